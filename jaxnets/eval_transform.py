"""The evaluation transform: what a model is shown at test time, and how a weights file records it.

torchvision's ``ImageClassification`` preset resizes the shorter side, center-crops and normalizes. The
registry gives each set of torchvision weights its transform; ``train.py`` records the sizes a fine-tuned
model was validated at in its weights file, and ``predict``, evaluation and the input pipeline read them
back through ``EvalTransform.from_record``. The ``resize = crop * 256 / 224`` rule lives here only, and so does
the rule that extends RGB normalization statistics to other channel counts (``extend_to_channels``).

The eval sizes have one spelling per owner. A run's settings spell them as its flags do, ``--val-resize-size`` and
``--val-crop-size``: ``val_resize_size`` and ``val_crop_size`` in ``TrainConfig``, its ``config.json`` and
``DataConfig`` (None there: this module's rule, through ``DataConfig.eval_transform``). A transform's own sizes
are ``EvalTransform.resize_size`` and ``crop_size``, as torchvision's ``ImageClassification`` names them, and so
are the keys of the record a weights file keeps (``to_record``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxnets.errors import UserError, is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet eval: resize to 256, crop 224; other crop sizes keep the ratio.
RESIZE_PER_CROP = 256 / 224
MAX_IMAGE_SIDE = 8192  # a recorded eval size beyond this is a corrupt entry, not a model's input size
RECORD_KEYS = ("resize_size", "crop_size", "mean", "std")


def extend_to_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Per-channel RGB statistics (a mean or a std) for ``in_chans`` channels, by the rule that adapts a
    pretrained stem to them (timm's ``adapt_input_conv``, ``jaxnets.adapt_input_conv``): for 1 channel
    the stem's RGB filters are summed, as if the channel were gray R = G = B, and the statistics averaged; for
    any other count the filters are repeated cyclically (channel i takes RGB channel i mod 3), and so are the
    statistics. Three channels keep their values."""
    values = tuple(float(v) for v in values)
    if in_chans == len(values):
        return values
    if in_chans == 1:
        return (math.fsum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def resize_for_crop(crop_size: int) -> int:
    """The shorter side to resize to before a center crop of ``crop_size``: ImageNet's 256/224 ratio."""
    return round(crop_size * RESIZE_PER_CROP)


@dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center crop, normalize (one mean
    and std per input channel)."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def for_channels(self, in_chans: int) -> EvalTransform:
        """This transform for ``in_chans``-channel input: its statistics extended by ``extend_to_channels``."""
        return dataclasses.replace(self, mean=extend_to_channels(self.mean, in_chans),
                                   std=extend_to_channels(self.std, in_chans))

    def at_crop(self, crop_size: int, resize_size: int | None = None) -> EvalTransform:
        """This transform at another crop size; the resize follows the 256/224 rule unless given."""
        resize = resize_for_crop(crop_size) if resize_size is None else resize_size
        return dataclasses.replace(self, crop_size=crop_size, resize_size=resize)

    def to_record(self) -> dict[str, Any]:
        """What a weights file records (``metadata['eval_transform']``): the sizes and the statistics."""
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std)}

    def from_record(self, recorded: Any, *, min_size: int, where: str) -> EvalTransform:
        """This transform at the sizes (and statistics) of a recorded entry, checked: a ``UserError`` naming
        ``where`` for a malformed one (guessing would show the model the wrong images). ``resize_size`` may be
        absent (the 256/224 rule); neither may be below ``min_size`` (the model's minimum) or the crop. ``mean``
        and ``std`` may be absent (this transform's); recorded, they need one positive std per channel of this
        transform (``for_channels`` of the model's ``in_chans``)."""
        if not isinstance(recorded, dict) or "crop_size" not in recorded or set(recorded) - set(RECORD_KEYS):
            raise UserError(f"{where} = {recorded!r}: expected {{'crop_size': int, 'resize_size': int (optional), "
                            f"'mean': [float, ...] (optional), 'std': [float, ...] (optional)}}")
        stats = {key: self._recorded_stats(recorded, key, where) for key in ("mean", "std")}
        crop = recorded["crop_size"]
        resize = recorded.get("resize_size", resize_for_crop(crop) if is_int(crop) else crop)
        for key, value, minimum in (("crop_size", crop, min_size),
                                    ("resize_size", resize, crop if is_int(crop) else min_size)):
            if not is_int(value) or not minimum <= value <= MAX_IMAGE_SIDE:
                raise UserError(f"{where}: {key}={value!r}, expected an integer from {minimum} to {MAX_IMAGE_SIDE}")
        return dataclasses.replace(self.at_crop(crop, resize), **stats)

    def _recorded_stats(self, recorded: dict, key: str, where: str) -> tuple[float, ...]:
        default = getattr(self, key)
        value = recorded.get(key, default)
        ok = (isinstance(value, list | tuple) and len(value) == len(default)
              and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
              and (key == "mean" or min(value) > 0))
        if not ok:
            raise UserError(f"{where}: {key}={value!r}, expected {len(default)} finite numbers"
                            f"{' > 0' if key == 'std' else ''} (in_chans={len(default)})")
        return tuple(float(v) for v in value)
