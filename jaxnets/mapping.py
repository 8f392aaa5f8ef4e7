"""torchvision state dicts <-> jaxnets Flax variables, both ways, on numpy arrays (no torch needed).

jaxnets names its modules as torchvision does, so the key map is a rule, applied strictly:
the Flax leaf ``params/layer1/0/conv1/kernel`` is the torch key ``layer1.0.conv1.weight``.
Every torch key must be consumed, every Flax leaf filled, and every shape equal; anything else
raises ``WeightMappingError`` naming the keys and shapes at fault.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxnets.errors import UserError
from jaxnets.registry import ModelRef, ModelSpec, get_spec

# Flax leaf name -> torch parameter/buffer name.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# A buffer torch keeps per BatchNorm that no computation here reads (momentum is fixed).
IGNORED_SUFFIX = ".num_batches_tracked"
# Constructor options that decide whether optional modules exist; inferred from the state dict.
OPTIONAL_MODULES = {"aux_logits": ("aux1", "aux2")}

MAX_LISTED = 8


class WeightMappingError(UserError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped keys."""


def from_torch_state_dict(model: ModelRef, state_dict: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """Map a torchvision state dict to ``{'params': ..., 'batch_stats': ...}`` of numpy float32 arrays.

    Values may be numpy arrays or torch tensors (``named_parameters()`` ones too; bfloat16 is upcast).
    ``num_classes`` is read off the classifier; GoogLeNet's ``aux_logits`` off the presence of its auxiliary
    heads; ``in_chans`` off the stem's kernel. A state dict without the classifier is a backbone
    (``features_only=True``; e.g. of ``create_feature_extractor``): every other key must still be there, those of
    the levels ``out_indices`` selects (all by default). Other ``options`` go to ``create_model`` (they must not
    change shapes).
    """
    spec = get_spec(model)
    name = spec.name
    state = {key: as_numpy(value) for key, value in state_dict.items() if not key.endswith(IGNORED_SUFFIX)}
    shapes = {path: _torch_to_flax_shape(state[key].shape) for path in _decisive_paths(spec)
              if path and (key := torch_key("/".join(path[1:-1]), path[-1])) in state}
    inferred = _inferred_options(spec, options, shapes, "state dict has", _preview(state), torch_key,
                                 lambda module: any(k.startswith(f"{module}.") for k in state))
    expected = torch_layout(spec, **{**inferred, **options})
    _check_layout(name, "state dict", {k: v.shape for k, v in state.items()},
                  {k: shape for k, (_, shape) in expected.items()})
    flat = {path: _to_flax(spec, path, state[key]) for key, (path, _) in expected.items()}
    return traverse_util.unflatten_dict(flat)


def to_torch_state_dict(model: ModelRef, variables: Mapping[str, Any], *, params_only: bool = False,
                        **options: Any) -> dict[str, np.ndarray]:
    """Map jaxnets variables back to torchvision's state dict keys and layouts, as numpy arrays (no torch
    import): ``load_state_dict({k: torch.tensor(v) ...}, strict=True)`` accepts it. ``num_batches_tracked``
    is written as 0: nothing in jaxnets counts batches.

    The variables must be exactly those of ``name`` (any number of classes and input channels; GoogLeNet with or
    without its aux heads; a ``features_only`` backbone, without the classifier, whose state dict
    ``create_feature_extractor``'s module accepts), else ``WeightMappingError``. ``options`` as in
    ``from_torch_state_dict`` (a backbone of some levels only: ``out_indices``). ``params_only`` maps a
    ``{'params': ...}`` tree alone (gradients, say): the result then has no BatchNorm buffers."""
    spec = get_spec(model)
    name = spec.name
    flat = traverse_util.flatten_dict(dict(variables))
    inferred = _variables_options(spec, flat, options)
    expected = {path: shape for path, shape in variable_shapes(spec, **{**inferred, **options}).items()
                if not params_only or path[0] == "params"}
    hint = "" if params_only or "batch_stats" in variables else " (params alone, e.g. gradients? pass params_only=True)"
    _check_layout(name, "variables", {"/".join(k): np.shape(v) for k, v in flat.items()},
                  {"/".join(k): shape for k, shape in expected.items()}, hint)
    state: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        state[torch_key("/".join(path[1:-1]), path[-1])] = _to_torch(spec, path, np.asarray(value))
        if path[0] == "batch_stats" and path[-1] == "mean":
            state[".".join(path[1:-1]) + IGNORED_SUFFIX] = np.array(0, np.int64)
    return state


def decided_options(model: ModelRef, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The model options that ``variables`` decide, as a weights file records them: GoogLeNet's ``aux_logits``
    (whether its aux heads are there), ``features_only=True`` for a backbone (no classifier), ``in_chans`` when
    the stem takes other than 3 channels."""
    options = _variables_options(get_spec(model), traverse_util.flatten_dict(dict(variables)), {})
    options.pop("num_classes", None)
    if options.get("in_chans") == 3:
        del options["in_chans"]
    return options


def _variables_options(spec: ModelSpec, flat: Mapping[tuple[str, ...], Any], given: Mapping[str, Any]) -> dict[
        str, Any]:
    """``_inferred_options`` of flattened Flax variables."""
    shapes = {path: tuple(np.shape(flat[path])) for path in _decisive_paths(spec) if path and path in flat}
    return _inferred_options(spec, given, shapes, "variables have", _preview({"/".join(k): v for k, v in flat.items()}),
                             lambda module, leaf: f"params/{module}/{leaf}",
                             lambda module: any("/".join(k).startswith(f"params/{module}/") for k in flat))


def as_numpy(value: Any) -> np.ndarray:
    """A state dict value as a numpy array: torch tensors detached (parameters require grad), moved to the CPU
    and, bfloat16 having no numpy dtype, upcast to float32. torch is never imported for numpy input."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded already
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _inferred_options(spec: ModelSpec, given: Mapping[str, Any], shapes: Mapping[tuple[str, ...], tuple],
                      what: str, preview: str, key: Callable[[str, str], str],
                      has_module: Callable[[str], bool]) -> dict[str, Any]:
    """The options the weights decide, unless ``given``: ``num_classes`` (the classifier's size), or
    ``features_only`` when there is no classifier but the stem is there (a backbone); ``in_chans`` (the stem
    kernel's input channels); GoogLeNet's ``aux_logits`` (whether ``has_module`` finds its auxiliary heads).
    ``shapes`` holds the Flax shapes of those of the ``_decisive_paths`` the weights have; ``key`` names a
    module's leaf as the weights do, for the error."""
    classifier, stem = _decisive_paths(spec)
    options: dict[str, Any] = {}
    if classifier in shapes:
        options["num_classes"] = int(shapes[classifier][-1])
    elif stem in shapes and given.get("features_only", True):
        options["features_only"] = True
    else:
        backbone = "" if stem is None else (f" (a backbone without it, features_only=True, starts at "
                                            f"{key('/'.join(stem[1:-1]), stem[-1])!r})")
        raise WeightMappingError(f"{spec.name}: {what} no classifier {key(spec.classifier, 'kernel')!r} (keys start "
                                 f"{preview}); are they {spec.name}'s?{backbone}")
    if stem in shapes:
        options["in_chans"] = int(shapes[stem][2])
    if not options.get("features_only") and not given.get("features_only"):
        for option, modules in OPTIONAL_MODULES.items():
            if any(module in spec.head for module in modules):
                options[option] = any(has_module(module) for module in modules)
    return {k: v for k, v in options.items() if k not in given}


@lru_cache(maxsize=64)
def _decisive_paths(spec: ModelSpec) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The Flax paths of the classifier's kernel and of the stem's kernel (the one convolution whose shape
    ``in_chans`` changes; None for a family without ``in_chans``): what the options are read off."""
    stems = stem_kernels(spec)
    if len(stems) > 1:
        raise TypeError(f"{spec.name}: expected one stem convolution, found {stems}")
    return ("params", *spec.classifier.split("/"), "kernel"), (stems[0] if stems else None)


@lru_cache(maxsize=64)
def stem_kernels(model: ModelRef) -> tuple[tuple[str, ...], ...]:
    """The Flax paths of the kernels whose shape depends on ``in_chans``: the stem convolution's (found by
    comparing the architecture at 3 and 1 input channels, so a new family needs no declaration)."""
    spec = get_spec(model)
    if "in_chans" not in spec.options:
        return ()
    rgb, gray = variable_shapes(spec, in_chans=3), variable_shapes(spec, in_chans=1)
    return tuple(path for path, shape in rgb.items() if gray[path] != shape)


@lru_cache(maxsize=64)
def classifier_modules(model: ModelRef) -> tuple[str, ...]:
    """The top-level modules a classifier has and a ``features_only`` backbone (of every level) lacks: the
    classifier and what feeds only it (VGG's and AlexNet's whole ``classifier``, GoogLeNet's ``fc`` and aux
    heads, ResNet's ``fc``)."""
    spec = get_spec(model)
    if "features_only" not in spec.options:
        return ()
    top = lambda shapes: dict.fromkeys(path[1] for path in shapes)  # noqa: E731
    backbone = top(variable_shapes(spec, features_only=True))
    return tuple(m for m in top(variable_shapes(spec)) if m not in backbone)


def torch_key(module_path: str, flax_leaf: str) -> str:
    """``('layer1/0/conv1', 'kernel')`` -> ``'layer1.0.conv1.weight'``."""
    return f"{module_path.replace('/', '.')}.{TORCH_LEAF[flax_leaf]}"


def variable_shapes(model: ModelRef, **options: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax variable path -> shape for ``create_model(model, **options)``, without computing anything."""
    return dict(_variable_shapes(get_spec(model), tuple(sorted(options.items()))))


@lru_cache(maxsize=64)
def _variable_shapes(spec: ModelSpec,
                     options: tuple[tuple[str, Any], ...]) -> tuple[tuple[tuple[str, ...], tuple], ...]:
    model = spec.create(**dict(options))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), spec.init_input(model), train=False))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(shapes).items())


def torch_layout(model: ModelRef, **options: Any) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """torch key -> (Flax variable path, torch shape) for the model ``create_model(model, **options)``."""
    return {torch_key("/".join(path[1:-1]), path[-1]): (path, _torch_shape(shape))
            for path, shape in variable_shapes(model, **options).items()}


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return flax_shape[::-1]
    return flax_shape


def _torch_to_flax_shape(torch_shape: tuple) -> tuple:
    """The inverse of ``_torch_shape``."""
    if len(torch_shape) == 4:  # OIHW -> HWIO
        return tuple(torch_shape[i] for i in (2, 3, 1, 0))
    if len(torch_shape) == 2:
        return tuple(torch_shape[::-1])
    return tuple(torch_shape)


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


def layout_problems(actual: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """What keeps ``actual`` (key -> shape) from being ``expected``: its missing, unexpected and mis-shaped
    keys, each kind counted with the first ``MAX_LISTED`` named; empty when they match."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    misshaped = [f"{k}: got {tuple(actual[k])}, expected {tuple(expected[k])}"
                 for k in sorted(set(actual) & set(expected)) if tuple(actual[k]) != tuple(expected[k])]
    return [f"{label} {len(keys)} key(s): {separator.join(keys[:MAX_LISTED])}"
            for label, keys, separator in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                                           ("mis-shaped", misshaped, "; ")) if keys]


def _check_layout(name: str, what: str, actual: Mapping[str, tuple], expected: Mapping[str, tuple],
                  hint: str = "") -> None:
    problems = layout_problems(actual, expected)
    if problems:
        raise WeightMappingError(f"{name}: the {what} and the architecture differ{hint}: " + "; ".join(problems))


def _preview(state: Mapping[str, Any]) -> str:
    return ", ".join(list(state)[:3]) or "<empty>"
