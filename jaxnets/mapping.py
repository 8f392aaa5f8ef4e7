"""torchvision state dicts <-> jaxnets Flax variables, both ways, on numpy arrays (no torch needed).

jaxnets names its modules as torchvision does, so the key map is a rule, applied strictly:
the Flax leaf ``params/layer1/0/conv1/kernel`` is the torch key ``layer1.0.conv1.weight``.
Every torch key must be consumed, every Flax leaf filled, and every shape equal; anything else
raises ``WeightMappingError`` naming the keys and shapes at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxnets.registry import ModelSpec, create_model, get_spec

# Flax leaf name -> torch parameter/buffer name.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# A buffer torch keeps per BatchNorm that no computation here reads (momentum is fixed).
IGNORED_SUFFIX = ".num_batches_tracked"
# Constructor options that decide whether optional modules exist; inferred from the state dict.
OPTIONAL_MODULES = {"aux_logits": ("aux1", "aux2")}

MAX_LISTED = 8


class WeightMappingError(ValueError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped keys."""


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """Map a torchvision state dict to ``{'params': ..., 'batch_stats': ...}`` of numpy float32 arrays.

    ``num_classes`` is read off the classifier; GoogLeNet's ``aux_logits`` off the presence of
    its auxiliary heads. Other ``options`` go to ``create_model`` (they must not change shapes).
    """
    spec = get_spec(name)
    state = {key: np.asarray(value) for key, value in state_dict.items()}
    classifier_key = torch_key(spec.classifier, "kernel")
    if classifier_key not in state:
        raise WeightMappingError(f"{name}: state dict has no classifier {classifier_key!r} "
                                 f"(keys start {_preview(state)}); is it a {name} state dict?")
    options = {"num_classes": int(state[classifier_key].shape[0]), **options}
    for option, modules in OPTIONAL_MODULES.items():
        if any(module in spec.head for module in modules):
            options.setdefault(option, any(k.startswith(f"{m}.") for k in state for m in modules))

    expected = torch_layout(name, **options)
    _check_keys(name, expected, {k for k in state if not k.endswith(IGNORED_SUFFIX)})
    flat: dict[tuple[str, ...], np.ndarray] = {}
    bad_shapes = []
    for key, (path, shape) in expected.items():
        if state[key].shape != shape:
            bad_shapes.append(f"{key}: got {tuple(state[key].shape)}, expected {shape}")
            continue
        flat[path] = _to_flax(spec, path, state[key])
    if bad_shapes:
        raise WeightMappingError(f"{name}: shape mismatch: " + "; ".join(bad_shapes[:MAX_LISTED]))
    return traverse_util.unflatten_dict(flat)


def to_torch_state_dict(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Map jaxnets variables back to torchvision's state dict keys and layouts, as numpy arrays (no torch
    import): ``load_state_dict({k: torch.tensor(v) ...}, strict=True)`` accepts it. ``num_batches_tracked``
    is written as 0: nothing in jaxnets counts batches."""
    spec = get_spec(name)
    flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats") if c in variables})
    state: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        state[torch_key("/".join(path[1:-1]), path[-1])] = _to_torch(spec, path, np.asarray(value))
        if path[0] == "batch_stats" and path[-1] == "mean":
            state[".".join(path[1:-1]) + IGNORED_SUFFIX] = np.array(0, np.int64)
    return state


def torch_key(module_path: str, flax_leaf: str) -> str:
    """``('layer1/0/conv1', 'kernel')`` -> ``'layer1.0.conv1.weight'``."""
    return f"{module_path.replace('/', '.')}.{TORCH_LEAF[flax_leaf]}"


def variable_shapes(name: str, **options: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax variable path -> shape for ``create_model(name, **options)``, without computing anything."""
    return dict(_variable_shapes(name, tuple(sorted(options.items()))))


@lru_cache(maxsize=64)
def _variable_shapes(name: str, options: tuple[tuple[str, Any], ...]) -> tuple[tuple[tuple[str, ...], tuple], ...]:
    model = create_model(name, **dict(options))
    size = max(224, *get_spec(name).weights.min_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(shapes).items())


def torch_layout(name: str, **options: Any) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """torch key -> (Flax variable path, torch shape) for the model ``create_model(name, **options)``."""
    return {torch_key("/".join(path[1:-1]), path[-1]): (path, _torch_shape(shape))
            for path, shape in variable_shapes(name, **options).items()}


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return flax_shape[::-1]
    return flax_shape


def _to_flax(spec: ModelSpec, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    value = value.astype(np.float32)
    if value.ndim == 4:
        # torch conv weight (out, in, kh, kw) -> lax HWIO (kh, kw, in, out).
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        module = "/".join(path[1:-1])
        if module in spec.flattened_linears:
            # torch flattens NCHW features (index c*H*W + h*W + w); jaxnets flattens NHWC (index
            # h*W*C + w*C + c). One copy: (out, C, H, W) -> (H, W, C, out) -> (H*W*C, out).
            c, h, w = spec.flattened_linears[module]
            return value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
        # torch Linear weight (out, in) -> Flax kernel (in, out).
        return value.T
    return value


def _to_torch(spec: ModelSpec, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The exact inverse of ``_to_flax``."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if value.ndim == 2:
        module = "/".join(path[1:-1])
        if module in spec.flattened_linears:
            c, h, w = spec.flattened_linears[module]
            return np.ascontiguousarray(value.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w))
        return np.ascontiguousarray(value.T)
    return value


def _check_keys(name: str, expected: Mapping[str, Any], present: set[str]) -> None:
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:MAX_LISTED])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:MAX_LISTED])}")
        raise WeightMappingError(f"{name}: state dict does not match the architecture: " + "; ".join(parts))


def _preview(state: Mapping[str, Any]) -> str:
    return ", ".join(list(state)[:3]) or "<empty>"
