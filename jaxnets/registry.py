"""Model names -> builders and torchvision weight metadata, as data.

Like torchvision's ``models/_api.py``: one ``ModelSpec`` per name, ``list_models`` and
``create_model`` over them. Variants of a family differ only in the arguments bound here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from importlib import resources
from typing import Any, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnets import layers
from jaxnets.errors import UserError, did_you_mean
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from jaxnets.models.alexnet import AlexNet
from jaxnets.models.backbone import FeatureInfo
from jaxnets.models.backbone import feature_info as _feature_info
from jaxnets.models.googlenet import GoogLeNet
from jaxnets.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxnets.models.vgg import VGG

__all__ = ["DEFAULT_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "TORCHVISION_DEFAULT", "EvalTransform", "ModelSpec",
           "OptionType", "PretrainedWeights", "bound_options", "check_num_classes", "check_options", "create_model",
           "get_spec", "imagenet_categories", "imagenet_wnids", "is_weights_name", "list_models", "model_class",
           "options", "recorded_options", "register_model", "NO_CLASSIFIER", "RUNTIME_OPTIONS", "FeatureInfo",
           "feature_info", "init_input"]

# Constructor arguments that are no model option: the classifier decides one, the caller the other.
RESERVED_OPTIONS = ("num_classes", "dtype")
# Options that change how a model computes, not what: create_model takes them, a weights file never records them
# (the same weights run with or without), and a recorded one is refused. Every other option is recorded: what a
# file needs to rebuild its model (``in_chans``; ``features_only`` and ``out_indices``, which decide the layers a
# backbone has; GoogLeNet's ``transform_input``).
RUNTIME_OPTIONS = ("remat",)
# The number of classes of a backbone (``features_only``): it has no classifier.
NO_CLASSIFIER = 0
# Size of the dummy input that shapes are traced with: ImageNet's, or the model's minimum if larger.
INIT_SIZE = 224


DEFAULT_WEIGHTS = "IMAGENET1K_V1"  # jaxnets' default version: what a model name without a version means
TORCHVISION_DEFAULT = "DEFAULT"  # torchvision's alias for its best weights of a model (IMAGENET1K_V2 where it exists)
_WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+")  # a bare word: torchvision's IMAGENET1K_V2, timm's a1_in1k, dino
HUB_PREFIX = "hf-hub:"  # weights on the Hugging Face Hub: hf-hub:ORG/REPO[@REVISION]


def is_weights_name(text: Any) -> bool:
    """Whether ``text`` names weights rather than a file: a bare word of letters, digits and underscores (no dot,
    no slash: torchvision's ``IMAGENET1K_V2`` and ``DEFAULT``, timm's tags such as ``a1_in1k``, the
    self-supervised ``dino``), or ``hf-hub:ORG/REPO[@REVISION]``. A file so named is reached as ``./NAME``."""
    return isinstance(text, str) and (_WEIGHTS_NAME.fullmatch(text) is not None or text.startswith(HUB_PREFIX))


@dataclass(frozen=True)
class PretrainedWeights:
    """One set of torchvision ImageNet-1k weights, a member of torchvision's ``<Model>_Weights`` enum named as
    there (``torchvision_name``: ``IMAGENET1K_V1``, ``IMAGENET1K_V2``), and what it was measured to do."""

    url: str
    acc1: float
    acc5: float
    num_params: int
    gflops: float
    min_size: tuple[int, int]
    transforms: EvalTransform = EvalTransform()
    # Constructor options torchvision sets when it builds the model for these weights.
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    torchvision_name: str = DEFAULT_WEIGHTS
    recipe: str = ""  # how they were trained: torchvision's link

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """torchvision names its files ``<model>-<first 8 hex digits of the SHA-256>.pth``."""
        return self.filename.rsplit(".", 1)[0].rsplit("-", 1)[-1]

    @property
    def categories(self) -> tuple[str, ...]:
        return imagenet_categories()

    @property
    def wnids(self) -> tuple[str, ...]:
        """The categories' WordNet ids (``n01440764``), as ImageNet's folders are named."""
        return imagenet_wnids()


# --- model options: the one schema of what create_model accepts and a weights file records ---------


@dataclass(frozen=True)
class OptionType:
    """A type a model option may have. Options are recorded in weights files as JSON, so only types that
    survive a JSON round trip exactly are options: a field of any other type is refused at registration."""

    name: str  # as the annotation reads: 'bool', 'float | None', 'tuple[int, ...]'
    words: str  # what a user must give, in words
    check: Callable[[Any], bool]
    coerce: Callable[[Any], Any]  # the JSON value -> the value the module is built with

    def accepts(self, value: Any) -> bool:
        return self.check(value)


def _number(kind: type) -> Callable[[Any], bool]:
    # bool is an int to Python, never a number here; float options take integers (JSON writes 1.0 as 1.0,
    # a user may type 1).
    allowed = (int, float) if kind is float else (kind,)
    return lambda v: isinstance(v, allowed) and (kind is bool or not isinstance(v, bool))


_SCALARS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", _number(bool)),
    int: ("an integer", _number(int)),
    float: ("a number", _number(float)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def option_type(annotation: Any) -> OptionType | None:
    """The ``OptionType`` of a field annotation, None when a weights file cannot record it. Recordable:
    bool, int, float, str, ``X | None`` of those, and ``tuple[X, ...]`` of the numbers and strings."""
    if annotation in _SCALARS:
        words, check = _SCALARS[annotation]
        return OptionType(annotation.__name__, words, check, annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = option_type(next(a for a in args if a is not type(None)))
        if inner is None or inner.name.endswith("None"):
            return None
        return OptionType(f"{inner.name} | None", f"{inner.words} or null",
                          lambda v: v is None or inner.check(v), lambda v: None if v is None else inner.coerce(v))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS and args[0] is not bool:
        inner = option_type(args[0])
        return OptionType(f"tuple[{inner.name}, ...]", f"a list of {inner.name}s",
                          lambda v: isinstance(v, list | tuple) and all(inner.check(x) for x in v),
                          lambda v: tuple(inner.coerce(x) for x in v))
    return None


def _module_class(builder: Callable[..., nn.Module]) -> type[nn.Module]:
    return builder.func if isinstance(builder, partial) else builder


def _free_fields(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """Constructor field -> annotation, for the fields the builder leaves free (not bound, not reserved)."""
    module_cls = _module_class(builder)
    hints = typing.get_type_hints(module_cls)
    bound = builder.keywords if isinstance(builder, partial) else {}
    return {f.name: hints.get(f.name) for f in dataclasses.fields(module_cls)
            if f.init and f.name not in {"parent", "name", *bound, *RESERVED_OPTIONS}}


def _option_schema(builder: Callable[..., nn.Module], name: str) -> dict[str, OptionType]:
    schema = {}
    for key, annotation in _free_fields(builder).items():
        kind = option_type(annotation)
        if kind is None:
            raise TypeError(f"model {name!r}: option {key!r} has type {annotation!r}, which a weights file cannot "
                            "record (bool, int, float, str, X | None, tuple[X, ...]); bind it in the builder or "
                            "change its type")
        schema[key] = kind
    return schema


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Everything jaxnets knows about one model name: resolve it once (``get_spec``) and pass it down."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    weights: PretrainedWeights
    # Module paths of the classifier: what depends on num_classes, is re-initialized for a new task
    # and stays trainable when the backbone is frozen (GoogLeNet: its auxiliary heads too).
    head: tuple[str, ...]
    # Linear layers that torch feeds with an NCHW flatten, with that (C, H, W): the converter
    # permutes their input rows, because jaxnets flattens NHWC.
    flattened_linears: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    # torchvision's later weights for the architecture (IMAGENET1K_V2), in its order, best last. ``weights``
    # (IMAGENET1K_V1) stays jaxnets' default, so a model name without a version means what it always meant.
    newer_weights: tuple[PretrainedWeights, ...] = ()
    # The options the variant leaves free, and their types: filled in at construction from the builder.
    options: Mapping[str, OptionType] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "options", _option_schema(self.builder, self.name))

    @property
    def classifier(self) -> str:
        """The final classifier layer; its output size is the number of classes."""
        return self.head[0]

    @property
    def module_class(self) -> type[nn.Module]:
        """The Flax module class the builder makes (its family's, whatever the variant binds)."""
        return _module_class(self.builder)

    @property
    def bound_options(self) -> dict[str, Any]:
        """The constructor arguments the variant binds (``functools.partial`` keywords): its architecture,
        which no option may change (ResNet's ``stage_sizes``, VGG's ``depth``)."""
        return dict(self.builder.keywords) if isinstance(self.builder, partial) else {}

    @property
    def weight_versions(self) -> dict[str, PretrainedWeights]:
        """Every registered set of torchvision weights by its name, jaxnets' default first."""
        return {w.torchvision_name: w for w in (self.weights, *self.newer_weights)}

    def get_weights(self, version: str | None = None) -> PretrainedWeights:
        """Weights by torchvision's name: None is jaxnets' default (``IMAGENET1K_V1``); ``'DEFAULT'`` is
        torchvision's alias for its best (the last registered: ``IMAGENET1K_V2`` where it exists)."""
        versions = self.weight_versions
        if version is None:
            return self.weights
        if version == TORCHVISION_DEFAULT:
            return list(versions.values())[-1]
        if version not in versions:
            raise UserError(f"{self.name}: no weights named {version!r}; torchvision's for {self.name}: "
                            f"{', '.join(versions)} ({TORCHVISION_DEFAULT} = {list(versions)[-1]})")
        return versions[version]

    def weights_with_sha256(self, sha256: str) -> PretrainedWeights | None:
        """The registered weights whose file has this SHA-256 (torchvision names its files by its prefix)."""
        return next((w for w in self.weight_versions.values() if sha256.startswith(w.sha256_prefix)), None)

    @property
    def init_size(self) -> int:
        """Side of the dummy image that variables are initialized (or their shapes traced) with."""
        return max(INIT_SIZE, *self.weights.min_size)

    @property
    def recorded_option_names(self) -> tuple[str, ...]:
        """The options a weights file records: all but ``RUNTIME_OPTIONS``."""
        return tuple(key for key in self.options if key not in RUNTIME_OPTIONS)

    def feature_info(self, out_indices: tuple[int, ...] | None = None) -> list[FeatureInfo]:
        """The feature levels ``create(features_only=True, out_indices=out_indices)`` returns: per map, its level
        index, the torchvision node it equals (``create_feature_extractor``'s ``return_nodes``), its channels and
        its reduction (stride). The levels are the variant's own (the module's ``feature_levels``)."""
        return _feature_info(self.builder().feature_levels(), out_indices, self.name)

    def create(self, num_classes: int = 1000, dtype: Any = jnp.float32, **options: Any) -> nn.Module:
        """The Flax module, after checking ``options`` are ones the variant leaves free. A ``features_only``
        backbone has no classifier: its ``num_classes`` is ``NO_CLASSIFIER`` whatever is asked."""
        num_classes = NO_CLASSIFIER if options.get("features_only") else check_num_classes(num_classes)
        bound = self.bound_options
        fixed = sorted(set(options) & set(bound))
        if fixed:
            raise UserError(f"{self.name} fixes " + ", ".join(f"{key}={bound[key]!r}" for key in fixed)
                            + "; choose another model")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UserError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(sorted(self.options))}")
        return self.builder(num_classes=num_classes, dtype=dtype, **options)

    def check_options(self, options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """``options`` as a weights file records them (coerced to their types), or a ``UserError`` naming the
        bad one: a file rebuilds its model from them, so a wrong one would only fail later, in training.
        Only the fields the variant leaves free are options: those it binds (ResNet's ``block_cls``, VGG's
        ``depth``) are its architecture, and choosing them means another model."""
        bound = self.bound_options
        checked = {}
        for key, value in options.items():
            if key in bound:
                raise UserError(f"{where}{self.name}: option {key}={_show(value)} refused: {self.name} binds "
                                f"{key}={bound[key]!r}, it is the architecture; choose another model instead")
            if key in RESERVED_OPTIONS:
                raise UserError(f"{where}{self.name}: {key!r} is not a model option here; "
                                "pass it as its own argument")
            if key in RUNTIME_OPTIONS:
                raise UserError(f"{where}{self.name}: {key!r} is not recorded in weights files (it changes how the "
                                f"model computes, not its weights); pass it when you create or load the model")
            if key not in self.options:
                raise UserError(f"{where}{self.name}: unknown option {key!r}; "
                                f"accepted: {', '.join(sorted(self.recorded_option_names)) or 'none'}")
            kind = self.options[key]
            if not kind.accepts(value):
                raise UserError(f"{where}{self.name}: option {key}={_show(value)} has the wrong type: "
                                f"expected {kind.name} ({kind.words})")
            checked[key] = kind.coerce(value)
        return checked

    def recorded_options(self, model: nn.Module) -> dict[str, Any]:
        """The options ``model`` was built with: what a weights file records so that loading it rebuilds the
        same model (GoogLeNet's ``transform_input``!, ``in_chans``, a backbone's ``features_only``), less the
        ``RUNTIME_OPTIONS``."""
        return {key: getattr(model, key) for key in self.recorded_option_names}

    def init_input(self, model: nn.Module) -> jax.Array:
        """The dummy batch that ``model`` (one of this spec's) is initialized, or its shapes traced, with: one
        image of ``init_size`` with the model's ``in_chans`` channels."""
        return init_input(model, self.init_size)


def _show(value: Any) -> str:
    """``value`` as it was typed on the command line (JSON), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --- the registry ----------------------------------------------------------------------------


_REGISTRY: dict[str, ModelSpec] = {}
ModelRef = str | ModelSpec  # what functions taking a model accept: a registered name, or its resolved spec


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (``'resnet*'``), in registration order."""
    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_spec(model: ModelRef) -> ModelSpec:
    """The ``ModelSpec`` of a registered name (a spec is returned as it is, so callers may pass either)."""
    if isinstance(model, ModelSpec):
        return model
    try:
        return _REGISTRY[model]
    except (KeyError, TypeError):
        hint = did_you_mean(str(model), _REGISTRY)
        raise UserError(f"unknown model {model!r}{hint}; known models: {', '.join(_REGISTRY)}") from None


def create_model(name: ModelRef, num_classes: int = 1000, dtype: Any = jnp.float32, **options: Any) -> nn.Module:
    """Build the Flax module for ``name``; ``options`` are the torchvision constructor options
    of its family (``dropout``, ``aux_logits``, ``zero_init_residual``, ...) that the variant leaves free."""
    return get_spec(name).create(num_classes, dtype, **options)


def feature_info(name: ModelRef, out_indices: tuple[int, ...] | None = None) -> list[FeatureInfo]:
    """Per feature map of ``create_model(name, features_only=True, out_indices=out_indices)``: its level index,
    the torchvision node it comes from, its channels and its reduction. See ``ModelSpec.feature_info``."""
    return get_spec(name).feature_info(out_indices)


def init_input(model: nn.Module, size: int) -> jax.Array:
    """A batch of one ``size`` x ``size`` image of zeros with ``model``'s input channels (``in_chans``)."""
    return jnp.zeros((1, size, size, getattr(model, "in_chans", 3)), jnp.float32)


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` as an int, or a ``UserError`` naming it: 0, a negative count, a bool or a float would
    otherwise fail deep inside the initializers (or, as ``True``, silently build a 1-class head)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def model_class(name: ModelRef) -> type[nn.Module]:
    """The Flax module class that ``name`` builds (its family's, whatever the variant binds)."""
    return get_spec(name).module_class


def bound_options(name: ModelRef) -> dict[str, Any]:
    """The constructor arguments the variant ``name`` binds: its architecture."""
    return get_spec(name).bound_options


def options(name: ModelRef) -> dict[str, OptionType]:
    """Option name -> type, for the options ``name`` leaves free: what ``create_model`` accepts and a weights
    file records."""
    return dict(get_spec(name).options)


def check_options(name: ModelRef, options: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """See ``ModelSpec.check_options``."""
    return get_spec(name).check_options(options, where)


def recorded_options(name: ModelRef, model: nn.Module) -> dict[str, Any]:
    """See ``ModelSpec.recorded_options``."""
    return get_spec(name).recorded_options(model)


def _describe_module(module: nn.Module) -> tuple[str, tuple[int, int]] | None:
    """The registered model ``module`` is (name, minimum input size), if exactly one builds it; for errors."""
    matches = [spec for spec in _REGISTRY.values() if spec.module_class is type(module)
               and all(getattr(module, k, None) == v for k, v in spec.bound_options.items())]
    return (matches[0].name, matches[0].weights.min_size) if len(matches) == 1 else None


layers.set_model_describer(_describe_module)


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in torchvision's order (shipped with the package)."""
    return _package_lines("imagenet_classes.txt")


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in the same order: sorted, the order in which torchvision's
    ``ImageFolder`` numbers ImageNet's synset folders (shipped with the package)."""
    return _package_lines("imagenet_wnids.txt")


def _package_lines(name: str) -> tuple[str, ...]:
    text = resources.files("jaxnets").joinpath(name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


# --- the model zoo --------------------------------------------------------------------

_DL = "https://download.pytorch.org/models/"
_RECIPES = "https://github.com/pytorch/vision/tree/main/references/classification#"
_NEW_RECIPE = "https://github.com/pytorch/vision/issues/3995#"


def _weights(file: str, acc1: float, acc5: float, num_params: int, gflops: float, min_size: int, recipe: str, *,
             version: str = DEFAULT_WEIGHTS, resize_size: int = 256, **model_kwargs: Any) -> PretrainedWeights:
    return PretrainedWeights(_DL + file, acc1, acc5, num_params, gflops, (min_size, min_size),
                             EvalTransform(resize_size=resize_size), model_kwargs=model_kwargs,
                             torchvision_name=version, recipe=recipe)


register_model(ModelSpec(
    "alexnet", "alexnet", AlexNet,
    _weights("alexnet-owt-7be5be79.pth", 56.522, 79.066, 61100840, 0.714, 63, _RECIPES + "alexnet-and-vgg"),
    head=("classifier/6",), flattened_linears={"classifier/1": (256, 6, 6)}))

_VGG = [  # depth, batch_norm, file, acc@1, acc@5, num_params, GFLOPs
    (11, False, "vgg11-8a719046.pth", 69.020, 88.628, 132863336, 7.609),
    (11, True, "vgg11_bn-6002323d.pth", 70.370, 89.810, 132868840, 7.609),
    (13, False, "vgg13-19584684.pth", 69.928, 89.246, 133047848, 11.308),
    (13, True, "vgg13_bn-abd245e5.pth", 71.586, 90.374, 133053736, 11.308),
    (16, False, "vgg16-397923af.pth", 71.592, 90.382, 138357544, 15.470),
    (16, True, "vgg16_bn-6c64b313.pth", 73.360, 91.516, 138365992, 15.470),
    (19, False, "vgg19-dcbb9e9d.pth", 72.376, 90.876, 143667240, 19.632),
    (19, True, "vgg19_bn-c79401a0.pth", 74.218, 91.842, 143678248, 19.632),
]
# torchvision's VGG16_Weights.IMAGENET1K_FEATURES (SSD's backbone) is not registered: its classifier has no
# trained values, so it classifies nothing (no categories, NaN accuracy).
for depth, bn, file, acc1, acc5, num_params, gflops in _VGG:
    register_model(ModelSpec(
        f"vgg{depth}{'_bn' if bn else ''}", "vgg", partial(VGG, depth=depth, batch_norm=bn),
        _weights(file, acc1, acc5, num_params, gflops, 32, _RECIPES + "alexnet-and-vgg"),
        head=("classifier/6",), flattened_linears={"classifier/0": (512, 7, 7)}))

register_model(ModelSpec(
    "googlenet", "googlenet", GoogLeNet,
    # torchvision builds GoogLeNet with transform_input=True for its ported weights.
    _weights("googlenet-1378be20.pth", 69.778, 89.530, 6624904, 1.498, 15, _RECIPES + "googlenet",
             transform_input=True),
    head=("fc", "aux1", "aux2"), flattened_linears={"aux1/fc1": (128, 4, 4), "aux2/fc1": (128, 4, 4)}))

_RN, _RNX, _WRN = _RECIPES + "resnet", _RECIPES + "resnext", "https://github.com/pytorch/vision/pull/912#issue-445437439"
_RESNET = [  # name, stage sizes, block, groups, width per group, file, acc@1, acc@5, num_params, GFLOPs, recipe
    ("resnet18", (2, 2, 2, 2), BasicBlock, 1, 64, "resnet18-f37072fd.pth", 69.758, 89.078, 11689512, 1.814, _RN),
    ("resnet34", (3, 4, 6, 3), BasicBlock, 1, 64, "resnet34-b627a593.pth", 73.314, 91.420, 21797672, 3.664, _RN),
    ("resnet50", (3, 4, 6, 3), Bottleneck, 1, 64, "resnet50-0676ba61.pth", 76.130, 92.862, 25557032, 4.089, _RN),
    ("resnet101", (3, 4, 23, 3), Bottleneck, 1, 64, "resnet101-63fe2227.pth", 77.374, 93.546, 44549160, 7.801, _RN),
    ("resnet152", (3, 8, 36, 3), Bottleneck, 1, 64, "resnet152-394f9c45.pth", 78.312, 94.046, 60192808, 11.514, _RN),
    ("resnext50_32x4d", (3, 4, 6, 3), Bottleneck, 32, 4, "resnext50_32x4d-7cdf4587.pth",
     77.618, 93.698, 25028904, 4.230, _RNX),
    ("resnext101_32x8d", (3, 4, 23, 3), Bottleneck, 32, 8, "resnext101_32x8d-8ba56ff5.pth",
     79.312, 94.526, 88791336, 16.414, _RNX),
    ("wide_resnet50_2", (3, 4, 6, 3), Bottleneck, 1, 128, "wide_resnet50_2-95faca4d.pth",
     78.468, 94.086, 68883240, 11.398, _WRN),
    ("wide_resnet101_2", (3, 4, 23, 3), Bottleneck, 1, 128, "wide_resnet101_2-32ee1156.pth",
     78.848, 94.284, 126886696, 22.753, _WRN),
]
# torchvision's IMAGENET1K_V2 (its "new recipe", evaluated at resize 232 / crop 224): file, acc@1, acc@5, recipe.
_RESNET_V2 = {
    "resnet50": ("resnet50-11ad3fa6.pth", 80.858, 95.434, _NEW_RECIPE + "issuecomment-1013906621"),
    "resnet101": ("resnet101-cd907fc2.pth", 81.886, 95.780, _NEW_RECIPE + "new-recipe"),
    "resnet152": ("resnet152-f82ba261.pth", 82.284, 96.002, _NEW_RECIPE + "new-recipe"),
    "resnext50_32x4d": ("resnext50_32x4d-1a0047aa.pth", 81.198, 95.340, _NEW_RECIPE + "new-recipe"),
    "resnext101_32x8d": ("resnext101_32x8d-110c445d.pth", 82.834, 96.228, _NEW_RECIPE + "new-recipe-with-fixres"),
    "wide_resnet50_2": ("wide_resnet50_2-9ba9bcbe.pth", 81.602, 95.758, _NEW_RECIPE + "new-recipe-with-fixres"),
    "wide_resnet101_2": ("wide_resnet101_2-d733dc28.pth", 82.510, 96.020, _NEW_RECIPE + "new-recipe"),
}
for name, stages, block, groups, width, file, acc1, acc5, num_params, gflops, recipe in _RESNET:
    v2 = _RESNET_V2.get(name)
    register_model(ModelSpec(
        name, "resnet",
        partial(ResNet, stage_sizes=stages, block_cls=block, groups=groups, width_per_group=width),
        _weights(file, acc1, acc5, num_params, gflops, 1, recipe),
        head=("fc",),
        newer_weights=() if v2 is None else (
            _weights(v2[0], v2[1], v2[2], num_params, gflops, 1, v2[3], version="IMAGENET1K_V2", resize_size=232),)))
