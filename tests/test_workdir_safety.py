"""A workdir has one run at a time, storage failures are one line that lose nothing, and a run killed at any
moment resumes to the very result of an uninterrupted one (issue 14)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from jaxnets import create_model, locks, save_weights, trees
from jaxnets.checkpointing import PARTIAL_MARK
from jaxnets.cli import convert
from jaxnets.cli import predict as predict_cli
from jaxnets.fileio import storage_errno
from jaxnets.weights import fileformat, load_weights
from jaxnets.weights.cache import cache_writer
from jaxnets.weights.pretrained import cached_weights_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

RUN = ["--model", "resnet18", "--epochs", "1", "--batch-size", "8", "--log-every", "1", "--no-progress"]
HOLD = """
import sys, time
from jaxnets import create_model, locks, predict, save_weights, trees
from jaxnets.weights.cache import cache_writer
with (locks.hold(sys.argv[1]) if sys.argv[2] == "workdir" else cache_writer(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""
KILL_DURING_SAVE = """
import os, signal, sys
from jaxnets import checkpointing
original = checkpointing.Checkpointer.save
def save(self, step, *args, **kwargs):
    saved = original(self, step, *args, **kwargs)
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the asynchronous write has started and not landed
    return saved
checkpointing.Checkpointer.save = save
sys.path.insert(0, os.getcwd())
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One compilation cache for the module: its runs are one program (resnet18 on the digits, batch 8), so only
    the first run compiles (the interruptions and full disks under test come after the compilation)."""
    return tmp_path_factory.mktemp("compile_cache")


def _train(capsys, workdir: Path, cache: Path, *extra: str) -> tuple[int, str, str]:
    status = train.main([*RUN, "--workdir", str(workdir), "--compile-cache", str(cache), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("train.py")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def _holder(path: Path, kind: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_held_workdir_is_refused_at_once_and_a_killed_holder_blocks_nothing(capsys, tmp_path, cache):
    workdir = tmp_path / "run"
    holder = _holder(workdir, "workdir")
    try:
        start = time.monotonic()
        status, _, err = _train(capsys, workdir, cache, "--steps", "1")
        elapsed = time.monotonic() - start
        line = _one_error_line(err)
        assert status == 1 and elapsed < 10, elapsed
        assert (f"--workdir {workdir} is in use by another process (host {socket.gethostname()}, pid {holder.pid}, "
                f"started ") in line and line.endswith("wait for it to end or use another --workdir")
        assert sorted(p.name for p in workdir.iterdir()) == [locks.LOCK_FILE]  # nothing read or written
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait()
    with locks.hold(workdir) as path:  # the kernel released the dead holder's lock
        assert path == workdir / locks.LOCK_FILE
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_weights_cache_has_one_writer_and_readers_are_never_blocked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "home"))
    entry = cached_weights_path("resnet18")
    holder = _holder(entry, "cache")
    try:
        source = tmp_path / "resnet18.safetensors"
        fileformat.write_safetensors(source, {"fc.bias": np.zeros(3, np.float32)}, {})
        assert convert.main(["resnet18", "--from", str(source), "--out", str(entry)], prog="convert_weights.py") == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"convert_weights.py: error: the weights cache entry {entry} is in use by another "
                              f"process (host {socket.gethostname()}, pid {holder.pid}") and "\n" not in err
        assert not entry.exists()
        # A first use waits for the other writer (here it never ends: the wait times out with the same line).
        with pytest.raises(locks.DirectoryInUse, match="the weights cache entry .* is in use"), \
                cache_writer(entry, wait=1.0):
            pass
        # predict (a reader) runs on a weights file in the cache while its writer holds the lock.
        model = create_model("resnet18", num_classes=3)
        weights = save_weights(entry.parent / "mine.safetensors", "resnet18",
                               model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
        with cache_writer(weights, wait=0):
            pass  # another entry's lock is free
        image = tmp_path / "image.png"
        Image.new("RGB", (40, 40), (90, 120, 30)).save(image)
        assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), str(image)]) == 0
    finally:
        holder.kill()
        holder.wait()


def test_injected_full_disk_in_a_checkpoint_and_in_the_final_weights_loses_nothing(capsys, tmp_path, monkeypatch,
                                                                                    cache):
    workdir = tmp_path / "run"
    args = ("--steps", "4", "--checkpoint-every", "2")
    original_save = ocp.CheckpointManager.save

    def full_at_step_4(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save(self, step, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", full_at_step_4)
        status, _, err = _train(capsys, workdir, cache, *args)
    assert status == 1
    assert _one_error_line(err) == (f"train.py: error: could not write checkpoint step 4 to {workdir}/checkpoints: no "
                                    f"space left on device; the last complete checkpoint is step 2, kept as it was: "
                                    f"run the same command to resume from it")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(fileformat, "save_file", full_disk)
        status, out, err = _train(capsys, workdir, cache, *args)
    assert status == 1 and "resumed from step 2" in out
    assert _one_error_line(err) == (f"train.py: error: could not write {workdir}/final_weights.safetensors: no space "
                                    f"left on device; the last complete checkpoint is step 4, kept as it was: run "
                                    f"the same command to resume from it")
    assert not list(workdir.glob("*final_weights*"))  # no half-written file, no temporary left

    status, out, _ = _train(capsys, workdir, cache, *args)
    assert status == 0 and "resumed from step 4" in out
    assert load_weights(workdir / "final_weights.safetensors").metadata["step"] == 4


def test_storage_errors_are_recognized_in_the_forms_libraries_give_them():
    assert storage_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "/x/": Failed '
                             "to write 914457 bytes to file 11: No space left on device [os_error_code='28']")
    assert storage_errno(tensorstore) == errno.ENOSPC
    safetensors = RuntimeError('Error while serializing: IoError(Os { code: 13, kind: PermissionDenied, message: '
                               '"Permission denied" })')  # an older safetensors
    assert storage_errno(safetensors) == errno.EACCES
    safetensors = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_errno(safetensors) == errno.ENOSPC
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert storage_errno(wrapped) == errno.EIO
    assert storage_errno(KeyError("params")) is None  # a bug, never shortened to a storage error


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MB tmpfs (one ResNet-18 checkpoint is ~90 MB), mounted by the test: needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected ENOSPC test covers the logic")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_and_a_read_only_workdir_lose_no_checkpoint(capsys, tmp_path, small_disk, cache):
    workdir = small_disk / "run"
    assert _train(capsys, workdir, cache, "--steps", "2", "--checkpoint-every", "2")[0] == 0
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave 20 MB: enough for logs, not for a checkpoint
        f.truncate(0)
        f.write(np.random.default_rng(0).bytes(free - 20 * 2**20))

    status, out, err = _train(capsys, workdir, cache, "--steps", "4", "--checkpoint-every", "2")
    assert status == 1 and "resumed from step 2" in out
    line = _one_error_line(err)
    # The checkpoint is written in the background: the full disk refuses it, or a log or plot written meanwhile
    # (then the checkpoint's own failure is reported if it came first). Either way: the cause and step 2.
    assert line.startswith("train.py: error: could not write ") and ": no space left on device; the last complete " \
        "checkpoint is step 2, kept as it was" in line, line
    assert f"checkpoint step 4 to {workdir}/checkpoints" in line or str(workdir) in line, line
    assert not list((workdir / "checkpoints").glob(f"*{PARTIAL_MARK}*"))  # the partial save's space is freed

    filler.unlink()
    status, out, _ = _train(capsys, workdir, cache, "--steps", "4", "--checkpoint-every", "2")
    assert status == 0 and "resumed from step 2" in out
    assert load_weights(workdir / "final_weights.safetensors").metadata["step"] == 4

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    status, _, err = _train(capsys, workdir, cache, "--steps", "6", "--checkpoint-every", "2")
    assert status == 1
    assert _one_error_line(err) == (f"train.py: error: could not write the lock of --workdir {workdir}/"
                                    f"{locks.LOCK_FILE}: read-only file system")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def _command(workdir: Path, cache: Path) -> list[str]:
    return [*RUN, "--steps", "12", "--checkpoint-every", "3", "--workdir", str(workdir), "--compile-cache", str(cache)]


def _start(args: list[str], script: str | None = None, **env: str) -> subprocess.Popen:
    argv = [sys.executable, "-c", script, *args] if script else [sys.executable, "train.py", *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAXNETS_ALLOCATOR": "glibc", **env})


def _wait_for(process: subprocess.Popen, *texts: str) -> str:
    """The first of ``texts`` the run prints."""
    for line in process.stdout:
        for text in texts:
            if text in line:
                return text
    raise AssertionError(f"the run ended (status {process.wait()}) before printing any of {texts!r}")


def _outcome(workdir: Path) -> tuple[dict, list]:
    """The final variables and every logged record but timings: what an uninterrupted run produces."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_sec", None)
    return trees.flatten(load_weights(workdir / "final_weights.safetensors").variables), records


@pytest.mark.xdist_group("sigkill")
def test_sigkill_at_any_moment_resumes_bit_identical_to_an_uninterrupted_run(tmp_path, cache):
    reference = _start(_command(tmp_path / "reference", cache))
    _wait_for(reference, "resnet18 (")  # training starts
    started = time.monotonic()
    assert reference.wait() == 0
    window = time.monotonic() - started  # from the first step to the end of the run, checkpoints included

    workdir = tmp_path / "killed"
    # Killed while its step-6 checkpoint is being written.
    killed = _start(_command(workdir, cache), KILL_DURING_SAVE, KILL_AT_STEP="6")
    assert killed.wait() == -signal.SIGKILL
    assert list((workdir / "checkpoints").glob(f"6{PARTIAL_MARK}*")), "the kill came after the save had landed"
    # Then killed at a random moment of what is left of the run.
    for fraction in np.random.default_rng(14).uniform(0.0, 1.0, 1):
        run = _start(_command(workdir, cache))
        if _wait_for(run, "resnet18 (", "this run is complete") != "resnet18 (":
            assert run.wait() == 0
            break  # the last kill came after the run had finished
        time.sleep(fraction * window)
        run.kill()
        run.wait()
    finished = _start(_command(workdir, cache))
    out = finished.communicate()[0]
    assert finished.returncode == 0, out
    assert any(said in out for said in ("incomplete checkpoint(s) left by an interrupted save", "resumed from step",
                                        "this run is complete")), out

    expected_variables, expected_records = _outcome(tmp_path / "reference")
    variables, records = _outcome(workdir)
    assert records == expected_records
    assert variables.keys() == expected_variables.keys()
    for key, value in expected_variables.items():
        np.testing.assert_array_equal(variables[key], value, err_msg=key)
    assert not list((workdir / "checkpoints").glob(f"*{PARTIAL_MARK}*"))
