"""Pretrained weights as models: torchvision's converted into a cache, files opened and fitted to a model.

``load_pretrained`` finds converted weights in a cache (``$JAXNETS_HOME/weights``, default
``~/.cache/jaxnets/weights``), converting torchvision's on first use when torch is installed; ``for_new_task``
starts a model for another task from them. Every route from a file to a model fits the head layers
(``spec.head``) by one rule, ``_renew_head``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxnets import trees
from jaxnets.errors import UserError
from jaxnets.eval_transform import EVAL_SIZES, TIMM_CFG_KEY, EvalTransform, check_size
from jaxnets.fileio import atomic_path
from jaxnets.layers import check_in_chans
from jaxnets.mapping import (
    WeightMappingError,
    classifier_modules,
    decided_options,
    from_torch_state_dict,
    stem_kernels,
    to_torch_state_dict,
)
from jaxnets.registry import (
    NO_CLASSIFIER,
    TORCHVISION_DEFAULT,
    ModelRef,
    ModelSpec,
    PretrainedWeights,
    check_num_classes,
    get_spec,
    is_weights_name,
)
from jaxnets.weights import hub, self_supervised
from jaxnets.weights.cache import CACHE_WAIT_SECONDS, cache_dir, cache_writer
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
from jaxnets.weights.torch_io import compare_with_torchvision, fetch_torchvision_state_dict, read_wrapped
from jaxnets.weights.wrappings import PLAIN

logger = logging.getLogger(__name__)

IN_CHANS = 3  # what torchvision's weights take: RGB


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


def cached_weights_path(name: ModelRef, weights: str | None = None) -> Path:
    """Cache file of torchvision's weights ``weights`` (None: ``IMAGENET1K_V1``) for ``name``, named like
    torchvision's file (``resnet50-0676ba61``; its ``IMAGENET1K_V2``: ``resnet50-11ad3fa6``)."""
    return cache_dir() / (Path(get_spec(name).get_weights(weights).filename).stem + SUFFIX)


def resolve_weights(name: ModelRef, weights: PathLike | None) -> Any:
    """What ``weights`` stands for, without downloading anything:

    - None: torchvision's ``IMAGENET1K_V1`` (jaxnets' default), a ``PretrainedWeights``;
    - torchvision's names (``IMAGENET1K_V2``; ``DEFAULT``, its alias for its best): a ``PretrainedWeights``;
    - a registered timm tag of the model (``a1_in1k``): a ``hub.TimmWeights``;
    - a self-supervised backbone's name (``dino``): a ``self_supervised.SelfSupervisedWeights``;
    - ``hf-hub:ORG/REPO[@REVISION]``: a ``hub.HubName``;
    - anything not spelled like a name (``is_weights_name``: a dot or a slash), a file: a ``Path``.

    An unknown name is a ``UserError`` listing the model's names (a file so named is reached as ``./NAME``)."""
    spec = get_spec(name)
    if weights is None:
        return spec.weights
    if hub.is_hub_name(weights):
        return hub.parse_hub_name(weights)
    if not is_weights_name(weights):
        return Path(weights)
    if weights == TORCHVISION_DEFAULT or weights in spec.weight_versions:
        return spec.get_weights(weights)
    found = hub.timm_weights(spec, weights) or _self_supervised(spec, weights)
    if found is None:
        versions = spec.weight_versions
        names = [f"torchvision's for {spec.name}: {', '.join(versions)} ({TORCHVISION_DEFAULT} = {list(versions)[-1]})"]
        if hub.timm_tags(spec):
            names.append(f"timm's: {', '.join(hub.timm_tags(spec))}")
        if self_supervised := _self_supervised_names(spec):
            names.append(f"self-supervised: {', '.join(self_supervised)}")
        raise UserError(f"{spec.name}: no weights named {weights!r}; " + "; ".join(names)
                        + f"; or {hub.HUB_PREFIX}ORG/REPO; a file so named: ./{weights}")
    return found


def describe_weights(resolved: Any) -> str:
    """What ``resolve_weights`` gave, in words for a log line: ``torchvision's IMAGENET1K_V2 (cache)``, ..."""
    if isinstance(resolved, PretrainedWeights):
        return f"torchvision's {resolved.torchvision_name} (cache)"
    if isinstance(resolved, hub.TimmWeights):
        return f"timm's {resolved.tag} ({resolved.hub_name})"
    if isinstance(resolved, hub.HubName):
        return str(resolved)
    if isinstance(resolved, Path):
        return str(resolved)
    return f"{getattr(resolved, 'method', 'self-supervised')} {getattr(resolved, 'name', '')} (cache)".strip()


def _self_supervised(spec: ModelSpec, name: str) -> Any:
    return self_supervised.lookup(spec.name, name)


def _self_supervised_names(spec: ModelSpec) -> list[str]:
    return [n for n in self_supervised.SELF_SUPERVISED if self_supervised.lookup(spec.name, n) is not None]


def torchvision_weights_of(weights_file: WeightsFile) -> PretrainedWeights | None:
    """The torchvision weights a file was converted from (recorded by ``convert``), None for any other file."""
    version = weights_file.metadata.get("torchvision_weights")
    return get_spec(weights_file.name).weight_versions.get(version) if isinstance(version, str) else None


def eval_transform_of(model: ModelRef, weights_file: WeightsFile, size: str = "default") -> EvalTransform:
    """The model's eval transform at the sizes its weights were validated with: ``train.py`` records them
    (a model fine-tuned at 64 px is shown 64-px crops, not ImageNet's 224), torchvision's weights use those of
    their version (IMAGENET1K_V2: resize 232), weights converted from timm's (their metadata keeps timm's
    ``pretrained_cfg``) timm's transform (``EvalTransform.from_timm_cfg``; ``size`` "test": timm's test size).
    A malformed entry is a ``UserError`` naming the file: guessing would show the model the wrong images. (Also
    ``jaxnets.predict.eval_transform``.)"""
    spec = get_spec(model)
    where = weights_file.path or spec.name
    cfg = weights_file.metadata.get(TIMM_CFG_KEY)
    cfg = None if cfg == {} else cfg  # a Hub repo without a pretrained_cfg: the transform of the architecture
    recorded = weights_file.metadata.get("eval_transform")
    if size not in EVAL_SIZES:
        raise UserError(f"--eval-size {size!r}: choose one of {', '.join(EVAL_SIZES)}")
    if size == "test" and cfg is None:
        raise UserError(f"--eval-size test: {where} has no test size (only weights converted from timm's, with "
                        f"timm's pretrained_cfg in their metadata, have one); leave out --eval-size")
    if size == "test" and recorded is not None:
        raise UserError(f"--eval-size test: {where} records the transform it was validated with (metadata "
                        f"eval_transform), which timm's test size is not; leave out --eval-size")
    in_chans = spec.check_options(weights_file.model_options, f"{weights_file.path}: ").get("in_chans", 3)
    min_size = max(spec.weights.min_size)
    if cfg is not None:
        base = EvalTransform.from_timm_cfg(cfg, size=size, where=f"{where}: metadata {TIMM_CFG_KEY}")
        check_size("crop_size", base.crop_size, min_size, f"{where}: metadata {TIMM_CFG_KEY}")
    else:
        base = (torchvision_weights_of(weights_file) or spec.weights).transforms  # IMAGENET1K_V2: resize 232
    base = base.for_channels(in_chans)  # the statistics of the model's channels, unless recorded
    if recorded is None:
        return base
    return base.from_record(recorded, min_size=min_size, where=f"{where}: metadata eval_transform")


def pretrained_transform(model: ModelRef, weights: PathLike | None) -> EvalTransform:
    """The eval transform (and so the normalization) of pretrained weights by any name or file: from the
    registry's data where the name says it (torchvision's versions, timm's tags; the self-supervised backbones
    were trained on torchvision's ImageNet statistics), else from the opened file (a Hub repo, a file)."""
    spec = get_spec(model)
    resolved = resolve_weights(spec, weights)
    if isinstance(resolved, PretrainedWeights):
        return resolved.transforms
    if isinstance(resolved, hub.TimmWeights):
        return EvalTransform.from_timm_cfg(resolved.pretrained_cfg(), where=describe_weights(resolved))
    if isinstance(resolved, self_supervised.SelfSupervisedWeights):
        return spec.weights.transforms
    return eval_transform_of(spec, open_pretrained(spec, weights))


def convert(name: ModelRef, source: PathLike | None = None, out: PathLike | None = None, *, verify: bool = False,
            model_options: Mapping[str, Any] | None = None, verify_image_size: int = 224,
            verify_batch_size: int = 2, weights: str | None = None, layout: str | None = None) -> Conversion:
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

    A ``source`` may wrap the state dict (``{'state_dict': ...}``, ``module.``, a self-supervised method's
    heads, momentum encoder, queue, prototypes): ``layout`` names the wrapping (``wrappings.LAYOUTS``; None:
    detected), and what it drops is logged and recorded (metadata ``layout``, ``dropped``).

    Weights by any other name (timm's tags, self-supervised backbones, ``hf-hub:ORG/REPO``, also as ``name``)
    are converted into the cache as ``open_pretrained`` does, copied to ``out`` when given; ``model_options``
    do not apply to them (their source records them).
    """
    if source is None and _other_named_weights(name, weights):
        return _convert_named(name, weights, out, verify=verify, model_options=model_options,
                              verify_image_size=verify_image_size, verify_batch_size=verify_batch_size)
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
                             model_options=model_options, layout=layout,
                             verify_image_size=verify_image_size, verify_batch_size=verify_batch_size)


def _other_named_weights(name: ModelRef, weights: str | None) -> bool:
    """Whether ``convert`` is asked for weights by a name other than torchvision's (or by an ``hf-hub:`` model)."""
    if hub.is_hub_name(name):
        return True
    return (weights is not None and is_weights_name(weights) and weights != TORCHVISION_DEFAULT
            and weights not in get_spec(name).weight_versions)


def _convert_named(name: ModelRef, weights: str | None, out: PathLike | None, *, verify: bool,
                   model_options: Mapping[str, Any] | None, verify_image_size: int,
                   verify_batch_size: int) -> Conversion:
    """``convert`` of timm's, the Hub's or the self-supervised weights: their cache file (``open_pretrained``),
    verified against torchvision on request, copied to ``out`` when given."""
    if model_options:
        raise WeightsError(f"{weights or name}: model options are recorded by the weights' source; convert without "
                           "--option (load_pretrained(..., **options) takes options)")
    weights_file = open_pretrained(name, weights)
    spec = get_spec(weights_file.name)
    diff = tolerance = None
    if verify:
        variables = weights_file.variables
        diff, tolerance = compare_with_torchvision(spec, to_torch_state_dict(spec, variables), variables,
                                                   weights_file.model_options, image_size=verify_image_size,
                                                   batch_size=verify_batch_size)
        if not diff <= tolerance:
            raise WeightsError(f"{weights_file.path}: {spec.name} in jaxnets does not reproduce torchvision: max "
                               f"|logit diff| {diff:.3g} > tolerance {tolerance:.3g}")
    path = weights_file.path
    if out is not None:
        refuse_overwriting(path, out)
        with atomic_path(out) as tmp:
            shutil.copyfile(path, tmp)
        path = Path(out)
    metadata = weights_file.metadata
    return Conversion(spec.name, path, str(metadata.get("source", weights)), str(metadata.get("source_sha256", "")),
                      diff, tolerance, metadata)


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


def _convert_into(spec: ModelSpec, source: PathLike | None, source_sha256: str | None, out: PathLike,
                  published: PretrainedWeights | None, *, verify: bool, model_options: Mapping[str, Any],
                  layout: str | None = None, verify_image_size: int = 224, verify_batch_size: int = 2) -> Conversion:
    """``convert``'s work once the output is decided (and, in the cache, locked); ``published``: the
    torchvision weights the source is (downloaded when ``source`` is None), None for any other file."""
    unwrapped = None
    if source is None:
        state, label, sha256 = fetch_torchvision_state_dict(spec, published.torchvision_name)
    else:
        unwrapped = read_wrapped(source, layout, model=spec)
        state, label, sha256 = unwrapped.state, Path(source).name, source_sha256
    try:
        variables = from_torch_state_dict(spec, state)
    except WeightMappingError as exc:
        raise WeightMappingError(f"{label}: {exc}") from None
    built_with = published.model_kwargs if published else {}
    options = {**built_with, **_decided_options(spec, variables), **model_options}
    metadata = {"source": label, "source_sha256": sha256}
    if published:
        metadata["torchvision_weights"] = published.torchvision_name
    if unwrapped is not None and (unwrapped.layout != PLAIN or unwrapped.dropped):
        metadata.update(layout=unwrapped.layout, dropped=unwrapped.dropped_summary())
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


def open_pretrained(name: ModelRef | None, weights: PathLike | None = None) -> WeightsFile:
    """The weights file for ``name``: ``weights`` if it is a file, else the weights of that name (see
    ``resolve_weights``: torchvision's, timm's tags, self-supervised backbones, ``hf-hub:ORG/REPO``) from the
    cache, downloaded and converted on first use. A file of another model is refused. Hub weights name their
    model: ``name`` may then be the ``hf-hub:`` name itself, or None."""
    if hub.is_hub_name(name):
        if weights is not None:
            raise WeightsError(f"{name}: Hub weights name their model; give them as the model or as weights, "
                               f"not both (weights={weights!r})")
        name, weights = None, name
    if name is None:
        if not hub.is_hub_name(weights):
            raise WeightsError(f"weights {weights!r}: a model name is needed (only {hub.HUB_PREFIX}ORG/REPO "
                               "weights name their model)")
        return load_weights(hub.open_hub(weights))
    spec = get_spec(name)
    resolved = resolve_weights(spec, weights)
    if isinstance(resolved, Path):
        path = resolved
    elif isinstance(resolved, PretrainedWeights):
        path = _cached_or_convert(spec, resolved)
    elif isinstance(resolved, hub.HubName):
        path = hub.open_hub(resolved, spec)
    elif isinstance(resolved, hub.TimmWeights):
        path = hub.open_hub(resolved.hub_name, spec, timm_tag=resolved)
    else:  # a self-supervised backbone
        path = self_supervised.open_cached(spec.name, resolved)
    weights_file = load_weights(path)
    if weights_file.name != spec.name:
        raise WeightsError(f"{path}: holds {weights_file.name} weights, not {spec.name}")
    return weights_file


def _opened(name: ModelRef, weights: PathLike | None, num_classes: int | None) -> tuple[ModelSpec, WeightsFile]:
    """``(spec, open_pretrained(name, weights))``; ``num_classes`` is checked first (before a first use
    downloads and converts weights for nothing). ``name`` may be an ``hf-hub:`` name: its file names the model."""
    if num_classes is not None:
        check_num_classes(num_classes)
    if hub.is_hub_name(name):
        weights_file = open_pretrained(name, weights)
        return get_spec(weights_file.name), weights_file
    spec = get_spec(name)
    return spec, open_pretrained(spec, weights)


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
    """``(model, variables)`` for ``name`` with pretrained weights: ``weights`` is a file or weights by name
    (None: torchvision's ``IMAGENET1K_V1``; ``"IMAGENET1K_V2"``, timm's ``"a1_in1k"``, ``"dino"``,
    ``"hf-hub:ORG/REPO"``); see ``resolve_weights``. ``name`` may be ``"hf-hub:ORG/REPO[@REVISION]"`` itself:
    the repo names its model.

    With ``num_classes`` other than the checkpoint's, the head layers (``spec.head``) are freshly
    initialized from ``rng`` (and logged); every other variable is the checkpoint's, bit for bit.
    ``options`` go to ``create_model`` on top of the file's recorded model options.
    """
    spec, weights_file = _opened(name, weights, num_classes)
    return _instantiate(spec, weights_file, num_classes, dtype, rng, options)


def instantiate(weights_file: WeightsFile, num_classes: int | None = None, dtype: Any = jnp.float32, *,
                rng: int | jax.Array = 0, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a weights file describes and fit its variables to it (see ``load_pretrained``): the
    head is renewed only where the number of classes changes or the file lacks a head module the model builds."""
    return _instantiate(get_spec(weights_file.name), weights_file, num_classes, dtype, rng, options)


def _instantiate(spec: ModelSpec, weights_file: WeightsFile, num_classes: int | None, dtype: Any,
                 rng: int | jax.Array, options: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    if num_classes is not None:
        options = _classifier_on_backbone(weights_file, options)
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
    num_classes = check_num_classes(num_classes)
    spec, weights_file = _opened(model, weights, num_classes)
    return _build(spec, weights_file, num_classes, dtype, rng, _classifier_on_backbone(weights_file, options),
                  new_task=True)


def _classifier_on_backbone(weights_file: WeightsFile, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """Asked for classes, a backbone file (``features_only`` recorded: a self-supervised one, say) gives a
    classifier on it (its head freshly initialized), unless ``features_only`` is asked for explicitly."""
    if "features_only" in options or not weights_file.model_options.get("features_only"):
        return options
    return {**options, "features_only": False}


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
