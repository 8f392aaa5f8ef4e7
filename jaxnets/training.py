"""Training in the library, ``train.py`` only parses flags: create the state, a jitted data-parallel train
step and eval step, and ``train_and_evaluate`` tying them to the data, checkpoints and logs.

Data parallelism is ``jax.jit`` over a device mesh (see ``jaxnets.parallel``): the state is replicated,
the batch is split, and BatchNorm statistics and gradients are over the global batch. The train step
is a pure function of (state, batch): dropout keys are ``fold_in(rng, step)``, so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec

from jaxnets import ema as ema_lib
from jaxnets import host, locks, parallel, transfer
from jaxnets import mixing as mixing_lib
from jaxnets.checkpointing import Checkpointer, CheckpointStorageError, resume_problem, resume_record
from jaxnets.config import TrainConfig, fit_batch_size, peak_learning_rate, resolve
from jaxnets.data import Dataset, load_dataset
from jaxnets.data.config import TooFewExamples
from jaxnets.ema import EmaSchedule
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.fileio import StorageError
from jaxnets.mixing import Mixing
from jaxnets.models import GoogLeNetOutputs
from jaxnets.models.backbone import remat_compiler_options
from jaxnets.models.googlenet import AUX_WEIGHT
from jaxnets.multilabel import binary_cross_entropy
from jaxnets.multilabel import metrics as multilabel_metrics
from jaxnets.registry import init_input
from jaxnets.run_io import METRICS_FILE, Progress, RunLog, epoch_summary, headline, headline_metric, read_metrics

PyTree = Any
FINAL_WEIGHTS = "final_weights.safetensors"


class TrainState(struct.PyTreeNode):
    """Everything a step changes (arrays, checkpointed) and how a step runs (static).

    ``frozen_norm`` goes to ``model.apply`` (BatchNorms there use and keep their running statistics);
    ``trainable`` is the transfer-learning mask as a tuple aligned with ``jax.tree.leaves(params)``
    (None: everything trains), static so that frozen leaves get ``stop_gradient`` at trace time.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen_norm: tuple[str, ...] = struct.field(pytree_node=False, default=())
    trainable: tuple[bool, ...] | None = struct.field(pytree_node=False, default=None)
    ema: PyTree | None = None  # --model-ema: the average (jaxnets.ema: params, batch_stats, count), else None

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

    def averaged(self) -> TrainState:
        """This state with the EMA's weights and statistics in place of the raw ones: what evaluation and the final
        weights use when the run keeps an average."""
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])

    def arrays(self) -> dict[str, PyTree]:
        """The checkpointed part."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng, **({"ema": self.ema} if self.ema is not None else {})}

    def with_arrays(self, arrays: dict[str, PyTree]) -> TrainState:
        return self.replace(**arrays)


def create_train_state(model: nn.Module, variables: PyTree, tx: optax.GradientTransformation, mesh: Any, *,
                       seed: int = 0, frozen_norm: tuple[str, ...] = (),
                       trainable_mask: PyTree | None = None, model_ema: bool = False) -> TrainState:
    """A replicated ``TrainState`` on ``mesh`` from initial ``variables``; the optimizer state is built on
    the devices, and every process computes the same one. The state may share buffers with ``variables``,
    and the train step donates the state: do not reuse ``variables`` after training. ``model_ema``: the state
    keeps an average of the weights (``jaxnets.ema``), starting as their copy."""
    trainable = None if trainable_mask is None else tuple(bool(t) for t in jax.tree.leaves(trainable_mask))
    if trainable is not None and len(trainable) != len(jax.tree.leaves(variables["params"])):
        raise UserError("trainable_mask does not have the structure of the parameters")
    replicated = parallel.replicated(mesh)

    def init(variables):
        return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(variables["params"]),
                "rng": jax.random.key_data(jax.random.key(seed)),
                **({"ema": ema_lib.init(variables["params"], variables.get("batch_stats", {}))} if model_ema else {})}

    arrays = jax.jit(init, out_shardings=replicated)(variables)
    return TrainState(apply_fn=model.apply, tx=tx, frozen_norm=tuple(frozen_norm), trainable=trainable, **arrays)



def init_variables(model: nn.Module, image_size: int, seed: int, mesh: Any) -> PyTree:
    """Fresh variables (torchvision's initializers), replicated on ``mesh``."""
    dummy = init_input(model, image_size)
    init = jax.jit(lambda key: model.init({"params": key, "dropout": key}, dummy, train=False),
                   out_shardings=parallel.replicated(mesh))
    return init(jax.random.key(seed))


def make_optimizer(config: TrainConfig, steps_per_epoch: int, *, trainable_mask: PyTree | None = None,
                   head_mask: PyTree | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (momentum, optionally Nesterov) or AdamW on the linearly scaled learning rate, with warmup +
    cosine or step decay, optional gradient clipping, and no weight decay on biases and BatchNorm
    parameters (the 1-D leaves). With a ``trainable_mask``, ``jaxnets.transfer.build_optimizer`` gives
    frozen leaves a zero update and no optimizer state, and clips the trainable gradients."""
    schedule = make_schedule(config, steps_per_epoch)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if config.optimizer == "adamw":
        base = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    else:
        base = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                           optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if trainable_mask is not None:
        # The masks have the parameters' structure: all that layer-wise multipliers need.
        lr_mults = (transfer.layerwise_lr_mults(config.spec, trainable_mask, config.layer_decay)
                    if config.layer_decay != 1.0 else None)
        base = transfer.build_optimizer(base, trainable_mask, head_mask=head_mask, grad_clip=config.grad_clip,
                                        backbone_lr_mult=config.backbone_lr_mult, lr_mults=lr_mults)
    elif config.grad_clip:
        base = optax.chain(optax.clip_by_global_norm(config.grad_clip), base)
    return base, schedule


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    peak = peak_learning_rate(config)
    total = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), total, end_value=0.0)
    boundaries = {round(e * steps_per_epoch): config.step_gamma for e in config.step_epochs if 0 < e < config.epochs}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), lambda s: decay(s + warmup)], [warmup])


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy in float32, with torch's label smoothing (uniform over all classes); ``labels``
    are class indices, or (one more axis) target probabilities, as torch's ``CrossEntropyLoss`` takes both."""
    logits = logits.astype(jnp.float32)
    targets = labels.astype(jnp.float32) if labels.ndim == logits.ndim else jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


NO_MIXING = Mixing()
MIX_STREAM = 0x6D6978  # folded into a step's dropout key: the key of its MixUp / CutMix draws


def make_train_step(mesh: Any, *, label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT,
                    remat: bool = False, mixing: Mixing = NO_MIXING, grad_accum_steps: int = 1,
                    multi_label: bool = False, ema_schedule: EmaSchedule | None = None):
    """``step(state, batch) -> (state, {'loss', 'accuracy'})``, jitted over ``mesh`` with the state donated:
    one optimizer update.

    GoogLeNet in training: loss = main + aux_weight * (aux1 + aux2), as in the paper; accuracy is the
    main head's (against the unmixed labels). ``remat``: the model is built with ``remat=True`` (compiled so that
    it saves memory on CPUs too, ``remat_compiler_options``). ``mixing``: MixUp / CutMix on each batch
    (``jaxnets.mixing``). ``grad_accum_steps`` N: the batch holds N micro-batches (the k-th takes rows k, k + N,
    ..., so each is spread over every device); their gradients are averaged into one update, and BatchNorm
    statistics are updated by each micro-batch in turn. ``multi_label``: multi-hot labels, sigmoid binary
    cross-entropy (``jaxnets.multilabel``), no accuracy. ``ema_schedule``: the state's average of the weights is
    updated after the update (``jaxnets.ema``)."""

    def loss_of(logits: jax.Array, targets: jax.Array) -> jax.Array:
        if multi_label:
            return binary_cross_entropy(logits, targets, label_smoothing)
        return cross_entropy(logits, targets, label_smoothing)

    def targets_of(labels: jax.Array, num_classes: int, mix: mixing_lib.MixParams | None, size: tuple) -> jax.Array:
        """Class indices as they are (no mixing), else one-hot or multi-hot rows, mixed as the images were."""
        if mix is None:
            return labels.astype(jnp.float32) if multi_label else labels
        rows = labels.astype(jnp.float32) if multi_label else jax.nn.one_hot(labels, num_classes)
        return mixing_lib.mix_targets(rows, mix, *size)

    def gradients(state: TrainState, batch_stats: PyTree, images: jax.Array, labels: jax.Array,
                  dropout_rng: jax.Array) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
        """One batch's gradients, updated BatchNorm statistics and metrics, at the state's parameters."""
        mix = None
        if mixing.enabled:
            size = images.shape[1:3]
            mix = mixing_lib.draw(jax.random.fold_in(dropout_rng, MIX_STREAM), *size, mixing)
            images = mixing_lib.mix_images(images, mix)

        def loss_fn(params):
            if state.trainable is not None:  # no gradient, hence no backward pass, through frozen leaves
                mask = jax.tree.unflatten(jax.tree.structure(params), state.trainable)
                params = transfer.stop_frozen_gradients(params, mask)
            variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
            out, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": dropout_rng}, frozen_norm=state.frozen_norm)
            logits, aux = (out.logits, (out.aux_logits1, out.aux_logits2)) if isinstance(
                out, GoogLeNetOutputs) else (out, ())
            targets = targets_of(labels, logits.shape[-1], mix, images.shape[1:3])
            loss = jnp.mean(loss_of(logits, targets))
            for aux_logits in aux:
                loss += aux_weight * jnp.mean(loss_of(aux_logits, targets))
            return loss, (logits, updates.get("batch_stats", batch_stats))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = {"loss": loss}
        if not multi_label:
            metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        return grads, batch_stats, metrics

    def accumulated(state: TrainState, batch: dict[str, jax.Array], dropout_rng: jax.Array):
        """The mean gradient of the batch's ``grad_accum_steps`` micro-batches, one after the other."""
        n = grad_accum_steps
        micro_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))

        def micro_batches(x):  # rows b * n + k -> [k, b]: micro-batch k, split over the devices as the batch was
            x = jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        def body(carry, xs):
            grad_sum, batch_stats = carry
            k, images, labels = xs
            grads, updated, metrics = gradients(state, batch_stats, images, labels, jax.random.fold_in(dropout_rng, k))
            updated = jax.tree.map(lambda new, old: new.astype(old.dtype), updated, batch_stats)  # the state's dtypes
            return (jax.tree.map(jnp.add, grad_sum, grads), updated), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, batch_stats), metrics = jax.lax.scan(
            body, (zeros, state.batch_stats), (jnp.arange(n), micro_batches(batch["image"]),
                                               micro_batches(batch["label"])))
        return jax.tree.map(lambda g: g / n, grad_sum), batch_stats, jax.tree.map(jnp.mean, metrics)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum_steps == 1:
            grads, batch_stats, metrics = gradients(state, state.batch_stats, batch["image"], batch["label"],
                                                    dropout_rng)
        else:
            grads, batch_stats, metrics = accumulated(state, batch, dropout_rng)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params, step = optax.apply_updates(state.params, updates), state.step + 1
        ema = state.ema if ema_schedule is None else ema_lib.update(state.ema, params, batch_stats, step, ema_schedule)
        state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
        return state, metrics

    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options={**host.xla_cpu_options(), **remat_compiler_options(remat)})


def make_eval_step(mesh: Any, num_classes: int, multi_label: bool = False):
    """``step(state, batch) -> sums`` over the real (``mask``) examples of a padded batch: loss, top-1 and
    top-5 hits, count, and the confusion matrix (true x predicted). Evaluation never runs aux heads.
    ``multi_label``: the loss sum and count, and the batch's logits, targets and mask (its metrics need every
    example's scores: ``evaluate`` gathers them)."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = state.apply_fn(state.variables, batch["image"], train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        if multi_label:
            return {"loss": jnp.sum(binary_cross_entropy(logits, labels) * mask), "count": jnp.sum(mask),
                    "logits": logits, "targets": labels, "mask": batch["mask"]}
        predicted = jnp.argmax(logits, -1)
        k = min(5, num_classes)
        in_top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
        confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predicted].add(
            batch["mask"].astype(jnp.int32))
        return {"loss": jnp.sum(cross_entropy(logits, labels) * mask), "top1": jnp.sum((predicted == labels) * mask),
                "top5": jnp.sum(in_top5 * mask), "count": jnp.sum(mask), "confusion": confusion}

    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(replicated, split), out_shardings=replicated,
                   compiler_options=host.xla_cpu_options())


def evaluate(eval_step, state: TrainState, batches: Iterator[dict],
             mesh: Any) -> tuple[dict[str, float], np.ndarray | None]:
    """Loss, top-1 (and top-5 with >= 5 classes) over every example of ``batches``; the confusion matrix. For a
    multi-label step, loss and ``jaxnets.multilabel.metrics`` instead, and no confusion matrix."""
    totals, examples = None, []
    for batch in parallel.prefetch_to_mesh(batches, mesh):
        sums = eval_step(state, batch)
        examples.append({k: sums.pop(k) for k in PER_EXAMPLE if k in sums})
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.to_host(totals)
    count = float(totals["count"])
    metrics = {"loss": float(totals["loss"]) / count}
    if "top1" in totals:
        metrics["top1"] = float(totals["top1"]) / count
        if totals["confusion"].shape[0] >= 5:
            metrics["top5"] = float(totals["top5"]) / count
    else:
        gathered = {k: np.concatenate([parallel.to_host(e[k]) for e in examples]) for k in PER_EXAMPLE}
        keep = gathered["mask"].astype(bool)
        metrics.update(multilabel_metrics(gathered["targets"][keep], gathered["logits"][keep]))
    metrics["count"] = int(count)
    return metrics, totals.get("confusion")


PER_EXAMPLE = ("logits", "targets", "mask")  # what a multi-label eval step returns per example, not summed


# --- the run -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the final evaluation
    interrupted: int | None = None  # the signal that stopped the run, if one did
    state: TrainState | None = None
    ema_metrics: dict[str, float] | None = None  # --model-ema: the final evaluation of the average


def setup_compilation_cache(directory: str | None) -> None:
    """Persistent XLA compilation cache, so that a second run (or a resumed one) does not recompile.

    ``None`` is the default directory, ``''`` switches the cache off. The setting is the process's: JAX opens
    its cache once, so a change of directory also resets it (else a second run in one process, or one that
    asked for no cache, would go on writing to the first run's directory)."""
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "jaxnets", "jax_compilation_cache")
    directory = directory or None
    if jax.config.jax_compilation_cache_dir == directory:
        return
    compilation_cache.set_cache_dir(directory)
    if directory:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()


def train_and_evaluate(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` data-parallel on all devices (of all processes),
    evaluating after every epoch; resume from ``config.workdir`` when it holds a checkpoint of this run.
    The run owns its workdir (``jaxnets.locks``): a second run on it is refused before it reads it."""
    fit_batch = config.batch_size is None  # a default batch shrinks to fit a small dataset (setup)
    config = start(config)
    with locks.hold(Path(config.workdir).absolute(), enabled=parallel.is_main_process()):
        return _train_and_evaluate(config, fit_batch)


def _train_and_evaluate(config: TrainConfig, fit_batch: bool = False) -> TrainResult:
    config, mesh, dataset = setup(config, fit_batch=fit_batch)
    workdir = Path(config.workdir).absolute()
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                clean_partial=parallel.is_main_process())
    try:
        return _run(config, mesh, dataset, workdir, checkpointer)
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


def _run(config: TrainConfig, mesh: Any, dataset: Dataset, workdir: Path, checkpointer: Checkpointer) -> TrainResult:
    resume_step = _check_resumable(checkpointer, config, dataset.steps_per_epoch)
    run = RunLog(workdir, enabled=parallel.is_main_process(), resume_step=resume_step or 0,
                 title=f"{config.model} on {config.dataset}")
    run.print(f"run directory: {workdir}")
    if checkpointer.removed_partial:
        run.print(f"removed {len(checkpointer.removed_partial)} incomplete checkpoint(s) left by an interrupted "
                  f"save: {', '.join(checkpointer.removed_partial)}")
    for note in dataset.notes:
        run.print(note)
    if resume_step is not None and resume_step >= _stop_step(config, dataset.steps_per_epoch):
        finished = _finished_metrics(workdir, resume_step)
        if finished is not None:  # nothing left to do: say so, and do not evaluate or write anything again
            run.print(f"this run is complete (step {resume_step}, {headline(finished, full=False)}, final "
                      f"weights {workdir / FINAL_WEIGHTS}): nothing to do. To train longer, raise --epochs or "
                      f"--steps; to start again, use another --workdir")
            return TrainResult(workdir, resume_step, finished)

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
    return _train_loop(config, dataset, mesh, state, schedule, checkpointer, run)


def start(config: TrainConfig) -> TrainConfig:
    """Processes and compilation cache started, the config resolved: all a run needs before it takes its
    workdir. Idempotent (a resolved config resolves to itself)."""
    parallel.initialize(config.coordinator, config.num_processes, config.process_id, config.local_devices)
    setup_compilation_cache(config.compile_cache)
    return resolve(config)


def setup(config: TrainConfig, *, fit_batch: bool = False) -> tuple[TrainConfig, Any, Dataset]:
    """``start``, then the device mesh and this process's data; ``fit_batch``: the batch size was a default,
    lowered to fit a dataset smaller than one batch (``fit_batch_size``)."""
    config = start(config)
    mesh = parallel.make_mesh(config.devices)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "--eval-batch-size")
    try:
        dataset = load_dataset(config.data_config(), jax.process_index(), jax.process_count())
    except TooFewExamples as too_few:
        config, note = fit_batch_size(config, too_few, mesh.devices.size, given=not fit_batch)
        dataset = load_dataset(config.data_config(), jax.process_index(), jax.process_count())
        dataset.notes.append(note)
    return dataclasses.replace(config, num_classes=dataset.num_classes), mesh, dataset


def run_linear_probe(config: TrainConfig) -> dict[str, float]:
    """``--linear-probe svm|logreg``: fit a linear classifier on the frozen model's pre-logit features of
    the (eval-transformed) training set and score it on the validation set; results in the workdir."""
    config = start(config)
    with locks.hold(Path(config.workdir).absolute(), enabled=parallel.is_main_process()):
        return _run_linear_probe(config)


def _run_linear_probe(config: TrainConfig) -> dict[str, float]:
    config, mesh, dataset = setup(config)
    if jax.process_count() > 1:
        raise UserError("--linear-probe runs in a single process")
    try:
        from jaxnets.probe import linear_probe
    except ImportError:
        raise UserError("--linear-probe needs jaxnets.probe.linear_probe, which this install lacks") from None
    workdir = Path(config.workdir).absolute()
    if Checkpointer(workdir / "checkpoints").latest_step() is not None or (workdir / METRICS_FILE).exists():
        raise UserError(f"--workdir {config.workdir} holds a training run; a linear probe would overwrite its logs, "
                        f"use another --workdir")
    run = RunLog(workdir)
    run.print(f"run directory: {workdir}")
    run.write_config(config.to_json())
    model, variables, note = build_model(config, dataset.num_classes, mesh)
    if note:
        run.print(note)
    metrics = linear_probe(model, variables, dataset.iterate("train"), dataset.iterate("val"),
                           kind=config.linear_probe, out_dir=workdir, seed=config.seed, mesh=mesh)
    run.print(f"linear probe ({config.linear_probe}) on {config.model} features: "
              + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


def build_model(config: TrainConfig, num_classes: int, mesh: Any) -> tuple[nn.Module, PyTree, str | None]:
    """The model and its initial variables, replicated on ``mesh``: fresh, or ``--pretrained`` with the
    classifier (GoogLeNet: and its aux heads) freshly initialized for the new task, whatever its number of
    classes. The third value says which pretrained weights were loaded and which layers were re-initialized."""
    from jaxnets.weights import for_new_task, resolve_weights

    # Options only where they differ from every family's defaults: a family without them still trains.
    options = {**({"aux_logits": False} if config.no_aux else {}), **({"remat": True} if config.remat else {}),
               **({"in_chans": config.in_chans} if config.in_chans != 3 else {})}
    dtype = jnp.dtype(config.dtype)
    if config.pretrained is None:
        model = config.spec.create(num_classes, dtype, **options)
        return model, init_variables(model, config.image_size, config.seed, mesh), None
    # A name (IMAGENET1K_V2) is torchvision's weights, anything else a file; "default" is what --pretrained without
    # a value recorded in the config.json of earlier versions.
    weights = None if config.pretrained == "default" else config.pretrained
    resolved = resolve_weights(config.spec, weights)
    model, variables, renewed = for_new_task(config.spec, num_classes, weights, dtype, rng=config.seed, **options)
    source = resolved if isinstance(resolved, Path) else f"torchvision's {resolved.torchvision_name} (cache)"
    note = f"pretrained weights: {source}; re-initialized {', '.join(renewed)} for {num_classes} classes"
    return model, jax.device_put(variables, parallel.replicated(mesh)), note


def freeze_masks(config: TrainConfig, params: PyTree) -> tuple[PyTree | None, PyTree | None, tuple[str, ...]]:
    """``--freeze`` / ``--backbone-lr-mult`` / ``--layer-decay`` -> (trainable mask, head mask, frozen
    BatchNorm paths); (None, None, ()) when everything trains at one learning rate."""
    if not _has_parameter_groups(config):
        return None, None, ()
    spec = config.spec
    mask = transfer.trainable_mask(spec, params, config.freeze)
    return mask, transfer.head_mask(spec, params), transfer.frozen_modules(spec, mask)


def _has_parameter_groups(config: TrainConfig) -> bool:
    """Whether the optimizer partitions the parameters: frozen ones, or learning-rate multipliers."""
    return config.freeze != "none" or config.backbone_lr_mult != 1.0 or config.layer_decay != 1.0


def describe_run(config: TrainConfig, dataset: Dataset, mesh: Any, state: TrainState) -> str:
    devices = mesh.devices.ravel()
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return (f"{config.model} ({num_params / 1e6:.1f}M params, {config.dtype}) on {dataset.name}: "
            f"{len(dataset.train)} train / {len(dataset.val)} val images, {dataset.num_classes} classes, "
            f"{config.image_size}px; {parallel.describe_topology(mesh)}{_host_malloc(devices[0].platform)}, "
            f"global batch {config.batch_size}"
            + (f" x {config.grad_accum_steps} accumulated (BatchNorm statistics per batch)"
               if config.grad_accum_steps > 1 else "")
            + f", {dataset.steps_per_epoch} {'updates' if config.grad_accum_steps > 1 else 'steps'}/epoch x "
              f"{config.epochs} epochs; "
            f"{config.optimizer} peak lr {peak_learning_rate(config):.4g} "
            f"(= {config.lr:g} x {config.update_batch_size}/256), {config.schedule} schedule"
            + (f"; backbone lr x {config.backbone_lr_mult:g}" if config.backbone_lr_mult != 1.0 else "")
            + (f"; layer-wise lr decay {config.layer_decay:g}" if config.layer_decay != 1.0 else "")
            + "".join(f"; {part}" for part in _recipe_parts(config, dataset.steps_per_epoch)))


def _recipe_parts(config: TrainConfig, steps_per_epoch: int) -> list[str]:
    """The modern-recipe settings a run uses, for its description (none by default)."""
    ema = ema_schedule(config, steps_per_epoch)
    return [part for part, used in (
        (f"recipe {config.recipe}", config.recipe),
        ("multi-label (sigmoid binary cross-entropy)", config.multi_label),
        (f"label smoothing {config.label_smoothing:g}", config.label_smoothing),
        (f"mixup alpha {config.mixup_alpha:g}", config.mixup_alpha),
        (f"cutmix alpha {config.cutmix_alpha:g}", config.cutmix_alpha),
        (f"auto-augment {config.auto_augment}"
         + (f" (magnitude {config.ra_magnitude})" if config.auto_augment == "ra" else ""), config.auto_augment),
        (f"random erasing p={config.random_erase:g}", config.random_erase),
        (f"EMA every {config.model_ema_steps} updates, decay {ema.decay:.6g} (adjusted from "
         f"{config.model_ema_decay:g})" if ema else "", ema),
        (f"eval resize {config.val_resize_size} crop {config.val_crop_size}",
         config.val_crop_size != config.image_size),
    ) if used]


def _host_malloc(platform: str) -> str:
    """On CPUs, which malloc serves XLA: it changes step times by up to a fifth (jaxnets.host)."""
    return f", malloc: {host.running_allocator()}" if platform == "cpu" else ""


def _check_resumable(checkpointer: Checkpointer, config: TrainConfig, steps_per_epoch: int) -> int | None:
    """The step to resume from, after checking the checkpoint is of this model and data: the step counts
    epochs and places the data, so a dataset that has grown or shrunk since cannot resume either."""
    step = checkpointer.latest_step()
    if step is None:
        return None
    current = resume_record(json.loads(config.to_json()), steps_per_epoch)
    problem = resume_problem(checkpointer.read_meta(step), current,
                             layout_matters=bool(config.grad_clip) and _has_parameter_groups(config))
    if problem:
        raise UserError(f"--workdir {config.workdir} holds a checkpoint (step {step}) of a different run: {problem}; "
                        f"use another --workdir")
    return step


class _StopSignal:
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def _train_loop(config: TrainConfig, dataset: Dataset, mesh: Any, state: TrainState, schedule: optax.Schedule,
                checkpointer: Checkpointer, run: RunLog) -> TrainResult:
    steps_per_epoch = dataset.steps_per_epoch
    train_step = make_train_step(mesh, label_smoothing=config.label_smoothing, aux_weight=config.aux_weight,
                                 remat=config.remat, mixing=Mixing(config.mixup_alpha, config.cutmix_alpha),
                                 grad_accum_steps=config.grad_accum_steps, multi_label=config.multi_label,
                                 ema_schedule=ema_schedule(config, steps_per_epoch))
    eval_step = make_eval_step(mesh, dataset.num_classes, multi_label=config.multi_label)
    stop_step = _stop_step(config, steps_per_epoch)
    step = int(parallel.to_host(state.step))
    meta = resume_record(json.loads(config.to_json()), steps_per_epoch)
    val_metrics, ema_metrics, confusion, stop = None, None, None, _StopSignal()

    def validate() -> tuple[dict, dict | None, np.ndarray | None]:
        """The weights' evaluation and (--model-ema) the average's, both logged ('val', 'val_ema'); the confusion
        matrix of the weights the run delivers (the average's when it keeps one)."""
        metrics, confusion = evaluate(eval_step, state, dataset.eval_batches("val"), mesh)
        run.log(step, step / steps_per_epoch, "val", metrics)
        if state.ema is None:
            return metrics, None, confusion
        averaged, confusion = evaluate(eval_step, state.averaged(), dataset.eval_batches("val"), mesh)
        run.log(step, step / steps_per_epoch, "val_ema", averaged)
        return metrics, averaged, confusion

    def save(metrics: dict | None = None) -> None:
        checkpointer.save(step, state.arrays(), meta, None if metrics is None else {"top1": headline_metric(metrics)})

    if step and step % steps_per_epoch == 0 and step < stop_step and not checkpointer.has_metrics(step):
        # Resumed from a stop at an epoch's end, before its evaluation: evaluate it now, as the
        # uninterrupted run did, so the log has every epoch's validation record.
        val_metrics, ema_metrics, _ = validate()

    estimate = _DurationEstimate(step, stop_step, run)
    with stop.installed():
        while step < stop_step and stop.signum is None:
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
                    logged = _mean(parallel.to_host(pending))
                    _check_finite(logged, step, checkpointer)  # before a diverged state is logged or saved
                    progress.update(len(pending), logged["loss"])
                    run.log(step, step / steps_per_epoch, "train",
                            {**logged, "lr": float(schedule(step - 1)), "images_per_sec": progress.images_per_second})
                    train_metrics.append(logged)
                    pending = []
                    if parallel.any_process(stop.signum is not None):
                        stop.signum = stop.signum or signal.SIGTERM
                        break
                if (config.checkpoint_every and step % config.checkpoint_every == 0 and not end_of_epoch
                        and step != stop_step):  # the last step is saved below, with its evaluation
                    _check_finite(_mean(parallel.to_host(pending)), step, checkpointer)
                    save()
                if step >= stop_step:
                    break
            progress.close()
            if stop.signum is not None:
                break
            if step % steps_per_epoch == 0 or step == stop_step:
                val_metrics, ema_metrics, confusion = validate()
                run.print(epoch_summary(epoch + 1, config.epochs, step, _mean(train_metrics), val_metrics,
                                        progress.images_per_second, time.perf_counter() - epoch_start, ema_metrics))
                save(ema_metrics or val_metrics)
                run.plot()

    if stop.signum is not None:
        save()
        checkpointer.wait()
        run.print(f"stopped by {signal.Signals(stop.signum).name} at step {step}: checkpoint saved in "
                  f"{checkpointer.directory}; run the same command again to resume")
        return TrainResult(Path(config.workdir).absolute(), step, {}, stop.signum, state)
    if val_metrics is None:  # resumed a finished run: nothing trained, evaluate again for the report
        val_metrics, ema_metrics, confusion = validate()
    checkpointer.wait()  # a save that failed in the background is reported before the run says it is done
    run.plot(confusion, dataset.class_names)
    if parallel.is_main_process():
        _save_final_weights(config, state, dataset.class_names, {"step": step, **(ema_metrics or val_metrics)}, run)
    run.print(f"done: step {step}, {headline(val_metrics)}"
              + (f", EMA {headline(ema_metrics)}" if ema_metrics else "")
              + f"; run directory: {Path(config.workdir).absolute()}")
    return TrainResult(Path(config.workdir).absolute(), step, val_metrics, None, state, ema_metrics)


class _DurationEstimate:
    """One log line, early in a run, with how long its training steps will take (timed after the first step,
    which compiles) and how to make it shorter: a run that would take hours on a CPU says so in seconds."""

    STEPS = 5  # timed steps

    def __init__(self, step: int, stop_step: int, run: RunLog):
        self.first, self.stop_step, self.run = step + 1, stop_step, run
        self.started: float | None = None

    def after(self, step: int, metrics: Any) -> None:
        if step not in (self.first, self.first + self.STEPS) or self.first + self.STEPS > self.stop_step:
            return
        jax.block_until_ready(metrics)
        if step == self.first:
            self.started = time.perf_counter()
            return
        per_step = (time.perf_counter() - self.started) / self.STEPS
        remaining = per_step * (self.stop_step - step)
        advice = "" if remaining < 300 else (" (shorten it with --epochs, --steps or a smaller --image-size; "
                                             "evaluation comes on top)")
        self.run.print(f"estimated training time: {_duration(remaining)} for {self.stop_step - step} more steps "
                       f"at {per_step:.2f} s/step{advice}")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _stop_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """The step the run ends at: the last of ``--epochs``, or ``--steps`` if sooner."""
    total_steps = steps_per_epoch * config.epochs
    return min(total_steps, config.steps or total_steps)


def _finished_metrics(workdir: Path, step: int) -> dict[str, float] | None:
    """The final evaluation of a run that ended at ``step`` and wrote its final weights, else None (the run
    still has to evaluate, or write the weights a full disk kept it from writing)."""
    from jaxnets.weights import WeightsError, load_weights

    try:
        if load_weights(workdir / FINAL_WEIGHTS).metadata.get("step") != step:
            return None
    except (WeightsError, OSError):
        return None
    records = [r for r in read_metrics(workdir / METRICS_FILE) if r["split"] == "val" and r["step"] == step]
    return {k: v for k, v in records[-1].items() if k not in ("step", "epoch", "split")} if records else None


def _save_final_weights(config: TrainConfig, state: TrainState, class_names: tuple[str, ...],
                        metrics: dict[str, float], run: RunLog) -> None:
    """``final_weights.safetensors``: the format ``jaxnets.load_pretrained`` reads. With ``--model-ema`` it holds
    the average (its header says so: ``weights: ema``, the adjusted ``ema_decay``), and ``metrics`` are the
    average's; a multi-label model's header says ``multi_label`` (``jaxnets.predict`` then thresholds each class)."""
    from jaxnets.weights import model_options, save_weights

    variables = parallel.to_host((state if state.ema is None else state.averaged()).variables)
    # Every option the model was built with (GoogLeNet's transform_input from pretrained weights too), so that
    # load_pretrained rebuilds the same model; apply_fn is the model's bound apply.
    options = model_options(config.spec, state.apply_fn.__self__)
    # The eval transform the model was validated with (sizes, and statistics for its in_chans), for jaxnets.predict.
    data = config.data_config()
    eval_transform = EvalTransform(data.eval_resize, data.eval_crop, mean=data.mean, std=data.std).to_record()
    recipe = {**({"weights": "ema", "ema_decay": ema_decay(config)} if state.ema is not None else {}),
              **({"multi_label": True} if config.multi_label else {})}
    score = {"val_map": metrics["map"]} if config.multi_label else {"val_top1": metrics["top1"]}
    path = save_weights(Path(config.workdir) / FINAL_WEIGHTS, config.spec, variables, model_options=options,
                        metadata={"source": "train.py", "dataset": config.dataset, "categories": list(class_names),
                                  "step": metrics["step"], **score, "eval_transform": eval_transform, **recipe})
    what = f" (the EMA of the weights, decay {recipe['ema_decay']:.6g}: {headline(metrics)})" if state.ema else ""
    run.print(f"final weights{what}: {path}")


def ema_schedule(config: TrainConfig, steps_per_epoch: int) -> EmaSchedule | None:
    """``--model-ema``'s schedule (None without it): torchvision's decay adjusted to the images per update, the
    update interval and the run's epochs."""
    if not config.model_ema:
        return None
    return EmaSchedule(ema_decay(config), config.model_ema_steps, steps_per_epoch, config.warmup_epochs)


def ema_decay(config: TrainConfig) -> float:
    """``--model-ema-decay`` adjusted as torchvision's reference does (``jaxnets.ema.adjusted_decay``)."""
    return ema_lib.adjusted_decay(config.model_ema_decay, config.update_batch_size, config.model_ema_steps,
                                  config.epochs)


def _check_finite(metrics: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
    """Stop a diverged run (a non-finite mean loss since the last check) with the reason, keeping its
    checkpoints as they are: none of them holds the diverged state."""
    loss = metrics.get("loss", 0.0)
    if not math.isfinite(loss):
        saved = checkpointer.latest_step()
        kept = f"the last checkpoint (step {saved}) is kept" if saved is not None else "no checkpoint was saved"
        raise UserError(f"training diverged: loss {loss} by step {step} (try a lower --lr); {kept}")


def _mean(records: list[dict[str, Any]]) -> dict[str, float]:
    if not records:
        return {}
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
