"""What the input pipeline is asked for (``DataConfig``), checked before any source is opened, and the error
every part of the pipeline raises for a dataset it cannot use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxnets.data.autoaugment import MAGNITUDE_BINS, POLICIES
from jaxnets.errors import UserError, is_int
from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, resize_for_crop

DIGITS = "digits"  # the default dataset: scikit-learn's digits, embedded, so that a first run needs no download


class DataError(UserError):
    """A dataset that cannot be used, with a one-line reason naming the dataset, folder or file."""


class TooFewExamples(DataError):
    """Fewer training examples than one global batch. ``examples`` (all processes together) lets a caller that
    chose the batch size itself (``train.py``'s default) pick one that fits, and one that did not propose it."""

    def __init__(self, message: str, examples: int) -> None:
        super().__init__(message)
        self.examples = examples


@dataclass(frozen=True)
class DataConfig:
    """What the input pipeline needs; batch sizes are global (all processes together)."""

    dataset: str = DIGITS
    data_dir: str | None = None
    image_size: int = 224
    resize_size: int | None = None  # eval: shorter side before the center crop; default image_size * 256/224
    in_chans: int = 3  # channels of the model input: 1 (grayscale), 3 (RGB) or any other count (.npy arrays)
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per channel (eval_transform.extend_to_channels)
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = 64
    eval_batch_size: int | None = None  # default batch_size
    seed: int = 0
    val_fraction: float = 0.2  # held out of train when the dataset has no validation split
    classes: tuple[int, ...] | None = None  # keep these labels only, remapped to 0..k-1
    min_crop_scale: float = 0.08  # RandomResizedCrop scale=(min, 1)
    hflip: bool = True
    eval_crop_size: int | None = None  # eval: the center crop; default image_size (the training crop)
    auto_augment: str | None = None  # a policy of autoaugment.POLICIES, after the crop and flip
    ra_magnitude: int = 9  # RandAugment's magnitude bin (of 31)
    random_erase: float = 0.0  # probability of torchvision's RandomErasing, after normalization
    multi_label: bool = False  # labels are sets of classes (multi-hot), not one class per example

    @property
    def eval_crop(self) -> int:
        return self.eval_crop_size or self.image_size

    @property
    def eval_resize(self) -> int:
        return self.resize_size or resize_for_crop(self.eval_crop)


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
    would fail on it at the first batch, many lines deep, or (a zero std) produce infinite pixels."""
    problems = (
        ("image_size", config.image_size, "an integer >= 1", is_int(config.image_size) and config.image_size >= 1),
        ("eval_crop_size", config.eval_crop_size, "None or an integer >= 1",
         config.eval_crop_size is None or (is_int(config.eval_crop_size) and config.eval_crop_size >= 1)),
        ("resize_size", config.resize_size,
         f"None or an integer >= {'image_size' if config.eval_crop_size is None else 'eval_crop_size'} "
         f"({config.eval_crop})",
         config.resize_size is None or (is_int(config.resize_size) and config.resize_size >= config.eval_crop)),
        ("batch_size", config.batch_size, "an integer >= 1", is_int(config.batch_size) and config.batch_size >= 1),
        ("eval_batch_size", config.eval_batch_size, "None or an integer >= 1",
         config.eval_batch_size is None or (is_int(config.eval_batch_size) and config.eval_batch_size >= 1)),
        ("in_chans", config.in_chans, "an integer >= 1", is_int(config.in_chans) and config.in_chans >= 1),
        ("mean", config.mean, f"{config.in_chans} finite numbers (one per channel)",
         len(config.mean) == config.in_chans and np.isfinite(config.mean).all()),
        ("std", config.std, f"{config.in_chans} finite numbers > 0 (one per channel)",
         len(config.std) == config.in_chans and np.isfinite(config.std).all() and min(config.std) > 0),
        ("val_fraction", config.val_fraction, "in (0, 1)", 0 < config.val_fraction < 1),
        ("min_crop_scale", config.min_crop_scale, "in (0, 1]", 0 < config.min_crop_scale <= 1),
        ("auto_augment", config.auto_augment, f"None or one of {', '.join(POLICIES)}",
         config.auto_augment is None or config.auto_augment in POLICIES),
        ("auto_augment", config.auto_augment, f"None for {config.in_chans}-channel input (the policies take 1 or 3)",
         config.auto_augment is None or config.in_chans in (1, 3)),
        ("ra_magnitude", config.ra_magnitude, f"an integer from 0 to {MAGNITUDE_BINS - 1}",
         is_int(config.ra_magnitude) and 0 <= config.ra_magnitude < MAGNITUDE_BINS),
        ("random_erase", config.random_erase, "in [0, 1]", 0 <= config.random_erase <= 1),
    )
    for field_name, value, expected, ok in problems:
        if not ok:
            raise DataError(f"DataConfig.{field_name} must be {expected}, got {value!r}")
