"""A model's state dict inside what a training script saved: the one owner of the rule that unwraps it.

A checkpoint wraps the torchvision-keyed state dict in up to three ways, undone here in this order:

1. nesting: ``{'state_dict': {...}, 'epoch': 800, 'optimizer': {...}}`` (also ``model``, ``model_state_dict``, and
   DINO's full checkpoint's ``teacher``, what DINO evaluates);
2. DataParallel's ``module.`` prefix on every key;
3. the self-supervised method's own modules around the backbone (``LAYOUTS``): a prefix on the backbone's keys
   (MoCo's ``encoder_q.``), projection heads, predictors, prototypes, a momentum encoder, a queue. They are dropped,
   and ``Unwrapped.dropped`` lists them.

Each layout is what the method's own evaluation code strips before it loads the backbone into torchvision's
ResNet-50 (``Layout.reference``). Detection needs no flag: a layout is recognized by its marker keys (MoCo v3's
``base_encoder.``, MoCo v2's ``encoder_q.``, SwAV's prototypes, ...); DINO's, Barlow Twins' and VICReg's published
files are plain torchvision keys without ``fc``, and detected as ``torchvision``. Given the model, keys its
architecture does not have are an unknown wrapping: one line naming the key prefixes found.
Values are never read here (numpy arrays or torch tensors alike): ``torch_io`` checks and converts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxnets.errors import command, did_you_mean
from jaxnets.mapping import torch_layout
from jaxnets.registry import ModelRef, get_spec
from jaxnets.weights.fileformat import WeightsError

# Keys under which scripts nest the state dict, tried in this order (DINO's full checkpoint: student, teacher, ...).
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict", "teacher")
DATA_PARALLEL_PREFIX = "module."
MAX_NESTING = 3  # {'model': {'state_dict': ...}} at most; a state dict's own keys are never wrapper names
MAX_LISTED = 8


class WrappingError(WeightsError):
    """A checkpoint whose wrapping is unknown, or not the ``--layout`` asked for."""


@dataclass(frozen=True)
class Layout:
    """How one method saves its ResNet-50: where the backbone's torchvision keys are and what surrounds them.

    Prefixes apply after nesting and DataParallel's ``module.`` are removed. A key under a ``drop`` prefix is
    dropped (``drop`` wins over ``prefix``: MoCo's projector is the encoder's own ``fc``); one under ``prefix`` is
    kept without it; with ``drop_others`` every other key is dropped too."""

    name: str
    description: str
    prefix: str = ""
    drop: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()  # key prefixes all present in this wrapping (and in no plain state dict)
    drop_others: bool = False
    reference: str = ""  # the method's code that strips it, which this layout follows

    def matches(self, keys: Iterable[str]) -> bool:
        """Whether ``keys`` (nesting and ``module.`` removed) have every marker of this layout."""
        keys = list(keys)
        return all(any(key.startswith(marker) for key in keys) for marker in self.markers)


_SWAV_HEADS = ("projection_head.", "prototypes.")
_PLAIN = "plain torchvision keys, no fc"

LAYOUTS: Mapping[str, Layout] = {layout.name: layout for layout in (
    Layout("mocov3", "MoCo v3: {'state_dict': ...} with module.base_encoder. (its fc is the projector), "
           "module.momentum_encoder., module.predictor.", prefix="base_encoder.",
           drop=("base_encoder.fc.", "momentum_encoder.", "predictor."), markers=("base_encoder.",),
           reference="facebookresearch/moco-v3 main_lincls.py"),
    Layout("mocov2", "MoCo v1/v2: {'state_dict': ...} with module.encoder_q. (its fc is the projector), "
           "module.encoder_k., module.queue", prefix="encoder_q.",
           drop=("encoder_q.fc.", "encoder_k.", "queue"), markers=("encoder_q.",),
           reference="facebookresearch/moco main_lincls.py"),
    Layout("deepcluster_v2", "DeepCluster-v2: module. prefix, projection head, prototypes.prototypes0/1/2",
           drop=_SWAV_HEADS, markers=("prototypes.prototypes0.",), reference="facebookresearch/swav eval_linear.py"),
    Layout("swav", "SwAV: module. prefix, projection head, prototypes", drop=_SWAV_HEADS,
           markers=("prototypes.weight",), reference="facebookresearch/swav hubconf.py, eval_linear.py"),
    Layout("backbone", "backbone. prefix, other modules dropped (full checkpoints of DINO, Barlow Twins, VICReg)",
           prefix="backbone.", markers=("backbone.",), drop_others=True,
           reference="facebookresearch/dino utils.load_pretrained_weights"),
    Layout("dino", f"DINO: {_PLAIN}", reference="facebookresearch/dino hubconf.py dino_resnet50"),
    Layout("barlowtwins", f"Barlow Twins: {_PLAIN}", reference="facebookresearch/barlowtwins hubconf.py"),
    Layout("vicreg", f"VICReg: {_PLAIN}", reference="facebookresearch/vicreg hubconf.py"),
    Layout("timm", "timm's resnet/resnext/wide_resnet: torchvision's keys"),
    Layout("torchvision", "torchvision's keys (a model's state_dict()), nested or with module. or not"),
)}
DETECTED = tuple(name for name, layout in LAYOUTS.items() if layout.markers)  # tried in this order
PLAIN = "torchvision"  # what a state dict matching no marker is


@dataclass(frozen=True)
class Unwrapped:
    """A torchvision-keyed state dict, the layout it was found in, and the keys dropped (as the file names them)."""

    state: dict[str, Any]
    layout: str
    dropped: list[str] = field(default_factory=list)

    def dropped_summary(self) -> list[str]:
        """The dropped keys grouped by what they belong to: ``['module.momentum_encoder. (328 keys)', ...]``."""
        return summarize(self.dropped, self.layout)


def unwrap(state: Mapping[str, Any], layout: str | None = None, *, where: str,
           model: ModelRef | None = None) -> Unwrapped:
    """The torchvision-keyed state dict in ``state`` (what ``torch.load`` gave), by ``LAYOUTS[layout]`` or, for
    None, the layout its keys show. ``where`` (the file) starts every error. Given ``model``, its torchvision
    modules under a prefix no layout removes are an unknown wrapping (``WrappingError`` naming the key prefixes
    found); other keys, and any without ``model``, are left for the state-dict mapping to report (another model's
    state dict is not a wrapping)."""
    if layout is not None and layout not in LAYOUTS:
        raise WrappingError(f"{where}: unknown layout {layout!r}{did_you_mean(layout, LAYOUTS)}; "
                            f"known: {', '.join(LAYOUTS)}")
    state, nested = _unnest(state, where)
    if not state:
        raise WrappingError(f"{where}: the state dict is empty")
    original = list(state)
    keys = ([key[len(DATA_PARALLEL_PREFIX):] for key in original]
            if all(key.startswith(DATA_PARALLEL_PREFIX) for key in original) else original)
    detected = next((name for name in DETECTED if LAYOUTS[name].matches(keys)), PLAIN)
    chosen = LAYOUTS[layout or detected]
    if not (chosen.matches(keys) and (chosen.markers or detected == PLAIN)):
        expected = f"no key starts {' or '.join(chosen.markers)}" if chosen.markers else "expected plain keys"
        raise WrappingError(f"{where}{nested}: not a {chosen.name} checkpoint ({expected}); key prefixes found: "
                            f"{_prefixes(original, model)}; its keys look like {detected}'s")
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, short in zip(original, keys, strict=True):
        if short.startswith(chosen.drop) or (chosen.drop_others and not short.startswith(chosen.prefix)):
            dropped.append(key)
        else:
            kept[short[len(chosen.prefix):] if short.startswith(chosen.prefix) else short] = state[key]
    if model is not None:
        modules = _torchvision_modules(model)
        stray = [key.split(".") for key in kept if key.split(".", 1)[0] not in modules]
        if any(part in modules for parts in stray for part in parts[1:-1]):  # the model's keys, under a prefix
            raise WrappingError(f"{where}{nested}: unknown wrapping of a {get_spec(model).name} state dict: key "
                                f"prefixes found: {_prefixes(original, model)}; known layouts: {', '.join(LAYOUTS)} "
                                f"({command('convert')} --help, --layout)")
    return Unwrapped(kept, chosen.name, dropped)


def summarize(keys: Sequence[str], layout: str | None = None) -> list[str]:
    """Keys grouped by the ``layout``'s drop prefix they fall under (else by their first two components), with
    counts, in order of appearance: what a log line shows of hundreds of dropped keys."""
    drop = LAYOUTS[layout].drop if layout in LAYOUTS else ()
    groups: Counter[str] = Counter()
    for key in keys:
        outer = DATA_PARALLEL_PREFIX if key.startswith(DATA_PARALLEL_PREFIX) else ""
        short = key[len(outer):]
        match = next((p for p in drop if short.startswith(p) and p.endswith(".")), None)
        groups[outer + (match or ".".join(short.split(".")[:2]))] += 1
    return [_counted(group, count) for group, count in groups.items()]


def _unnest(state: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], str]:
    """The state dict under the wrapper keys, and how it was reached (``"['state_dict']"``, for errors)."""
    path = ""
    for _ in range(MAX_NESTING):
        if not isinstance(state, Mapping):
            break
        wrapper = next((w for w in STATE_DICT_WRAPPERS if isinstance(state.get(w), Mapping)), None)
        if wrapper is None:
            break
        state, path = state[wrapper], f"{path}[{wrapper!r}]"
    if not isinstance(state, Mapping):
        raise WrappingError(f"{where}: holds a {type(state).__name__}, not a state dict")
    return state, path


def _torchvision_modules(model: ModelRef) -> frozenset[str]:
    """The top-level modules of ``model``'s torchvision state dict (ResNet's conv1, bn1, layer1-4, fc)."""
    return frozenset(key.split(".", 1)[0] for key in torch_layout(model))


def _prefixes(keys: Sequence[str], model: ModelRef | None) -> str:
    """The keys' prefixes, counted: everything before the first of ``model``'s top-level modules (without a model,
    or none found, the first two components), e.g. ``module.encoder_x. (320 keys), module.queue (1 key)``."""
    modules = _torchvision_modules(model) if model is not None else frozenset()
    groups: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        cut = next((i for i, part in enumerate(parts[:-1]) if part in modules), None)
        if cut is None:
            groups[".".join(parts[:2]) + ("." if len(parts) > 2 else "")] += 1
        else:
            groups[".".join(parts[:cut]) + "." if cut else "(no prefix)"] += 1
    shown = [_counted(group, count) for group, count in list(groups.items())[:MAX_LISTED]]
    more = len(groups) - MAX_LISTED
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _counted(group: str, count: int) -> str:
    return f"{group} ({count} key{'s' if count > 1 else ''})"
