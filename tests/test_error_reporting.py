"""Errors that never hide a bug (issue 25): a storage failure is recognised from a system error code only, never
from words in a message or from the exception being handled when another was raised; a checkpoint is called
unreadable (delete it) only when it is proven damaged; a line of metrics.jsonl that is no record is reported and
kept."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxnets.fileio import StorageError, storage_errno, writing
from jaxnets.run_io import METRICS_FILE, RunLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _key_error_while_handling_a_missing_file(missing: Path) -> None:
    try:
        missing.read_bytes()
    except FileNotFoundError:
        {}["params"]  # a bug in the handler: a KeyError whose __context__ is the FileNotFoundError


def test_a_bug_raised_while_a_missing_file_is_handled_is_no_storage_error(tmp_path):
    with pytest.raises(KeyError, match="params") as raised, writing(tmp_path / "w.safetensors", "the final weights"):
        _key_error_while_handling_a_missing_file(tmp_path / "missing")
    assert isinstance(raised.value.__context__, FileNotFoundError)  # the implicit context is there, and ignored
    assert storage_errno(raised.value) is None


def test_words_are_no_evidence_and_codes_are():
    assert storage_errno(ValueError("no such key 'Permission denied' in the table")) is None
    assert storage_errno(RuntimeError("No space left on device")) is None
    with pytest.raises(ValueError, match="Permission denied"), writing("/tmp/x", "the final weights"):
        raise ValueError("cannot parse 'Permission denied'")
    # The real system's errors, raised here: as themselves and as the explicit cause of a library's error.
    with pytest.raises(StorageError, match=r"^could not write the final weights .*: no such file or directory$") as \
            raised, writing("/nonexistent-dir/w.safetensors", "the final weights"):
        Path("/nonexistent-dir/w.safetensors").write_bytes(b"")
    assert raised.value.errno == errno.ENOENT
    try:
        os.rmdir("/nonexistent-dir")
    except OSError as real:
        wrapped = RuntimeError("save failed")
        wrapped.__cause__ = real
        assert storage_errno(wrapped) == errno.ENOENT
        context_only = RuntimeError("save failed")
        context_only.__context__ = real
        assert storage_errno(context_only) is None


# Through a CLI: train.py writes the lock of its workdir first, inside ``writing``; the injected bug is raised there.
BUG_IN_WRITING = """
import os, sys
from jaxnets import locks
def holder_info():
    if sys.argv[1] == "key-error":
        try:
            open(os.path.join(sys.argv[2], "missing"))
        except FileNotFoundError:
            return {}["host"]
    raise ValueError("cannot parse 'Permission denied' in the host table")
locks.holder_info = holder_info
sys.path.insert(0, os.getcwd())
import train
sys.exit(train.main(["--model", "resnet18", "--steps", "1", "--workdir", sys.argv[2]]))
"""


@pytest.mark.parametrize("bug", ["key-error", "quoting-value-error"])
def test_a_bug_inside_a_write_keeps_its_traceback_at_the_command_line(tmp_path, bug):
    run = subprocess.run([sys.executable, "-c", BUG_IN_WRITING, bug, str(tmp_path / "run")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "JAXNETS_ALLOCATOR": "glibc"}, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "Traceback (most recent call last)" in run.stderr and "train.py: error" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == ("KeyError: 'host'" if bug == "key-error" else
                    "ValueError: cannot parse 'Permission denied' in the host table"), run.stderr


def test_a_line_of_metrics_jsonl_that_is_no_record_is_reported_once_and_kept_on_resume(tmp_path, capsys):
    path = tmp_path / METRICS_FILE
    records = [{"step": s, "epoch": s / 2, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    lines = [json.dumps(records[0]), json.dumps(records[1]), "{garbled by hand", json.dumps(records[2]),
             "\xff not utf-8", json.dumps(records[3]), '{"step": 5, "epoch": 2.5, "spl']  # the last cut short
    raw = [line.encode("latin-1") if line.startswith("\xff") else line.encode() for line in lines]
    path.write_bytes(b"\n".join(raw))  # no final newline: the run was killed while appending

    assert read_metrics(path) == records
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": not a metrics record")[0] for line in err] == [
        f"warning: {path}:{number}" for number in (3, 5, 7)]
    assert read_metrics(path) == records and capsys.readouterr().err == ""  # reported once

    RunLog(tmp_path, resume_step=2)  # a resume from step 2 drops the records of steps 3 and 4, nothing else
    assert path.read_bytes() == b"".join(line + b"\n" for line in raw[:3] + raw[4:5] + raw[6:])
    run = RunLog(tmp_path, resume_step=2)
    run.log(3, 1.5, "train", {"loss": 0.5})  # an append after a cut-short line stays a record of its own
    assert read_metrics(path) == [*records[:2], {"step": 3, "epoch": 1.5, "split": "train", "loss": 0.5}]


@pytest.mark.parametrize("failure", ["bug", "full disk"])
def test_a_bug_in_a_checkpoint_save_is_no_storage_error_and_keeps_the_partial_save(tmp_path, monkeypatch, failure):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxnets.checkpointing import PARTIAL_MARK, Checkpointer, CheckpointStorageError

    partial = tmp_path / f"1{PARTIAL_MARK}"

    def save(self, step, *args, **kwargs):
        partial.mkdir()  # what a save leaves until it completes
        if failure == "bug":
            _key_error_while_handling_a_missing_file(tmp_path / "missing")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(KeyError if failure == "bug" else CheckpointStorageError):
        checkpointer.save(1, {"w": jnp.zeros(3)}, {})
    checkpointer.close(quiet=True)
    assert partial.is_dir() == (failure == "bug")  # kept for a look at the bug; a full disk's space is freed
