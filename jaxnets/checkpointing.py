"""Orbax checkpoints of a training run: the last N and the best (by validation top-1) kept.

A checkpoint holds the train state's arrays (step, params, BatchNorm statistics, optimizer state, RNG key)
and a JSON ``meta`` item with the resolved config. The data position is a function of the step, so
restoring the state restores the data order too. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never replaces a good checkpoint. Orbax keeps no
checksum of the arrays, so ``meta`` records a CRC-32 of the state and a restore checks it: a
checkpoint whose bytes changed on disk is refused, never resumed from.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxnets.errors import UserError, first_line

BEST_METRIC = "top1"
DIGEST_KEY = "state_crc32"
# What makes a run resumable, recorded in each checkpoint's ``meta``: the settings a resumed run must share with
# it (anything else changes what a step means: the model, the data, how it is batched; or the optimizer state's
# structure: which parameters train, how their updates are transformed), the steps per epoch (the step counts
# epochs and places the data), and the optimizer state's layout (2: --grad-clip outside the parameter groups).
RESUME_KEYS = ("model", "dataset", "classes", "image_size", "batch_size", "seed", "no_aux", "num_classes",
               "val_fraction", "optimizer", "grad_clip", "freeze", "backbone_lr_mult", "layer_decay")
OPTIMIZER_LAYOUT = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be read back as it was written."""


def state_digest(state: Any) -> int | None:
    """CRC-32 over every array of ``state`` (tree order, raw bytes), or None when an array is not whole
    in this process (sharded across processes: no process could check it alone)."""
    crc = 0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).view(np.uint8), crc)
    return crc


def resume_record(config: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The ``meta`` a checkpoint of the run with resolved settings ``config`` (as JSON) is saved with."""
    return {"config": config, "steps_per_epoch": steps_per_epoch, "optimizer_layout": OPTIMIZER_LAYOUT}


def resume_problem(saved: dict[str, Any], current: dict[str, Any], *, layout_matters: bool) -> str | None:
    """Why a checkpoint saved with ``meta`` ``saved`` cannot be resumed by the run whose ``resume_record`` is
    ``current`` (None when it can). ``layout_matters``: this run's optimizer state has a layout that changed
    (--grad-clip with parameter groups); a checkpoint that predates the layout record has the old one."""
    saved_config, config = saved.get("config", {}), current["config"]
    for key in RESUME_KEYS:
        if key in saved_config and saved_config[key] != config[key]:
            return f"{key}={saved_config[key]!r} (this run: {config[key]!r})"
    saved_steps, steps = saved.get("steps_per_epoch", current["steps_per_epoch"]), current["steps_per_epoch"]
    if saved_steps != steps:
        return (f"{saved_steps} steps per epoch (this run: {steps}; the dataset, or the number of processes "
                f"sharing it, changed)")
    if layout_matters and saved.get("optimizer_layout", 1) != current["optimizer_layout"]:
        return ("its optimizer state has an older jaxnets' layout (whose --grad-clip clipped each learning-rate "
                "group on its own)")
    return None


class _MissingMetricsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


@contextlib.contextmanager
def _quiet_about_missing_metrics() -> Iterator[None]:
    """Without orbax's warning (through absl's logger) on each save that has no metrics."""
    logger, quiet = logging.getLogger("absl"), _MissingMetricsFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Checkpointer:
    """``CheckpointManager`` with two items, ``state`` (a pytree of arrays) and ``meta`` (JSON)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes orbax write a save's metrics to disk: without it a reopened manager (a resumed
        # run) sees no metrics, and BestN then drops the best checkpoint at the next save.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has_metrics(self, step: int) -> bool:
        """Whether ``step`` was saved with validation metrics (an end-of-epoch save, not a stop)."""
        return bool(self.manager.metrics(step))

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except Exception as error:  # orbax raises KeyError, JSONDecodeError, bare Exception...
            raise self._unreadable(step, error) from error

    def restore(self, step: int, target: Any) -> Any:
        """The ``state`` item of ``step``, with ``target``'s structure, shapes, dtypes and shardings,
        checked against the digest saved with it."""
        expected = self.read_meta(step).get(DIGEST_KEY)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as error:
            raise self._unreadable(step, error) from error
        state = restored["state"]
        if expected is not None and (actual := state_digest(state)) not in (None, expected):
            raise self._unreadable(step, f"its arrays changed on disk (CRC-32 {actual:08x}, saved {expected:08x})")
        return state

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> bool:
        """Save unless ``step`` is already saved (a resumed run that has nothing left to do)."""
        if step in self.manager.all_steps():
            return False
        digest = state_digest(state)
        meta = meta if digest is None else {**meta, DIGEST_KEY: digest}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with _quiet_about_missing_metrics():  # a save between evaluations has none, by design
            return self.manager.save(step, args=args, metrics=metrics, force=True)

    def _unreadable(self, step: int, reason: Any) -> CheckpointError:
        """A one-line error naming the checkpoint, why, and what to do (resume from an older one)."""
        if isinstance(reason, BaseException):
            reason = first_line(reason)
        older = [s for s in self.manager.all_steps() if s < step]
        remedy = (f"delete {self.directory / str(step)} to resume from step {max(older)}" if older
                  else "use another --workdir")
        return CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); {remedy}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for asynchronous saves to land on disk."""
        self.manager.wait_until_finished()
        self.manager.close()
