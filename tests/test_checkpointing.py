"""Checkpoints that changed on disk are refused with the reason, never resumed from; a restore that fails for
another reason says what it is, without advice to delete a good checkpoint."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxnets.checkpointing import (
    DIGEST_KEY,
    PARTIAL_MARK,
    Checkpointer,
    CheckpointError,
    CheckpointMismatch,
    CheckpointStorageError,
)

STATE = {"w": jnp.linspace(-1.0, 1.0, 50_000, dtype=jnp.float32), "step": jnp.asarray(3, jnp.int32)}


def _saved(directory: Path, steps=(1, 2)) -> Checkpointer:
    checkpointer = Checkpointer(directory)
    for step in steps:
        checkpointer.save(step, STATE, {"config": {"model": "m"}})
    checkpointer.close()
    return Checkpointer(directory)


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_restore_is_exact_and_checks_the_digest(tmp_path):
    checkpointer = _saved(tmp_path)
    restored = checkpointer.restore(2, STATE)
    for name in STATE:
        np.testing.assert_array_equal(restored[name], STATE[name])
    assert DIGEST_KEY in checkpointer.read_meta(2)

    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta[DIGEST_KEY] ^= 1  # what a flipped bit in the arrays looks like to the check
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is unreadable \(its arrays changed on disk "
                                              r"\(CRC-32 [0-9a-f]{8}, saved [0-9a-f]{8}\)\); delete .*2 to resume "
                                              r"from step 1$"):
        checkpointer.restore(2, STATE)


def test_overwritten_array_bytes_are_refused(tmp_path):
    """The reviewer's case: 4 KiB of 0xff over the arrays' largest data file resumed without a word."""
    checkpointer = _saved(tmp_path)
    data = _largest_file(tmp_path / "2" / "state")
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = b"\xff" * min(4096, len(raw) - middle)
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is unreadable \(.+\); delete .* to resume "
                                              r"from step 1$"):
        checkpointer.restore(2, STATE)
    np.testing.assert_array_equal(checkpointer.restore(1, STATE)["w"], STATE["w"])  # the older one is intact


@pytest.mark.parametrize("damage", ["empty step directory", "state deleted", "meta garbled"])
def test_damaged_checkpoints_fail_with_one_line(tmp_path, damage):
    checkpointer = _saved(tmp_path, steps=(1,))
    if damage == "empty step directory":
        (tmp_path / "5").mkdir()
        step = 5
    elif damage == "state deleted":
        shutil.rmtree(tmp_path / "1" / "state")
        step = 1
    else:
        (tmp_path / "1" / "meta" / "metadata").write_text('{"config": ')
        step = 1
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(step, STATE)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"checkpoint step {step} in {tmp_path}")
    assert message.endswith("to resume from step 1" if step == 5 else "use another --workdir")


def test_the_best_checkpoint_and_its_metrics_survive_a_restart(tmp_path):
    """A resumed run reopens the manager: the metrics must be on disk, or the best is dropped at its next save."""
    first = Checkpointer(tmp_path, keep=2)
    for step, top1 in [(1, 0.9), (2, 0.5), (3, 0.4)]:
        first.save(step, STATE, {}, {"top1": top1})
    first.save(4, STATE, {})  # a stop: no evaluation
    first.close()
    resumed = Checkpointer(tmp_path, keep=2)
    assert {step: resumed.has_metrics(step) for step in resumed.manager.all_steps()} == {1: True, 3: True, 4: False}
    resumed.save(5, STATE, {}, {"top1": 0.3})
    resumed.close()
    assert Checkpointer(tmp_path, keep=2).manager.all_steps() == [1, 4, 5]  # the last two and the best


# --- a failed restore is reported as what it is (issue 25) ---------------------------------------------------------


def test_a_checkpoint_of_another_state_structure_is_a_mismatch_never_unreadable(tmp_path):
    checkpointer = _saved(tmp_path)
    for target, difference in [
        ({**STATE, "w": jnp.zeros(49_999, jnp.float32)}, "w has shape (50000,) there, (49999,) here"),
        ({**STATE, "ema": {"w": STATE["w"]}}, "ema/w only in this run"),
        ({"step": STATE["step"]}, "w only in the checkpoint"),
    ]:
        with pytest.raises(CheckpointMismatch) as error:
            checkpointer.restore(2, target)
        message = str(error.value)
        assert message.startswith(f"checkpoint step 2 in {tmp_path} holds another train state than this run's "
                                  f"({difference}): it was saved with other options or by another jaxnets version")
        assert "\n" not in message and "delete" not in message and "unreadable" not in message
    np.testing.assert_array_equal(checkpointer.restore(2, STATE)["w"], STATE["w"])  # intact all along


def _failing_state_restore(monkeypatch, error: BaseException) -> None:
    """Orbax's restore of the ``state`` item raises ``error``; the ``meta`` item reads as it is."""
    original = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        if "state" in kwargs["args"]:
            raise error
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


def test_out_of_memory_during_a_restore_is_raised_as_itself(tmp_path, monkeypatch):
    checkpointer = _saved(tmp_path)
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 200000 bytes.")
    _failing_state_restore(monkeypatch, oom)
    with pytest.raises(jax.errors.JaxRuntimeError) as error:
        checkpointer.restore(2, STATE)
    assert error.value is oom  # with its traceback; no advice to delete a good checkpoint


def test_an_io_error_during_a_restore_is_a_storage_error_without_delete_advice(tmp_path, monkeypatch):
    checkpointer = _saved(tmp_path)
    _failing_state_restore(monkeypatch, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(CheckpointStorageError) as error:
        checkpointer.restore(2, STATE)
    assert error.value.errno == errno.EIO
    assert str(error.value) == (f"could not read checkpoint step 2 in {tmp_path}: input/output error; the checkpoint "
                                f"itself may be intact: run the same command again when the storage is back")


def test_array_data_that_does_not_decode_is_unreadable(tmp_path):
    """TensorStore's own verdict on damaged bytes (here: the head of the compressed data overwritten)."""
    checkpointer = _saved(tmp_path)
    data = _largest_file(tmp_path / "2" / "state")
    data.write_bytes(b"\xff" * 16 + data.read_bytes()[16:])
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is unreadable \(FAILED_PRECONDITION: .+\); "
                                              r"delete .*2 to resume from step 1$"):
        checkpointer.restore(2, STATE)


# --- the best checkpoint's metric, and what killed saves left -----------------------------------------------------


def test_the_best_checkpoint_is_by_the_score_a_save_names_and_old_top1_records_still_count(tmp_path):
    first = Checkpointer(tmp_path, keep=1)
    first.save(1, STATE, {}, {"top1": 0.9})  # an older jaxnets' multi-label save: its mAP recorded as "top1"
    first.save(2, STATE, {}, {"map": 0.5, "f1": 0.4, "loss": 0.3})  # a multi-label evaluation's metrics
    first.close()
    resumed = Checkpointer(tmp_path, keep=1)
    assert resumed.manager.metrics(2) == {"map": 0.5}  # named for what it is
    resumed.save(3, STATE, {}, {"map": 0.95, "f1": 0.9, "loss": 0.1})
    resumed.save(4, STATE, {}, {"map": 0.2, "f1": 0.1, "loss": 0.9})
    resumed.close()
    assert Checkpointer(tmp_path, keep=1).manager.all_steps() == [3, 4]  # the last one and the best (0.95 > 0.9)


def test_orbax_removes_what_killed_saves_left_for_the_run_that_owns_the_directory(tmp_path):
    _saved(tmp_path, steps=(1,)).close()
    partial = tmp_path / f"2{PARTIAL_MARK}"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "data").write_bytes(b"half")
    assert Checkpointer(tmp_path).removed_partial == [] and partial.is_dir()  # a reader removes nothing
    owner = Checkpointer(tmp_path, clean_partial=True)
    assert owner.removed_partial == [partial.name] and owner.latest_step() == 1
    owner.save(2, STATE, {})
    owner.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
