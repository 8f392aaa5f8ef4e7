"""What every run (training, the linear probe) does before its work: processes and the compilation cache started,
the config resolved, the device mesh, this process's data, and the model with its initial variables."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets import host, locks, parallel
from jaxnets.config import TrainConfig, fit_batch_size, resolve
from jaxnets.data import Dataset, load_dataset
from jaxnets.data.config import TooFewExamples
from jaxnets.errors import UserError
from jaxnets.fileio import write_text
from jaxnets.train_step import init_variables

PyTree = Any
SHARED_CHECK_FILE = ".jaxnets.shared"  # process 0's token, which every process reads back (check_shared_workdir)


def start(config: TrainConfig) -> TrainConfig:
    """Processes and compilation cache started, the config resolved: all a run needs before it takes its
    workdir. Idempotent (a resolved config resolves to itself)."""
    parallel.initialize(config.coordinator, config.num_processes, config.process_id, config.local_devices,
                        config.distributed)
    host.setup_compilation_cache(config.compile_cache)
    return resolve(config)


class Start:
    """A run's start in its workdir (``owned_workdir``): until ``done``, a failure removes what the run created."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> None:
        """The start is over (training begins, the probe has its results): what is in the workdir now stays."""
        self.finished = True


@contextlib.contextmanager
def owned_workdir(workdir: Path, *, enabled: bool = True) -> Iterator[Start]:
    """The run's ``workdir`` held for the block (``locks.hold``; ``enabled=False``: the processes other than 0
    take and create nothing). A start that fails (an unknown dataset, ``--pretrained`` offline, Ctrl-C) leaves
    nothing it created: the entries new in the workdir, then its lock file, the workdir and the folders above it
    that did not exist before, each folder only if empty. What existed before (a resumed run's files, a user's
    folder) is never touched; what a run writes once ``Start.done`` stays, whatever follows.

    Several processes: each enters at the same point, and a lock refused to process 0 stops every process with its
    line (``parallel.raise_together``), none left waiting in a collective; then every process proves it sees the
    workdir process 0 holds (``check_shared_workdir``)."""
    opening = Start()
    if not enabled:
        parallel.raise_together(None)  # process 0's lock: taken, or refused there and so here
        check_shared_workdir(workdir)
        yield opening
        return
    # Before the lock, which creates them: the folders and the lock file a failed start removes again.
    new_folders = [folder for folder in (workdir, *workdir.parents) if not folder.exists()]
    new_lock = not (workdir / locks.LOCK_FILE).exists()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locks.hold(workdir))
        except BaseException as error:
            parallel.raise_together(error)
            raise
        parallel.raise_together(None)
        before = {entry.name for entry in workdir.iterdir()}  # under the lock: nobody else writes here now
        try:
            check_shared_workdir(workdir)
            yield opening
        except BaseException:
            if not opening.finished:
                with contextlib.suppress(OSError):  # best effort: the error that failed the start is the one to tell
                    _remove_new(workdir, before, new_lock, new_folders)
            raise


def check_shared_workdir(workdir: Path) -> None:
    """A run of several processes needs one workdir that all of them see (a checkpoint is written by all processes
    together, and each reads which step to resume from): process 0 writes a random token into it, every process
    reads it back at the path it was given. One that does not see it stops every process with one line naming its
    host and the path it sees. Collective; a no-op for a single process."""
    if jax.process_count() == 1:
        return
    path = workdir / SHARED_CHECK_FILE
    token, problem = secrets.token_hex(16), None
    if parallel.is_main_process():
        try:
            write_text(path, token)
        except OSError as error:  # StorageError (a UserError) included
            problem = error
    parallel.raise_together(problem)
    token = parallel.share_text(token)[0]  # process 0's, on every process
    try:
        seen = path.read_text(encoding="utf-8") if path.is_file() else None
    except OSError:
        seen = None
    if seen != token:
        what = "no such directory" if not workdir.is_dir() else ("a different directory: not the file process 0 "
                                                                  "wrote" if seen is None else "an older token")
        problem = UserError(f"--workdir {workdir} is not shared: process {jax.process_index()} on host "
                            f"{parallel.host_name()} sees {what} there; every process of a run must see the same "
                            "directory (a filesystem all hosts mount)")
    parallel.raise_together(problem)
    if parallel.is_main_process():
        path.unlink(missing_ok=True)


def _remove_new(workdir: Path, before: set[str], new_lock: bool, folders: list[Path]) -> None:
    """What a failed start created: ``workdir``'s entries not in ``before``; the lock file when it was new (removed
    while held: a writer waiting on it opens it again, ``locks.hold``); then the ``folders``, innermost first, each
    only if empty."""
    for entry in workdir.iterdir():
        if entry.name not in before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    if new_lock:
        (workdir / locks.LOCK_FILE).unlink(missing_ok=True)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or not removable): kept, and so is every folder above it
            return


def batch_fits_data(config: TrainConfig) -> bool:
    """Whether the batch of ``config`` (as given, before ``resolve``) may shrink to fit a dataset smaller than one
    batch (``setup``'s ``fit_batch``): a default one does, for training and the linear probe alike; one the user
    gave is kept, and the error names the value that fits."""
    return config.batch_size is None


def setup(config: TrainConfig, *, fit_batch: bool = False) -> tuple[TrainConfig, Any, Dataset]:
    """``start``, then the device mesh and this process's data; ``fit_batch`` (``batch_fits_data``): the batch size
    was a default, lowered to fit a dataset smaller than one batch (``fit_batch_size``, which adds the log line
    saying so to the dataset's notes)."""
    config = start(config)
    mesh = parallel.make_mesh(config.devices)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "--eval-batch-size")
    # The workdir caches a folder's scan: a resumed run, and every process but the first, skip it.
    load = functools.partial(load_dataset, index_dir=Path(config.workdir).absolute())
    try:
        dataset = load(config.data_config(), jax.process_index(), jax.process_count())
    except TooFewExamples as too_few:
        config, note = fit_batch_size(config, too_few, mesh.devices.size, given=not fit_batch)
        dataset = load(config.data_config(), jax.process_index(), jax.process_count())
        dataset.notes.append(note)
    return dataclasses.replace(config, num_classes=dataset.num_classes), mesh, dataset


def build_model(config: TrainConfig, num_classes: int, mesh: Any) -> tuple[nn.Module, PyTree, str | None]:
    """The model and its initial variables, replicated on ``mesh``: fresh, or ``--pretrained`` with the
    classifier (GoogLeNet: and its aux heads) freshly initialized for the new task, whatever its number of
    classes. The third value says which pretrained weights were loaded and which layers were re-initialized."""
    from jaxnets.weights import describe_weights, for_new_task, resolve_weights

    # The options the settings declare (setting(model=...)), each only where it differs from its default.
    options = config.model_options()
    dtype = jnp.dtype(config.dtype)
    if config.pretrained is None:
        model = config.spec.create(num_classes, dtype, **options)
        return model, init_variables(model, config.image_size, config.seed, mesh), None
    # A name (IMAGENET1K_V2) is torchvision's weights, anything else a file; "default" is what --pretrained without
    # a value recorded in the config.json of earlier versions.
    weights = None if config.pretrained == "default" else config.pretrained
    resolved = resolve_weights(config.spec, weights)
    model, variables, renewed = for_new_task(config.spec, num_classes, weights, dtype, rng=config.seed, **options)
    note = (f"pretrained weights: {describe_weights(resolved)}; re-initialized {', '.join(renewed)} for "
            f"{num_classes} classes")
    return model, jax.device_put(variables, parallel.replicated(mesh)), note
