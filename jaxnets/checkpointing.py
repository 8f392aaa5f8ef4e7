"""Orbax checkpoints of a training run: the last N and the best (by validation top-1, or mAP) kept.

A checkpoint holds the train state's arrays (step, params, BatchNorm statistics, optimizer state, RNG key)
and a JSON ``meta`` item with the resolved config. The data position is a function of the step, so
restoring the state restores the data order too. Saves are atomic (orbax writes to a temporary
directory and renames), so an interrupted save never replaces a good checkpoint; the temporary directory
a killed save leaves is removed by the next run. Orbax keeps no checksum of the arrays, so ``meta``
records a CRC-32 of the state and a restore checks it: a checkpoint whose bytes changed on disk is
refused, never resumed from. Saves are asynchronous: a write the storage refuses (a full disk, no
permission) surfaces at the next save or ``wait`` as a ``StorageError`` naming the checkpoint, the cause
and the last complete checkpoint, which stays as it was.

A restore that fails says what failed, and advises deleting the checkpoint only when it is proven damaged
(its digest, or its format: a metadata file missing or not JSON, array data that does not decode). A state of
another structure (other options, another jaxnets version) is a ``CheckpointMismatch``; a storage failure a
``CheckpointStorageError``; anything else (out of memory, a bug) is raised as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxnets.config import resume_keys
from jaxnets.errors import UserError, first_line
from jaxnets.fileio import StorageError, causes, storage_errno
from jaxnets.run_io import headline_metric, headline_score

DIGEST_KEY = "state_crc32"
# What makes a run resumable, recorded in each checkpoint's ``meta``: the settings a resumed run must share with
# it (the TrainConfig fields declared ``setting(resume=True)``; jaxnets.config says why each is), the steps per
# epoch (the step counts epochs and places the data), and the optimizer state's layout (2: --grad-clip outside the
# parameter groups).

RESUME_KEYS = resume_keys()
OPTIMIZER_LAYOUT = 2
# What orbax names a checkpoint being written (renamed to the step when complete): what a killed save leaves.
PARTIAL_MARK = ocp.utils.TMP_DIR_SUFFIX
CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoints, in its workdir
# TensorStore's verdicts (absl status codes, the start of its error messages) on array data that is not what was
# written: DATA_LOSS; NOT_FOUND (a file of the checkpoint is gone); OUT_OF_RANGE (a file cut short);
# FAILED_PRECONDITION (bytes that do not decode: "ZSTD_decompressStream() failed").
_DAMAGED_DATA = re.compile(r"^(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION): ")


class CheckpointError(UserError):
    """A checkpoint proven damaged (by its digest or its format); the message says to delete it."""


class CheckpointMismatch(UserError):
    """A checkpoint that holds another train state than this run's: saved with other options, or by another
    jaxnets version. Nothing is wrong with it: the message never says to delete it."""


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


class _AbandonedReadsFilter(logging.Filter):
    """A failed restore leaves orbax's other array reads to asyncio, which logs each with its traceback (hundreds
    of lines); the failure itself reaches the caller as an exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unhandled exception during asyncio.run() shutdown" not in record.getMessage()


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
        # Best by the headline score a save recorded: "top1", or (multi-label) "map"; a multi-label checkpoint
        # of an older jaxnets recorded its mAP as "top1", which this reads as well.
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=headline_metric, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes orbax write a save's metrics to disk: without it a reopened manager (a resumed
        # run) sees no metrics, and BestN then drops the best checkpoint at the next save. cleanup_tmp_directories:
        # orbax removes what killed saves left (in the background, awaited by the first save).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, best_fn=headline_metric,
                                               best_mode="max", cleanup_tmp_directories=clean_partial)
        self.directory = Path(directory).absolute()
        self.removed_partial = _partial_saves(self.directory) if clean_partial else []  # what orbax removes
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
        with self._reading(step, "meta"):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise self._unreadable(step, f"its meta item is a JSON {type(meta).__name__}, not an object")
        return dict(meta)

    def restore(self, step: int, target: Any) -> Any:
        """The ``state`` item of ``step``, with ``target``'s structure, shapes, dtypes and shardings,
        checked against the digest saved with it."""
        expected = self.read_meta(step).get(DIGEST_KEY)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        with self._reading(step, "state", target):
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = restored["state"]
        if expected is not None and (actual := state_digest(state)) not in (None, expected):
            raise self._unreadable(step, f"its arrays changed on disk (CRC-32 {actual:08x}, saved {expected:08x})")
        return state

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> bool:
        """Save unless ``step`` is already saved (a resumed run that has nothing left to do); asynchronous:
        a failure of the previous save surfaces here, of this one at the next save or ``wait``. ``metrics``:
        the evaluation's (None for a save between evaluations); the checkpoint records its headline score under
        its own name (``run_io.headline_score``: top-1, or mAP), which picks the best checkpoint."""
        if step in self.manager.all_steps():
            return False
        self.wait()
        digest = state_digest(state)
        meta = meta if digest is None else {**meta, DIGEST_KEY: digest}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        recorded = None if metrics is None else dict([headline_score(metrics)])
        self._in_flight = step
        with self._writing(step), _quiet_about_missing_metrics():  # a save between evaluations has no metrics
            return self.manager.save(step, args=args, metrics=recorded, force=True)

    def _unreadable(self, step: int, reason: Any) -> CheckpointError:
        """A one-line error naming the checkpoint, why it is damaged, and what to do (resume from an older one)."""
        if isinstance(reason, BaseException):
            reason = first_line(reason)
        older = [s for s in self.manager.all_steps() if s < step]
        remedy = (f"delete {self.directory / str(step)} to resume from step {max(older)}" if older
                  else "use another --workdir")
        return CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); {remedy}")

    @contextlib.contextmanager
    def _reading(self, step: int, item: str, target: Any = None) -> Iterator[None]:
        """A failed read of ``item`` of ``step`` as what it is: a ``CheckpointError`` (delete it) only when the
        checkpoint is proven damaged; a ``CheckpointMismatch`` when it holds a state of another structure than
        ``target``; a ``CheckpointStorageError`` when the storage failed (the checkpoint may be intact); any other
        error (out of memory, a bug) as it is, with its traceback."""
        quiet = _AbandonedReadsFilter()
        logging.getLogger("asyncio").addFilter(quiet)
        try:
            yield
        except UserError:
            raise
        except Exception as error:
            if (damage := self._damage(step, item, error)) is not None:
                raise self._unreadable(step, damage) from error
            if target is not None and (difference := self._difference(step, target)) is not None:
                raise CheckpointMismatch(
                    f"checkpoint step {step} in {self.directory} holds another train state than this run's "
                    f"({difference}): it was saved with other options or by another jaxnets version; resume it "
                    f"with those, or use another --workdir") from error
            if (code := storage_errno(error)) is not None:
                raise CheckpointStorageError(
                    f"could not read checkpoint step {step} in {self.directory}: {os.strerror(code).lower()}; the "
                    f"checkpoint itself may be intact: run the same command again when the storage is back",
                    code) from error
            raise
        finally:
            logging.getLogger("asyncio").removeFilter(quiet)

    def _damage(self, step: int, item: str, error: BaseException) -> str | None:
        """Why ``error`` (reading ``item`` of ``step``) proves the checkpoint damaged, None when it does not: the
        item is missing, or its format says so (a metadata file gone or not JSON, array data TensorStore cannot
        decode). Out of memory, a failing disk, another structure or a bug prove nothing about the checkpoint."""
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():  # gone as a whole (the workdir deleted meanwhile): nothing left to judge
            return None
        if not (step_dir / item).is_dir():
            return f"its {item} is missing"
        for link in causes(error):
            if isinstance(link, json.JSONDecodeError):
                return f"a metadata file of its {item} is not JSON: {link}"
            if isinstance(link, FileNotFoundError):
                return f"a file of its {item} is missing: {first_line(link)}"
            if isinstance(link, ValueError) and _DAMAGED_DATA.match(str(link)):
                return first_line(link)
        return None

    def _difference(self, step: int, target: Any) -> str | None:
        """How the state saved at ``step`` differs from ``target`` in its arrays' names and shapes (the first
        differences, in words), None when it does not or its metadata cannot tell."""
        try:
            saved = _shapes(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree)
        except Exception:  # no metadata to compare: the failure is diagnosed otherwise
            return None
        wanted = _shapes(target)
        differences = [f"{name} only in the checkpoint" for name in saved if name not in wanted]
        differences += [f"{name} only in this run" for name in wanted if name not in saved]
        differences += [f"{name} has shape {saved[name]} there, {wanted[name]} here" for name in wanted
                        if name in saved and saved[name] != wanted[name]]
        if not differences:
            return None
        more = f" and {len(differences) - 3} more difference(s)" if len(differences) > 3 else ""
        return "; ".join(differences[:3]) + more

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
        """A storage failure of the block (``fileio.storage_errno``: orbax/TensorStore errors quote the system's
        code) as one ``StorageError`` naming the checkpoint, the cause and the last complete checkpoint; anything
        else is a bug, kept as it is (and so is the partial save, for a look at it)."""
        try:
            yield
        except Exception as error:
            code = storage_errno(error)
            if code is None:
                raise
            self._in_flight = None
            what = f"checkpoint step {step} to {self.directory}" if step is not None else f"to {self.directory}"
            if step is not None:
                # Frees the space it took (it is never picked anyway). By hand: orbax's cleanup_tmp_directories
                # runs only when a manager is created, and the run may go on (or another save may) before that.
                _remove_partial_save(self.directory, step)
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


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/fc/kernel": (512, 10), ...}``: the arrays of a state, or of orbax's metadata of one (which
    stores a named tuple's fields as dict keys: names compare the same either way)."""
    def name(path: tuple) -> str:
        return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)

    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _complete_steps(directory: Path) -> list[int]:
    """The steps of the finished checkpoints in ``directory`` (orbax renames a save to its step when done)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) \
        if directory.is_dir() else []


def _partial_saves(directory: Path) -> list[str]:
    """The names of what saves that never completed left in ``directory``, sorted: orbax's temporary directories
    (by orbax's own rule for local files: the mark in the name, a directory, not a link)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if PARTIAL_MARK in p.name and p.is_dir() and not p.is_symlink())


def _remove_partial_save(directory: Path, step: int) -> None:
    """Remove what the failed save of ``step`` left."""
    for name in _partial_saves(directory):
        if name.startswith(f"{step}{PARTIAL_MARK}"):
            shutil.rmtree(directory / name, ignore_errors=True)
