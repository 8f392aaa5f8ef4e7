"""The evaluation's numbers, from each image's record (its label and its model's top-k): pure numpy, so every
figure is a count over images that the report can show and a test can recount."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOP_K = 5  # predictions recorded per image; top-5 accuracy needs 5 outputs
MOST_CONFUSED = 20  # (true, predicted) pairs listed


@dataclass
class Records:
    """One row per evaluated image, in evaluation order: ``label`` (the model's output index of its class),
    ``top`` (the k best outputs, best first), their softmax probabilities ``prob``, and its cross-entropy."""

    label: np.ndarray  # int (N,)
    top: np.ndarray  # int (N, k)
    prob: np.ndarray  # float32 (N, k)
    loss: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def concatenate(cls, parts: Sequence[Records]) -> Records:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("label", "top", "prob", "loss")))

    @property
    def predicted(self) -> np.ndarray:
        return self.top[:, 0]

    @property
    def in_top5(self) -> np.ndarray:
        return np.any(self.top[:, :TOP_K] == self.label[:, None], axis=1)


def summary(records: Records, num_outputs: int) -> dict[str, float | int]:
    """top-1, top-5 (with 5 outputs or more), mean cross-entropy, and the number of images."""
    if not len(records):
        return {"count": 0}
    metrics: dict[str, float | int] = {"top1": float(np.mean(records.predicted == records.label))}
    if num_outputs >= TOP_K:
        metrics["top5"] = float(np.mean(records.in_top5))
    metrics["loss"] = float(np.mean(records.loss, dtype=np.float64))
    metrics["count"] = len(records)
    return metrics


def per_class(records: Records, names: Sequence[str], num_outputs: int) -> list[dict]:
    """Each class with images: its output index, name, number of images, top-1 (and top-5) accuracy."""
    rows = []
    for index in np.unique(records.label):
        members = records.label == index
        row = {"index": int(index), "class": names[index], "count": int(members.sum()),
               "top1": float(np.mean(records.predicted[members] == index))}
        if num_outputs >= TOP_K:
            row["top5"] = float(np.mean(records.in_top5[members]))
        rows.append(row)
    return rows


def confusion(records: Records, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix over the classes that have images (true x predicted, counts), square, with an
    ``other`` row and column for predictions of any other output (when there are some)."""
    classes = np.unique(records.label)
    position = np.full(len(names), len(classes), np.int64)  # any other output -> the last position
    position[classes] = np.arange(len(classes))
    predicted = position[records.predicted]
    size = len(classes) + int(np.any(predicted == len(classes)))
    matrix = np.zeros((size, size), np.int64)
    np.add.at(matrix, (position[records.label], predicted), 1)
    labels = [names[c] for c in classes] + (["other"] if size > len(classes) else [])
    return matrix, labels


def most_confused(records: Records, names: Sequence[str], limit: int = MOST_CONFUSED) -> list[dict]:
    """The (true, predicted) pairs of different classes with the most images, most first."""
    wrong = records.predicted != records.label
    pairs, counts = np.unique(np.stack([records.label[wrong], records.predicted[wrong]], axis=1), axis=0,
                              return_counts=True)
    totals = np.bincount(records.label, minlength=len(names))
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:limit]
    return [{"true": names[pairs[i, 0]], "predicted": names[pairs[i, 1]], "count": int(counts[i]),
             "of": int(totals[pairs[i, 0]])} for i in order]
