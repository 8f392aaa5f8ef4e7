"""The image transforms of the input pipeline, as TensorFlow ops for ``tf.data`` (float32 pixels in 0..255
until normalized): decoding files, torchvision's ``RandomResizedCrop`` bounds, ``Resize`` and ``CenterCrop``,
and the training augmentation and evaluation transform built from them.

Augmentation (random resized crop, horizontal flip) uses stateless random ops seeded per example, so a
batch's pixels do not depend on thread scheduling or on where the run was resumed. An image file's crop box
depends on its size only, read from a JPEG's header, so only the window is decoded (``decode_window``), with
the pixels of decoding the whole file. Evaluation is torchvision's eval transform: resize the shorter side,
center crop.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from jaxnets.data import autoaugment, erasing
from jaxnets.data.arrays import ARRAY_EXTENSION, load_array
from jaxnets.data.config import ChannelMismatch, DataConfig
from jaxnets.data.lazy_tf import tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")  # what decode_rgb reads
IMAGE_CHANNELS = (1, 3)  # what an image file decodes to: grayscale or RGB
JPEG_MAGIC = b"\xff\xd8\xff"  # how decode_image tells a JPEG
JPEG_MARGIN = 8  # pixels decoded around a JPEG's crop window: one block, past any chroma upsampling's reach


def augmentation(config: DataConfig, epoch_seed: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``(example, position) -> normalized float32 image``: a random resized crop and (``config.hflip``) a
    horizontal flip, seeded by the epoch and the example's position in it; then, when asked, an automatic
    augmentation policy and random erasing (``policy_and_erasing``). The example is a decoded image, or an image
    file's path (a string: ``IndexedSplit``'s files, ``config.in_chans`` channels), of which only the crop window
    is decoded (``decode_window``): the same box and pixels as decoding the whole file first, for less work."""
    extra = policy_and_erasing(config)
    scale = (config.min_crop_scale, 1.0)

    def augment(example: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
        seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(position, tf.int64)])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if example.dtype == tf.string:
            window = decode_window(example, config.in_chans, lambda shape: crop_box(shape, crop_seed, scale))
            image = resize_crop(window, config.image_size)
        else:
            image = random_resized_crop(example, config.image_size, crop_seed, scale=scale)
        if config.hflip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return extra(image, seed) if extra else normalize(image, config)
    return augment


def policy_and_erasing(config: DataConfig) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None:
    """``(cropped image, example seed) -> normalized image`` with ``config.auto_augment``'s policy on whole
    levels (torchvision's uint8 crop) and ``config.random_erase`` after normalization, as torchvision's reference
    preset orders them; None when neither is asked (the crop and flip keep their seeds either way)."""
    if config.auto_augment is None and not config.random_erase:
        return None
    policy = (None if config.auto_augment is None else
              autoaugment.policy(config.auto_augment, config.image_size, config.image_size, config.ra_magnitude))

    def apply(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        policy_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, 1), 2))
        if policy is not None:  # on whole levels of known channels (the ops differ for gray and RGB)
            levels = tf.ensure_shape(tf.clip_by_value(tf.round(image), 0.0, 255.0), [None, None, config.in_chans])
            image = policy(levels, policy_seed)
        image = normalize(image, config)
        return erasing.random_erase(image, erase_seed, config.random_erase) if config.random_erase else image
    return apply


def eval_transform(config: DataConfig) -> Callable[[tf.Tensor], tf.Tensor]:
    """``uint8 image -> normalized float32 image``: torchvision's resize of the shorter side and center crop."""
    sizes = config.eval_transform
    return lambda image: normalize(center_crop(resize_shorter(image, sizes.resize_size), sizes.crop_size), config)


def normalize(image: tf.Tensor, config: DataConfig) -> tf.Tensor:
    """torchvision's ``Normalize`` after ``ToDtype(scale=True)``, on pixels in 0..255."""
    mean = tf.constant(config.mean, tf.float32) * 255.0
    std = tf.constant(config.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """torchvision's ``RandomResizedCrop`` of a decoded image: ``crop_box``'s box, resized by ``resize_crop``."""
    box = crop_box(tf.shape(image), seed, scale, ratio)
    return resize_crop(tf.slice(image, [box[0], box[1], 0], [box[2], box[3], -1]), size)


def crop_box(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """int32 ``[top, left, height, width]`` of torchvision's ``RandomResizedCrop`` bounds in an image of ``shape``
    (H, W, C): a crop of area fraction in ``scale`` and aspect ratio (width / height) in ``ratio``, up to rounding
    to whole pixels, tried 10 times, else torchvision's fallback: a center crop of the image's aspect ratio clamped
    into ``ratio``. Within those bounds crops are drawn as TensorFlow's ``sample_distorted_bounding_box`` draws
    them, not with torchvision's distribution (area uniform, ratio log-uniform). A function of the shape and the
    seed only, so that a file's box is known from its header before it is decoded (``decode_window``)."""
    shape = tf.cast(shape, tf.int32)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=scale, aspect_ratio_range=ratio,
        min_object_covered=0.0,  # else (default 0.1, the whole image being the box) no crop is under 10 %
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    # TensorFlow falls back to the whole image, whatever its aspect ratio (a 3:2 photo is squeezed by 1.5);
    # torchvision to a center crop of that ratio clamped into ``ratio``. Only an out-of-range whole image
    # differs: a sampled crop has its ratio in range.
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    too_wide, too_tall = width / height > ratio[1], width / height < ratio[0]
    clamped = tf.stack([tf.where(too_tall, tf.cast(tf.round(width / ratio[0]), tf.int32), shape[0]),
                        tf.where(too_wide, tf.cast(tf.round(height * ratio[1]), tf.int32), shape[1])])
    fallback = tf.reduce_all(tf.equal(crop_size[:2], shape[:2])) & (too_wide | too_tall)
    crop_hw = tf.where(fallback, clamped, crop_size[:2])
    begin_hw = tf.where(fallback, (shape[:2] - clamped) // 2, begin[:2])
    return tf.concat([begin_hw, crop_hw], 0)


def resize_crop(crop: tf.Tensor, size: int) -> tf.Tensor:
    """A crop (uint8 or float32 levels) resized to ``size`` x ``size`` float32: bilinear with antialiasing
    (``tf.image.resize``), torchvision's choice on tensors and PIL's own filter on images: within one level of
    torchvision's ``resized_crop`` on a PIL image, which rounds to uint8 (tests/test_input_pipeline.py)."""
    return tf.image.resize(tf.cast(crop, tf.float32), (size, size), "bilinear", antialias=True)


def resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, the longer one is truncated."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.where(shape == tf.reduce_min(shape), float(size), tf.floor(shape * scale))
    return tf.image.resize(tf.cast(image, tf.float32), tf.cast(new, tf.int32), "bilinear", antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``CenterCrop(size)``: offsets rounded as ``int(round((h - size) / 2))``."""
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return tf.slice(image, [top, left, 0], [size, size, -1])


def decode_file(path: tf.Tensor, channels: int = 3) -> tf.Tensor:
    """An example file, by its path, as float32 (H, W, ``channels``) pixel values in 0..255: an image file
    (``decode_image``: 1 or 3 channels) or a ``.npy`` array (``arrays.load_array``: any count, the only kind for
    other than 1 and 3). One dtype for both, so that a folder may mix them."""
    if channels not in IMAGE_CHANNELS:
        return load_array_op(path, channels)
    is_array = tf.strings.regex_full_match(tf.strings.lower(path), ".*" + re.escape(ARRAY_EXTENSION))
    return tf.cond(is_array, lambda: load_array_op(path, channels),
                   lambda: tf.cast(decode_image(tf.io.read_file(path), channels), tf.float32))


def decode_window(path: tf.Tensor, channels: int, box_of: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """The window ``box_of(shape)`` (``[top, left, height, width]`` of an image of ``shape`` (H, W, ``channels``))
    of an image file (not a ``.npy`` array), as uint8: the same pixels as ``decode_file``'s whole image cropped
    there (tests/test_input_pipeline.py), but a JPEG's shape is read from its header and only the window's rows
    and blocks, with a margin of ``JPEG_MARGIN``, are decoded (``decode_and_crop_jpeg``); other formats are
    decoded whole. uint8 until the window is cut: only the window is ever converted to float32."""
    data = tf.io.read_file(path)

    def jpeg() -> tf.Tensor:
        shape = tf.concat([tf.image.extract_jpeg_shape(data)[:2], [channels]], 0)
        box = box_of(shape)
        # libjpeg upsamples subsampled chroma at a window's right edge as at the image's, which moves that
        # column by up to ~30 levels: decode a margin around the window (clamped to the image) and cut it off.
        top_left = tf.maximum(box[:2] - JPEG_MARGIN, 0)
        bottom_right = tf.minimum(box[:2] + box[2:] + JPEG_MARGIN, shape[:2])
        padded = tf.image.decode_and_crop_jpeg(data, tf.concat([top_left, bottom_right - top_left], 0),
                                               channels=channels)
        return tf.slice(padded, tf.concat([box[:2] - top_left, [0]], 0), tf.concat([box[2:], [-1]], 0))

    def whole() -> tf.Tensor:
        image = decode_image(data, channels)
        box = box_of(tf.shape(image))
        return tf.slice(image, [box[0], box[1], 0], [box[2], box[3], -1])
    window = tf.cond(tf.strings.substr(data, 0, 3) == JPEG_MAGIC, jpeg, whole)
    window.set_shape([None, None, channels])
    return window


def load_array_op(path: tf.Tensor, channels: int) -> tf.Tensor:
    """``arrays.load_array`` as a TensorFlow op: float32 (H, W, ``channels``)."""
    array = tf.numpy_function(load_array, [path], tf.float32, stateful=False)
    array.set_shape([None, None, channels])
    return array


def decode_image(data: tf.Tensor, channels: int = 3) -> tf.Tensor:
    """An image file's bytes as uint8 (H, W, ``channels``): RGB (3) or grayscale (1; color images converted
    to luma as TensorFlow's decoders do), as training reads every folder image."""
    if channels == 3:
        return decode_rgb(data)
    head = tf.strings.substr(data, 0, 12) + b"\0" * 12
    is_webp = (tf.strings.substr(head, 0, 4) == b"RIFF") & (tf.strings.substr(head, 8, 4) == b"WEBP")
    # TensorFlow decodes WebP as RGB(A) whatever it is asked, and refuses BMP and GIF at one channel: their gray
    # is the luma of decode_rgb's pixels. JPEG and PNG have their decoders' own grayscale.
    rgb_only = is_webp | (tf.strings.substr(head, 0, 2) == b"BM") | (tf.strings.substr(head, 0, 4) == b"GIF8")
    image = tf.cond(rgb_only, lambda: tf.image.rgb_to_grayscale(decode_rgb(data)),
                    lambda: tf.io.decode_image(data, channels=1, expand_animations=False))
    image.set_shape([None, None, 1])
    return image


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """An image file's bytes as uint8 RGB (H, W, 3), as training reads every folder image."""
    # TensorFlow's WebP decoder returns the channels the file has (a WebP with transparency refuses to give
    # 3): decode a still WebP as it is and drop the alpha, as PIL's convert("RGB") does. Everything else,
    # animated WebP included (which decode_webp would need as RGBA), goes to decode_image, asked for RGB.
    head = tf.strings.substr(data, 0, 21) + b"\0" * 21  # RIFF header, padded: short files read as zeros
    flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]  # extended header (VP8X) flags
    animated = (tf.strings.substr(head, 12, 4) == b"VP8X") & (tf.bitwise.bitwise_and(flags, 2) > 0)
    still_webp = (tf.strings.substr(head, 8, 4) == b"WEBP") & ~animated
    image = tf.cond(still_webp, lambda: tf.io.decode_webp(data)[0, :, :, :3],
                    lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """A decoded image (any integer dtype; its channel count known statically) as uint8 with ``channels``
    channels, by ``channel_conversion``'s rule."""
    have = image.shape[-1]
    check_channels(have, channels, f"images of shape {tuple(image.shape)}")
    if have == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif have == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    return tf.cast(image, tf.uint8)


def check_channels(have: int | None, want: int, what: str) -> None:
    """Images of ``have`` channels can feed a model of ``want`` (``--in-chans``) when they are equal, or are
    gray and RGB (gray repeated to RGB, as PIL's ``convert('RGB')``; RGB to its luma); anything else is a
    ``ChannelMismatch`` naming both."""
    if have == want or (have in IMAGE_CHANNELS and want in IMAGE_CHANNELS):
        return
    raise ChannelMismatch(want, f"{what} have {have} channel(s)", str(have), f"use --in-chans {have} or convert them")

