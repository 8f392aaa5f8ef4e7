"""The report's tables, from each image's record (its label and its model's top-k; ``jaxnets.evaluation.Records``,
whose ``summary`` gives top-1, top-5 and the loss): pure numpy, so every figure is a count over images that the
report can show and a test can recount."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxnets.evaluation import TOP_K, Records

MOST_CONFUSED = 20  # (true, predicted) pairs listed


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
