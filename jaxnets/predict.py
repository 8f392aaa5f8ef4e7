"""Classify images with pretrained or fine-tuned weights: ``python -m jaxnets.predict``.

    python -m jaxnets.predict --model resnet50 --top 5 cat.jpg dog.png
    python -m jaxnets.predict --weights runs/resnet18-flowers/final_weights.safetensors photos/*.jpg
    python -m jaxnets.predict --model resnet50 --weights IMAGENET1K_V2 cat.jpg
    python -m jaxnets.predict --model resnet18 --weights multilabel.safetensors --threshold 0.4 photo.jpg

A jaxnets weights file names its model in its header, so ``--model`` is needed only for torchvision's weights
(by name, or the default). Weights trained with ``--multi-label`` (their header says so) show every class above
``--threshold`` instead.

Preprocessing is torchvision's eval transform for the weights, done with PIL exactly as torchvision
does on PIL images (``jaxnets.data.pil_eval``, shared with the evaluation): resize the shorter side
(bilinear, antialiased), center crop, scale to [0, 1], normalize. Images are classified in fixed-size
batches (the last one padded), so the forward pass is compiled once.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jaxnets.data.arrays import is_array_file, load_array
from jaxnets.data.pil_eval import READ_ERRORS, center_crop, preprocess, read_image
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.multilabel import THRESHOLD
from jaxnets.registry import ModelRef, get_spec, imagenet_categories, is_weights_name
from jaxnets.weights import WeightsFile, instantiate, load_weights, open_pretrained, torchvision_weights_of

__all__ = ["above_threshold", "batch_logits", "category_names", "center_crop", "classify", "eval_transform",
           "is_multi_label", "load_input", "main", "make_forward", "open_weights", "preprocess", "read_image",
           "sigmoid", "softmax", "top_k"]

def make_forward(model: nn.Module) -> Callable[[Any, np.ndarray], jax.Array]:
    """The jitted eval-mode forward pass: logits for a batch (compiled once per batch shape)."""
    return jax.jit(partial(model.apply, train=False), compiler_options=host.xla_cpu_options())


def load_input(path: str | Path, transform: EvalTransform) -> np.ndarray:
    """One model input, float32 (crop, crop, C) with C = the transform's channels (the model's ``in_chans``):
    an image file read as RGB (3) or grayscale (1), or a ``.npy`` array ``(H, W, C)`` (``jaxnets.data.arrays``,
    as training reads them), each channel resized like an image. Any other pairing is a ``UserError`` naming
    the file, its channels and ``in_chans``."""
    channels = transform.in_chans
    if is_array_file(path):
        pixels = load_array(path)
        if pixels.shape[-1] != channels:
            raise UserError(f"array of shape {pixels.shape} has {pixels.shape[-1]} channel(s); the model takes "
                            f"in_chans={channels}")
        # PIL resizes one channel at a time (mode 'F'), as it resizes an image's; preprocess scales by 1/255.
        return np.stack([preprocess(Image.fromarray(pixels[..., c], mode="F"),
                                    dataclasses.replace(transform, mean=(m,), std=(s,)))
                         for c, (m, s) in enumerate(zip(transform.mean, transform.std, strict=True))], axis=-1)
    if channels == 3:
        return preprocess(read_image(path), transform)
    if channels == 1:
        # Gray as training decodes it: gray files as they are (16-bit: the high byte), color ones to their luma.
        return preprocess(read_image(path).convert("L"), transform)[..., None]
    raise UserError(f"an image file gives 1 or 3 channels; the model takes in_chans={channels}: give .npy arrays "
                    f"(H, W, {channels})")


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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def above_threshold(logits: np.ndarray, threshold: float, categories: Sequence[str]) -> list[list[tuple[str, float]]]:
    """A multi-label model's answer: every category whose sigmoid probability reaches ``threshold``, most
    probable first (none may)."""
    probs = sigmoid(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    return [[(categories[i], float(row[i])) for i in indices if row[i] >= threshold]
            for row, indices in zip(probs, order, strict=True)]


def is_multi_label(weights_file: WeightsFile) -> bool:
    """Whether ``train.py --multi-label`` wrote the file (its header's ``multi_label``)."""
    return bool(weights_file.metadata.get("multi_label", False))


def eval_transform(model: ModelRef, weights_file: WeightsFile) -> EvalTransform:
    """The model's eval transform at the sizes its weights were validated with: ``train.py`` records them
    (a model fine-tuned at 64 px is shown 64-px crops, not ImageNet's 224), torchvision's weights use those of
    their version (IMAGENET1K_V2: resize 232).
    A malformed entry is a ``UserError`` naming the file: guessing would show the model the wrong images."""
    spec = get_spec(model)
    base = (torchvision_weights_of(weights_file) or spec.weights).transforms  # IMAGENET1K_V2: resize 232
    in_chans = spec.check_options(weights_file.model_options, f"{weights_file.path}: ").get("in_chans", 3)
    base = base.for_channels(in_chans)  # the statistics of the model's channels, unless recorded
    recorded = weights_file.metadata.get("eval_transform")
    if recorded is None:
        return base
    return base.from_record(recorded, min_size=max(spec.weights.min_size),
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


def open_weights(model: str | None, weights: str | None) -> WeightsFile:
    """The weights to classify with. A jaxnets file names its model (its header's ``name``), so ``model`` may
    be None for one; given, it must be the file's. torchvision's weights (by name, or None: the default) need
    ``model``."""
    if weights is not None and not is_weights_name(weights):
        weights_file = load_weights(weights)
        if model is not None and get_spec(model).name != weights_file.name:
            raise UserError(f"--model {model}: {weights} holds {weights_file.name} weights, not {model}; leave "
                            f"out --model (the file names its model)")
        return weights_file
    if model is None:
        raise UserError(f"--model is needed for torchvision's weights ({weights or 'IMAGENET1K_V1'}); a jaxnets "
                        f"weights file (--weights FILE) names its model")
    return open_pretrained(model, weights)


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=errors.command("predict"),
                                     description="Top-K ImageNet (or fine-tuned) classes of each image.")
    parser.add_argument("--model", help="model name, e.g. resnet50 (see jaxnets.list_models()); default: the one "
                                        "the --weights file records (needed for torchvision's weights)")
    parser.add_argument("--weights", help="jaxnets weights file, or torchvision's weights by name (IMAGENET1K_V2; "
                                          "default: IMAGENET1K_V1), converted into the cache on first use")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, metavar="P",
                        help=f"multi-label weights (train.py --multi-label): show every class whose sigmoid "
                             f"probability reaches P, instead of the top K (default {THRESHOLD})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        parser.error("--top and --batch-size must be at least 1")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        weights_file = open_weights(args.model, args.weights)
        model, variables = instantiate(weights_file)
        if getattr(model, "features_only", False):
            raise UserError(f"{weights_file.path}: {weights_file.name} backbone weights (features_only): no classifier "
                            f"to classify with")
        transform = eval_transform(weights_file.name, weights_file)
    except (OSError, UserError) as exc:  # anything else is a bug in jaxnets: its traceback shows
        print(f"error: {exc}", file=sys.stderr)
        return 1
    categories = category_names(weights_file)
    multi_label = is_multi_label(weights_file)
    forward = make_forward(model)
    variables = jax.device_put(variables)
    batch_size = min(args.batch_size, len(args.images))
    failed = 0
    for paths in chunks(args.images, batch_size):
        readable, arrays = [], []
        for path in paths:
            try:
                arrays.append(load_input(path, transform))
                readable.append(path)
            except READ_ERRORS as exc:
                print(f"error: {path}: cannot read image ({exc})", file=sys.stderr)
                failed += 1
        if not arrays:
            continue
        logits = batch_logits(forward, variables, np.stack(arrays), batch_size)
        answers = (above_threshold(logits, args.threshold, categories) if multi_label
                   else top_k(logits, args.top, categories))
        for path, best in zip(readable, answers, strict=True):
            print(path)
            for category, probability in best:
                print(f"  {probability:7.4f}  {category}")
            if not best:
                print(f"  (no class at probability {args.threshold:g} or more)")
    if failed:
        print(f"error: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with errors.invoked_as("predict", "python -m jaxnets.predict"):
        sys.exit(main())
