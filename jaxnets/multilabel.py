"""Multi-label classification (``--multi-label``): an image has any number of classes, each an independent yes/no.

The loss is the sigmoid binary cross-entropy over multi-hot targets (torch's ``BCEWithLogitsLoss``: the mean
over classes and examples), with ``--label-smoothing`` as timm's ``BinaryCrossEntropy`` smooths
(``(1 - s) * target + s / classes``). The metrics replace top-k: mAP (the mean over classes of scikit-learn's
``average_precision_score``, over the classes with a positive example in the evaluated set: a class with none
has no precision-recall curve), F1 at probability 0.5 (macro over classes, and micro), and exact match (the
predicted set of classes is the true one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

THRESHOLD = 0.5  # a class is predicted when its sigmoid probability reaches this


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example sigmoid binary cross-entropy in float32, the mean over classes."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


def average_precision(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per class (column), scikit-learn's average precision: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct
    scores as thresholds, highest first; NaN for a class without a positive example."""
    targets, scores = np.asarray(targets, bool), np.asarray(scores, np.float64)
    result = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        positives = targets[:, c].sum()
        if not positives:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        score, hit = scores[order, c], targets[order, c]
        last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last index of each distinct score
        true_pos = np.cumsum(hit)[last]
        precision = true_pos / (last + 1)
        recall = true_pos / positives
        result[c] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return result


def metrics(targets: np.ndarray, logits: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """``map``, ``f1`` (macro), ``f1_micro`` and ``exact_match`` of the logits of a whole evaluated set."""
    targets = np.asarray(targets, bool)
    predicted = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))) >= threshold
    ap = average_precision(targets, logits)
    true_pos = (predicted & targets).sum(axis=0)
    false_pos, false_neg = (predicted & ~targets).sum(axis=0), (~predicted & targets).sum(axis=0)
    denominator = 2 * true_pos + false_pos + false_neg
    f1 = np.where(denominator > 0, 2 * true_pos / np.maximum(denominator, 1), 0.0)  # 0 when undefined, as sklearn's
    micro = 2 * true_pos.sum() / max(2 * true_pos.sum() + false_pos.sum() + false_neg.sum(), 1)
    return {"map": float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0, "f1": float(f1.mean()),
            "f1_micro": float(micro), "exact_match": float(np.mean(np.all(predicted == targets, axis=1)))}
