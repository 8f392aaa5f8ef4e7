"""Classify images with pretrained or fine-tuned weights: the work behind ``jaxnets-predict``.

A jaxnets weights file names its model in its header, so ``--model`` is needed only for torchvision's weights
(by name, or the default). Weights trained with ``--multi-label`` (their header says so) show every class above
``--threshold`` instead.

Preprocessing is torchvision's eval transform for the weights, done with PIL exactly as torchvision
does on PIL images (``jaxnets.data.pil_eval``, shared with the evaluation): resize the shorter side
(bilinear, antialiased), center crop, scale to [0, 1], normalize. Images are classified in fixed-size
batches (the last one padded), so the forward pass is compiled once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from PIL import Image

from jaxnets import evaluation
from jaxnets.data.arrays import is_array_file, load_array
from jaxnets.data.pil_eval import center_crop, preprocess, read_image
from jaxnets.errors import UserError
from jaxnets.eval_transform import TIMM_CFG_KEY, EvalTransform
from jaxnets.fileio import atomic_path
from jaxnets.registry import get_spec, imagenet_categories, is_weights_name
from jaxnets.weights import WeightsFile, is_hub_name, load_weights, open_pretrained, torchvision_weights_of
from jaxnets.weights.pretrained import eval_transform_of as eval_transform  # predict's name for it, kept

__all__ = ["above_threshold", "batch_logits", "cam_background", "cam_file_names", "category_names", "center_crop",
           "classify", "eval_transform", "chunks", "is_multi_label", "load_input", "make_forward", "open_weights",
           "preprocess", "read_image", "sigmoid", "softmax", "top_k", "transform_source", "weights_path",
           "write_png"]

def make_forward(model: nn.Module) -> Callable[[Any, np.ndarray], jax.Array]:
    """The jitted eval-mode forward pass: float32 logits for a batch (compiled once per batch shape), under the
    kernel choice current now (``jaxnets.evaluation.make_forward``)."""
    return evaluation.make_forward(model.apply)


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
    padded = evaluation.pad_rows(np.asarray(images, np.float32), batch_size)
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
    order = evaluation.top_k_indices(probs, k)
    return [[(categories[i], float(row[i])) for i in indices] for row, indices in zip(probs, order, strict=True)]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def above_threshold(logits: np.ndarray, threshold: float, categories: Sequence[str]) -> list[list[tuple[str, float]]]:
    """A multi-label model's answer: every category whose sigmoid probability reaches ``threshold``, most
    probable first (none may)."""
    probs = sigmoid(logits)
    order = evaluation.top_k_indices(probs, probs.shape[-1])
    return [[(categories[i], float(row[i])) for i in indices if row[i] >= threshold]
            for row, indices in zip(probs, order, strict=True)]


def is_multi_label(weights_file: WeightsFile) -> bool:
    """Whether ``train.py --multi-label`` wrote the file (its header's ``multi_label``)."""
    return bool(weights_file.metadata.get("multi_label", False))


def transform_source(weights_file: WeightsFile, size: str = "default") -> str:
    """Where ``eval_transform`` found the transform of ``weights_file``, in words, for a report."""
    if "eval_transform" in weights_file.metadata:
        return "the weights' recorded eval_transform"
    if weights_file.metadata.get(TIMM_CFG_KEY):
        return f"timm's pretrained_cfg in the weights ({size} size)"
    published = torchvision_weights_of(weights_file)
    return f"torchvision's {published.torchvision_name}" if published else "torchvision's ImageNet eval transform"


def category_names(weights_file: WeightsFile) -> tuple[str, ...]:
    """Class names recorded in the file (``metadata['categories']``), ImageNet's for 1000 classes,
    else ``class 0``, ``class 1``, ..."""
    recorded = weights_file.metadata.get("categories")
    if recorded and len(recorded) == weights_file.num_classes:
        return tuple(recorded)
    if weights_file.num_classes == len(imagenet_categories()):
        return imagenet_categories()
    return tuple(f"class {i}" for i in range(weights_file.num_classes))


def weights_path(weights: str | Path) -> Path:
    """The weights file ``weights`` names: itself, or for a ``train.py`` run directory its final weights."""
    path = Path(weights)
    if not path.is_dir():
        return path
    from jaxnets.final_weights import FINAL_WEIGHTS  # the name train.py gives them

    if not (path / FINAL_WEIGHTS).is_file():
        raise UserError(f"--weights {weights}: a directory without {FINAL_WEIGHTS}; give a weights file or a "
                        "finished train.py run directory")
    return path / FINAL_WEIGHTS


def open_weights(model: str | None, weights: str | None) -> WeightsFile:
    """The weights to classify (or evaluate, or export) with: a jaxnets file or a ``train.py`` run directory
    (``weights_path``) names its model (its header's ``name``), so ``model`` may be None for one; given, it
    must be the file's. torchvision's weights (by name, or None: the default) need ``model``."""
    if weights is not None and not is_weights_name(weights):
        weights_file = load_weights(weights_path(weights))
        if model is not None and get_spec(model).name != weights_file.name:
            raise UserError(f"--model {model}: {weights} holds {weights_file.name} weights, not {model}; leave "
                            f"out --model (the file names its model)")
        return weights_file
    if model is None and is_hub_name(weights):  # a Hub repo names its model
        return open_pretrained(None, weights)
    if model is None:
        raise UserError(f"--model is needed for torchvision's weights ({weights or 'IMAGENET1K_V1'}); a jaxnets "
                        f"weights file (--weights FILE) names its model")
    return open_pretrained(model, weights)


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]



def cam_background(path: str | Path, transform: EvalTransform) -> Image.Image | np.ndarray:
    """What a class activation map is laid over: the input as ``load_input`` reads it, before the eval transform
    (an RGB or grayscale image; a ``.npy`` array's pixels, its channels' mean in gray unless it has 3)."""
    if not is_array_file(path):
        image = read_image(path)
        return image if transform.in_chans == 3 else image.convert("L")
    pixels = load_array(path)
    if pixels.shape[-1] != 3:
        pixels = pixels.mean(axis=-1)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def cam_file_names(paths: Sequence[str | Path], method: str) -> list[str]:
    """``<stem>.<method>.png`` for each input, ``<stem>-<n>.<method>.png`` (n = 2, 3, ...) for a stem already
    taken (compared case-blind, as some file systems do), so no picture overwrites another."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem
        name, n = f"{stem}.{method}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.{method}.png"
        taken.add(name.lower())
        names.append(name)
    return names


def write_png(path: str | Path, picture: Image.Image) -> Path:
    """``picture`` written atomically as the PNG ``path`` (``fileio.atomic_path``: never half-written)."""
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")  # the temporary name does not end in .png
    return Path(path)
