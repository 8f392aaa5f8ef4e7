"""Checkpoints that changed on disk are refused with the reason, never resumed from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets.checkpointing import DIGEST_KEY, Checkpointer, CheckpointError

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
