"""The train state and the jitted data-parallel train step: a pure function of (state, batch).

Data parallelism is ``jax.jit`` over a device mesh (see ``jaxnets.parallel``): the state is replicated,
the batch is split, and BatchNorm statistics and gradients are over the global batch. Dropout keys are
``fold_in(rng, step)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxnets import ema as ema_lib
from jaxnets import host, kernels, parallel, transfer
from jaxnets import mixing as mixing_lib
from jaxnets.ema import EmaSchedule
from jaxnets.errors import UserError
from jaxnets.losses import binary_cross_entropy, cross_entropy
from jaxnets.mixing import Mixing
from jaxnets.models import GoogLeNetOutputs
from jaxnets.models.backbone import remat_compiler_options
from jaxnets.models.googlenet import AUX_WEIGHT
from jaxnets.registry import init_input

PyTree = Any


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


class GradientGroup(NamedTuple):
    """One stage whose gradient norm ``--log-grad-norms`` logs: its name (torchvision's module name, ``layer1``,
    ``features.3``, ``aux1``) and the parameter paths it holds (Flax path prefixes)."""

    name: str
    paths: tuple[tuple[str, ...], ...]


def gradient_groups(model: nn.Module, variables: PyTree, image_size: int) -> tuple[GradientGroup, ...]:
    """The model's parameters as stages, in the order a training forward pass reaches them, by one rule for every
    family: each top-level module of the parameter tree is a unit (ResNet's ``layer1``, GoogLeNet's ``inception4a``
    and ``aux1``, the classifier ``fc``), except a torch ``Sequential`` of layers (children named 0, 1, ..., each
    holding its own arrays: VGG's and AlexNet's ``features`` and ``classifier``), whose layers are units; and a unit
    without a kernel (a BatchNorm: ResNet's ``bn1``, VGG's ``features.1``) joins the unit before it, the layer it
    normalizes. The order is found by tracing one training forward pass (shapes only) on ``image_size`` images."""
    params = variables["params"]
    units = []
    for top, tree in params.items():
        sequential = all(key.isdigit() and _holds_arrays(child) for key, child in tree.items())
        units += [(top, key) for key in sorted(tree, key=int)] if sequential else [(top,)]
    order: dict[tuple[str, ...], None] = {}

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        order.update({unit: None for unit in units if path[:len(unit)] == unit})
        return next_fun(*args, **kwargs)

    # two images: training BatchNorm refuses one value per channel (a 1x1 map of one image)
    image = jax.ShapeDtypeStruct((2, *init_input(model, image_size).shape[1:]), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(0)}), dict(variables), image)
    unreached = [unit for unit in units if unit not in order]
    if unreached:
        raise ValueError(f"{type(model).__name__}: parameters never used in training: {unreached}")
    groups: list[list[tuple[str, ...]]] = []
    for unit in order:
        node = params[unit[0]] if len(unit) == 1 else params[unit[0]][unit[1]]
        if groups and not _has_kernel(node):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return tuple(GradientGroup(".".join(paths[0]), tuple(paths)) for paths in groups)


def _holds_arrays(tree: Any) -> bool:
    return isinstance(tree, Mapping) and all(not isinstance(leaf, Mapping) for leaf in tree.values())


def _has_kernel(tree: Any) -> bool:
    return isinstance(tree, Mapping) and any(key == "kernel" or _has_kernel(child) for key, child in tree.items())


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def group_norms(grads: PyTree, groups: tuple[GradientGroup, ...]) -> jax.Array:
    """The L2 norm of each group's gradients (``gradient_groups``), as one vector in the groups' order."""
    def subtree(paths):
        for path in paths:
            node = grads
            for key in path:
                node = node[key]
            yield from jax.tree.leaves(node)

    return jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(_at_least_f32(g))) for g in subtree(group.paths)))
                      for group in groups])


NO_MIXING = Mixing()
MIX_STREAM = 0x6D6978  # folded into a step's dropout key: the key of its MixUp / CutMix draws


def make_train_step(mesh: Any, *, label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT,
                    remat: bool = False, mixing: Mixing = NO_MIXING, grad_accum_steps: int = 1,
                    multi_label: bool = False, ema_schedule: EmaSchedule | None = None,
                    grad_norm_groups: tuple[GradientGroup, ...] | None = None):
    """``step(state, batch) -> (state, {'loss', 'accuracy'})``, jitted over ``mesh`` with the state donated:
    one optimizer update.

    GoogLeNet in training: loss = main + aux_weight * (aux1 + aux2), as in the paper; accuracy is the
    main head's (against the unmixed labels). ``remat``: the model is built with ``remat=True`` (compiled so that
    it saves memory on CPUs too, ``remat_compiler_options``). ``mixing``: MixUp / CutMix on each batch
    (``jaxnets.mixing``). ``grad_accum_steps`` N: the batch holds N micro-batches (the k-th takes rows k, k + N,
    ..., so each is spread over every device); their gradients are averaged into one update, and BatchNorm
    statistics are updated by each micro-batch in turn. ``multi_label``: multi-hot labels, sigmoid binary
    cross-entropy (``jaxnets.losses``), no accuracy. ``ema_schedule``: the state's average of the weights is
    updated after the update (``jaxnets.ema``). ``grad_norm_groups`` (``gradient_groups``): the metrics have
    ``grad_norm``, the L2 norm of each group's gradient of the update (the mean over micro-batches), in the groups'
    order; without it nothing is computed. The step runs under the kernel choice current when it is built
    (``jaxnets.kernels.bind``)."""

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
        if grad_norm_groups is not None:
            metrics = {**metrics, "grad_norm": group_norms(grads, grad_norm_groups)}
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params, step = optax.apply_updates(state.params, updates), state.step + 1
        ema = state.ema if ema_schedule is None else ema_lib.update(state.ema, params, batch_stats, step, ema_schedule)
        state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
        return state, metrics

    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(kernels.bind(train_step), in_shardings=(replicated, split),
                   out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options={**host.xla_cpu_options(), **remat_compiler_options(remat)})
