"""Which parameters a transfer-learning run trains, and how fast: freeze masks, frozen BatchNorm, optax
partition, learning-rate multipliers (backbone vs head, layer-wise decay).

A mask is a pytree of bools shaped like ``params`` (True = trainable). Patterns name parameters by their
'/'-joined module paths, which mirror torchvision's module names, so ``'conv1,bn1,layer1'`` freezes what a
torch user would expect. Frozen leaves go to ``optax.set_to_zero()`` through ``optax.partition``: unlike
``optax.masked``, which passes the raw gradient through for masked leaves, this gives them a zero update,
no optimizer state and no weight decay.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from jaxnets.errors import UserError
from jaxnets.registry import ModelRef, ModelSpec, get_spec

PyTree = Any
Path = tuple[str, ...]

NO_FREEZE = "none"
BACKBONE = "backbone"
FROZEN = "frozen"  # build_optimizer's partition label of frozen leaves


def trainable_mask(model: ModelRef, params: PyTree, freeze: str | Sequence[str]) -> PyTree:
    """A bool pytree like ``params``: True where a parameter is trained, False where it is frozen.

    ``freeze`` is ``'none'`` (full fine-tuning), ``'backbone'`` (everything but ``get_spec(model).head``), or a
    comma-separated string / sequence of shell-style patterns over module paths (``'conv1,bn1,layer1'``,
    ``'features/*'``, ``'layer[12]'``; torch's dots work too: ``'layer1.0'``). A pattern matches a parameter
    when it matches the whole of a leading run of its path components, so ``layer1`` never matches
    ``layer10`` and ``conv1`` means the stem, not ``layer1/0/conv1``.
    """
    spec = get_spec(model)
    name = spec.name
    flat = _flat(params, name)
    frozen = {path: False for path in flat}
    for pattern in _parse_freeze(freeze):
        if pattern == NO_FREEZE:
            continue
        if pattern == BACKBONE:
            head = _flat_head(spec, flat)
            matched = [path for path in flat if not head[path]]
        else:
            matched = [path for path in flat if _matches(pattern, path)]
            if not matched:
                raise UserError(f"{name}: freeze pattern {pattern!r} matches no parameter; "
                                f"top-level modules: {', '.join(_top_level(flat))}")
        frozen.update(dict.fromkeys(matched, True))
    if all(frozen.values()):
        raise UserError(f"{name}: freeze {_as_text(freeze)!r} leaves nothing trainable "
                        f"(all {len(flat)} parameter arrays frozen)")
    return traverse_util.unflatten_dict({path: not is_frozen for path, is_frozen in frozen.items()})


def head_mask(model: ModelRef, params: PyTree) -> PyTree:
    """A bool pytree like ``params``: True on the classifier head (``get_spec(model).head``, GoogLeNet's
    auxiliary heads included when present), the part a new task re-initializes."""
    spec = get_spec(model)
    return traverse_util.unflatten_dict(_flat_head(spec, _flat(params, spec.name)))


def frozen_modules(model: ModelRef, mask: PyTree) -> tuple[str, ...]:
    """The ``frozen_norm`` argument of ``model.apply``: module paths covering exactly the BatchNorm layers
    whose parameters are all frozen, so they normalize with their running statistics and never update them.

    Paths are merged upwards where every BatchNorm below is frozen (ResNet-18 with a frozen backbone gives
    ``('bn1', 'layer1', 'layer2', 'layer3', 'layer4')``). ``model`` is accepted for symmetry with the other
    functions and for error messages.
    """
    flat = _flat(mask, get_spec(model).name)
    _check_bools(flat, "mask")
    # A BatchNorm is the module that owns a 'scale' (convs and linears own a 'kernel').
    norms = {path[:-1] for path in flat if path[-1] == "scale"}
    norm_frozen = {norm: not any(v for p, v in flat.items() if p[:-1] == norm) for norm in norms}

    def all_frozen_under(prefix: Path) -> bool:
        return all(frozen for norm, frozen in norm_frozen.items() if norm[:len(prefix)] == prefix)

    covered: list[str] = []
    for norm in sorted(norm for norm, frozen in norm_frozen.items() if frozen):
        # The shortest (never empty) prefix whose BatchNorms are all frozen.
        prefix = next(norm[:k] for k in range(1, len(norm) + 1) if all_frozen_under(norm[:k]))
        joined = "/".join(prefix)
        if joined not in covered:
            covered.append(joined)
    return tuple(covered)


def build_optimizer(base_tx: optax.GradientTransformation, mask: PyTree, *, head_mask: PyTree | None = None,
                    backbone_lr_mult: float = 1.0, lr_mults: PyTree | None = None,
                    grad_clip: float | None = None) -> optax.GradientTransformation:
    """Wrap ``base_tx`` so that frozen leaves get a zero update and no optimizer state.

    ``grad_clip`` clips the global norm of the trainable gradients (frozen ones zeroed first), once over
    all of them as torch's ``clip_grad_norm_`` over the parameters that have gradients: before the
    learning-rate groups, each of which would otherwise be clipped on its own.

    With ``backbone_lr_mult != 1`` (which needs ``head_mask``), trainable leaves outside the head get
    ``base_tx``'s update scaled by the multiplier: a discriminative learning rate, as torch parameter
    groups with ``lr * mult`` (weight decay included, since optax folds it into the update).
    ``lr_mults`` (a float per leaf, e.g. ``layerwise_lr_mults``) multiplies on top of that.
    """
    _check_mult(backbone_lr_mult, "backbone_lr_mult")
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise UserError(f"grad_clip must be > 0 and finite, got {grad_clip!r} (None: no clipping)")
    if backbone_lr_mult != 1.0 and head_mask is None:
        raise UserError("backbone_lr_mult needs head_mask to tell the head from the backbone")
    _check_bools(_flat_like(mask, mask, "mask"), "mask")
    if head_mask is not None:
        _check_bools(_flat_like(head_mask, mask, "head_mask"), "head_mask")
    if lr_mults is not None:
        for path, mult in _flat_like(lr_mults, mask, "lr_mults").items():
            _check_mult(mult, f"lr_mults at {'/'.join(path)}")
    head_mask = jax.tree.map(lambda _: True, mask) if head_mask is None else head_mask
    lr_mults = jax.tree.map(lambda _: 1.0, mask) if lr_mults is None else lr_mults

    def effective(head: bool, mult: float) -> float:
        return float(mult) * (1.0 if head else backbone_lr_mult)

    mults = jax.tree.map(effective, head_mask, lr_mults)
    labels = jax.tree.map(lambda trainable, mult: f"lr x {mult:.6g}" if trainable else FROZEN, mask, mults)
    transforms = {FROZEN: optax.set_to_zero()}
    for label, mult in zip(jax.tree.leaves(labels), jax.tree.leaves(mults), strict=True):
        if label == FROZEN or label in transforms:
            continue
        transforms[label] = base_tx if mult == 1.0 else optax.chain(base_tx, optax.scale(mult))
    tx = optax.partition(transforms, labels)
    if grad_clip:
        frozen = jax.tree.map(lambda trainable: not trainable, mask)
        # The nesting is the optimizer state's layout that checkpoints record (checkpointing.OPTIMIZER_LAYOUT).
        tx = optax.chain(optax.chain(optax.masked(optax.set_to_zero(), frozen),
                                     optax.clip_by_global_norm(grad_clip)), tx)
    return _checked_against(mask, tx)


def _checked_against(mask: PyTree, tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``tx`` refusing params / updates that are not shaped like ``mask`` (a mask of another model) with a
    one-line error instead of jax's pytree structure error. Trace-time only: tree structures are static."""
    def init(params: PyTree) -> optax.OptState:
        _flat_like(params, mask, "params")
        return tx.init(params)

    def update(updates: PyTree, state: optax.OptState, params: PyTree | None = None, **extra: Any) -> Any:
        _flat_like(updates, mask, "updates")
        return tx.update(updates, state, params, **extra)
    return optax.GradientTransformationExtraArgs(init, update)


def layerwise_lr_mults(model: ModelRef, params: PyTree, decay: float) -> PyTree:
    """Layer-wise learning-rate decay (as BEiT/ELECTRA): the head gets 1, the backbone's last block
    ``decay``, the one before ``decay**2``, ... down to the stem, in forward order.

    A block is a top-level module (``conv1``, ``inception4a``) or a numbered child of a torch Sequential
    (``layer3/1``, ``features/7``, ``classifier/4``); pass the result to ``build_optimizer(lr_mults=...)``.
    """
    if not 0 < decay <= 1:
        raise UserError(f"layer decay must be in (0, 1], got {decay}")
    spec = get_spec(model)
    name = spec.name
    flat = _flat(params, name)
    head = _flat_head(spec, flat)
    backbone_blocks = {_block(path[:-1]) for path in flat if not head[path]}
    unknown = sorted(backbone_blocks - set(_forward_order(spec)))
    if unknown:
        raise UserError(f"{name}: params have block(s) {', '.join(unknown)} that {name} does not have "
                        "(parameters of another model?)")
    blocks = [block for block in _forward_order(spec) if block in backbone_blocks]
    depth = {block: len(blocks) - i for i, block in enumerate(blocks)}
    return traverse_util.unflatten_dict({p: 1.0 if head[p] else decay ** depth[_block(p[:-1])] for p in flat})


def stop_frozen_gradients(params: PyTree, mask: PyTree) -> PyTree:
    """``params`` with ``jax.lax.stop_gradient`` on frozen leaves: call inside the loss so that no backward
    pass is computed through a frozen prefix of the network."""
    _check_bools(_flat_like(mask, params, "mask", "params"), "mask")
    return jax.tree.map(lambda p, trainable: p if trainable else jax.lax.stop_gradient(p), params, mask)


def describe(params: PyTree, mask: PyTree) -> str:
    """``'frozen 11.2M / trainable 5.1k params'``: for the training log."""
    flat_mask = _flat_like(mask, params, "mask", "params")
    _check_bools(flat_mask, "mask")
    sizes = {path: int(np.size(p)) for path, p in traverse_util.flatten_dict(params).items()}
    trainable = sum(size for path, size in sizes.items() if flat_mask[path])
    frozen = sum(sizes.values()) - trainable
    return f"frozen {_human(frozen)} / trainable {_human(trainable)} params"


# --- helpers ----------------------------------------------------------------------------


def _flat(tree: PyTree, name: str) -> dict[Path, Any]:
    if not isinstance(tree, Mapping) or not tree:
        raise UserError(f"{name}: expected a non-empty dict of parameters, got {type(tree).__name__}")
    if "params" in tree and set(tree) <= {"params", "batch_stats"}:
        raise UserError(f"{name}: pass variables['params'], not the whole variables dict")
    return traverse_util.flatten_dict(tree)


def _flat_like(tree: PyTree, reference: PyTree, what: str, reference_what: str = "mask") -> dict[Path, Any]:
    """``tree`` flattened, if it has exactly the leaf paths of ``reference`` (a mask from another model,
    or params instead of a mask, would otherwise fail deep inside jax or with a bare KeyError)."""
    if not isinstance(tree, Mapping) or not isinstance(reference, Mapping):
        raise UserError(f"{what} and {reference_what} must be dicts shaped like params, "
                        f"got {type(tree).__name__} and {type(reference).__name__}")
    flat, expected = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(reference)
    if flat.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - flat.keys()), sorted(flat.keys() - expected.keys())
        where = (f"{'/'.join(missing[0])} is in {reference_what} but not in {what}" if missing
                 else f"{'/'.join(extra[0])} is in {what} but not in {reference_what}")
        raise UserError(f"{what} does not match {reference_what} ({len(missing)} leaves missing, {len(extra)} extra): "
                        f"{where}; built for another model?")
    return flat


def _check_bools(flat: dict[Path, Any], what: str) -> None:
    """Mask leaves are Python/NumPy bools: an array there means params were passed instead of a mask."""
    for path, leaf in flat.items():
        if not isinstance(leaf, bool | np.bool_):
            raise UserError(f"{what} leaves must be bools (True = trainable), got {type(leaf).__name__} at "
                            f"{'/'.join(path)}; pass a mask from trainable_mask or head_mask, not params")


def _check_mult(mult: Any, where: str) -> None:
    """A learning-rate multiplier: finite and > 0 (NaN fails ``<= 0`` too, so test what is allowed)."""
    try:
        value = float(mult)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"learning-rate multipliers must be > 0 and finite, got {mult!r} for {where} "
                        "(freeze those parameters instead)")


def head_modules(spec: ModelSpec) -> tuple[Path, ...]:
    """The head's module paths (``spec.head``, the classifier first) as tuples of names."""
    return tuple(tuple(module.split("/")) for module in spec.head)


def in_head(path: Path, modules: tuple[Path, ...]) -> bool:
    """THE head rule: a parameter path is in the head when it lies under one of the head's ``modules``."""
    return any(path[:len(module)] == module for module in modules)


def _flat_head(spec: ModelSpec, flat: dict[Path, Any]) -> dict[Path, bool]:
    modules = head_modules(spec)
    if not any(in_head(path, modules[:1]) for path in flat):
        raise UserError(f"{spec.name}: parameters have no classifier {spec.classifier!r}; "
                        f"top-level modules: {', '.join(_top_level(flat))}")
    return {path: in_head(path, modules) for path in flat}


def _block(module: Path) -> str:
    """The block of a module: its top-level module, or a numbered child of a Sequential container."""
    return "/".join(module[:2]) if len(module) > 1 and module[1].isdigit() else module[0]


@functools.cache
def _forward_order(spec: ModelSpec) -> tuple[str, ...]:
    """Blocks in the order the forward pass calls them (traced abstractly, nothing is computed)."""
    model = spec.create()
    calls: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path:
            calls.append(_block(tuple(context.module.path)))
        return next_fun(*args, **kwargs)

    size = spec.init_size
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return tuple(dict.fromkeys(calls))


def _parse_freeze(freeze: str | Sequence[str]) -> list[str]:
    items = freeze.split(",") if isinstance(freeze, str) else list(freeze)
    patterns = [item.strip().replace(".", "/").strip("/") for item in items]
    if not patterns or not all(patterns):
        raise UserError(f"freeze {_as_text(freeze)!r}: empty pattern; use 'none', 'backbone' or module paths")
    if NO_FREEZE in patterns and len(patterns) > 1:
        raise UserError(f"freeze {_as_text(freeze)!r}: 'none' cannot be combined with other patterns")
    return patterns


def _matches(pattern: str, path: Path) -> bool:
    return any(fnmatch.fnmatchcase("/".join(path[:k]), pattern) for k in range(1, len(path) + 1))


def _top_level(flat: dict[Path, Any]) -> list[str]:
    return list(dict.fromkeys(path[0] for path in flat))


def _as_text(freeze: str | Sequence[str]) -> str:
    return freeze if isinstance(freeze, str) else ",".join(freeze)


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
