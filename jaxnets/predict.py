"""Classify images with pretrained or fine-tuned weights: ``python -m jaxnets.predict``.

    python -m jaxnets.predict --model resnet50 --top 5 cat.jpg dog.png
    python -m jaxnets.predict --model resnet18 --weights finetuned.safetensors photos/*.jpg

Preprocessing is torchvision's eval transform for the weights, done with PIL exactly as torchvision
does on PIL images: resize the shorter side (bilinear, antialiased), center crop, scale to [0, 1],
normalize. Images are classified in fixed-size batches (the last one padded), so the forward pass
is compiled once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from PIL import Image

from jaxnets import errors, host
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.registry import ModelRef, get_spec, imagenet_categories
from jaxnets.weights import WeightsFile, instantiate, open_pretrained

IMAGENET_EVAL = EvalTransform()
INTERPOLATION = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC}


# PIL's modes for 16- and 32-bit integer grayscale (16-bit PNGs open as one of them).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; grayscale, RGBA and palette images are converted as
    ``Image.convert('RGB')`` does (alpha is dropped, as torchvision's folder loader does).

    16-bit grayscale is the exception: ``convert`` saturates it (almost every pixel white), while
    ``train.py``'s decoder (TensorFlow) keeps each value's high byte; predictions use what training saw.
    """
    with Image.open(path) as image:
        if image.mode in WIDE_GRAY_MODES:
            high_byte = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
            return Image.fromarray(high_byte.astype(np.uint8)).convert("RGB")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette transparency would otherwise warn
        return image.convert("RGB")


def preprocess(image: Image.Image, transform: EvalTransform = IMAGENET_EVAL) -> np.ndarray:
    """torchvision's ``ImageClassification`` eval transform on a PIL image, as a float32 HWC array."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = transform.resize_size, int(transform.resize_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize(size, INTERPOLATION[transform.interpolation])
    image = center_crop(image, transform.crop_size)
    mean = np.asarray(transform.mean, np.float32)
    std = np.asarray(transform.std, np.float32)
    return (np.asarray(image, np.float32) / np.float32(255) - mean) / std


def center_crop(image: Image.Image, crop: int) -> Image.Image:
    """torchvision's ``center_crop``: zero-pad when the image is smaller, then crop the middle."""
    width, height = image.size
    if crop > width or crop > height:
        padded = Image.new(image.mode, (max(width, crop), max(height, crop)))
        padded.paste(image, ((crop - width) // 2 if crop > width else 0, (crop - height) // 2 if crop > height else 0))
        image, (width, height) = padded, padded.size
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def make_forward(model: nn.Module) -> Callable[[Any, np.ndarray], jax.Array]:
    """The jitted eval-mode forward pass: logits for a batch (compiled once per batch shape)."""
    return jax.jit(partial(model.apply, train=False), compiler_options=host.xla_cpu_options())


def batch_logits(forward: Callable, variables: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 logits of up to ``batch_size`` images, padded to exactly ``batch_size`` so every call
    has the same shape and reuses one compilation."""
    count = len(images)
    if count > batch_size:
        raise UserError(f"{count} images exceed the batch size {batch_size}")
    padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
    padded[:count] = images
    return np.asarray(forward(variables, padded), np.float32)[:count]


def classify(model: nn.Module, variables: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """float32 logits of preprocessed images ``(N, H, W, 3)``, computed ``batch_size`` at a time."""
    forward = make_forward(model)
    variables = jax.device_put(variables)  # once, not per batch
    batch_size = min(batch_size, len(images))
    return np.concatenate([batch_logits(forward, variables, images[i:i + batch_size], batch_size)
                           for i in range(0, len(images), batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int, categories: Sequence[str]) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable categories of each row, with their probabilities."""
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(categories[i], float(row[i])) for i in indices] for row, indices in zip(probs, order, strict=True)]


def eval_transform(model: ModelRef, weights_file: WeightsFile) -> EvalTransform:
    """The model's eval transform at the sizes its weights were validated with: ``train.py`` records them
    (a model fine-tuned at 64 px is shown 64-px crops, not ImageNet's 224), torchvision's weights use theirs.
    A malformed entry is a ``UserError`` naming the file: guessing would show the model the wrong images."""
    spec = get_spec(model)
    recorded = weights_file.metadata.get("eval_transform")
    if recorded is None:
        return spec.weights.transforms
    return spec.weights.transforms.from_record(recorded, min_size=max(spec.weights.min_size),
                                               where=f"{weights_file.path or spec.name}: metadata eval_transform")


def category_names(weights_file: WeightsFile) -> tuple[str, ...]:
    """Class names recorded in the file (``metadata['categories']``), ImageNet's for 1000 classes,
    else ``class 0``, ``class 1``, ..."""
    recorded = weights_file.metadata.get("categories")
    if recorded and len(recorded) == weights_file.num_classes:
        return tuple(recorded)
    if weights_file.num_classes == len(imagenet_categories()):
        return imagenet_categories()
    return tuple(f"class {i}" for i in range(weights_file.num_classes))


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=errors.command("predict"),
                                     description="Top-K ImageNet (or fine-tuned) classes of each image.")
    parser.add_argument("--model", required=True, help="model name, e.g. resnet50 (see jaxnets.list_models())")
    parser.add_argument("--weights", help="jaxnets weights file (default: converted torchvision ImageNet weights "
                                          "from the cache, converting them on first use)")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        parser.error("--top and --batch-size must be at least 1")
    try:
        weights_file = open_pretrained(args.model, args.weights)
        model, variables = instantiate(weights_file)
        transform = eval_transform(args.model, weights_file)
    except (OSError, UserError) as exc:  # anything else is a bug in jaxnets: its traceback shows
        print(f"error: {exc}", file=sys.stderr)
        return 1
    categories = category_names(weights_file)
    forward = make_forward(model)
    variables = jax.device_put(variables)
    batch_size = min(args.batch_size, len(args.images))
    failed = 0
    for paths in chunks(args.images, batch_size):
        readable, arrays = [], []
        for path in paths:
            try:
                arrays.append(preprocess(read_image(path), transform))
                readable.append(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError: OSError
                print(f"error: {path}: cannot read image ({exc})", file=sys.stderr)
                failed += 1
        if not arrays:
            continue
        logits = batch_logits(forward, variables, np.stack(arrays), batch_size)
        for path, best in zip(readable, top_k(logits, args.top, categories), strict=True):
            print(path)
            for category, probability in best:
                print(f"  {probability:7.4f}  {category}")
    if failed:
        print(f"error: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with errors.invoked_as("predict", "python -m jaxnets.predict"):
        sys.exit(main())
