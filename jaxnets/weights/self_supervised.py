"""Self-supervised ResNet-50 backbones by name (``weights="dino"``), as their projects publish them.

Each entry is one published file: where it is, its hash where the project publishes one, its licence (they
differ, and a user must see which applies), its linear-probe top-1 on ImageNet (frozen backbone, a linear
classifier trained on it, as the project reports it) and its wrapping (``wrappings.LAYOUTS``). None of the seven
projects publishes a SHA-256 of its file (MoCo publishes an MD5 prefix, checked): ``sha256`` is None for all, and the
SHA-256 of what was downloaded is recorded in the converted file instead.

``open_cached`` downloads a file once (torch.hub's ``download_url_to_file``), converts it into the jaxnets cache
(``cache.cache_dir()``) as a backbone (``features_only``: no ``fc``, the methods train none) and deletes the
download. ``load_pretrained("resnet50", weights="dino", num_classes=10, features_only=False)`` then gives a
classifier with a new head; ``features_only=True`` (what the file records) the feature maps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jaxnets.mapping import WeightMappingError, decided_options, from_torch_state_dict
from jaxnets.registry import ModelRef, get_spec
from jaxnets.weights.cache import CACHE_WAIT_SECONDS, cache_dir, cache_writer
from jaxnets.weights.fileformat import SUFFIX, WeightsError, save_weights
from jaxnets.weights.torch_io import download, read_wrapped

logger = logging.getLogger(__name__)

_CC_BY_NC = "CC-BY-NC-4.0"


@dataclass(frozen=True)
class SelfSupervisedWeights:
    """One published self-supervised checkpoint of a torchvision architecture."""

    name: str  # what weights= takes: lower-case letters, digits, underscores
    method: str
    url: str
    filename: str
    sha256: str | None  # as the project publishes it; None: it publishes none (the download is then unchecked)
    licence: str  # SPDX identifier of the project's licence, which covers its published weights
    linear_probe_top1: float  # ImageNet-1k top-1 of a linear classifier on the frozen backbone, as published
    layout: str  # a key of wrappings.LAYOUTS
    paper: str
    model: str = "resnet50"
    md5_prefix: str | None = None  # MoCo's README publishes the first 8 hex digits of each file's MD5
    repository: str = ""  # the project, whose README table lists the file, accuracy and licence


_DL = "https://dl.fbaipublicfiles.com/"

SELF_SUPERVISED: Mapping[str, SelfSupervisedWeights] = {entry.name: entry for entry in (
    SelfSupervisedWeights("dino", "DINO", _DL + "dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
                          "dino_resnet50_pretrain.pth", None, "Apache-2.0", 75.3, "dino",
                          "https://arxiv.org/abs/2104.14294", repository="https://github.com/facebookresearch/dino"),
    SelfSupervisedWeights("swav", "SwAV, 800 epochs", _DL + "deepcluster/swav_800ep_pretrain.pth.tar",
                          "swav_800ep_pretrain.pth.tar", None, _CC_BY_NC, 75.3, "swav",
                          "https://arxiv.org/abs/2006.09882", repository="https://github.com/facebookresearch/swav"),
    SelfSupervisedWeights("deepcluster_v2", "DeepCluster-v2, 800 epochs",
                          _DL + "deepcluster/deepclusterv2_800ep_pretrain.pth.tar",
                          "deepclusterv2_800ep_pretrain.pth.tar", None, _CC_BY_NC, 75.2, "deepcluster_v2", "https://arxiv.org/abs/2006.09882",
                          repository="https://github.com/facebookresearch/swav"),
    # The README's current file (73.5 %); torch.hub's hubconf.py still loads the earlier ep1000_bs2048_... one.
    SelfSupervisedWeights("barlowtwins", "Barlow Twins, 1000 epochs", _DL + "barlowtwins/ljng/resnet50.pth",
                          "resnet50.pth", None, "MIT", 73.5, "barlowtwins", "https://arxiv.org/abs/2103.03230",
                          repository="https://github.com/facebookresearch/barlowtwins"),
    SelfSupervisedWeights("vicreg", "VICReg, 1000 epochs", _DL + "vicreg/resnet50.pth", "resnet50.pth", None, "MIT",
                          73.2, "vicreg", "https://arxiv.org/abs/2105.04906",
                          repository="https://github.com/facebookresearch/vicreg"),
    # MoCo was relicensed from CC-BY-NC-4.0 to MIT in January 2023 (facebookresearch/moco#135).
    SelfSupervisedWeights("mocov2", "MoCo v2, 800 epochs",
                          _DL + "moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
                          "moco_v2_800ep_pretrain.pth.tar", None, "MIT", 71.1, "mocov2",
                          "https://arxiv.org/abs/2003.04297", md5_prefix="a04e12f8",
                          repository="https://github.com/facebookresearch/moco"),
    SelfSupervisedWeights("mocov3", "MoCo v3, 1000 epochs", _DL + "moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
                          "r-50-1000ep.pth.tar", None, _CC_BY_NC, 74.6, "mocov3", "https://arxiv.org/abs/2104.02057",
                          repository="https://github.com/facebookresearch/moco-v3"),
)}


def lookup(model: ModelRef, name: str) -> SelfSupervisedWeights | None:
    """The registered self-supervised weights ``name`` of ``model``, None when it has none of that name."""
    entry = SELF_SUPERVISED.get(name) if isinstance(name, str) else None
    return entry if entry is not None and entry.model == get_spec(model).name else None


def names(model: ModelRef) -> list[str]:
    """The self-supervised weights names ``model`` has (for the list an unknown name shows)."""
    spec = get_spec(model)
    return [name for name, entry in SELF_SUPERVISED.items() if entry.model == spec.name]


def cached_path(model: ModelRef, entry: SelfSupervisedWeights) -> Path:
    """The cache file of ``entry`` converted for ``model``: ``resnet50-dino.safetensors``."""
    return cache_dir() / f"{get_spec(model).name}-{entry.name}{SUFFIX}"


def open_cached(model: ModelRef, entry: SelfSupervisedWeights) -> Path:
    """The jaxnets weights file of ``entry`` in the cache: on first use downloaded (its published hash checked),
    converted as a backbone (no ``fc``) recording method, URL, SHA-256 and licence, and the download deleted.
    Another process converting it is waited for. A failed download or hash check caches nothing."""
    spec = get_spec(model)
    if entry.model != spec.name:
        raise WeightsError(f"{spec.name}: {entry.name!r} weights are {entry.model}'s")
    path = cached_path(spec, entry)
    if path.is_file():
        return path
    with cache_writer(path, wait=CACHE_WAIT_SECONDS):
        if not path.is_file():
            logger.info("%s: downloading %s weights %r (%s licence) from %s into %s (first use)", spec.name,
                        entry.method, entry.name, entry.licence, entry.url, path)
            _download_and_convert(spec.name, entry, path)
    return path


def _download_and_convert(model: str, entry: SelfSupervisedWeights, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_name(f".{path.stem}.download")
    try:
        sha256 = download(entry.url, source, sha256=entry.sha256, md5_prefix=entry.md5_prefix)
        unwrapped = read_wrapped(source, entry.layout, model=model)
        try:
            variables = from_torch_state_dict(model, unwrapped.state)
        except WeightMappingError as exc:
            raise WeightMappingError(f"{entry.url}: {exc}") from None
        metadata = {"source": entry.filename, "source_url": entry.url, "source_sha256": sha256,
                    "base": f"{entry.method} {entry.model} ({entry.url})", "self_supervised": entry.name,
                    "method": entry.method, "licence": entry.licence,
                    "linear_probe_top1": entry.linear_probe_top1, "paper": entry.paper, "layout": unwrapped.layout,
                    "dropped": unwrapped.dropped_summary()}
        save_weights(path, model, variables, model_options=decided_options(model, variables), metadata=metadata)
    finally:
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
