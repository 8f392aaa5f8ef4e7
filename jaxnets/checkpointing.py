"""Orbax checkpoints of a training run: the last N and the best (by validation top-1) kept.

A checkpoint holds the train state's arrays (step, params, BatchNorm statistics, optimizer state, RNG key)
and a JSON ``meta`` item with the resolved config. The data position is a function of the step, so
restoring the state restores the data order too. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never replaces a good checkpoint; the temporary directory
a killed save leaves is removed by the next run. Orbax keeps no checksum of the arrays, so ``meta``
records a CRC-32 of the state and a restore checks it: a checkpoint whose bytes changed on disk is
refused, never resumed from. Saves are asynchronous: a write the storage refuses (a full disk, no
permission) surfaces at the next save or ``wait`` as a ``StorageError`` naming the checkpoint, the cause
and the last complete checkpoint, which stays as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxnets.errors import UserError, first_line
from jaxnets.fileio import StorageError, storage_errno

BEST_METRIC = "top1"
DIGEST_KEY = "state_crc32"
# What makes a run resumable, recorded in each checkpoint's ``meta``: the settings a resumed run must share with
# it (anything else changes what a step means: the model, the data, how it is batched; or the optimizer state's
# structure: which parameters train, how their updates are transformed), the steps per epoch (the step counts
# epochs and places the data), and the optimizer state's layout (2: --grad-clip outside the parameter groups).
# The modern-recipe settings are among them: --model-ema adds the average to the state; --grad-accum-steps sets the
# images per update (the step counts updates); --multi-label changes the labels and the loss; --mixup-alpha,
# --cutmix-alpha and the augmentation policy (--auto-augment, --ra-magnitude, --random-erase) are drawn per step and
# per example from the seed, so a run resumed with others would not continue the one it resumes. --in-chans shapes
# the stem and the data.
RESUME_KEYS = ("model", "dataset", "classes", "image_size", "batch_size", "seed", "no_aux", "num_classes",
               "val_fraction", "optimizer", "grad_clip", "freeze", "backbone_lr_mult", "layer_decay",
               "model_ema", "grad_accum_steps", "multi_label", "mixup_alpha", "cutmix_alpha", "auto_augment",
               "ra_magnitude", "random_erase", "in_chans")
OPTIMIZER_LAYOUT = 2
# What orbax names a checkpoint being written (renamed to the step when complete): what a killed save leaves.
PARTIAL_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(UserError):
    """A checkpoint that cannot be read back as it was written."""


class CheckpointStorageError(StorageError):
    """A checkpoint the storage refused; the message says which complete checkpoint a run resumes from."""


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


class _BackgroundFailureFilter(logging.Filter):
    """Orbax logs a failed asynchronous save from each of its threads, with tracebacks (300 lines for a full
    disk); the failure reaches the caller as an exception, which ``Checkpointer`` reports once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info is not None and "orbax" in record.pathname)


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

    def __init__(self, directory: str | Path, keep: int = 3, *, clean_partial: bool = False):
        """``clean_partial``: remove what killed saves left (only the run that owns the directory may)."""
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes orbax write a save's metrics to disk: without it a reopened manager (a resumed
        # run) sees no metrics, and BestN then drops the best checkpoint at the next save.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max")
        self.directory = Path(directory).absolute()
        self.removed_partial = remove_partial_checkpoints(self.directory) if clean_partial else []
        self._in_flight: int | None = None  # the step whose asynchronous save may not have landed yet
        self._closed = False
        self._quiet = _BackgroundFailureFilter()
        logging.getLogger("absl").addFilter(self._quiet)
        with self._writing(None):
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
        """Save unless ``step`` is already saved (a resumed run that has nothing left to do); asynchronous:
        a failure of the previous save surfaces here, of this one at the next save or ``wait``."""
        if step in self.manager.all_steps():
            return False
        self.wait()
        digest = state_digest(state)
        meta = meta if digest is None else {**meta, DIGEST_KEY: digest}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._in_flight = step
        with self._writing(step), _quiet_about_missing_metrics():  # a save between evaluations has no metrics
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
        """Block until the last save has landed on disk; its failure as a ``StorageError``."""
        with self._writing(self._in_flight):
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self, *, quiet: bool = False) -> None:
        """Wait for asynchronous saves to land on disk (``quiet``: while another error is on its way out, a
        failed save is not reported over it; the partial checkpoint is still never picked)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
        finally:
            with contextlib.suppress(Exception):  # after a failed save orbax re-raises it here
                self.manager.close()
            logging.getLogger("absl").removeFilter(self._quiet)

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """A storage failure of the block (orbax/TensorStore errors quote the system's) as one ``StorageError``
        naming the checkpoint, the cause and the last complete checkpoint; anything else is a bug, kept."""
        try:
            yield
        except Exception as error:
            code = storage_errno(error)
            if code is None:
                raise
            self._in_flight = None
            what = f"checkpoint step {step} to {self.directory}" if step is not None else f"to {self.directory}"
            if step is not None:
                remove_partial_checkpoints(self.directory, step)  # frees the space it took; never picked anyway
            raise CheckpointStorageError(f"could not write {what}: {os.strerror(code).lower()}; "
                                         f"{self.last_complete(step)}", code) from error

    def last_complete(self, failed: int | None = None) -> str:
        """Which checkpoint a run resumes from (not ``failed``), in words for an error message."""
        with contextlib.suppress(Exception):
            self.manager.reload()
        steps = [s for s in _complete_steps(self.directory) if s != failed]
        if not steps:
            return "no checkpoint of this run is complete"
        return (f"the last complete checkpoint is step {max(steps)}, kept as it was: run the same command to "
                f"resume from it")


def _complete_steps(directory: Path) -> list[int]:
    """The steps of the finished checkpoints in ``directory`` (orbax renames a save to its step when done)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) \
        if directory.is_dir() else []


def remove_partial_checkpoints(directory: str | Path, step: int | None = None) -> list[str]:
    """Remove the temporary directories of saves that never completed (of ``step`` only, if given): what a
    run killed while saving leaves. Their names, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    prefix = "" if step is None else f"{step}{PARTIAL_MARK}"
    removed = sorted(p.name for p in directory.iterdir() if PARTIAL_MARK in p.name and p.name.startswith(prefix))
    for name in removed:
        shutil.rmtree(directory / name, ignore_errors=True)
    return removed
