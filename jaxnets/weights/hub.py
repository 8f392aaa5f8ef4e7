"""Weights from the Hugging Face Hub: ``hf-hub:ORG/REPO[@REVISION]`` and timm's registered tags (``a1_in1k``).

A timm-format repo holds ``config.json`` (``architecture``, ``num_classes``, ``pretrained_cfg``) and
``model.safetensors`` (else ``pytorch_model.bin``); a repo ``jaxnets-push`` wrote is one too. It is downloaded with
``huggingface_hub`` into the client's own cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` uses only that cache),
converted once into the jaxnets cache (one file per repo and commit), and the converted file records where it
came from: repo, revision asked, commit resolved, file and its SHA-256, licence, and timm's ``pretrained_cfg``
(metadata ``timm_pretrained_cfg``: the eval transform of the weights).

timm's tags of jaxnets' architectures are data here (``TIMM_WEIGHTS``), with timm's published top-1: jaxnets
never needs timm itself.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxnets import errors
from jaxnets._version import __version__
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, TIMM_CFG_KEY
from jaxnets.mapping import WeightMappingError, decided_options, from_torch_state_dict
from jaxnets.registry import HUB_PREFIX, ModelRef, get_spec, imagenet_wnids, list_models
from jaxnets.weights.fileformat import SUFFIX, WeightsError, check_model_options, file_sha256, save_weights
from jaxnets.weights.timm_layout import VGG_EXACT_SIZE, from_timm_state_dict, is_timm_layout
from jaxnets.weights.torch_io import read_state_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: the safe file first
JAXNETS_KEY = "jaxnets"  # config.json section jaxnets-push writes: model options and the file's metadata
HUB_EXTRA = "hub"  # the pip extra that installs huggingface_hub
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CARD_LICENSE = re.compile(r"^license:\s*['\"]?([^'\"\s]+)", re.MULTILINE)


# --- names --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubName:
    """A repo on the Hub, and the revision asked for (None: ``main``)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_name(text: Any) -> bool:
    """Whether ``text`` names Hub weights (``hf-hub:ORG/REPO[@REVISION]``)."""
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def parse_hub_name(text: str) -> HubName:
    """``hf-hub:ORG/REPO[@REVISION]`` as a ``HubName``; a malformed one is a ``WeightsError``."""
    repo_id, _, revision = text[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "@" in revision or (_ and not revision):
        raise WeightsError(f"{text}: expected {HUB_PREFIX}ORG/REPO or {HUB_PREFIX}ORG/REPO@REVISION "
                           f"(e.g. {HUB_PREFIX}timm/resnet50.a1_in1k)")
    return HubName(repo_id, revision or None)


# --- timm's tags, as data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TimmWeights:
    """One of timm's pretrained weights of a jaxnets architecture (``timm/<model>.<tag>`` on the Hub), with the
    eval settings of its ``pretrained_cfg`` and its ImageNet-1k top-1/top-5 from timm's ``results-imagenet.csv``
    at the default size (``input_size``) and, where timm has one, at its test size."""

    model: str
    tag: str
    top1: float
    top5: float
    input_size: int
    crop_pct: float
    interpolation: str
    licence: str
    test_input_size: int | None = None
    test_crop_pct: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # No commit of timm's repos could be looked up where this table was made (offline): the branch, not a pin.
    revision: str = "main"

    @property
    def repo_id(self) -> str:
        return f"timm/{self.model}.{self.tag}"

    @property
    def hub_name(self) -> HubName:
        return HubName(self.repo_id, self.revision)

    @property
    def best_top1(self) -> tuple[float, int]:
        """``(top-1, image size)`` at the better of the default and the test size."""
        if self.test_top1 is not None and self.test_top1 > self.top1:
            return self.test_top1, self.test_input_size
        return self.top1, self.input_size

    def pretrained_cfg(self) -> dict[str, Any]:
        """The eval part of timm's ``pretrained_cfg`` (what ``EvalTransform.from_timm_cfg`` reads)."""
        cfg = {"input_size": [3, self.input_size, self.input_size], "crop_pct": self.crop_pct,
               "interpolation": self.interpolation, "crop_mode": "center", "mean": list(self.mean),
               "std": list(self.std), "license": self.licence}
        if self.test_input_size is not None:
            cfg.update(test_input_size=[3, self.test_input_size, self.test_input_size],
                       test_crop_pct=self.test_crop_pct)
        return cfg


def _tag(model: str, tag: str, top1: float, top5: float, size: int, crop_pct: float, interpolation: str,
         licence: str, test: tuple[int, float, float, float] | None = None, **stats: Any) -> TimmWeights:
    test_fields = dict(zip(("test_input_size", "test_crop_pct", "test_top1", "test_top5"), test or (), strict=False))
    return TimmWeights(model, tag, top1, top5, size, crop_pct, interpolation, licence, **test_fields, **stats)


# timm 1.0.31's pretrained_cfg of each tag; top-1/top-5 from results/results-imagenet.csv of
# huggingface/pytorch-image-models at commit aa4b5850c1543fa488abf260f18390eda46cf85d. Per architecture the best
# few of timm's own tags; its tv_in1k/tv2_in1k are torchvision's IMAGENET1K_V1/V2 (registered already), except
# where timm has nothing else (VGG: its own layout; wide_resnet101_2: a test size).
_TAGS = (
    _tag("resnet18", "fb_swsl_ig1b_ft_in1k", 73.286, 91.754, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnet18", "fb_ssl_yfcc100m_ft_in1k", 72.636, 91.416, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnet18", "a1_in1k", 71.504, 90.086, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 73.164, 91.054)),
    _tag("resnet34", "ra4_e3600_r224_in1k", 77.492, 93.498, 224, 0.9, "bicubic", "apache-2.0",
         (288, 1.0, 78.972, 94.454), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    _tag("resnet34", "a1_in1k", 76.42, 92.896, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 77.930, 93.758)),
    _tag("resnet34", "bt_in1k", 75.176, 92.166, 224, 0.875, "bicubic", "apache-2.0", (288, 0.95, 76.506, 93.342)),
    _tag("resnet50", "a1_in1k", 80.382, 94.598, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 81.240, 95.112)),
    _tag("resnet50", "fb_swsl_ig1b_ft_in1k", 81.146, 95.98, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnet50", "d_in1k", 79.904, 94.666, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 81.012, 95.456)),
    _tag("resnet50", "a1h_in1k", 79.264, 94.498, 176, 0.9, "bicubic", "apache-2.0", (224, 1.0, 80.654, 95.312)),
    _tag("resnet101", "a1h_in1k", 81.95, 95.76, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 82.796, 96.324)),
    _tag("resnet101", "a1_in1k", 81.494, 95.164, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 82.326, 95.630)),
    _tag("resnet152", "a1h_in1k", 82.818, 96.124, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 83.494, 96.522)),
    _tag("resnet152", "a1_in1k", 81.998, 95.294, 224, 0.95, "bicubic", "apache-2.0", (288, 1.0, 82.742, 95.734)),
    _tag("resnext50_32x4d", "fb_swsl_ig1b_ft_in1k", 82.162, 96.224, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnext50_32x4d", "a1h_in1k", 81.14, 95.32, 224, 0.95, "bicubic", "apache-2.0",
         (288, 1.0, 82.016, 95.934)),
    _tag("resnext50_32x4d", "a1_in1k", 80.526, 94.458, 224, 0.95, "bicubic", "apache-2.0",
         (288, 1.0, 81.480, 95.152)),
    _tag("resnext101_32x8d", "fb_swsl_ig1b_ft_in1k", 84.276, 97.188, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnext101_32x8d", "fb_wsl_ig1b_ft_in1k", 82.72, 96.624, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("resnext101_32x8d", "fb_ssl_yfcc100m_ft_in1k", 81.62, 96.036, 224, 0.875, "bilinear", "cc-by-nc-4.0"),
    _tag("wide_resnet50_2", "racm_in1k", 81.466, 95.544, 224, 0.875, "bicubic", "apache-2.0",
         (288, 0.95, 82.260, 96.062)),
    _tag("wide_resnet101_2", "tv2_in1k", 80.494, 94.978, 176, 0.875, "bilinear", "bsd-3-clause",
         (224, 0.965, 82.514, 96.012)),
    _tag("vgg11", "tv_in1k", 69.05, 88.63, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg11_bn", "tv_in1k", 70.374, 89.802, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg13", "tv_in1k", 69.95, 89.262, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg13_bn", "tv_in1k", 71.56, 90.372, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg16", "tv_in1k", 71.594, 90.398, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg16_bn", "tv_in1k", 73.354, 91.49, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg19", "tv_in1k", 72.4, 90.878, 224, 0.875, "bilinear", "bsd-3-clause"),
    _tag("vgg19_bn", "tv_in1k", 74.23, 91.848, 224, 0.875, "bilinear", "bsd-3-clause"),
)
TIMM_WEIGHTS: Mapping[str, Mapping[str, TimmWeights]] = {
    model: {w.tag: w for w in _TAGS if w.model == model} for model in dict.fromkeys(w.model for w in _TAGS)}


def timm_weights(model: ModelRef, tag: str) -> TimmWeights | None:
    """timm's weights ``tag`` of ``model`` when registered, else None."""
    return TIMM_WEIGHTS.get(get_spec(model).name, {}).get(tag)


def timm_tags(model: ModelRef) -> tuple[str, ...]:
    """The registered timm tags of ``model``, in ``TIMM_WEIGHTS``' order."""
    return tuple(TIMM_WEIGHTS.get(get_spec(model).name, {}))


# --- downloading and converting ------------------------------------------------------------------------


def cached_hub_path(repo_id: str, commit: str) -> Path:
    """The jaxnets cache file of ``repo_id`` at ``commit``: ``hf-hub--ORG--REPO--<commit>.safetensors``."""
    from jaxnets.weights.cache import cache_dir

    return cache_dir() / (f"hf-hub--{repo_id.replace('/', '--')}--{commit}" + SUFFIX)


def open_hub(name: HubName | str, model: ModelRef | None = None, *, timm_tag: TimmWeights | None = None) -> Path:
    """The converted jaxnets weights file of a Hub repo (``name``) in the jaxnets cache, downloaded and converted
    on first use. ``model`` given: the repo's ``architecture`` must be it. ``timm_tag``: the registered tag the
    repo is (recorded in the file). Needs ``huggingface_hub``; offline (``HF_HUB_OFFLINE=1``) only its cache."""
    from jaxnets.weights.cache import CACHE_WAIT_SECONDS, cache_writer

    name = parse_hub_name(name) if isinstance(name, str) else name
    hub = _import_hub(name)
    config_path = _download(hub, name, CONFIG_FILE, name.revision)
    commit = config_path.parent.name  # the client's cache: .../snapshots/<commit>/config.json
    if not _COMMIT.fullmatch(commit):
        raise WeightsError(f"{name}: {config_path} is not in a Hugging Face cache snapshot (no commit)")
    config = _read_config(name, config_path)
    spec = _architecture(name, config, model)
    out = cached_hub_path(name.repo_id, commit)
    if not out.is_file():
        with cache_writer(out, wait=CACHE_WAIT_SECONDS):
            if not out.is_file():
                logger.info("%s: converting %s at %s into %s (first use)", spec.name, name, commit[:12], out)
                _convert(hub, name, commit, config, spec, out, timm_tag)
    return out


def _import_hub(name: HubName) -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(f"{name}: Hub weights need huggingface_hub ({errors.install_hint(HUB_EXTRA)})") from None
    return huggingface_hub


def _download(hub: Any, name: HubName, filename: str, revision: str | None) -> Path:
    """One file of the repo through the client's cache; its refusals as one-line ``WeightsError``s. A file the
    repo lacks is ``EntryNotFoundError`` (the caller may try another)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    try:
        return Path(hub.hf_hub_download(name.repo_id, filename, revision=revision, library_name="jaxnets",
                                        library_version=__version__))
    except hub_errors.LocalEntryNotFoundError:
        if filename != CONFIG_FILE:
            raise
        raise WeightsError(f"{name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                           f"cannot be reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}); check the "
                           f"repo name, or download it once online") from None
    except hub_errors.RepositoryNotFoundError:
        raise WeightsError(f"{name}: no such repo on the Hugging Face Hub, or it is private or gated (log in: "
                           f"hf auth login)") from None
    except hub_errors.RevisionNotFoundError:
        raise WeightsError(f"{name}: the repo has no revision {revision!r}") from None
    except hub_errors.EntryNotFoundError:
        if filename != CONFIG_FILE:
            raise
        raise WeightsError(f"{name}: no {CONFIG_FILE} in the repo: not a timm-format repo") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise WeightsError(f"{name}: cannot download {filename} ({errors.one_line(exc)})") from None


def _read_config(name: HubName, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{name}: {CONFIG_FILE} is not JSON ({errors.one_line(exc)})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{name}: {CONFIG_FILE} is not a JSON object")
    return config


def _architecture(name: HubName, config: Mapping[str, Any], model: ModelRef | None) -> Any:
    """The jaxnets model the repo's ``architecture`` is; a ``WeightsError`` for one jaxnets lacks or for another
    than ``model``."""
    arch = config.get("architecture")
    if arch not in list_models():
        raise WeightsError(f"{name}: architecture {arch!r} (its {CONFIG_FILE}) is not a jaxnets model; jaxnets has "
                           f"{', '.join(list_models())}")
    if model is not None and get_spec(model).name != arch:
        raise WeightsError(f"{name}: holds {arch} weights, not {get_spec(model).name}")
    return get_spec(arch)


def _weights_file(hub: Any, name: HubName, commit: str) -> Path:
    """``model.safetensors`` of the commit, else ``pytorch_model.bin`` (read through the safe loader)."""
    from huggingface_hub import errors as hub_errors

    for filename in WEIGHTS_FILES:
        try:
            return _download(hub, name, filename, commit)
        except hub_errors.EntryNotFoundError:
            continue
    raise WeightsError(f"{name}: neither {' nor '.join(WEIGHTS_FILES)} at {commit[:12]} (in the repo, or offline "
                       f"in the Hugging Face cache)")


def _convert(hub: Any, name: HubName, commit: str, config: Mapping[str, Any], spec: Any, out: Path,
             timm_tag: TimmWeights | None) -> None:
    path = _weights_file(hub, name, commit)
    state = read_state_dict(path)
    timm_layout = is_timm_layout(spec, state)
    try:
        variables = from_torch_state_dict(spec, from_timm_state_dict(spec, state))
    except WeightMappingError as exc:
        raise WeightMappingError(f"{name} ({path.name}): {exc}") from None
    pushed = config.get(JAXNETS_KEY) if isinstance(config.get(JAXNETS_KEY), Mapping) else {}
    options = {**decided_options(spec, variables),
               **check_model_options(spec, pushed.get("model_options") or {}, where=f"{name}: ")}
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), Mapping) else {}
    sha256 = file_sha256(path)
    metadata = {**(pushed.get("metadata") or {}),
                "source": f"{HUB_PREFIX}{name.repo_id}@{commit}", "source_sha256": sha256,
                "hub": {"repo_id": name.repo_id, "revision": name.revision or "main", "commit": commit,
                        "file": path.name, "sha256": sha256},
                "licence": cfg.get("license") or _card_licence(hub, name, commit),
                TIMM_CFG_KEY: dict(cfg)}
    labels = config.get("label_names")
    if (isinstance(labels, list) and len(labels) == config.get("num_classes")
            and tuple(labels) != imagenet_wnids() and "categories" not in metadata):
        metadata["categories"] = [str(label) for label in labels]
    if timm_tag is not None:
        metadata["timm_tag"] = timm_tag.tag
    if spec.family == "vgg" and timm_layout:
        metadata["note"] = (f"timm's VGG layout, loaded into torchvision's VGG: timm's logits at "
                            f"{VGG_EXACT_SIZE} px only")
    save_weights(out, spec, variables, model_options=options, metadata=metadata)


def _card_licence(hub: Any, name: HubName, commit: str) -> str | None:
    """The licence in the repo's model card (``README.md`` front matter), None when it has none or none can be had."""
    try:
        text = Path(hub.hf_hub_download(name.repo_id, "README.md", revision=commit)).read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001  (a card is optional: any failure to get it means "no licence known")
        return None
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    match = _CARD_LICENSE.search(front)
    return match.group(1) if match else None
