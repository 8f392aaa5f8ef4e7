"""What the input pipeline is asked for (``DataConfig``), checked before any source is opened, and the error
every part of the pipeline raises for a dataset it cannot use.

A ``DataConfig`` field's valid values are declared on the field (``data_field(default, valid=Range(...))``): the
check here and ``train.py``'s flag check (a ``TrainConfig`` setting that feeds this field takes its range) read
the same ``Range``."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxnets.data.autoaugment import CHANNELS, MAGNITUDE_BINS, POLICIES
from jaxnets.errors import UserError, is_int
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

DIGITS = "digits"  # the default dataset: scikit-learn's digits, embedded, so that a first run needs no download


class DataError(UserError):
    """A dataset that cannot be used, with a one-line reason naming the dataset, folder or file."""


class ChannelMismatch(DataError):
    """Data of other channels than the model takes (``in_chans``). The message names ``train.py``'s ``--in-chans``,
    which sets them there; a command whose model's channels come from elsewhere (``jaxnets-evaluate``: the weights)
    words its own from ``found`` (what the data is) and ``fits`` (the ``in_chans`` that would read it)."""

    def __init__(self, in_chans: int, found: str, fits: str, advice: str) -> None:
        super().__init__(f"--in-chans {in_chans}: {found}; {advice}")
        self.in_chans, self.found, self.fits = in_chans, found, fits


class TooFewExamples(DataError):
    """Fewer training examples than one global batch. ``examples`` (all processes together) lets a caller that
    chose the batch size itself (``train.py``'s default) pick one that fits, and one that did not propose it."""

    def __init__(self, message: str, examples: int) -> None:
        super().__init__(message)
        self.examples = examples


@dataclass(frozen=True)
class Range:
    """The numbers a setting may take, as data: ``str`` is what an error says (``>= 1``, ``in [0, 1)``), ``in``
    the test. NaN, infinities and booleans lie in no range (a value outside one trains without an error, but not
    as asked: a negative ``--grad-clip`` flips the gradients)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE_INT = Range(1)
FRACTION = Range(0, 1, low_open=True, high_open=True)  # in (0, 1)
PROBABILITY = Range(0, 1)  # in [0, 1]


def data_field(default: Any, *, valid: Range | None = None) -> Any:
    """A ``DataConfig`` field with the range its values must lie in (``None``: any value of its type)."""
    return dataclasses.field(default=default, metadata={"valid": valid})


@dataclass(frozen=True)
class DataConfig:
    """What the input pipeline needs; batch sizes are global (all processes together). The eval sizes are spelled
    as ``train.py``'s (``val_resize_size``, ``val_crop_size``); left None, the eval transform's rule resolves them
    (``eval_transform``)."""

    dataset: str = DIGITS
    data_dir: str | None = None
    image_size: int = data_field(EvalTransform.crop_size, valid=POSITIVE_INT)  # the training crop
    val_resize_size: int | None = data_field(None, valid=POSITIVE_INT)  # eval: shorter side before the crop
    in_chans: int = data_field(3, valid=POSITIVE_INT)  # 1 (grayscale), 3 (RGB) or any other count (.npy arrays)
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per channel (eval_transform.extend_to_channels)
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = data_field(64, valid=POSITIVE_INT)
    eval_batch_size: int | None = data_field(None, valid=POSITIVE_INT)  # default batch_size
    seed: int = 0
    val_fraction: float = data_field(0.2, valid=FRACTION)  # held out of train when there is no validation split
    classes: tuple[int, ...] | None = None  # keep these labels only, remapped to 0..k-1
    min_crop_scale: float = data_field(0.08, valid=Range(0, 1, low_open=True))  # RandomResizedCrop scale=(min, 1)
    hflip: bool = True
    val_crop_size: int | None = data_field(None, valid=POSITIVE_INT)  # eval: the center crop; default image_size
    auto_augment: str | None = None  # a policy of autoaugment.POLICIES, after the crop and flip
    ra_magnitude: int = data_field(9, valid=Range(0, MAGNITUDE_BINS - 1))  # RandAugment's magnitude bin
    random_erase: float = data_field(0.0, valid=PROBABILITY)  # torchvision's RandomErasing, after normalization
    multi_label: bool = False  # labels are sets of classes (multi-hot), not one class per example

    @property
    def eval_transform(self) -> EvalTransform:
        """What evaluation shows the model: the center crop (``image_size`` unless ``val_crop_size``), the resize
        before it (the eval transform's 256/224 rule unless ``val_resize_size``), this config's statistics."""
        crop = self.image_size if self.val_crop_size is None else self.val_crop_size
        return EvalTransform(mean=self.mean, std=self.std).at_crop(crop, self.val_resize_size)


# The eval sizes' names before they were spelled as train.py's: a keyword user is told the new one.
_RENAMED = {"resize_size": "val_resize_size", "eval_crop_size": "val_crop_size"}


def _refusing_renamed(init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: DataConfig, *args: Any, **kwargs: Any) -> None:
        for old in kwargs.keys() & _RENAMED:
            raise TypeError(f"DataConfig({old}=...) is now DataConfig({_RENAMED[old]}=...), as train.py's "
                            f"--{_RENAMED[old].replace('_', '-')}")
        init(self, *args, **kwargs)
    return __init__


DataConfig.__init__ = _refusing_renamed(DataConfig.__init__)


def field_ranges(cls: type = DataConfig) -> dict[str, Range]:
    """Each field of ``cls`` (a ``DataConfig``) that declares a range, and the range."""
    return {f.name: f.metadata["valid"] for f in dataclasses.fields(cls) if f.metadata.get("valid") is not None}


def parse_classes(text: str) -> tuple[int, ...]:
    """``'0,1,2'``, ``'5-9'`` or ``'0-2,7'`` -> a tuple of labels, in the order given."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            labels.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise DataError(f"--classes {text!r}: expected comma-separated labels or ranges like 0,1,2 or 5-9") from None
    if not labels or len(set(labels)) != len(labels) or min(labels) < 0:
        raise DataError(f"--classes {text!r}: expected distinct non-negative labels")
    return tuple(labels)


def check_config(config: DataConfig) -> None:
    """A ``DataError`` naming the first ``DataConfig`` field that the pipeline could not honour: TensorFlow
    would fail on it at the first batch, many lines deep, or (a zero std) produce infinite pixels. First each
    field's declared range (``data_field``), then what depends on several fields."""
    hints = typing.get_type_hints(type(config))
    for name, valid in field_ranges(type(config)).items():
        value = getattr(config, name)
        union = typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
        options = typing.get_args(hints[name]) if union else (hints[name],)
        optional, integer = type(None) in options, int in options
        if not ((optional and value is None) or (value in valid and (is_int(value) or not integer))):
            _refuse(name, value, f"{'None or ' if optional else ''}{'an integer ' if integer else ''}{valid}")
    crop = "image_size" if config.val_crop_size is None else "val_crop_size"
    problems = (
        ("val_resize_size", config.val_resize_size, f"None or an integer >= {crop} ({getattr(config, crop)})",
         config.val_resize_size is None or config.val_resize_size >= getattr(config, crop)),
        ("mean", config.mean, f"{config.in_chans} finite numbers (one per channel)",
         len(config.mean) == config.in_chans and np.isfinite(config.mean).all()),
        ("std", config.std, f"{config.in_chans} finite numbers > 0 (one per channel)",
         len(config.std) == config.in_chans and np.isfinite(config.std).all() and min(config.std) > 0),
        ("auto_augment", config.auto_augment, f"None or one of {', '.join(POLICIES)}",
         config.auto_augment is None or config.auto_augment in POLICIES),
        ("auto_augment", config.auto_augment, f"None for {config.in_chans}-channel input (the policies take "
                                        f"{' or '.join(map(str, CHANNELS))})",
         config.auto_augment is None or config.in_chans in CHANNELS),
    )
    for name, value, expected, ok in problems:
        if not ok:
            _refuse(name, value, expected)


def _refuse(name: str, value: Any, expected: str) -> None:
    raise DataError(f"DataConfig.{name} must be {expected}, got {value!r}")
