"""Pretrained weights as models: torchvision's converted into a cache, files opened and fitted to a model.

``load_pretrained`` finds converted weights in a cache (``$JAXNETS_HOME/weights``, default
``~/.cache/jaxnets/weights``), converting torchvision's on first use when torch is installed; ``for_new_task``
starts a model for another task from them. Every route from a file to a model fits the head layers
(``spec.head``) by one rule, ``_renew_head``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxnets import trees
from jaxnets.mapping import OPTIONAL_MODULES, WeightMappingError, from_torch_state_dict
from jaxnets.registry import ModelRef, ModelSpec, check_num_classes, get_spec
from jaxnets.weights.fileformat import (
    SUFFIX,
    PathLike,
    WeightsError,
    WeightsFile,
    check_model_options,
    check_variables,
    expected_shapes,
    file_sha256,
    load_weights,
    refuse_overwriting,
    save_weights,
)
from jaxnets.weights.torch_io import compare_with_torchvision, fetch_torchvision_state_dict, read_state_dict

logger = logging.getLogger(__name__)

HOME_ENV = "JAXNETS_HOME"
DEFAULT_HOME = "~/.cache/jaxnets"


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` wrote, from what, and how close it is to torchvision (when verified)."""

    name: str
    path: Path
    source: str
    source_sha256: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --- the cache and conversion -------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted torchvision weights live: ``$JAXNETS_HOME/weights`` (default ``~/.cache/jaxnets``)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / "weights"


def cached_weights_path(name: ModelRef) -> Path:
    """Cache file of torchvision's weights for ``name``, named like torchvision's (``resnet18-f37072fd``)."""
    return cache_dir() / (Path(get_spec(name).weights.filename).stem + SUFFIX)


def convert(name: ModelRef, source: PathLike | None = None, out: PathLike | None = None, *, verify: bool = False,
            model_options: Mapping[str, Any] | None = None, verify_image_size: int = 224,
            verify_batch_size: int = 2) -> Conversion:
    """Convert a torchvision state dict for ``name`` into a jaxnets weights file.

    ``source=None`` downloads torchvision's ImageNet weights (needs torch). ``out=None`` writes to
    the cache when the source is torchvision's own file (its SHA-256 matches), else next to the
    source as ``<stem>.jaxnets.safetensors``; ``out`` is never the source. With ``verify``, torchvision
    and jaxnets run on the same random batch first, and nothing is written when their logits differ
    beyond the tolerance.

    The recorded model options are ``model_options`` over those the state dict decides (GoogLeNet's
    ``aux_logits``) over, for torchvision's own file only, the options torchvision builds it with
    (GoogLeNet's ``transform_input=True``): a state dict does not say how its model was built, so any
    other file gets torchvision's constructor defaults unless ``model_options`` says otherwise.
    """
    spec = get_spec(name)
    model_options = check_model_options(spec, model_options or {})
    if source is None:
        state, label, sha256 = fetch_torchvision_state_dict(spec)
    else:
        state, label, sha256 = read_state_dict(source), Path(source).name, file_sha256(source)
    try:
        variables = from_torch_state_dict(spec, state)
    except WeightMappingError as exc:
        raise WeightMappingError(f"{label}: {exc}") from None
    is_torchvision = source is None or sha256.startswith(spec.weights.sha256_prefix)
    published = spec.weights.model_kwargs if is_torchvision else {}
    options = {**published, **_decided_options(spec, variables), **model_options}
    metadata = {"source": label, "source_sha256": sha256}
    if is_torchvision:
        metadata["torchvision_weights"] = spec.weights.torchvision_name
    if out is None:
        out = cached_weights_path(spec) if is_torchvision else Path(source).with_name(
            Path(source).stem + ".jaxnets" + SUFFIX)
    if source is not None:
        refuse_overwriting(source, out)
    diff = tolerance = None
    if verify:
        diff, tolerance = compare_with_torchvision(spec, state, variables, options,
                                                   image_size=verify_image_size, batch_size=verify_batch_size)
        if not diff <= tolerance:
            raise WeightsError(f"{label}: {spec.name} in jaxnets does not reproduce torchvision: max |logit diff| "
                               f"{diff:.3g} > tolerance {tolerance:.3g}; nothing written")
    path = save_weights(out, spec, variables, model_options=options, metadata=metadata)
    return Conversion(spec.name, path, label, sha256, diff, tolerance, metadata)


def _decided_options(spec: ModelSpec, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Options the state dict decided (GoogLeNet's aux_logits), recorded so the file rebuilds its model."""
    return {option: any(m in variables["params"] for m in modules)
            for option, modules in OPTIONAL_MODULES.items() if any(m in spec.head for m in modules)}


# --- from a file to a model -----------------------------------------------------------------------------


def open_pretrained(name: ModelRef, weights: PathLike | None = None) -> WeightsFile:
    """The weights file for ``name``: ``weights`` if given, else the cache, converting torchvision's
    weights on first use. A file of another model is refused."""
    spec = get_spec(name)
    path = Path(weights) if weights is not None else _cached_or_convert(spec)
    weights_file = load_weights(path)
    if weights_file.name != spec.name:
        raise WeightsError(f"{path}: holds {weights_file.name} weights, not {spec.name}")
    return weights_file


def _cached_or_convert(spec: ModelSpec) -> Path:
    path = cached_weights_path(spec)
    if not path.is_file():
        logger.warning("%s: no converted weights in %s; converting torchvision's", spec.name, path)
        convert(spec, out=path)
    return path


def load_pretrained(name: ModelRef, num_classes: int | None = None, weights: PathLike | None = None,
                    dtype: Any = jnp.float32, *, rng: int | jax.Array = 0,
                    **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` for ``name`` with pretrained weights (see ``open_pretrained``).

    With ``num_classes`` other than the checkpoint's, the head layers (``spec.head``) are freshly
    initialized from ``rng`` (and logged); every other variable is the checkpoint's, bit for bit.
    ``options`` go to ``create_model`` on top of the file's recorded model options.
    """
    spec = get_spec(name)
    if num_classes is not None:
        check_num_classes(num_classes)  # before a first use converts torchvision's weights for nothing
    return _instantiate(spec, open_pretrained(spec, weights), num_classes, dtype, rng, options)


def instantiate(weights_file: WeightsFile, num_classes: int | None = None, dtype: Any = jnp.float32, *,
                rng: int | jax.Array = 0, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a weights file describes and fit its variables to it (see ``load_pretrained``): the
    head is renewed only where the number of classes changes or the file lacks a head module the model builds."""
    return _instantiate(get_spec(weights_file.name), weights_file, num_classes, dtype, rng, options)


def _instantiate(spec: ModelSpec, weights_file: WeightsFile, num_classes: int | None, dtype: Any,
                 rng: int | jax.Array, options: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    num_classes = check_num_classes(weights_file.num_classes if num_classes is None else num_classes)
    model, variables, renewed = _build(spec, weights_file, num_classes, dtype, rng, options,
                                       new_task=num_classes != weights_file.num_classes)
    if renewed:
        logger.warning("%s: freshly initialized %s for %d classes (checkpoint %s has %d); train before use",
                       weights_file.name, ", ".join(renewed), num_classes, weights_file.path, weights_file.num_classes)
    return model, variables


def for_new_task(model: ModelRef, num_classes: int, weights: PathLike | None = None, dtype: Any = jnp.float32, *,
                 rng: int | jax.Array = 0, **options: Any) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The start of a fine-tuning run: ``(model, variables, re-initialized module paths)``.

    Opens ``weights`` (None: the cache, converting torchvision's on first use), builds the model with the
    file's recorded options updated by ``options``, and re-initializes every head module the model builds from
    ``rng`` for ``num_classes``, whatever the checkpoint's number of classes: its classifier was trained for
    another task. Every other variable is the checkpoint's, bit for bit."""
    spec = get_spec(model)
    num_classes = check_num_classes(num_classes)  # before a first use converts torchvision's weights for nothing
    return _build(spec, open_pretrained(spec, weights), num_classes, dtype, rng, options, new_task=True)


def reinitialize_head(name: ModelRef, variables: Mapping[str, Any], num_classes: int, rng: int | jax.Array = 0,
                      **options: Any) -> tuple[dict[str, Any], list[str]]:
    """Replace the head layers of ``variables`` by a fresh initialization for ``num_classes``:
    ``(new variables, re-initialized module paths)``. Other leaves are kept as they are; variables that do not
    fit the model (another model's, ``params`` alone) are refused rather than mixed with a fresh head."""
    spec = get_spec(name)
    model = spec.create(num_classes, **options)  # which checks num_classes
    return _renew_head(spec, model, variables, num_classes, options, rng, new_task=True, where=spec.name)


def _build(spec: ModelSpec, weights_file: WeightsFile, num_classes: int, dtype: Any, rng: int | jax.Array,
           options: Mapping[str, Any], *, new_task: bool) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The model ``weights_file`` (of ``spec``) describes, with ``options`` over its recorded ones, and its
    fitted variables. The recorded options are JSON: the schema gives them back their types (tuples)."""
    options = {**spec.check_options(weights_file.model_options, where=f"{weights_file.path}: "), **options}
    model = spec.create(num_classes, dtype, **options)
    variables, renewed = _renew_head(spec, model, weights_file.variables, num_classes, options, rng,
                                     new_task=new_task, where=f"{weights_file.path}: {spec.name}")
    return model, variables, renewed


# --- the head-renewal rule ---------------------------------------------------------------------------------


def _renew_head(spec: ModelSpec, model: nn.Module, variables: Mapping[str, Any], num_classes: int,
                options: Mapping[str, Any], rng: int | jax.Array, *, new_task: bool,
                where: str) -> tuple[dict[str, Any], list[str]]:
    """THE rule that fits the head modules (``spec.head``) of ``variables`` to ``model``, whatever the route:

    - a head module the model does not build is dropped (GoogLeNet with ``aux_logits=False``), as torchvision does;
    - one it builds is re-initialized from ``rng`` when the task is new (``new_task``: another number of
      classes, or a fine-tuning start) or when ``variables`` lack it; otherwise it is kept.

    Then the variables must fit the model exactly: ``(variables, re-initialized module paths)``."""
    expected = expected_shapes(spec, num_classes, options)
    built = _modules_in(expected, spec.head)
    variables = _without_modules(variables, [m for m in spec.head if m not in built])
    present = _modules_in(trees.flatten(variables), spec.head)
    renew = [m for m in built if new_task or m not in present]
    if renew:
        variables = _reinitialize(spec, model, variables, renew, rng)
    check_variables(where, variables, expected)
    return variables, renew


def _reinitialize(spec: ModelSpec, model: nn.Module, variables: Mapping[str, Any], modules: Sequence[str],
                  rng: int | jax.Array) -> dict[str, Any]:
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    size = spec.init_size

    def init_modules(key):
        # Only the selected leaves are outputs: XLA drops the rest of the init (and the forward pass).
        fresh = model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
        return {k: v for k, v in trees.flatten(fresh).items() if any(trees.in_module(k, m) for m in modules)}

    fresh = {k: np.asarray(v) for k, v in jax.jit(init_modules)(rng).items()}
    return trees.unflatten({**_without_flat(variables, modules), **fresh})


def _without_modules(variables: Mapping[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    return trees.unflatten(_without_flat(variables, modules)) if modules else dict(variables)


def _without_flat(variables: Mapping[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in trees.flatten(variables).items() if not any(trees.in_module(k, m) for m in modules)}


def _modules_in(keys: Iterable[str], modules: Sequence[str]) -> list[str]:
    keys = list(keys)
    return [m for m in modules if any(trees.in_module(k, m) for k in keys)]
