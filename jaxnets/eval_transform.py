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

timm's checkpoints name their transform in a ``pretrained_cfg``: input size, ``crop_pct`` (the resize is
``floor(crop / crop_pct)``, not the 256/224 rule), ``crop_mode``, interpolation (mostly bicubic), mean and std.
``EvalTransform.from_timm_cfg`` reads one as ``timm.data.resolve_data_config`` does (timm is not imported:
its rules are restated here, and the tests hold them to timm's); a weights file converted from timm's keeps the
cfg in its metadata under ``TIMM_CFG_KEY``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxnets.errors import UserError, is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet eval: resize to 256, crop 224; other crop sizes keep the ratio.
RESIZE_PER_CROP = 256 / 224
MAX_IMAGE_SIDE = 8192  # a recorded eval size beyond this is a corrupt entry, not a model's input size
RECORD_KEYS = ("resize_size", "crop_size", "interpolation", "crop_mode", "mean", "std")
MODE_KEYS = ("interpolation", "crop_mode")  # recorded only where not the defaults (EvalTransform.to_record)
INTERPOLATIONS = ("bilinear", "bicubic")  # what the PIL path resamples with (the tf path: bilinear only)
# timm's crop modes: resize the shorter side and crop the center (torchvision's); resize both sides (the aspect
# ratio lost) and crop; resize the longer side and pad the shorter one with the mean colour.
CROP_MODES = ("center", "squash", "border")
TIMM_CFG_KEY = "timm_pretrained_cfg"  # a weights file's metadata: timm's pretrained_cfg of the checkpoint
EVAL_SIZES = ("default", "test")  # timm's input size and crop_pct, or its test_input_size and test_crop_pct
# resolve_data_config's values where a cfg names none (timm.data.constants)
TIMM_INPUT_SIZE = (3, 224, 224)
TIMM_CROP_PCT = 0.875
TIMM_INTERPOLATION = "bicubic"


def check_size(key: str, value: Any, minimum: int, where: str) -> None:
    """A recorded image size, checked: an integer from ``minimum`` to ``MAX_IMAGE_SIDE``, else a ``UserError``
    naming ``where`` and ``key``."""
    if not is_int(value) or not minimum <= value <= MAX_IMAGE_SIDE:
        raise UserError(f"{where}: {key}={value!r}, expected an integer from {minimum} to {MAX_IMAGE_SIDE}")


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


def resize_for_crop_pct(crop_size: int, crop_pct: float) -> int:
    """timm's resize before a crop of ``crop_size`` that keeps ``crop_pct`` of it: ``floor(crop / crop_pct)``
    (224 at 0.875 gives 256 as the 256/224 rule does, but 0.95 gives 235 where rounding would give 236)."""
    return math.floor(crop_size / crop_pct)


@dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center crop, normalize (one mean
    and std per input channel); with timm's ``crop_mode`` "squash" both sides are resized to ``resize_size``,
    with "border" the longer side, the shorter one padded to the crop with the mean colour."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_mode: str = "center"  # one of CROP_MODES

    @classmethod
    def from_timm_cfg(cls, cfg: Mapping[str, Any], *, size: str = "default",
                      where: str = "timm pretrained_cfg") -> EvalTransform:
        """The transform ``timm.data.resolve_data_config(pretrained_cfg=cfg)`` describes, as timm's
        ``create_transform(is_training=False)`` applies it; ``size`` "test": with ``use_test_size=True`` (the
        cfg's ``test_input_size`` and ``test_crop_pct``, which it must have). A value jaxnets cannot apply (a
        non-square input, an interpolation other than ``INTERPOLATIONS``) is a ``UserError`` naming ``where``
        and the key: the model would be shown other images than timm shows it."""
        if not isinstance(cfg, Mapping):
            raise UserError(f"{where}: expected timm's pretrained_cfg (a JSON object), got {cfg!r}")
        if size not in EVAL_SIZES:
            raise UserError(f"eval size {size!r}: choose one of {', '.join(EVAL_SIZES)}")
        test = size == "test"
        if test and cfg.get("test_input_size") is None and not cfg.get("test_crop_pct"):
            raise UserError(f"{where}: no test size (test_input_size, test_crop_pct): use the default eval size")
        # resolve_data_config's precedence and its truthiness tests, key by key
        size_key = "test_input_size" if test and cfg.get("test_input_size") is not None else "input_size"
        input_size = cfg.get(size_key)
        if input_size is None:
            size_key, input_size = "input_size", TIMM_INPUT_SIZE
        pct_key = "test_crop_pct" if test and cfg.get("test_crop_pct") else "crop_pct"
        crop_pct = cfg.get(pct_key) or TIMM_CROP_PCT
        interpolation = cfg.get("interpolation") or TIMM_INTERPOLATION
        crop_mode = cfg.get("crop_mode") or CROP_MODES[0]
        if not (isinstance(input_size, list | tuple) and len(input_size) == 3 and all(map(is_int, input_size))
                and input_size[0] >= 1 and input_size[1] == input_size[2]):
            raise UserError(f"{where}: {size_key}={input_size!r}, expected [channels, size, size] (square)")
        if not (isinstance(crop_pct, int | float) and not isinstance(crop_pct, bool) and 0 < crop_pct <= 1):
            raise UserError(f"{where}: {pct_key}={crop_pct!r}, expected a number in (0, 1]")
        for key, value, allowed in (("interpolation", interpolation, INTERPOLATIONS),
                                    ("crop_mode", crop_mode, CROP_MODES)):
            if value not in allowed:
                raise UserError(f"{where}: {key}={value!r}, jaxnets applies {' or '.join(allowed)}")
        channels, crop = input_size[0], input_size[1]
        check_size(size_key, crop, 1, where)
        plain = cls(mean=(0.0,) * channels, std=(1.0,) * channels)  # the statistics' shape, checked below
        stats = {key: plain._recorded_stats({key: cfg.get(key) or default}, key, where)
                 for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD))}
        return cls(resize_size=resize_for_crop_pct(crop, crop_pct), crop_size=crop, interpolation=interpolation,
                   crop_mode=crop_mode, **stats)

    def to_timm_cfg(self) -> dict[str, Any]:
        """The eval part of a timm ``pretrained_cfg`` that makes timm show a model what this transform shows it
        (``from_timm_cfg`` reads it back as this transform): for a ``config.json`` timm loads. ``crop_pct`` is
        chosen so that timm's ``floor(crop / crop_pct)`` is ``resize_size`` whatever the float rounding."""
        crop_pct = self.crop_size / self.resize_size
        if resize_for_crop_pct(self.crop_size, crop_pct) != self.resize_size:
            crop_pct = self.crop_size / (self.resize_size + 0.5)
        return {"input_size": [self.in_chans, self.crop_size, self.crop_size], "crop_pct": crop_pct,
                "crop_mode": self.crop_mode, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std)}

    @property
    def crop_pct(self) -> float:
        """The fraction of the resized image's side the crop keeps (timm's ``crop_pct``, up to its rounding)."""
        return self.crop_size / self.resize_size

    def as_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready: what a report (eval.json) and an export's description state."""
        return {field.name: list(value) if isinstance(value := getattr(self, field.name), tuple) else value
                for field in dataclasses.fields(self)}

    def describe(self) -> str:
        """The transform in words, as a report names it."""
        resize = {"center": "resize the shorter side to", "squash": "resize to a square of",
                  "border": "resize the longer side to"}[self.crop_mode]
        crop = "pad and center-crop" if self.crop_mode == "border" else "center-crop"
        stats = ", ".join(f"{key} ({', '.join(f'{v:g}' for v in getattr(self, key))})" for key in ("mean", "std"))
        return f"{resize} {self.resize_size} ({self.interpolation}), {crop} {self.crop_size}, normalize: {stats}"

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
        """What a weights file records (``metadata['eval_transform']``): the sizes and the statistics, and the
        interpolation and crop mode where they are not the defaults (bilinear, center: a record without them, as
        every record written before they existed, means those)."""
        modes = {key: getattr(self, key) for key in MODE_KEYS if getattr(self, key) != getattr(EvalTransform, key)}
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), **modes}

    def from_record(self, recorded: Any, *, min_size: int, where: str) -> EvalTransform:
        """This transform at the sizes (and statistics) of a recorded entry, checked: a ``UserError`` naming
        ``where`` for a malformed one (guessing would show the model the wrong images). ``resize_size`` may be
        absent (the 256/224 rule); neither may be below ``min_size`` (the model's minimum) or the crop. ``mean``
        and ``std`` may be absent (this transform's); recorded, they need one positive std per channel of this
        transform (``for_channels`` of the model's ``in_chans``). ``interpolation`` and ``crop_mode`` may be
        absent: bilinear and center, as ``to_record`` leaves them out (not this transform's: a file fine-tuned from
        a bicubic checkpoint was validated bilinearly all the same)."""
        if not isinstance(recorded, dict) or "crop_size" not in recorded or set(recorded) - set(RECORD_KEYS):
            raise UserError(f"{where} = {recorded!r}: expected {{'crop_size': int, 'resize_size': int (optional), "
                            f"'mean': [float, ...] (optional), 'std': [float, ...] (optional), 'interpolation': "
                            f"{'|'.join(INTERPOLATIONS)} (optional), 'crop_mode': {'|'.join(CROP_MODES)} (optional)}}")
        stats = {key: self._recorded_stats(recorded, key, where) for key in ("mean", "std")}
        modes = {key: recorded.get(key, getattr(EvalTransform, key)) for key in MODE_KEYS}
        for (key, value), allowed in zip(modes.items(), (INTERPOLATIONS, CROP_MODES), strict=True):
            if value not in allowed:
                raise UserError(f"{where}: {key}={value!r}, expected one of {', '.join(allowed)}")
        crop = recorded["crop_size"]
        resize = recorded.get("resize_size", resize_for_crop(crop) if is_int(crop) else crop)
        check_size("crop_size", crop, min_size, where)
        check_size("resize_size", resize, crop if is_int(crop) else min_size, where)
        return dataclasses.replace(self.at_crop(crop, resize), **stats, **modes)

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
