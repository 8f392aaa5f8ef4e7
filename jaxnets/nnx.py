"""Every jaxnets model as a Flax NNX module, over its one Linen definition.

``create_model`` and ``load_pretrained`` return a ``Model``: an ``nnx.Module`` whose state is the Linen model's
variables, ``params`` as ``nnx.Param`` and BatchNorm's running statistics as ``nnx.BatchStat``, at the paths the
Linen variables have (``('params', 'layer1', '0', 'conv1', 'kernel')``, ``('batch_stats', 'bn1', 'mean')``).
Calling it runs the Linen model's ``apply``: no architecture is defined twice, and the numbers are Linen's.

As torchvision's modules and NNX's own, a ``Model`` starts in training mode: ``model.eval()`` switches
BatchNorm to its running statistics, dropout off and GoogLeNet's auxiliary outputs off, ``model.train()``
back (``nnx.view(model, deterministic=..., use_running_average=...)`` gives such a view without changing it).

Transfer learning uses NNX's own tools: ``head_filter(name)`` and ``backbone_filter(name)`` select the
parameters of the head (``ModelSpec.head``, what ``jaxnets.transfer`` keeps trainable under
``--freeze backbone``) or the rest, for ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.DiffState``;
``model.freeze(...)`` makes the frozen BatchNorm layers keep their statistics in training, as ``--freeze``
does, and returns the filter of what stays trainable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util
from flax.nnx import filterlib

from jaxnets import registry, transfer, trees
from jaxnets import weights as weights_lib
from jaxnets.errors import UserError
from jaxnets.layers import model_name
from jaxnets.registry import ModelRef, get_spec

__all__ = ["Model", "backbone_filter", "create_model", "from_linen", "head_filter", "linen_of", "load_pretrained",
           "save_weights", "to_linen", "to_linen_variables"]

PARAMS, BATCH_STATS = "params", "batch_stats"  # the Linen collections, the first component of every state path
_KINDS = {PARAMS: nnx.Param, BATCH_STATS: nnx.BatchStat}
Filter = Any  # an NNX filter: a Variable type, a predicate (path, value) -> bool, nnx.All(...), ...


class Model(nnx.Module):
    """A jaxnets Linen model and its variables as one stateful NNX module.

    ``model(x)`` (NHWC images) returns what ``linen_module.apply(variables, x, train=...)`` returns: logits, a
    ``features_only`` backbone's maps, and GoogLeNet's ``GoogLeNetOutputs`` in training mode. In training mode
    BatchNorm normalizes by the batch and updates its statistics (except in the frozen layers, see ``freeze``),
    and dropout draws its masks from ``rngs``'s ``dropout`` stream. ``pre_logits=True`` returns the pooled
    features instead of the logits.
    """

    def __init__(self, linen_module: nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None):
        spec = get_spec(model_name(linen_module))
        where = f"{spec.name} variables"
        unknown = sorted(set(variables) - set(_KINDS))
        if unknown:
            raise UserError(f"{where}: unknown collection(s) {', '.join(unknown)}; a jaxnets model has "
                            f"{' and '.join(_KINDS)}")
        weights_lib.check_variables(where, variables, weights_lib.expected_shapes(
            spec, linen_module.num_classes, spec.recorded_options(linen_module)))
        self.model_name = spec.name
        self.linen_module = linen_module
        for collection, kind in _KINDS.items():
            tree = trees.plain(variables.get(collection, {}))
            setattr(self, collection, nnx.data(jax.tree.map(lambda value, kind=kind: kind(jnp.asarray(value)), tree)))
        # One key from the caller's dropout stream (its default one, else its params one), then a stream of the model's
        # own, as a torch model draws from the global generator: no state shared with other modules (NNX's tree mode
        # refuses shared state).
        rngs = rngs or nnx.Rngs(0)
        self.rngs = nnx.Rngs(dropout=rngs.dropout() if "dropout" in rngs or "default" in rngs else rngs.params())
        self.deterministic = False  # dropout on: training mode, as torchvision's and NNX's modules start
        self.use_running_average = False  # BatchNorm on the batch's statistics, updating the running ones
        self.frozen_norm: tuple[str, ...] = ()  # BatchNorm module paths kept in eval mode (``freeze``)

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (``model.train()``), as torch's ``module.training``."""
        if self.deterministic != self.use_running_average:
            raise UserError(f"{self.model_name}: deterministic={self.deterministic} with use_running_average="
                            f"{self.use_running_average}: a jaxnets model switches dropout and BatchNorm together "
                            "(Linen's train argument); use model.train() or model.eval()")
        return not self.use_running_average

    def set_view(self, deterministic: bool | None = None, use_running_average: bool | None = None) -> None:
        """What ``nnx.view`` calls: ``deterministic`` (dropout off) and ``use_running_average`` (BatchNorm on
        its running statistics) both True is eval mode, both False training mode."""
        if deterministic is not None:
            self.deterministic = deterministic
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, *, pre_logits: bool = False) -> Any:
        variables = to_linen_variables(self)
        if not self.training:
            return self.linen_module.apply(variables, x, train=False, pre_logits=pre_logits)
        out, updates = self.linen_module.apply(variables, x, train=True, pre_logits=pre_logits,
                                               frozen_norm=self.frozen_norm, rngs={"dropout": self.rngs.dropout()},
                                               mutable=[BATCH_STATS])
        new_stats = traverse_util.flatten_dict(trees.plain(updates.get(BATCH_STATS, {})))
        for path, variable in traverse_util.flatten_dict(self.batch_stats).items():
            variable[...] = new_stats[path]
        return out

    def freeze(self, frozen: str | Sequence[str] | Filter) -> Filter:
        """Freeze part of the model, as ``train.py --freeze`` does: returns the filter of the parameters that stay
        trainable (for ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.DiffState``), and from now on the BatchNorm
        layers whose parameters are all frozen normalize with, and never update, their running statistics, even in
        training mode.

        ``frozen``: what ``--freeze`` takes (``'backbone'``, ``'none'``, module patterns such as
        ``'conv1,bn1,layer1'``), or an NNX filter over this model's parameters (``backbone_filter(name)``).
        """
        flat = traverse_util.flatten_dict(self.params)
        if isinstance(frozen, str) or (isinstance(frozen, Sequence) and all(isinstance(p, str) for p in frozen)):
            arrays = traverse_util.unflatten_dict({path: variable.get_value() for path, variable in flat.items()})
            flat_mask = traverse_util.flatten_dict(transfer.trainable_mask(self.model_name, arrays, frozen))
        else:
            predicate = filterlib.to_predicate(frozen)
            flat_mask = {path: not predicate((PARAMS, *path), variable) for path, variable in flat.items()}
            if not any(flat_mask.values()):
                raise UserError(f"{self.model_name}: the filter {frozen!r} freezes every parameter "
                                f"(all {len(flat)} arrays); nothing would train")
        self.frozen_norm = transfer.frozen_modules(self.model_name, traverse_util.unflatten_dict(flat_mask))
        if all(flat_mask.values()):
            return nnx.Param
        trainable = frozenset(tuple(path) for path, trains in flat_mask.items() if trains)
        return nnx.All(nnx.Param, _ParamPaths(trainable))


# --- building -----------------------------------------------------------------------------------------------


def create_model(name: ModelRef, num_classes: int = 1000, dtype: Any = jnp.float32, *, rngs: nnx.Rngs | None = None,
                 **options: Any) -> Model:
    """A freshly initialized ``Model`` (torchvision's initializers), as ``jaxnets.create_model`` + Linen's ``init``
    with the key ``rngs.params()``; ``rngs`` (default ``nnx.Rngs(0)``) also seeds the dropout stream. ``options``
    are ``jaxnets.create_model``'s (``dropout``, ``aux_logits``, ``features_only``, ``in_chans``, ...)."""
    rngs = rngs or nnx.Rngs(0)
    spec = get_spec(name)
    module = registry.create_model(spec, num_classes, dtype, **options)
    dummy = registry.init_input(module, spec.init_size)
    # Jitted, XLA keeps only the initializers: the forward pass that shapes them is dropped.
    variables = jax.jit(lambda key: module.init({PARAMS: key}, dummy, train=False))(rngs.params())
    return Model(module, variables, rngs=rngs)


def load_pretrained(name: ModelRef, num_classes: int | None = None, weights: weights_lib.PathLike | None = None,
                    dtype: Any = jnp.float32, *, rngs: nnx.Rngs | None = None, **options: Any) -> Model:
    """``jaxnets.load_pretrained`` as a ``Model``: torchvision's weights by name (None: ``IMAGENET1K_V1``) or a
    jaxnets weights file; with another ``num_classes`` the head is initialized from ``rngs.params()``. ``options``
    (``features_only``, ``in_chans``, ...) go over the file's recorded ones."""
    rngs = rngs or nnx.Rngs(0)
    module, variables = weights_lib.load_pretrained(name, num_classes, weights, dtype, rng=rngs.params(), **options)
    return Model(module, variables, rngs=rngs)


def from_linen(linen_module: nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None) -> Model:
    """A ``Model`` of a jaxnets Linen module and its variables (what ``jaxnets.load_pretrained`` returns), which
    must fit it (a ``WeightsError`` names what does not). JAX arrays are shared, not copied: a step that donates the
    model's state (``nnx.jit(..., donate_argnames=...)``) consumes them."""
    return Model(linen_module, variables, rngs=rngs)


def to_linen(model: Model) -> tuple[nn.Module, dict[str, Any]]:
    """``(linen_module, variables)`` of ``model``: what ``jaxnets.export_model``, ``jaxnets.evaluate`` and every
    Linen-taking function take. The inverse of ``from_linen``."""
    variables = to_linen_variables(model)  # which checks that model is one
    return model.linen_module, variables


def linen_of(model: Model, variables: Mapping[str, Any] | None, where: str) -> tuple[nn.Module, dict[str, Any]]:
    """``to_linen(model)`` for a function that takes ``(model, variables)`` and is given an NNX model (which carries
    its own variables: ``variables`` must be None). ``where`` names the function in the error."""
    if variables is not None:
        raise UserError(f"{where}: an NNX model carries its own variables; pass variables=None")
    return to_linen(model)


def to_linen_variables(model: Model) -> dict[str, Any]:
    """The Linen variables of ``model``'s current state: ``{'params': ..., 'batch_stats': ...}`` (no
    ``batch_stats`` where the model has no BatchNorm, as Linen's ``init`` gives)."""
    if not isinstance(model, Model):
        raise UserError(f"expected a jaxnets.nnx.Model, got {type(model).__name__}")
    variables = {}
    for collection in _KINDS:
        tree = getattr(model, collection)
        if tree:
            variables[collection] = jax.tree.map(lambda v: v.get_value(), tree,
                                                 is_leaf=lambda v: isinstance(v, nnx.Variable))
    return variables


def save_weights(path: weights_lib.PathLike, model: Model, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state as a jaxnets weights file (``jaxnets.save_weights``, with the options it was built
    with), which ``jaxnets.load_pretrained`` and this module's ``load_pretrained`` read back."""
    module, variables = to_linen(model)
    return weights_lib.save_weights(path, model.model_name, variables,
                                    model_options=weights_lib.model_options(model.model_name, module),
                                    metadata=metadata)


# --- transfer-learning filters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UnderModules:
    """NNX filter: the ``params`` under any of ``modules``, by ``jaxnets.transfer``'s head rule (``in_head``)."""

    modules: tuple[tuple[str, ...], ...]

    def __call__(self, path: tuple, value: Any) -> bool:
        return bool(path) and path[0] == PARAMS and transfer.in_head(tuple(str(p) for p in path[1:]), self.modules)

    def __repr__(self) -> str:
        return f"UnderModules({', '.join('/'.join(m) for m in self.modules)})"


@dataclass(frozen=True)
class _ParamPaths:
    """NNX filter: exactly these ``params`` (Linen paths without the collection)."""

    paths: frozenset[tuple[str, ...]]

    def __call__(self, path: tuple, value: Any) -> bool:
        return len(path) > 1 and path[0] == PARAMS and tuple(str(part) for part in path[1:]) in self.paths

    def __repr__(self) -> str:
        return f"ParamPaths({len(self.paths)} arrays)"


def head_filter(name: ModelRef | Model) -> Filter:
    """The parameters of ``name``'s head (``get_spec(name).head``: the classifier, GoogLeNet's auxiliary heads
    too), what ``jaxnets.transfer.head_mask`` marks and ``--freeze backbone`` trains: for
    ``nnx.Optimizer(model, tx, wrt=head_filter(name))`` and ``nnx.DiffState(0, head_filter(name))``."""
    return nnx.All(nnx.Param, _UnderModules(transfer.head_modules(_spec(name))))


def backbone_filter(name: ModelRef | Model) -> Filter:
    """The parameters outside ``name``'s head: what ``--freeze backbone`` freezes (``model.freeze(...)``)."""
    return nnx.All(nnx.Param, nnx.Not(_UnderModules(transfer.head_modules(_spec(name)))))


def _spec(name: ModelRef | Model) -> registry.ModelSpec:
    return get_spec(name.model_name if isinstance(name, Model) else name)
