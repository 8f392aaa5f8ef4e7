"""Pretrained weights as models: torchvision's converted into a cache, files opened and fitted to a model.

``load_pretrained`` finds converted weights in a cache (``$JAXNETS_HOME/weights``, default
``~/.cache/jaxnets/weights``), converting torchvision's on first use when torch is installed; ``for_new_task``
starts a model for another task from them. Every route from a file to a model fits the head layers
(``spec.head``) by one rule, ``_renew_head``.
"""

from __future__ import annotations

import contextlib
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

from jaxnets import locks, trees
from jaxnets.layers import check_in_chans
from jaxnets.mapping import (
    WeightMappingError,
    classifier_modules,
    decided_options,
    from_torch_state_dict,
    stem_kernels,
)
from jaxnets.registry import (
    NO_CLASSIFIER,
    ModelRef,
    ModelSpec,
    PretrainedWeights,
    check_num_classes,
    get_spec,
    is_weights_name,
)
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
    require_file,
    save_weights,
)
from jaxnets.weights.torch_io import compare_with_torchvision, fetch_torchvision_state_dict, read_state_dict

logger = logging.getLogger(__name__)

HOME_ENV = "JAXNETS_HOME"
IN_CHANS = 3  # what torchvision's weights take: RGB
CACHE_WAIT_SECONDS = 1800.0  # a first use waits this long for another process converting the same weights
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


def cached_weights_path(name: ModelRef, weights: str | None = None) -> Path:
    """Cache file of torchvision's weights ``weights`` (None: ``IMAGENET1K_V1``) for ``name``, named like
    torchvision's file (``resnet50-0676ba61``; its ``IMAGENET1K_V2``: ``resnet50-11ad3fa6``)."""
    return cache_dir() / (Path(get_spec(name).get_weights(weights).filename).stem + SUFFIX)


def resolve_weights(name: ModelRef, weights: PathLike | None) -> PretrainedWeights | Path:
    """What ``weights`` stands for: torchvision's weights by name (None: jaxnets' default ``IMAGENET1K_V1``;
    ``'IMAGENET1K_V2'``; ``'DEFAULT'``, torchvision's alias for its best) or, for anything not spelled like a
    name (``is_weights_name``), a file. An unknown name is a ``UserError`` listing the model's weights."""
    if weights is None or is_weights_name(weights):
        return get_spec(name).get_weights(weights)
    return Path(weights)


def torchvision_weights_of(weights_file: WeightsFile) -> PretrainedWeights | None:
    """The torchvision weights a file was converted from (recorded by ``convert``), None for any other file."""
    version = weights_file.metadata.get("torchvision_weights")
    return get_spec(weights_file.name).weight_versions.get(version) if isinstance(version, str) else None


def convert(name: ModelRef, source: PathLike | None = None, out: PathLike | None = None, *, verify: bool = False,
            model_options: Mapping[str, Any] | None = None, verify_image_size: int = 224,
            verify_batch_size: int = 2, weights: str | None = None) -> Conversion:
    """Convert a torchvision state dict for ``name`` into a jaxnets weights file.

    ``source=None`` downloads torchvision's ImageNet weights ``weights`` (a name: None is ``IMAGENET1K_V1``,
    see ``resolve_weights``; needs torch). A ``source`` is torchvision's own file when its SHA-256 matches one
    of the model's registered versions (given ``weights``, it must be that one's). ``out=None`` writes to
    the cache when the source is torchvision's own file, else next to the
    source as ``<stem>.jaxnets.safetensors``; ``out`` is never the source. With ``verify``, torchvision
    and jaxnets run on the same random batch first, and nothing is written when their logits differ
    beyond the tolerance. A cache entry has one writer at a time: another process converting into it
    is a ``DirectoryInUse`` error at once.

    The recorded model options are ``model_options`` over those the state dict decides (GoogLeNet's
    ``aux_logits``) over, for torchvision's own file only, the options torchvision builds it with
    (GoogLeNet's ``transform_input=True``): a state dict does not say how its model was built, so any
    other file gets torchvision's constructor defaults unless ``model_options`` says otherwise.
    """
    spec = get_spec(name)
    model_options = check_model_options(spec, model_options or {})
    if source is not None:
        require_file(Path(source))
    source_sha256 = None if source is None else file_sha256(source)
    published = _published_weights(spec, source, source_sha256, weights)
    if out is None:
        out = cached_weights_path(spec, published.torchvision_name) if published else Path(source).with_name(
            Path(source).stem + ".jaxnets" + SUFFIX)
    if source is not None:
        refuse_overwriting(source, out)
    with cache_writer(out):
        return _convert_into(spec, source, source_sha256, out, published, verify=verify,
                             model_options=model_options,
                             verify_image_size=verify_image_size, verify_batch_size=verify_batch_size)


def _published_weights(spec: ModelSpec, source: PathLike | None, source_sha256: str | None,
                       weights: str | None) -> PretrainedWeights | None:
    """The torchvision weights a conversion is of: ``weights`` when downloading, else those whose file
    ``source`` is (by its SHA-256; None for any other file). A ``source`` that is not the file ``weights``
    names is refused: converting it as that version would record the wrong eval transform and provenance."""
    if weights is not None and not is_weights_name(weights):
        raise WeightsError(f"weights {weights!r}: expected the name of torchvision's weights, e.g. IMAGENET1K_V2 "
                           "(a file is the source)")
    wanted = None if weights is None else spec.get_weights(weights)
    if source is None:
        return wanted or spec.weights
    found = spec.weights_with_sha256(source_sha256)
    if wanted is not None and found is not wanted:
        raise WeightsError(f"{source}: not torchvision's {spec.name} {wanted.torchvision_name} file {wanted.filename} "
                           f"(SHA-256 {source_sha256[:8]}..., expected {wanted.sha256_prefix}...)")
    return found


def cache_writer(path: PathLike, wait: float = 0.0) -> contextlib.AbstractContextManager:
    """The lock of one cache entry while it is written (nothing when ``path`` is not in the cache): two
    conversions into the same entry would race; readers never take it."""
    path = Path(path)
    in_cache = path.parent.absolute() == cache_dir().absolute()
    return locks.hold(path.parent, what="the weights cache entry", target=path, lock_file=f".{path.name}.lock",
                      wait=wait, enabled=in_cache)


def _convert_into(spec: ModelSpec, source: PathLike | None, source_sha256: str | None, out: PathLike,
                  published: PretrainedWeights | None, *, verify: bool, model_options: Mapping[str, Any],
                  verify_image_size: int = 224, verify_batch_size: int = 2) -> Conversion:
    """``convert``'s work once the output is decided (and, in the cache, locked); ``published``: the
    torchvision weights the source is (downloaded when ``source`` is None), None for any other file."""
    if source is None:
        state, label, sha256 = fetch_torchvision_state_dict(spec, published.torchvision_name)
    else:
        state, label, sha256 = read_state_dict(source), Path(source).name, source_sha256
    try:
        variables = from_torch_state_dict(spec, state)
    except WeightMappingError as exc:
        raise WeightMappingError(f"{label}: {exc}") from None
    built_with = published.model_kwargs if published else {}
    options = {**built_with, **_decided_options(spec, variables), **model_options}
    metadata = {"source": label, "source_sha256": sha256}
    if published:
        metadata["torchvision_weights"] = published.torchvision_name
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
    """Options the state dict decided (GoogLeNet's aux_logits; a backbone's features_only; in_chans), recorded
    so the file rebuilds its model."""
    return decided_options(spec, variables)


# --- from a file to a model -----------------------------------------------------------------------------


def open_pretrained(name: ModelRef, weights: PathLike | None = None) -> WeightsFile:
    """The weights file for ``name``: ``weights`` if it is a file, else torchvision's weights of that name
    (None: ``IMAGENET1K_V1``; ``'IMAGENET1K_V2'``, ``'DEFAULT'``: see ``resolve_weights``) from the cache,
    converted on first use. A file of another model is refused."""
    spec = get_spec(name)
    resolved = resolve_weights(spec, weights)
    path = resolved if isinstance(resolved, Path) else _cached_or_convert(spec, resolved)
    weights_file = load_weights(path)
    if weights_file.name != spec.name:
        raise WeightsError(f"{path}: holds {weights_file.name} weights, not {spec.name}")
    return weights_file


def _cached_or_convert(spec: ModelSpec, published: PretrainedWeights) -> Path:
    """The cache entry of torchvision's weights ``published`` for ``spec``, converted on first use; while
    another process converts it (the processes of one multi-process run, two runs started together), wait for
    its file."""
    path = cached_weights_path(spec, published.torchvision_name)
    if not path.is_file():
        with cache_writer(path, wait=CACHE_WAIT_SECONDS):
            if not path.is_file():
                # Not a warning: a first use is expected, torch.hub announces its download, and offline the
                # error that follows says what to do (a warning above it only added a raw logging line).
                logger.info("%s: converting torchvision's %s weights into %s (first use)", spec.name,
                            published.torchvision_name, path)
                _convert_into(spec, None, None, path, published, verify=False, model_options={})
    return path


def load_pretrained(name: ModelRef, num_classes: int | None = None, weights: PathLike | None = None,
                    dtype: Any = jnp.float32, *, rng: int | jax.Array = 0,
                    **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` for ``name`` with pretrained weights: ``weights`` is a file or torchvision's
    weights by name (None: ``IMAGENET1K_V1``; ``weights="IMAGENET1K_V2"``); see ``open_pretrained``.

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
    num_classes = weights_file.num_classes if num_classes is None else num_classes
    if not _model_options(spec, weights_file, options).get("features_only"):
        if num_classes == NO_CLASSIFIER:
            raise WeightsError(f"{weights_file.path}: {spec.name} backbone weights (features_only, no classifier): "
                               f"pass num_classes for a classifier on it, or features_only=True")
        num_classes = check_num_classes(num_classes)
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
    fitted variables: the stem adapted to another ``in_chans`` (``adapt_input_conv``), the head fitted
    (``_renew_head``)."""
    options = _model_options(spec, weights_file, options)
    model = spec.create(num_classes, dtype, **options)
    where = f"{weights_file.path}: {spec.name}"
    variables = adapt_in_chans(spec, weights_file.variables, options.get("in_chans", IN_CHANS), where)
    variables, renewed = _renew_head(spec, model, variables, num_classes, options, rng, new_task=new_task, where=where)
    return model, variables, renewed


def _model_options(spec: ModelSpec, weights_file: WeightsFile, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the file's recorded ones. Those are JSON: the schema gives them back their types."""
    return {**spec.check_options(weights_file.model_options, where=f"{weights_file.path}: "), **options}


# --- the input-channel rule --------------------------------------------------------------------------------


def adapt_input_conv(kernel: np.ndarray, in_chans: int) -> np.ndarray:
    """A pretrained RGB stem kernel (Flax HWIO: ``(kh, kw, 3, out)``) for ``in_chans`` input channels, by timm's
    ``adapt_input_conv`` rule: 1 channel sums the RGB filters (x then gives what the RGB model gives for x
    repeated to three channels); any other count repeats the RGB filters cyclically to ``in_chans`` and scales
    them by 3 / ``in_chans`` (the RGB channels repeated to ``in_chans`` then give the RGB model's output). The
    normalization statistics follow the same rule (``eval_transform.extend_to_channels``). Computed in the
    kernel's dtype, as timm computes it (float32: the same bits)."""
    kernel = np.asarray(kernel)
    in_chans = check_in_chans(in_chans, "adapt_input_conv")
    if kernel.ndim != 4 or kernel.shape[2] != IN_CHANS:
        raise WeightsError(f"adapt_input_conv: expected an RGB stem kernel (kh, kw, 3, out), got {kernel.shape}")
    if in_chans == 1:
        return kernel.sum(axis=2, keepdims=True, dtype=kernel.dtype)
    if in_chans == IN_CHANS:
        return kernel.copy()
    return kernel[:, :, [i % IN_CHANS for i in range(in_chans)], :] * kernel.dtype.type(IN_CHANS / in_chans)


def adapt_in_chans(model: ModelRef, variables: Mapping[str, Any], in_chans: int, where: str = "") -> dict[str, Any]:
    """``variables`` with the stem kernel (``mapping.stem_kernels``) adapted to ``in_chans`` input channels by
    ``adapt_input_conv``, every other leaf as it is (a stem already for ``in_chans`` too). Only RGB stems are
    adapted: another is a ``WeightsError``."""
    spec = get_spec(model)
    in_chans = check_in_chans(in_chans, where or spec.name)
    flat = trees.flatten(variables)
    adapted = dict(flat)
    for path in stem_kernels(spec):
        key = "/".join(path)
        if key not in flat or np.shape(flat[key])[2] == in_chans:
            continue
        have = np.shape(flat[key])[2]
        if have != IN_CHANS:
            raise WeightsError(f"{where or spec.name}: weights for in_chans={have} (stem {key} {np.shape(flat[key])}) "
                               f"cannot be adapted to in_chans={in_chans}: only RGB (in_chans=3) stems are")
        adapted[key] = adapt_input_conv(flat[key], in_chans)
    return trees.unflatten(adapted)


# --- the head-renewal rule ---------------------------------------------------------------------------------


def _renew_head(spec: ModelSpec, model: nn.Module, variables: Mapping[str, Any], num_classes: int,
                options: Mapping[str, Any], rng: int | jax.Array, *, new_task: bool,
                where: str) -> tuple[dict[str, Any], list[str]]:
    """THE rule that fits the head modules (``spec.head``) of ``variables`` to ``model``, whatever the route:

    - a head module the model does not build is dropped (GoogLeNet with ``aux_logits=False``), as torchvision does;
    - one it builds is re-initialized from ``rng`` when the task is new (``new_task``: another number of
      classes, or a fine-tuning start) or when ``variables`` lack it; otherwise it is kept.

    A ``features_only`` model keeps what it builds: the classifier (and, after the deepest level ``out_indices``
    selects, the rest) is dropped. Weights of a backbone (no classifier) in a classifier: the classifier
    modules (``mapping.classifier_modules``) are all re-initialized.

    Then the variables must fit the model exactly: ``(variables, re-initialized module paths)``."""
    expected = expected_shapes(spec, num_classes, options)
    if options.get("features_only"):
        variables = trees.unflatten({k: v for k, v in trees.flatten(variables).items() if k in expected})
        check_variables(where, variables, expected)
        return variables, []
    built = _modules_in(expected, spec.head)
    variables = _without_modules(variables, [m for m in spec.head if m not in built])
    present = _modules_in(trees.flatten(variables), spec.head)
    renew = [m for m in built if new_task or m not in present]
    absent = [m for m in classifier_modules(spec) if m not in _modules_in(trees.flatten(variables), [m])
              and _modules_in(expected, [m])]
    renew = [m for m in renew if not any(m == a or m.startswith(a + "/") for a in absent)] + absent
    if renew:
        variables = _reinitialize(spec, model, variables, renew, rng)
    check_variables(where, variables, expected)
    return variables, renew


def _reinitialize(spec: ModelSpec, model: nn.Module, variables: Mapping[str, Any], modules: Sequence[str],
                  rng: int | jax.Array) -> dict[str, Any]:
    rng = jax.random.key(rng) if isinstance(rng, int) else rng

    def init_modules(key):
        # Only the selected leaves are outputs: XLA drops the rest of the init (and the forward pass).
        fresh = model.init(key, spec.init_input(model), train=False)
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
