"""torchvision's evaluation preprocessing, done with PIL exactly as torchvision does it on PIL images: the
one implementation behind ``jaxnets.predict`` and the evaluation's ``--preprocess torchvision``.

``ImageFolder``'s loader opens a file with PIL and converts it to RGB; ``weights.transforms()`` (the
``ImageClassification`` preset) resizes the shorter side with PIL (bilinear, antialiased), center-crops,
scales to [0, 1] and normalizes in float32. ``load`` does the same steps with the same libraries and the same
float32 arithmetic, so its pixels are identical. The same steps are timm's eval transform
(``create_transform(**resolve_data_config(cfg), is_training=False)``) for a transform read from timm's
``pretrained_cfg`` (``EvalTransform.from_timm_cfg``): bicubic or bilinear, its ``crop_pct`` resize, and its crop
modes (``squash``: both sides resized; ``border``: the longer side, padded with the mean colour).

A loader runs it in worker processes or threads (``ordered_map``). Threads start at once, but hold the GIL for
~15 % of the work (PIL's Python code around its C decoder and resampler), which caps them near 6x one core;
processes scale with the cores.
"""

from __future__ import annotations

import io
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxnets.data.config import DataError
from jaxnets.eval_transform import EvalTransform

IMAGENET_EVAL = EvalTransform()
INTERPOLATION = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC}
# PIL's modes for 16- and 32-bit integer grayscale (16-bit PNGs open as one of them).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# What reading an image can raise for a bad file (UnidentifiedImageError is an OSError).
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)

ImageSource = str | Path | bytes | np.ndarray  # a file, its bytes, or decoded uint8 pixels (H, W, 3)


def read_image(source: ImageSource) -> Image.Image:
    """An RGB image from a file, its bytes or a uint8 array; grayscale, RGBA and palette images are converted
    as ``Image.convert('RGB')`` does (alpha is dropped, as torchvision's folder loader does).

    16-bit grayscale is the exception: ``convert`` saturates it (almost every pixel white), while
    ``train.py``'s decoder (TensorFlow) keeps each value's high byte; predictions use what training saw.
    """
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        if image.mode in WIDE_GRAY_MODES:
            high_byte = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
            return Image.fromarray(high_byte.astype(np.uint8)).convert("RGB")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette transparency would otherwise warn
        return image.convert("RGB")


def preprocess(image: Image.Image, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """torchvision's ``ImageClassification`` eval transform on a PIL image, as a float32 HWC array."""
    return normalize(resize_and_crop(image, transform), transform)


def resize_and_crop(image: Image.Image, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """torchvision's ``Resize`` of the shorter side and ``CenterCrop`` on a PIL image: uint8 (crop, crop, 3);
    for timm's other crop modes its ``Resize`` to a square or ``ResizeKeepRatio`` and ``CenterCropOrPad``."""
    image = image.resize(resized_size(image.size, transform), INTERPOLATION[transform.interpolation])
    return np.asarray(center_crop(image, transform.crop_size, pad_fill(transform)))


def pad_fill(transform: EvalTransform) -> int | tuple[int, ...]:
    """What ``center_crop`` pads with: black, or for timm's ``border`` mode the mean colour (as timm rounds it)."""
    if transform.crop_mode != "border":
        return 0
    fill = tuple(round(255 * v) for v in transform.mean)
    return fill if len(fill) > 1 else fill[0]


def resized_size(size: tuple[int, int], transform: EvalTransform = IMAGENET_EVAL) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize`` of the shorter side to ``resize_size`` (the longer side
    truncated): also where the class activation maps find the crop in the original image. timm's ``squash``
    mode resizes both sides to ``resize_size``; its ``border`` mode the longer one (``ResizeKeepRatio``,
    ``longest=1``: the other side rounded)."""
    width, height = size
    if transform.crop_mode == "squash":
        return transform.resize_size, transform.resize_size
    if transform.crop_mode == "border":
        ratio = max(height / transform.resize_size, width / transform.resize_size)
        return round(width / ratio), round(height / ratio)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = transform.resize_size, int(transform.resize_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_offset(length: int, crop: int) -> int:
    """Where ``center_crop`` starts along an axis of ``length`` pixels: rounded to the middle, or negative where
    the crop is larger and the image is zero-padded around it."""
    return -((crop - length) // 2) if crop > length else int(round((length - crop) / 2.0))


def normalize(pixels: np.ndarray, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """torchvision's ``ToImage``/``ToDtype(scale=True)`` and ``Normalize`` on uint8 pixels (..., 3), in its float32
    arithmetic: ``(x / 255 - mean) / std``, element by element, so a batch gives each image's pixels."""
    mean = np.asarray(transform.mean, np.float32)
    std = np.asarray(transform.std, np.float32)
    return (pixels.astype(np.float32) / np.float32(255) - mean) / std


def center_crop(image: Image.Image, crop: int, fill: int | tuple[int, ...] = 0) -> Image.Image:
    """torchvision's ``center_crop``: zero-pad when the image is smaller, then crop the middle; with ``fill``
    timm's ``center_crop_or_pad`` (the same place, another colour)."""
    width, height = image.size
    if crop > width or crop > height:
        padded = Image.new(image.mode, (max(width, crop), max(height, crop)), fill)
        padded.paste(image, ((crop - width) // 2 if crop > width else 0, (crop - height) // 2 if crop > height else 0))
        image, (width, height) = padded, padded.size
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def load(source: ImageSource, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """``source`` read and eval-transformed: a float32 (crop, crop, 3) array."""
    return normalize(crop(source, transform), transform)


def crop(source: ImageSource, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """``source`` read, resized and center-cropped: the uint8 (crop, crop, 3) pixels ``normalize`` takes."""
    return resize_and_crop(read_image(source), transform)


def load_example(example: tuple[ImageSource, Any, Any], transform: EvalTransform) -> tuple[np.ndarray, Any, Any]:
    """A loader's unit of work, ``(source, *rest) -> (float32 image, *rest)``; an unreadable image is a
    ``DataError`` naming its file."""
    source, *rest = example
    try:
        return (load(source, transform), *rest)
    except READ_ERRORS as error:
        where = source if isinstance(source, str | Path) else "an image"
        raise DataError(f"{where}: cannot read image ({error})") from None


WORKER_KINDS = ("process", "thread")


def ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int,
                kind: str = "thread") -> Iterator[Any]:
    """``function(item)`` for each item, in order, computed by ``workers`` threads or processes (``kind``) with
    at most ``ahead`` items in flight (bounded memory). Processes are started by a fork server (not forked from
    this process, whose JAX and TensorFlow runtimes are not fork-safe), so ``function`` must be picklable (a
    module-level function or a ``partial`` of one). An exception is raised where its item's result would have
    been yielded; stopping early cancels the items not yet started."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"kind must be one of {WORKER_KINDS}, got {kind!r}")
    if kind == "process":
        context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                              else "spawn")
        # No forkserver preload: with one, the server would also run the caller's __main__ (a script without a
        # ``if __name__ == "__main__"`` guard would start again); each worker imports this module instead.
        pool: Executor = ProcessPoolExecutor(max(1, workers), mp_context=context)
    else:
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="pil_eval")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
