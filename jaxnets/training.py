"""Training: ``train_and_evaluate`` ties the train step to the data, checkpoints and logs; ``train.py`` only
parses flags.

A run owns its workdir (``jaxnets.locks``), resumes from its last checkpoint when it is one of the same run,
evaluates after every epoch (``jaxnets.evaluation``), stops cleanly on a signal and writes its final weights
(``jaxnets.final_weights``). The parts are modules of their own: the state and the pure, jitted train step
(``jaxnets.train_step``), the losses (``jaxnets.losses``), the optimizer (``jaxnets.optimization``), what a run
does before its work (``jaxnets.run_setup``), its description (``jaxnets.run_description``) and its controls
(``jaxnets.run_control``).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxnets import ema, evaluation, parallel, transfer
from jaxnets.checkpointing import CHECKPOINTS_DIR, Checkpointer, CheckpointStorageError, resume_problem, resume_record
from jaxnets.config import TrainConfig
from jaxnets.data import Dataset
from jaxnets.errors import UserError
from jaxnets.evaluation import TOP_K
from jaxnets.fileio import StorageError
from jaxnets.final_weights import FINAL_WEIGHTS, finished_metrics, save_final_weights
from jaxnets.mixing import Mixing
from jaxnets.optimization import freeze_masks, has_parameter_groups, make_optimizer
from jaxnets.run_control import DurationEstimate, StopSignal
from jaxnets.run_description import describe_run, small_data_warning
from jaxnets.run_io import Progress, RunLog, epoch_summary, grad_norm_key, headline
from jaxnets.run_setup import Start, batch_fits_data, build_model, owned_workdir, setup, start
from jaxnets.train_step import GradientGroup, TrainState, create_train_state, gradient_groups, make_train_step


@dataclass
class TrainResult:
    """What a run did: where, to which step, its final evaluation, and the state it ended with."""

    run_dir: Path
    step: int
    metrics: dict[str, float]  # the final evaluation
    interrupted: int | None = None  # the signal that stopped the run, if one did
    state: TrainState | None = None
    ema_metrics: dict[str, float] | None = None  # --model-ema: the final evaluation of the average


def train_and_evaluate(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` data-parallel on all devices (of all processes),
    evaluating after every epoch; resume from ``config.workdir`` when it holds a checkpoint of this run.
    The run owns its workdir (``jaxnets.locks``): a second run on it is refused before it reads it."""
    fit_batch = batch_fits_data(config)
    config = start(config)
    stop = StopSignal()
    # Several processes: a signal during the start (a host preempted while the others compile) is held for the
    # loop's first check, where all stop together; a single process keeps Ctrl-C's immediate exit until the loop.
    early = stop.installed() if jax.process_count() > 1 else contextlib.nullcontext()
    with early, owned_workdir(Path(config.workdir).absolute(), enabled=parallel.is_main_process()) as opening:
        return _train_and_evaluate(config, fit_batch, opening, stop)


def _train_and_evaluate(config: TrainConfig, fit_batch: bool, opening: Start, stop: StopSignal) -> TrainResult:
    config, mesh, dataset = setup(config, fit_batch=fit_batch)
    workdir = Path(config.workdir).absolute()
    checkpointer = Checkpointer(workdir / CHECKPOINTS_DIR, keep=config.keep_checkpoints,
                                clean_partial=parallel.is_main_process())
    try:
        return _run(config, mesh, dataset, workdir, checkpointer, opening, stop)
    except StorageError as error:
        if isinstance(error, CheckpointStorageError):
            checkpointer.close(quiet=True)
            raise
        # The disk that refused this file (a log, a plot, the final weights) may also have refused the checkpoint
        # being written in the background: report that one, else say which checkpoint the run resumes from.
        checkpointer.close()
        raise StorageError(f"{error}; {checkpointer.last_complete()}", error.errno) from error
    except BaseException:
        checkpointer.close(quiet=True)  # the error on its way out is the one to report
        raise
    finally:
        checkpointer.close()  # a no-op when closed above; else reports a save that failed in the background


def _run(config: TrainConfig, mesh: Any, dataset: Dataset, workdir: Path, checkpointer: Checkpointer,
         opening: Start, stop: StopSignal) -> TrainResult:
    resume_step = _check_resumable(checkpointer, config, dataset.steps_per_epoch)
    run = RunLog(workdir, enabled=parallel.is_main_process(), resume_step=resume_step or 0, title=_title(config))
    run.print(f"run directory: {workdir}")
    if checkpointer.removed_partial:
        run.print(f"removed {len(checkpointer.removed_partial)} incomplete checkpoint(s) left by an interrupted "
                  f"save: {', '.join(checkpointer.removed_partial)}")
    for note in dataset.notes:
        run.print(note)
    if resume_step is not None and resume_step >= _stop_step(config, dataset.steps_per_epoch):
        finished = finished_metrics(workdir, resume_step)
        if finished is not None:  # nothing left to do: say so, and do not evaluate or write anything again
            run.print(f"this run is complete (step {resume_step}, {headline(finished, full=False)}, final "
                      f"weights {workdir / FINAL_WEIGHTS}): nothing to do. To train longer, raise --epochs or "
                      f"--steps; to start again, use another --workdir")
            return TrainResult(workdir, resume_step, finished)
    warning = small_data_warning(config, len(dataset.train), dataset.num_classes)
    if warning:
        run.print(warning)

    model, variables, note = build_model(config, dataset.num_classes, mesh)
    if note:
        run.print(note)
    trainable_mask, head_mask, frozen_norm = freeze_masks(config, variables["params"])
    tx, schedule = make_optimizer(config, dataset.steps_per_epoch, trainable_mask=trainable_mask, head_mask=head_mask)
    state = create_train_state(model, variables, tx, mesh, seed=config.seed, frozen_norm=frozen_norm,
                               trainable_mask=trainable_mask, model_ema=config.model_ema)
    if resume_step is not None:
        state = state.with_arrays(checkpointer.restore(resume_step, state.arrays()))
        run.print(f"resumed from step {resume_step} ({checkpointer.directory})")
    run.write_config(config.to_json())  # only now: a run that could not resume leaves the workdir's config as it was
    run.print(describe_run(config, dataset, mesh, state))
    if config.freeze != "none":
        run.print(f"--freeze {config.freeze}: {transfer.describe(variables['params'], trainable_mask)}"
                  + (f"; BatchNorm on running statistics in {', '.join(frozen_norm)}" if frozen_norm else ""))
    opening.done()  # training begins: what the run writes from now on stays, whatever follows
    return _train_loop(config, dataset, mesh, state, schedule, checkpointer, run, stop)


def _check_resumable(checkpointer: Checkpointer, config: TrainConfig, steps_per_epoch: int) -> int | None:
    """The step to resume from, after checking the checkpoint is of this model and data: the step counts
    epochs and places the data, so a dataset that has grown or shrunk since cannot resume either."""
    step = checkpointer.latest_step()
    if step is None:
        return None
    current = resume_record(json.loads(config.to_json()), steps_per_epoch)
    problem = resume_problem(checkpointer.read_meta(step), current,
                             layout_matters=bool(config.grad_clip) and has_parameter_groups(config))
    if problem:
        raise UserError(f"--workdir {config.workdir} holds a checkpoint (step {step}) of a different run: {problem}; "
                        f"use another --workdir")
    return step


def _train_loop(config: TrainConfig, dataset: Dataset, mesh: Any, state: TrainState, schedule: optax.Schedule,
                checkpointer: Checkpointer, run: RunLog, stop: StopSignal) -> TrainResult:
    steps_per_epoch = dataset.steps_per_epoch
    # --log-grad-norms: the step computes each stage's gradient norm; without it, the step is the same as ever.
    groups = (gradient_groups(state.apply_fn.__self__, state.variables, config.image_size)
              if config.log_grad_norms else None)
    train_step = make_train_step(mesh, label_smoothing=config.label_smoothing, aux_weight=config.aux_weight,
                                 remat=config.remat, mixing=Mixing(config.mixup_alpha, config.cutmix_alpha),
                                 grad_accum_steps=config.grad_accum_steps, multi_label=config.multi_label,
                                 ema_schedule=ema.schedule_of(config, steps_per_epoch), grad_norm_groups=groups)
    eval_step = evaluation.make_eval_step(state.apply_fn, mesh, min(TOP_K, dataset.num_classes),
                                          multi_label=config.multi_label)
    stop_step = _stop_step(config, steps_per_epoch)
    step = int(parallel.to_host(state.step))
    meta = resume_record(json.loads(config.to_json()), steps_per_epoch)
    val_metrics, ema_metrics, confusion = None, None, None

    def evaluate(weights: TrainState) -> tuple[dict, np.ndarray | None]:
        return evaluation.validate(eval_step, weights.variables, dataset.eval_batches("val"), mesh,
                                   dataset.num_classes, multi_label=config.multi_label)

    def validate() -> tuple[dict, dict | None, np.ndarray | None]:
        """The weights' evaluation and (--model-ema) the average's, both logged ('val', 'val_ema'); the confusion
        matrix of the weights the run delivers (the average's when it keeps one)."""
        metrics, confusion = evaluate(state)
        run.log(step, step / steps_per_epoch, "val", metrics)
        if state.ema is None:
            return metrics, None, confusion
        averaged, confusion = evaluate(state.averaged())
        run.log(step, step / steps_per_epoch, "val_ema", averaged)
        return metrics, averaged, confusion

    def save(metrics: dict | None = None) -> None:
        checkpointer.save(step, state.arrays(), meta, metrics)  # it records the headline score under its name

    if step and step % steps_per_epoch == 0 and step < stop_step and not checkpointer.has_metrics(step):
        # Resumed from a stop at an epoch's end, before its evaluation: evaluate it now, as the
        # uninterrupted run did, so the log has every epoch's validation record.
        val_metrics, ema_metrics, _ = validate()

    estimate = DurationEstimate(step, stop_step, run)
    # Every stop decision is stop.requested(), collective, at points every process reaches at the same step: at the
    # start of each epoch (after the last one's evaluation, save and plot) and at each logged step. The handlers stay
    # installed to the end, so that a signal during the final save or the final weights cannot cut them short.
    with stop.installed():
        stopping = False
        while step < stop_step and not (stopping := stop.requested()):
            epoch, start = divmod(step, steps_per_epoch)
            epoch_start = time.perf_counter()
            progress = Progress(epoch, config.epochs, steps_per_epoch, start, config.update_batch_size,
                                enabled=config.progress and parallel.is_main_process())
            train_metrics: list[dict] = []
            pending: list[dict] = []
            batches = parallel.prefetch_to_mesh(dataset.train_batches(epoch, start), mesh)
            for batch in batches:
                state, metrics = train_step(state, batch)
                step += 1
                pending.append(metrics)
                estimate.after(step, metrics)
                end_of_epoch = step % steps_per_epoch == 0
                if step % config.log_every == 0 or end_of_epoch or step == stop_step:
                    logged = _named_norms(_mean(parallel.to_host(pending)), groups)
                    _check_finite(logged, step, checkpointer)  # before a diverged state is logged or saved
                    progress.update(len(pending), logged["loss"])
                    run.log(step, step / steps_per_epoch, "train",
                            {**logged, "lr": float(schedule(step - 1)), "images_per_sec": progress.images_per_second})
                    train_metrics.append(logged)
                    pending = []
                    if stop.requested():
                        stopping = True
                        break
                if (config.checkpoint_every and step % config.checkpoint_every == 0 and not end_of_epoch
                        and step != stop_step):  # the last step is saved below, with its evaluation
                    _check_finite(_mean(parallel.to_host(pending)), step, checkpointer)
                    save()
                if step >= stop_step:
                    break
            progress.close()
            if stopping:
                break
            if step % steps_per_epoch == 0 or step == stop_step:
                val_metrics, ema_metrics, confusion = validate()
                run.print(epoch_summary(epoch + 1, config.epochs, step, _mean(train_metrics), val_metrics,
                                        progress.images_per_second, time.perf_counter() - epoch_start, ema_metrics))
                save(ema_metrics or val_metrics)
                run.plot()

        if stopping:
            save()
            checkpointer.wait()
            signum = stop.signum or signal.SIGTERM
            run.print(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved in "
                      f"{checkpointer.directory}; run the same command again to resume")
            return TrainResult(Path(config.workdir).absolute(), step, {}, signum, state)
        if val_metrics is None:  # resumed a finished run: nothing trained, evaluate again for the report
            val_metrics, ema_metrics, confusion = validate()
        checkpointer.wait()  # a save that failed in the background is reported before the run says it is done
        run.plot(confusion, dataset.class_names)
        if parallel.is_main_process():
            save_final_weights(config, state, dataset.class_names, {"step": step, **(ema_metrics or val_metrics)},
                               run)
    run.print(f"done: step {step}, {headline(val_metrics)}"
              + (f", EMA {headline(ema_metrics)}" if ema_metrics else "")
              + f"; run directory: {Path(config.workdir).absolute()}")
    return TrainResult(Path(config.workdir).absolute(), step, val_metrics, None, state, ema_metrics)


def _title(config: TrainConfig) -> str:
    """What the plots call the run: ``resnet34 on digits``, with the model options that make another network
    (``resnet34 (shortcut=False) on digits``; not ``remat``, which only changes how it computes)."""
    recorded = config.spec.recorded_option_names
    shown = ", ".join(f"{k}={v}" for k, v in config.model_options().items() if k in recorded)
    return f"{config.model}{f' ({shown})' if shown else ''} on {config.dataset}"


def _stop_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """The step the run ends at: the last of ``--epochs``, or ``--steps`` if sooner."""
    total_steps = steps_per_epoch * config.epochs
    return min(total_steps, config.steps or total_steps)


def _check_finite(metrics: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
    """Stop a diverged run (a non-finite mean loss since the last check) with the reason, keeping its
    checkpoints as they are: none of them holds the diverged state."""
    loss = metrics.get("loss", 0.0)
    if not math.isfinite(loss):
        saved = checkpointer.latest_step()
        kept = f"the last checkpoint (step {saved}) is kept" if saved is not None else "no checkpoint was saved"
        raise UserError(f"training diverged: loss {loss} by step {step} (try a lower --lr); {kept}")


def _mean(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the records: a float, or for a vector (``grad_norm``) one per element."""
    if not records:
        return {}
    means = {k: np.mean([r[k] for r in records], axis=0) for k in records[0]}
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in means.items()}


def _named_norms(metrics: dict[str, Any], groups: tuple[GradientGroup, ...] | None) -> dict[str, Any]:
    """``metrics`` with the step's ``grad_norm`` vector as one float per stage (``grad_norm/<stage>``), in the
    stages' forward order (the order ``gradients.png`` draws them in)."""
    if groups is None:
        return metrics
    norms = metrics.pop("grad_norm")
    return {**metrics, **{grad_norm_key(group.name): float(norm) for group, norm in zip(groups, norms, strict=True)}}

