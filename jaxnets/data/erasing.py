"""torchvision's ``RandomErasing`` as a TensorFlow op for ``tf.data``: with probability ``p``, a rectangle of the
normalized image is set to 0 (the mean colour), its area a uniform fraction of ``scale`` of the image and its
aspect ratio (height / width) log-uniform in ``ratio``, drawn up to 10 times until it fits, else nothing is
erased; its position uniform where it fits. torchvision's defaults, as its reference recipe uses them
(``--random-erase P``). Seeded per example (``transforms.augmentation``); never on the evaluation path.
"""

from __future__ import annotations

import math

from jaxnets.data.lazy_tf import tf

SCALE = (0.02, 0.33)
RATIO = (0.3, 3.3)
ATTEMPTS = 10
VALUE = 0.0


def erase_box(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float] = SCALE,
              ratio: tuple[float, float] = RATIO) -> tf.Tensor:
    """``(top, left, box height, box width)`` int32 as ``RandomErasing.get_params`` draws them: ``(0, 0, 0, 0)``
    when none of the attempts fits (torchvision then erases nothing)."""
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    erase_area = h * w * tf.random.stateless_uniform([ATTEMPTS], area_seed, scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform([ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
    # int(round(x)): Python rounds halves to even, as tf.round does
    box_h = tf.cast(tf.round(tf.sqrt(erase_area * aspect)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(erase_area / aspect)), tf.int32)
    fits = (box_h < height) & (box_w < width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first attempt that fits
    found = tf.reduce_any(fits)
    box_h, box_w = tf.where(found, box_h[first], 0), tf.where(found, box_w[first], 0)
    top = tf.random.stateless_uniform([], top_seed, 0, height - box_h + 1, tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, width - box_w + 1, tf.int32)
    return tf.stack([tf.where(found, top, 0), tf.where(found, left, 0), box_h, box_w])


def random_erase(image: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """``image`` (H, W, C) with a random rectangle set to ``VALUE``, with ``probability``."""
    apply_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    top, left, box_h, box_w = tf.unstack(erase_box(shape[0], shape[1], box_seed))
    rows, cols = tf.range(shape[0])[:, None, None], tf.range(shape[1])[None, :, None]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    apply = tf.random.stateless_uniform([], apply_seed) < probability  # torchvision: skip when rand() >= p
    return tf.where(apply & inside, tf.constant(VALUE, image.dtype), image)
