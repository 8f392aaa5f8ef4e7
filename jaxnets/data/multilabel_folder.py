"""Source: a multi-label image folder (``--multi-label``), where an image shows any number of classes. The folder
holds the images (anywhere below it) and ``labels.csv``, one line per image: ``file,label;label;...`` (the path
relative to the folder; no labels is allowed: an image of none of the classes). A header line ``file,labels`` is
skipped. With ``train/labels.csv`` and ``val/labels.csv`` (or ``validation/``) those are the splits; else
``val_fraction`` of the images, drawn with the split seed, is held out. The classes are the labels found, sorted.

Labels reach the pipeline as multi-hot rows (int32, one column per class): ``Dataset`` batches them as it
batches class indices, and the training step turns them into sigmoid targets.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxnets.data.config import DataConfig, DataError
from jaxnets.data.folder import VAL_DIRS, file_problems, folder_source
from jaxnets.data.folder import recognizes as is_folder
from jaxnets.data.indexed import IndexedSplit
from jaxnets.data.labels import SPLIT_SEED
from jaxnets.data.split import Source

LABELS_FILE = "labels.csv"
LABEL_SEPARATOR = ";"
HEADER = ("file", "labels")


def recognizes(config: DataConfig) -> bool:
    """A folder (or a name that can only be a path) of a ``--multi-label`` run."""
    return config.multi_label and is_folder(config)


@dataclass
class MultiLabelSplit(IndexedSplit):
    """An indexed split whose ``labels`` are multi-hot rows (n, classes)."""

    def subset(self, keep: np.ndarray, labels: np.ndarray | None = None) -> MultiLabelSplit:
        return dataclasses.replace(self, labels=self.labels[keep] if labels is None else labels,
                                   paths=None if self.paths is None else self.paths[keep])

    def relabel(self, label_map: np.ndarray) -> MultiLabelSplit:
        """Keep the classes mapped to 0..k-1, in that order (every image is kept, perhaps with no label left)."""
        kept = np.flatnonzero(label_map >= 0)
        return dataclasses.replace(self, labels=self.labels[:, kept[np.argsort(label_map[kept])]])

    def label_counts(self, num_classes: int) -> np.ndarray:
        return self.labels.sum(axis=0)


def load(config: DataConfig, process_count: int) -> Source:
    """The folder's train and validation splits, with notes on the layout and the files skipped."""
    root = Path(config.dataset).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {config.dataset!r} does not exist")
    split_files = _split_files(root)
    if split_files is not None:
        train_rows, val_rows = (_read(path) for path in split_files)
        notes = [f"multi-label folder {root}: {split_files[0].relative_to(root)} and "
                 f"{split_files[1].relative_to(root)}"]
    elif (root / LABELS_FILE).is_file():
        rows = _read(root / LABELS_FILE)
        train_rows, val_rows = _hold_out(rows, config.val_fraction)
        notes = [f"multi-label folder {root}: held out {len(val_rows)} of {len(rows)} images for validation "
                 f"({config.val_fraction:.0%}, split seed {SPLIT_SEED})"]
    else:
        raise DataError(f"folder {root}: --multi-label needs {root / LABELS_FILE} (lines file,label;label;...) or "
                        f"train/{LABELS_FILE} and val/{LABELS_FILE}")
    class_names = tuple(sorted({label for _, labels in train_rows + val_rows for label in labels}))
    if len(class_names) < 2:
        raise DataError(f"folder {root}: {len(class_names)} class(es) in its {LABELS_FILE}; a classifier needs at "
                        f"least 2")
    (train, skipped_train), (val, skipped_val) = (_split(rows, class_names, config.in_chans)
                                                  for rows in (train_rows, val_rows))
    return folder_source(root, class_names, train, val, notes, skipped_train + skipped_val)


def _split_files(root: Path) -> tuple[Path, Path] | None:
    train = root / "train" / LABELS_FILE
    val = next((root / d / LABELS_FILE for d in VAL_DIRS if (root / d / LABELS_FILE).is_file()), None)
    return (train, val) if train.is_file() and val is not None else None


def _read(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(file path, labels)`` per line of a ``labels.csv``; a malformed line is a ``DataError`` naming it."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            for number, row in enumerate(csv.reader(file), start=1):
                if not row or (number == 1 and tuple(c.strip().lower() for c in row) == HEADER):
                    continue
                if len(row) != 2 or not row[0].strip():
                    raise DataError(f"{path}:{number}: expected file,label;label;... got {','.join(row)!r}")
                labels = tuple(sorted({x.strip() for x in row[1].split(LABEL_SEPARATOR) if x.strip()}))
                rows.append((str(path.parent / row[0].strip()), labels))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    return rows


def _hold_out(rows: list, fraction: float) -> tuple[list, list]:
    """A seeded random ``fraction`` of the rows held out (at least one, never all)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:count].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _split(rows: list, class_names: tuple[str, ...], in_chans: int) -> tuple[MultiLabelSplit, list[str]]:
    """The readable rows as a split of multi-hot labels; the unreadable files, with why."""
    problems = file_problems([path for path, _ in rows], in_chans)
    good = [row for row, problem in zip(rows, problems, strict=True) if problem is None]
    skipped = [f"{path} ({problem})" for (path, _), problem in zip(rows, problems, strict=True) if problem]
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.zeros((len(good), len(class_names)), np.int32)
    for i, (_, names) in enumerate(good):
        labels[i, [index[n] for n in names]] = 1
    paths = np.array([p for p, _ in good], dtype=object).astype(str) if good else np.zeros(0, str)
    return MultiLabelSplit(labels, paths=paths, channels=in_chans), skipped
