"""Model names -> builders and torchvision weight metadata, as data.

Like torchvision's ``models/_api.py``: one ``ModelSpec`` per name, ``list_models`` and
``create_model`` over them. Variants of a family differ only in the arguments bound here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from importlib import resources
from typing import Any, Union

import jax.numpy as jnp
from flax import linen as nn

from jaxnets import layers
from jaxnets.errors import UserError
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from jaxnets.models.alexnet import AlexNet
from jaxnets.models.googlenet import GoogLeNet
from jaxnets.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxnets.models.vgg import VGG

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "ModelSpec", "OptionType", "PretrainedWeights",
           "bound_options", "check_num_classes", "check_options", "create_model", "get_spec", "imagenet_categories",
           "list_models", "model_class", "options", "recorded_options", "register_model"]

# Constructor arguments that are no model option: the classifier decides one, the caller the other.
RESERVED_OPTIONS = ("num_classes", "dtype")
# Size of the dummy input that shapes are traced with: ImageNet's, or the model's minimum if larger.
INIT_SIZE = 224


@dataclass(frozen=True)
class PretrainedWeights:
    """One set of torchvision ImageNet-1k weights (``IMAGENET1K_V1``) and what it was measured to do."""

    url: str
    acc1: float
    acc5: float
    num_params: int
    gflops: float
    min_size: tuple[int, int]
    transforms: EvalTransform = EvalTransform()
    # Constructor options torchvision sets when it builds the model for these weights.
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    torchvision_name: str = "IMAGENET1K_V1"

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
    def init_size(self) -> int:
        """Side of the dummy image that variables are initialized (or their shapes traced) with."""
        return max(INIT_SIZE, *self.weights.min_size)

    def create(self, num_classes: int = 1000, dtype: Any = jnp.float32, **options: Any) -> nn.Module:
        """The Flax module, after checking ``options`` are ones the variant leaves free."""
        num_classes = check_num_classes(num_classes)
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
            if key not in self.options:
                raise UserError(f"{where}{self.name}: unknown option {key!r}; "
                                f"accepted: {', '.join(sorted(self.options)) or 'none'}")
            kind = self.options[key]
            if not kind.accepts(value):
                raise UserError(f"{where}{self.name}: option {key}={_show(value)} has the wrong type: "
                                f"expected {kind.name} ({kind.words})")
            checked[key] = kind.coerce(value)
        return checked

    def recorded_options(self, model: nn.Module) -> dict[str, Any]:
        """The options ``model`` was built with: what a weights file records so that loading it rebuilds the
        same model (GoogLeNet's ``transform_input``!)."""
        return {key: getattr(model, key) for key in self.options}


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
        raise UserError(f"unknown model {model!r}; known models: {', '.join(_REGISTRY)}") from None


def create_model(name: ModelRef, num_classes: int = 1000, dtype: Any = jnp.float32, **options: Any) -> nn.Module:
    """Build the Flax module for ``name``; ``options`` are the torchvision constructor options
    of its family (``dropout``, ``aux_logits``, ``zero_init_residual``, ...) that the variant leaves free."""
    return get_spec(name).create(num_classes, dtype, **options)


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
    text = resources.files("jaxnets").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


# --- the model zoo --------------------------------------------------------------------

_DL = "https://download.pytorch.org/models/"


def _weights(file: str, acc1: float, acc5: float, num_params: int, gflops: float, min_size: int,
             **model_kwargs: Any) -> PretrainedWeights:
    return PretrainedWeights(_DL + file, acc1, acc5, num_params, gflops, (min_size, min_size),
                             model_kwargs=model_kwargs)


register_model(ModelSpec(
    "alexnet", "alexnet", AlexNet,
    _weights("alexnet-owt-7be5be79.pth", 56.522, 79.066, 61100840, 0.714, 63),
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
for depth, bn, file, acc1, acc5, num_params, gflops in _VGG:
    register_model(ModelSpec(
        f"vgg{depth}{'_bn' if bn else ''}", "vgg", partial(VGG, depth=depth, batch_norm=bn),
        _weights(file, acc1, acc5, num_params, gflops, 32),
        head=("classifier/6",), flattened_linears={"classifier/0": (512, 7, 7)}))

register_model(ModelSpec(
    "googlenet", "googlenet", GoogLeNet,
    # torchvision builds GoogLeNet with transform_input=True for its ported weights.
    _weights("googlenet-1378be20.pth", 69.778, 89.530, 6624904, 1.498, 15, transform_input=True),
    head=("fc", "aux1", "aux2"), flattened_linears={"aux1/fc1": (128, 4, 4), "aux2/fc1": (128, 4, 4)}))

_RESNET = [  # name, stage sizes, block, groups, width per group, file, acc@1, acc@5, num_params, GFLOPs
    ("resnet18", (2, 2, 2, 2), BasicBlock, 1, 64, "resnet18-f37072fd.pth", 69.758, 89.078, 11689512, 1.814),
    ("resnet34", (3, 4, 6, 3), BasicBlock, 1, 64, "resnet34-b627a593.pth", 73.314, 91.420, 21797672, 3.664),
    ("resnet50", (3, 4, 6, 3), Bottleneck, 1, 64, "resnet50-0676ba61.pth", 76.130, 92.862, 25557032, 4.089),
    ("resnet101", (3, 4, 23, 3), Bottleneck, 1, 64, "resnet101-63fe2227.pth", 77.374, 93.546, 44549160, 7.801),
    ("resnet152", (3, 8, 36, 3), Bottleneck, 1, 64, "resnet152-394f9c45.pth", 78.312, 94.046, 60192808, 11.514),
    ("resnext50_32x4d", (3, 4, 6, 3), Bottleneck, 32, 4, "resnext50_32x4d-7cdf4587.pth",
     77.618, 93.698, 25028904, 4.230),
    ("resnext101_32x8d", (3, 4, 23, 3), Bottleneck, 32, 8, "resnext101_32x8d-8ba56ff5.pth",
     79.312, 94.526, 88791336, 16.414),
    ("wide_resnet50_2", (3, 4, 6, 3), Bottleneck, 1, 128, "wide_resnet50_2-95faca4d.pth",
     78.468, 94.086, 68883240, 11.398),
    ("wide_resnet101_2", (3, 4, 23, 3), Bottleneck, 1, 128, "wide_resnet101_2-32ee1156.pth",
     78.848, 94.284, 126886696, 22.753),
]
for name, stages, block, groups, width, file, acc1, acc5, num_params, gflops in _RESNET:
    register_model(ModelSpec(
        name, "resnet",
        partial(ResNet, stage_sizes=stages, block_cls=block, groups=groups, width_per_group=width),
        _weights(file, acc1, acc5, num_params, gflops, 1), head=("fc",)))
