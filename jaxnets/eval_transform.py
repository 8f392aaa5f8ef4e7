"""The evaluation transform: what a model is shown at test time, and how a weights file records it.

torchvision's ``ImageClassification`` preset resizes the shorter side, center-crops and normalizes. The
registry gives each set of torchvision weights its transform; ``train.py`` records the sizes a fine-tuned
model was validated at in its weights file, and ``predict``, evaluation and the input pipeline read them
back through ``EvalTransform.from_record``. The ``resize = crop * 256 / 224`` rule lives here only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxnets.errors import UserError, is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet eval: resize to 256, crop 224; other crop sizes keep the ratio.
RESIZE_PER_CROP = 256 / 224
MAX_IMAGE_SIDE = 8192  # a recorded eval size beyond this is a corrupt entry, not a model's input size
RECORD_KEYS = ("resize_size", "crop_size")


def resize_for_crop(crop_size: int) -> int:
    """The shorter side to resize to before a center crop of ``crop_size``: ImageNet's 256/224 ratio."""
    return round(crop_size * RESIZE_PER_CROP)


@dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center crop, normalize."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def at_crop(self, crop_size: int, resize_size: int | None = None) -> EvalTransform:
        """This transform at another crop size; the resize follows the 256/224 rule unless given."""
        resize = resize_for_crop(crop_size) if resize_size is None else resize_size
        return dataclasses.replace(self, crop_size=crop_size, resize_size=resize)

    def to_record(self) -> dict[str, int]:
        """The sizes a weights file records (``metadata['eval_transform']``)."""
        return {"resize_size": self.resize_size, "crop_size": self.crop_size}

    def from_record(self, recorded: Any, *, min_size: int, where: str) -> EvalTransform:
        """This transform at the sizes of a recorded entry, checked: a ``UserError`` naming ``where`` for a
        malformed one (guessing would show the model the wrong images). ``resize_size`` may be absent (the
        256/224 rule); neither may be below ``min_size`` (the model's minimum) or the crop."""
        if not isinstance(recorded, dict) or "crop_size" not in recorded or set(recorded) - set(RECORD_KEYS):
            raise UserError(f"{where} = {recorded!r}: expected {{'crop_size': int, 'resize_size': int (optional)}}")
        crop = recorded["crop_size"]
        resize = recorded.get("resize_size", resize_for_crop(crop) if is_int(crop) else crop)
        for key, value, minimum in (("crop_size", crop, min_size),
                                    ("resize_size", resize, crop if is_int(crop) else min_size)):
            if not is_int(value) or not minimum <= value <= MAX_IMAGE_SIDE:
                raise UserError(f"{where}: {key}={value!r}, expected an integer from {minimum} to {MAX_IMAGE_SIDE}")
        return self.at_crop(crop, resize)
