"""torchvision's automatic augmentation policies as TensorFlow ops for ``tf.data``: ``AutoAugment`` (ImageNet
policy), ``RandAugment`` and ``TrivialAugmentWide`` (``torchvision.transforms.v2``), with their operations and
magnitude tables.

torchvision applies them to 8-bit images (after ``RandomResizedCrop`` and the flip, before normalization): here
an image is float32 holding integers 0..255 (the crop rounded to whole levels, as torchvision's uint8 crop is),
with 1 or 3 channels, and every operation rounds or truncates where torchvision's uint8 kernels do, so the
colour operations give torchvision's pixels. The geometric ones (shear, translate, rotate) sample bilinearly
as the reference recipe asks (``--interpolation bilinear``), with torchvision's inverse affine matrix and fill 0;
TensorFlow's bilinear sampler differs from ``grid_sample`` by float rounding only (tests/test_augment.py states
by how much). The random choices are drawn from one stateless seed per example (``transforms.augmentation``),
so a resumed run augments every example as the uninterrupted run did.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from jaxnets.data.lazy_tf import tf

POLICIES = ("ra", "ta_wide", "imagenet")  # --auto-augment: torchvision's reference names
CHANNELS = (1, 3)  # the channel counts the policies take: gray or RGB, as torchvision's
MAGNITUDE_BINS = 31  # RandAugment's and TrivialAugmentWide's num_magnitude_bins
RA_NUM_OPS = 2  # RandAugment's num_ops
AA_MAGNITUDE_BINS = 10  # AutoAugment's

Magnitudes = Callable[[int, int, int], "np.ndarray | None"]  # (num_bins, height, width) -> a value per bin


def _linspace(start: float, stop: float) -> Magnitudes:
    return lambda bins, height, width: np.linspace(start, stop, bins, dtype=np.float32)


def _posterize_bits(top_bin: int) -> Magnitudes:
    """``(8 - arange(bins) / ((bins - 1) / top_bin)).round().int()``: 8 bits down to ``8 - top_bin``."""
    return lambda bins, height, width: np.round(
        (8 - np.arange(bins) / ((bins - 1) / top_bin)).astype(np.float32)).astype(np.int64).astype(np.float32)


_NONE: Magnitudes = lambda bins, height, width: None  # noqa: E731
# Each policy's augmentation space, in torchvision's order: op -> (magnitudes, signed).
_RA_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (_NONE, False),
    "ShearX": (_linspace(0.0, 0.3), True),
    "ShearY": (_linspace(0.0, 0.3), True),
    "TranslateX": (lambda bins, height, width: np.linspace(0.0, 150.0 / 331.0 * width, bins, dtype=np.float32), True),
    "TranslateY": (lambda bins, height, width: np.linspace(0.0, 150.0 / 331.0 * height, bins, dtype=np.float32), True),
    "Rotate": (_linspace(0.0, 30.0), True),
    "Brightness": (_linspace(0.0, 0.9), True),
    "Color": (_linspace(0.0, 0.9), True),
    "Contrast": (_linspace(0.0, 0.9), True),
    "Sharpness": (_linspace(0.0, 0.9), True),
    "Posterize": (_posterize_bits(4), False),
    "Solarize": (_linspace(1.0, 0.0), False),
    "AutoContrast": (_NONE, False),
    "Equalize": (_NONE, False),
}
_TA_WIDE_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (_NONE, False),
    "ShearX": (_linspace(0.0, 0.99), True),
    "ShearY": (_linspace(0.0, 0.99), True),
    "TranslateX": (_linspace(0.0, 32.0), True),
    "TranslateY": (_linspace(0.0, 32.0), True),
    "Rotate": (_linspace(0.0, 135.0), True),
    "Brightness": (_linspace(0.0, 0.99), True),
    "Color": (_linspace(0.0, 0.99), True),
    "Contrast": (_linspace(0.0, 0.99), True),
    "Sharpness": (_linspace(0.0, 0.99), True),
    "Posterize": (_posterize_bits(6), False),
    "Solarize": (_linspace(1.0, 0.0), False),
    "AutoContrast": (_NONE, False),
    "Equalize": (_NONE, False),
}
_AA_SPACE = {**{k: v for k, v in _RA_SPACE.items() if k != "Identity"}, "Invert": (_NONE, False)}
# AutoAugment's ImageNet policy: 25 sub-policies of two (op, probability, magnitude bin) each.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


# --- the operations: (image float32 (H, W, C) of whole levels 0..255, magnitude) -> image ------------------


def _fma(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """``a + b * c`` rounded once to float32, as torch's ``add_(c, alpha=b)`` (a fused multiply-add) computes it:
    exact in float64 here, since the operands are float32 and ``c`` is a whole level."""
    wide = lambda x: tf.cast(x, tf.float64)  # noqa: E731
    return tf.cast(wide(a) + wide(b) * wide(c), tf.float32)


def _gray(image: tf.Tensor) -> tf.Tensor:
    """torchvision's luma ``0.2989 R + 0.587 G + 0.114 B`` in float32 (not rounded), (H, W, 1)."""
    r, g, b = tf.unstack(image, axis=-1)
    return _fma(_fma(r * 0.2989, np.float32(0.587), g), np.float32(0.114), b)[..., None]


def _factors(magnitude: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(1 + m, 1 - (1 + m))`` in float64 (Python floats in torchvision), then as the float32 scalars torch uses."""
    ratio = 1.0 + tf.cast(magnitude, tf.float64)
    return tf.cast(ratio, tf.float32), tf.cast(1.0 - ratio, tf.float32)


def _blend(image: tf.Tensor, other: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """torchvision's ``_blend`` at ratio ``1 + m`` on uint8: ``image * r + other * (1 - r)``, clamped, truncated."""
    ratio, rest = _factors(magnitude)
    return tf.floor(tf.clip_by_value(_fma(image * ratio, rest, other), 0.0, 255.0))


def _inverse_affine(center: tuple, angle: tf.Tensor, translate: tuple, shear: tuple) -> list[tf.Tensor]:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1), float64, angles in radians: output -> input
    coordinates, origin at the image centre."""
    cx, cy = center
    tx, ty = translate
    sx, sy = shear
    a = tf.cos(angle - sy) / tf.cos(sy)
    b = -(a * tf.tan(sx) + tf.sin(angle))
    c = tf.sin(angle - sy) / tf.cos(sy)
    d = tf.cos(angle) - c * tf.tan(sx)
    m = [d, -b, -c, a]
    return [m[0], m[1], cx - m[0] * (cx + tx) - m[1] * (cy + ty), m[2], m[3], cy - m[2] * (cx + tx) - m[3] * (cy + ty)]


def _warp(image: tf.Tensor, matrix: list[tf.Tensor]) -> tf.Tensor:
    """``image`` resampled (bilinear, fill 0, rounded to whole levels) at ``matrix`` applied to each output
    pixel, in torchvision's frame: pixel centres at ``index - (size - 1) / 2``."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a0, a1, a2, b0, b1, b2 = matrix
    transform = tf.stack([a0, a1, a2 + cx - a0 * cx - a1 * cy, b0, b1, b2 + cy - b0 * cx - b1 * cy,
                          tf.constant(0.0, tf.float64), tf.constant(0.0, tf.float64)])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(transform, tf.float32)[None], output_shape=shape[:2],
        fill_value=tf.constant(0.0, tf.float32), interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.round(out[0])


def _zero() -> tf.Tensor:
    return tf.constant(0.0, tf.float64)


def shear_x(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.affine(shear=[degrees(atan(m)), 0], center=[0, 0])``: the top-left corner stays."""
    shape = tf.cast(tf.shape(image), tf.float64)
    m = tf.cast(magnitude, tf.float64)
    return _warp(image, _inverse_affine((-shape[1] / 2, -shape[0] / 2), _zero(), (0.0, 0.0), (tf.atan(m), _zero())))


def shear_y(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    shape = tf.cast(tf.shape(image), tf.float64)
    m = tf.cast(magnitude, tf.float64)
    return _warp(image, _inverse_affine((-shape[1] / 2, -shape[0] / 2), _zero(), (0.0, 0.0), (_zero(), tf.atan(m))))


def translate_x(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.affine(translate=[int(m), 0])``: whole pixels (truncated toward zero)."""
    shift = tf.cast(tf.cast(magnitude, tf.int32), tf.float64)
    return _warp(image, _inverse_affine((0.0, 0.0), _zero(), (shift, 0.0), (_zero(), _zero())))


def translate_y(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    shift = tf.cast(tf.cast(magnitude, tf.int32), tf.float64)
    return _warp(image, _inverse_affine((0.0, 0.0), _zero(), (0.0, shift), (_zero(), _zero())))


def rotate(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.rotate(angle=m)``: counter-clockwise by ``m`` degrees about the centre (``-m`` in the affine)."""
    angle = -tf.cast(magnitude, tf.float64) * (math.pi / 180.0)
    return _warp(image, _inverse_affine((0.0, 0.0), angle, (0.0, 0.0), (_zero(), _zero())))


def brightness(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    return tf.floor(tf.clip_by_value(image * _factors(magnitude)[0], 0.0, 255.0))


def color(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.adjust_saturation(1 + m)``: blend with the (floored) luma; a gray image is left as it is."""
    if image.shape[-1] == 1:
        return image
    return _blend(image, tf.floor(_gray(image)), magnitude)


def contrast(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.adjust_contrast(1 + m)``: blend with the mean of the (floored) luma."""
    gray = tf.floor(_gray(image)) if image.shape[-1] == 3 else image
    return _blend(image, tf.reduce_mean(gray), magnitude)


def sharpness(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """``F.adjust_sharpness(1 + m)``: blend the inner pixels with torchvision's 3x3 smoothing (1s around a 5,
    over 13, rounded); the border pixels stay."""
    shape = tf.shape(image)
    channels = image.shape[-1]

    def sharpen():
        kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
        kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
        blurred = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
        inner = image[1:-1, 1:-1]
        inner = _fma(inner, _factors(magnitude)[1], blurred - inner)
        out = tf.concat([image[:1, 1:-1], inner, image[-1:, 1:-1]], axis=0)
        out = tf.concat([image[:, :1], out, image[:, -1:]], axis=1)
        return tf.floor(tf.clip_by_value(out, 0.0, 255.0))
    return tf.cond((shape[0] > 2) & (shape[1] > 2), sharpen, lambda: image)


def posterize(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """Keep the ``int(m)`` high bits of each level (``image & mask``)."""
    step = tf.pow(2.0, 8.0 - tf.minimum(tf.floor(tf.cast(magnitude, tf.float32)), 8.0))
    return tf.floor(image / step) * step


def solarize(image: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """Invert the levels ``>= 255 * m`` (computed in float64, compared in float32: torch promotes the uint8
    image and the Python float to float32)."""
    threshold = tf.cast(255.0 * tf.cast(magnitude, tf.float64), tf.float32)
    return tf.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: tf.Tensor, magnitude: tf.Tensor | None = None) -> tf.Tensor:
    """Stretch each channel's levels to 0..255 (a constant channel stays)."""
    low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
    high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
    flat = tf.equal(high, low)
    inv_scale = tf.where(flat, 1.0, (high - low) * np.float32(1.0 / 255.0))
    low = tf.where(flat, 0.0, low)
    return tf.floor(tf.clip_by_value((image - low) / inv_scale, 0.0, 255.0))


def equalize(image: tf.Tensor, magnitude: tf.Tensor | None = None) -> tf.Tensor:
    """PIL's histogram equalization per channel, as torchvision's ``equalize`` computes it (integer LUT)."""
    shape = tf.shape(image)
    levels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, shape[-1]]))  # (C, H*W)
    hist = tf.math.bincount(levels, minlength=256, maxlength=256, axis=-1)  # (C, 256)
    cum = tf.cumsum(hist, axis=-1)
    last = tf.gather(hist, tf.argmax(cum, axis=-1, output_type=tf.int32), batch_dims=1)  # the top level's count
    step = (tf.shape(levels)[1] - last) // 255  # (C,)
    lut = tf.clip_by_value((cum[:, :-1] + (step // 2)[:, None]) // tf.maximum(step, 1)[:, None], 0, 255)
    lut = tf.concat([tf.zeros_like(lut[:, :1]), lut], axis=-1)
    equalized = tf.gather(lut, levels, batch_dims=1)
    out = tf.where((step != 0)[:, None], equalized, levels)
    return tf.reshape(tf.cast(tf.transpose(out), tf.float32), shape)


def invert(image: tf.Tensor, magnitude: tf.Tensor | None = None) -> tf.Tensor:
    return 255.0 - image


def identity(image: tf.Tensor, magnitude: tf.Tensor | None = None) -> tf.Tensor:
    return image


OPS: dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
    "TranslateY": translate_y, "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
    "Equalize": equalize, "Invert": invert,
}
_OP_NAMES = tuple(OPS)


def apply_op(image: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """The operation numbered ``op`` (an index into ``OPS``, a tensor) at ``magnitude``."""
    magnitude = tf.cast(magnitude, tf.float32)
    branches = [functools.partial(fn, image, magnitude) for fn in OPS.values()]
    return tf.ensure_shape(tf.switch_case(tf.cast(op, tf.int32), branches), image.shape)


# --- the policies ------------------------------------------------------------------------------------


def magnitude_table(space: dict[str, tuple[Magnitudes, bool]], bins: int, height: int, width: int) -> np.ndarray:
    """(ops, bins) float32: each op's magnitude per bin (0 where it takes none)."""
    rows = [fn(bins, height, width) for fn, _ in space.values()]
    return np.stack([np.zeros(bins, np.float32) if r is None else np.asarray(r, np.float32) for r in rows])


def _signed_draw(magnitude: tf.Tensor, signed: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """``magnitude *= -1`` with probability 1/2 for a signed op (torchvision: ``rand() <= 0.5``)."""
    return tf.where(signed & (u <= 0.5), -magnitude, magnitude)


def _space_tables(space: dict[str, tuple[Magnitudes, bool]], bins: int, height: int, width: int):
    ops = tf.constant([_OP_NAMES.index(name) for name in space], tf.int32)
    signed = tf.constant([s for _, s in space.values()])
    return ops, signed, tf.constant(magnitude_table(space, bins, height, width))


def policy(name: str, height: int, width: int, ra_magnitude: int = 9) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``(image, seed) -> image`` for ``--auto-augment name`` on ``height`` x ``width`` images (the training
    crop): torchvision's draws (which op, which magnitude bin, its sign, whether it applies) from ``seed``."""
    if name == "ta_wide":
        ops, signed, table = _space_tables(_TA_WIDE_SPACE, MAGNITUDE_BINS, height, width)

        def trivial_augment(image, seed):
            which_seed, level_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
            which = tf.random.stateless_uniform([], which_seed, 0, len(_TA_WIDE_SPACE), tf.int32)
            level = tf.random.stateless_uniform([], level_seed, 0, MAGNITUDE_BINS, tf.int32)
            sign = tf.random.stateless_uniform([], sign_seed)
            return apply_op(image, ops[which], _signed_draw(table[which, level], signed[which], sign))
        return trivial_augment
    if name == "ra":
        ops, signed, table = _space_tables(_RA_SPACE, MAGNITUDE_BINS, height, width)

        def rand_augment(image, seed):
            for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, RA_NUM_OPS)):
                which_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(op_seed, 2))
                which = tf.random.stateless_uniform([], which_seed, 0, len(_RA_SPACE), tf.int32)
                sign = tf.random.stateless_uniform([], sign_seed)
                image = apply_op(image, ops[which], _signed_draw(table[which, ra_magnitude], signed[which], sign))
            return image
        return rand_augment
    if name == "imagenet":
        names = tuple(_AA_SPACE)
        table = magnitude_table(_AA_SPACE, AA_MAGNITUDE_BINS, height, width)
        sub_ops = tf.constant([[_OP_NAMES.index(op) for op, _, _ in sub] for sub in IMAGENET_POLICY], tf.int32)
        sub_probs = tf.constant([[p for _, p, _ in sub] for sub in IMAGENET_POLICY], tf.float32)
        sub_magnitudes = tf.constant([[0.0 if b is None else table[names.index(op), b] for op, _, b in sub]
                                      for sub in IMAGENET_POLICY], tf.float32)
        sub_signed = tf.constant([[_AA_SPACE[op][1] for op, _, _ in sub] for sub in IMAGENET_POLICY])

        def auto_augment(image, seed):
            which_seed, draw_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            which = tf.random.stateless_uniform([], which_seed, 0, len(IMAGENET_POLICY), tf.int32)
            applies, signs = tf.unstack(tf.random.stateless_uniform([2, 2], draw_seed))
            for k in range(2):
                magnitude = _signed_draw(sub_magnitudes[which, k], sub_signed[which, k], signs[k])
                image = tf.cond(applies[k] <= sub_probs[which, k],
                                functools.partial(apply_op, image, sub_ops[which, k], magnitude), lambda i=image: i)
            return image
        return auto_augment
    raise ValueError(f"unknown auto-augment policy {name!r}; one of {', '.join(POLICIES)}")
