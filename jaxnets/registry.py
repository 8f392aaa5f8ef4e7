"""Model names -> builders and torchvision weight metadata, as data.

Like torchvision's ``models/_api.py``: one ``ModelSpec`` per name, ``list_models`` and
``create_model`` over them. Variants of a family differ only in the arguments bound here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from importlib import resources
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxnets.models.alexnet import AlexNet
from jaxnets.models.googlenet import GoogLeNet
from jaxnets.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxnets.models.vgg import VGG

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center crop, normalize."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


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


@dataclass(frozen=True)
class ModelSpec:
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

    @property
    def classifier(self) -> str:
        """The final classifier layer; its output size is the number of classes."""
        return self.head[0]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (``'resnet*'``), in registration order."""
    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32, **options: Any) -> nn.Module:
    """Build the Flax module for ``name``; ``options`` are the torchvision constructor options
    of its family (``dropout``, ``aux_logits``, ``zero_init_residual``, ...) that the variant leaves free."""
    spec = get_spec(name)
    num_classes = check_num_classes(num_classes)
    bound = bound_options(name)
    fixed = sorted(set(options) & set(bound))
    if fixed:
        raise ValueError(f"{name} fixes " + ", ".join(f"{key}={bound[key]!r}" for key in fixed)
                         + "; choose another model")
    allowed = {f.name for f in dataclasses.fields(model_class(name)) if f.init} - {"parent", "name", *bound}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(sorted(allowed - {'num_classes', 'dtype'}))}")
    return spec.builder(num_classes=num_classes, dtype=dtype, **options)


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` as an int, or a ``ValueError`` naming it: 0, a negative count, a bool or a float would
    otherwise fail deep inside the initializers (or, as ``True``, silently build a 1-class head)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def model_class(name: str) -> type[nn.Module]:
    """The Flax module class that ``name`` builds (its family's, whatever the variant binds)."""
    builder = get_spec(name).builder
    return builder.func if isinstance(builder, partial) else builder


def bound_options(name: str) -> dict[str, Any]:
    """The constructor arguments the variant ``name`` binds (``functools.partial`` keywords): its architecture,
    which no option may change (ResNet's ``stage_sizes``, VGG's ``depth``)."""
    builder = get_spec(name).builder
    return dict(builder.keywords) if isinstance(builder, partial) else {}


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
