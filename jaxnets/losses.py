"""The training losses, per example in float32: softmax cross-entropy (single-label) and sigmoid binary
cross-entropy (``--multi-label``), each with torch's (resp. timm's) label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy in float32, with torch's label smoothing (uniform over all classes); ``labels``
    are class indices, or (one more axis) target probabilities, as torch's ``CrossEntropyLoss`` takes both."""
    logits = logits.astype(jnp.float32)
    targets = labels.astype(jnp.float32) if labels.ndim == logits.ndim else jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example sigmoid binary cross-entropy in float32, the mean over classes (torch's ``BCEWithLogitsLoss``
    over multi-hot targets); ``label_smoothing`` as timm's ``BinaryCrossEntropy``: ``(1 - s) * target + s /
    classes``."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
