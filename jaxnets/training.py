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

from jaxnets import host, parallel, transfer, workdir_lock
from jaxnets.checkpointing import Checkpointer, resume_problem, resume_record
from jaxnets.config import TrainConfig, peak_learning_rate, resolve
from jaxnets.data import Dataset, load_dataset
from jaxnets.errors import UserError
from jaxnets.models import GoogLeNetOutputs
from jaxnets.models.googlenet import AUX_WEIGHT
from jaxnets.run_io import METRICS_FILE, Progress, RunLog, epoch_summary

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

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

    def arrays(self) -> dict[str, PyTree]:
        """The checkpointed part."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng}

    def with_arrays(self, arrays: dict[str, PyTree]) -> TrainState:
        return self.replace(**arrays)


def create_train_state(model: nn.Module, variables: PyTree, tx: optax.GradientTransformation, mesh: Any, *,
                       seed: int = 0, frozen_norm: tuple[str, ...] = (),
                       trainable_mask: PyTree | None = None) -> TrainState:
    """A replicated ``TrainState`` on ``mesh`` from initial ``variables``; the optimizer state is built on
    the devices, and every process computes the same one. The state may share buffers with ``variables``,
    and the train step donates the state: do not reuse ``variables`` after training."""
    trainable = None if trainable_mask is None else tuple(bool(t) for t in jax.tree.leaves(trainable_mask))
    if trainable is not None and len(trainable) != len(jax.tree.leaves(variables["params"])):
        raise UserError("trainable_mask does not have the structure of the parameters")
    replicated = parallel.replicated(mesh)

    def init(variables):
        return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(variables["params"]),
                "rng": jax.random.key_data(jax.random.key(seed))}

    arrays = jax.jit(init, out_shardings=replicated)(variables)
    return TrainState(apply_fn=model.apply, tx=tx, frozen_norm=tuple(frozen_norm), trainable=trainable, **arrays)



def init_variables(model: nn.Module, image_size: int, seed: int, mesh: Any) -> PyTree:
    """Fresh variables (torchvision's initializers), replicated on ``mesh``."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
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
    """Per-example cross-entropy in float32, with torch's label smoothing (uniform over all classes)."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(mesh: Any, *, label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT):
    """``step(state, batch) -> (state, {'loss', 'accuracy'})``, jitted over ``mesh`` with the state donated.

    GoogLeNet in training: loss = main + aux_weight * (aux1 + aux2), as in the paper; accuracy is the
    main head's."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            if state.trainable is not None:  # no gradient, hence no backward pass, through frozen leaves
                mask = jax.tree.unflatten(jax.tree.structure(params), state.trainable)
                params = transfer.stop_frozen_gradients(params, mask)
            variables = {**state.variables, "params": params}
            out, updates = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"],
                                          rngs={"dropout": dropout_rng}, frozen_norm=state.frozen_norm)
            logits, aux = (out.logits, (out.aux_logits1, out.aux_logits2)) if isinstance(
                out, GoogLeNetOutputs) else (out, ())
            loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
            for aux_logits in aux:
                loss += aux_weight * jnp.mean(cross_entropy(aux_logits, batch["label"], label_smoothing))
            return loss, (logits, updates.get("batch_stats", state.batch_stats))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return state, {"loss": loss, "accuracy": accuracy}

    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=host.xla_cpu_options())


def make_eval_step(mesh: Any, num_classes: int):
    """``step(state, batch) -> sums`` over the real (``mask``) examples of a padded batch: loss, top-1 and
    top-5 hits, count, and the confusion matrix (true x predicted). Evaluation never runs aux heads."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = state.apply_fn(state.variables, batch["image"], train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
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


def evaluate(eval_step, state: TrainState, batches: Iterator[dict], mesh: Any) -> tuple[dict[str, float], np.ndarray]:
    """Loss, top-1 (and top-5 with >= 5 classes) over every example of ``batches``; the confusion matrix."""
    totals = None
    for batch in parallel.prefetch_to_mesh(batches, mesh):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.to_host(totals)
    count = float(totals["count"])
    metrics = {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count}
    if totals["confusion"].shape[0] >= 5:
        metrics["top5"] = float(totals["top5"]) / count
    metrics["count"] = int(count)
    return metrics, totals["confusion"]


# --- the run -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the final evaluation
    interrupted: int | None = None  # the signal that stopped the run, if one did
    state: TrainState | None = None


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
    The run owns its workdir (``jaxnets.workdir_lock``): a second run on it is refused before it reads it."""
    config = start(config)
    with workdir_lock.hold(Path(config.workdir).absolute(), enabled=parallel.is_main_process()):
        return _train_and_evaluate(config)


def _train_and_evaluate(config: TrainConfig) -> TrainResult:
    config, mesh, dataset = setup(config)
    workdir = Path(config.workdir).absolute()
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    resume_step = _check_resumable(checkpointer, config, dataset.steps_per_epoch)

    run = RunLog(workdir, enabled=parallel.is_main_process(), resume_step=resume_step or 0)
    run.print(f"run directory: {workdir}")
    for note in dataset.notes:
        run.print(note)

    model, variables, note = build_model(config, dataset.num_classes, mesh)
    if note:
        run.print(note)
    trainable_mask, head_mask, frozen_norm = freeze_masks(config, variables["params"])
    tx, schedule = make_optimizer(config, dataset.steps_per_epoch, trainable_mask=trainable_mask, head_mask=head_mask)
    state = create_train_state(model, variables, tx, mesh, seed=config.seed, frozen_norm=frozen_norm,
                               trainable_mask=trainable_mask)
    if resume_step is not None:
        state = state.with_arrays(checkpointer.restore(resume_step, state.arrays()))
        run.print(f"resumed from step {resume_step} ({checkpointer.directory})")
    run.write_config(config.to_json())  # only now: a run that could not resume leaves the workdir's config as it was
    run.print(describe_run(config, dataset, mesh, state))
    if config.freeze != "none":
        run.print(f"--freeze {config.freeze}: {transfer.describe(variables['params'], trainable_mask)}"
                  + (f"; BatchNorm on running statistics in {', '.join(frozen_norm)}" if frozen_norm else ""))
    try:
        return _train_loop(config, dataset, mesh, state, schedule, checkpointer, run)
    finally:
        checkpointer.close()


def start(config: TrainConfig) -> TrainConfig:
    """Processes and compilation cache started, the config resolved: all a run needs before it takes its
    workdir. Idempotent (a resolved config resolves to itself)."""
    parallel.initialize(config.coordinator, config.num_processes, config.process_id)
    setup_compilation_cache(config.compile_cache)
    return resolve(config)


def setup(config: TrainConfig) -> tuple[TrainConfig, Any, Dataset]:
    """``start``, then the device mesh and this process's data."""
    config = start(config)
    mesh = parallel.make_mesh(config.devices)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "--eval-batch-size")
    dataset = load_dataset(config.data_config(), jax.process_index(), jax.process_count())
    return dataclasses.replace(config, num_classes=dataset.num_classes), mesh, dataset


def run_linear_probe(config: TrainConfig) -> dict[str, float]:
    """``--linear-probe svm|logreg``: fit a linear classifier on the frozen model's pre-logit features of
    the (eval-transformed) training set and score it on the validation set; results in the workdir."""
    config = start(config)
    with workdir_lock.hold(Path(config.workdir).absolute(), enabled=parallel.is_main_process()):
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
    from jaxnets.weights import for_new_task

    options = {"aux_logits": False} if config.no_aux else {}
    dtype = jnp.dtype(config.dtype)
    if config.pretrained is None:
        model = config.spec.create(num_classes, dtype, **options)
        return model, init_variables(model, config.image_size, config.seed, mesh), None
    weights = None if config.pretrained == "default" else config.pretrained
    model, variables, renewed = for_new_task(config.spec, num_classes, weights, dtype, rng=config.seed, **options)
    note = (f"pretrained weights: {weights or 'torchvision ImageNet (cache)'}; re-initialized "
            f"{', '.join(renewed)} for {num_classes} classes")
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
            f"{config.image_size}px; {len(devices)} {devices[0].platform} device(s) in {jax.process_count()} "
            f"process(es){_host_malloc(devices[0].platform)}, global batch {config.batch_size}, "
            f"{dataset.steps_per_epoch} steps/epoch x {config.epochs} epochs; "
            f"{config.optimizer} peak lr {peak_learning_rate(config):.4g} "
            f"(= {config.lr:g} x {config.batch_size}/256), {config.schedule} schedule"
            + (f"; backbone lr x {config.backbone_lr_mult:g}" if config.backbone_lr_mult != 1.0 else "")
            + (f"; layer-wise lr decay {config.layer_decay:g}" if config.layer_decay != 1.0 else ""))


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
    train_step = make_train_step(mesh, label_smoothing=config.label_smoothing, aux_weight=config.aux_weight)
    eval_step = make_eval_step(mesh, dataset.num_classes)
    steps_per_epoch = dataset.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    stop_step = min(total_steps, config.steps or total_steps)
    step = int(parallel.to_host(state.step))
    meta = resume_record(json.loads(config.to_json()), steps_per_epoch)
    val_metrics, confusion, stop = None, None, _StopSignal()

    def save(metrics: dict | None = None) -> None:
        checkpointer.save(step, state.arrays(), meta, None if metrics is None else {"top1": metrics["top1"]})

    if step and step % steps_per_epoch == 0 and step < stop_step and not checkpointer.has_metrics(step):
        # Resumed from a stop at an epoch's end, before its evaluation: evaluate it now, as the
        # uninterrupted run did, so the log has every epoch's validation record.
        val_metrics, _ = evaluate(eval_step, state, dataset.eval_batches("val"), mesh)
        run.log(step, step / steps_per_epoch, "val", val_metrics)

    with stop.installed():
        while step < stop_step and stop.signum is None:
            epoch, start = divmod(step, steps_per_epoch)
            epoch_start = time.perf_counter()
            progress = Progress(epoch, config.epochs, steps_per_epoch, start, config.batch_size,
                                enabled=config.progress and parallel.is_main_process())
            train_metrics: list[dict] = []
            pending: list[dict] = []
            batches = parallel.prefetch_to_mesh(dataset.train_batches(epoch, start), mesh)
            for batch in batches:
                state, metrics = train_step(state, batch)
                step += 1
                pending.append(metrics)
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
                val_metrics, confusion = evaluate(eval_step, state, dataset.eval_batches("val"), mesh)
                run.log(step, step / steps_per_epoch, "val", val_metrics)
                run.print(epoch_summary(epoch + 1, config.epochs, step, _mean(train_metrics), val_metrics,
                                        progress.images_per_second, time.perf_counter() - epoch_start))
                save(val_metrics)
                run.plot()

    if stop.signum is not None:
        save()
        checkpointer.wait()
        run.print(f"stopped by {signal.Signals(stop.signum).name} at step {step}: checkpoint saved in "
                  f"{checkpointer.directory}; run the same command again to resume")
        return TrainResult(Path(config.workdir).absolute(), step, {}, stop.signum, state)
    if val_metrics is None:  # resumed a finished run: nothing trained, evaluate again for the report
        val_metrics, confusion = evaluate(eval_step, state, dataset.eval_batches("val"), mesh)
    run.plot(confusion, dataset.class_names)
    if parallel.is_main_process():
        _save_final_weights(config, state, dataset.class_names, {"step": step, **val_metrics}, run)
    run.print(f"done: step {step}, val top1 {100 * val_metrics['top1']:.2f}%"
              + (f" top5 {100 * val_metrics['top5']:.2f}%" if "top5" in val_metrics else "")
              + f"; run directory: {Path(config.workdir).absolute()}")
    return TrainResult(Path(config.workdir).absolute(), step, val_metrics, None, state)


def _save_final_weights(config: TrainConfig, state: TrainState, class_names: tuple[str, ...],
                        metrics: dict[str, float], run: RunLog) -> None:
    """``final_weights.safetensors``: the format ``jaxnets.load_pretrained`` reads."""
    from jaxnets.weights import model_options, save_weights

    variables = parallel.to_host(state.variables)
    # Every option the model was built with (GoogLeNet's transform_input from pretrained weights too), so that
    # load_pretrained rebuilds the same model; apply_fn is the model's bound apply.
    options = model_options(config.spec, state.apply_fn.__self__)
    path = save_weights(Path(config.workdir) / FINAL_WEIGHTS, config.spec, variables, model_options=options,
                        metadata={"source": "train.py", "dataset": config.dataset, "categories": list(class_names),
                                  "step": metrics["step"], "val_top1": metrics["top1"],
                                  # the eval transform the model was validated with, for jaxnets.predict
                                  "eval_transform": {"resize_size": config.data_config().eval_resize,
                                                     "crop_size": config.image_size}})
    run.print(f"final weights: {path}")


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
