"""Rules about labels that hold for every source: the ``--classes`` filter, the two-class minimum, and the
stratified held-out split of a dataset without a validation split."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxnets.data.config import DataConfig, DataError
from jaxnets.data.split import Source

SPLIT_SEED = 0  # held-out splits are fixed, whatever --seed is, so runs with different seeds compare


def keep_classes(source: Source, classes: tuple[int, ...]) -> Source:
    """``source`` with the labels ``classes`` only, remapped to 0..k-1 in the order given."""
    class_names = source.class_names
    bad = [c for c in classes if c >= len(class_names)]
    if bad:
        raise DataError(f"--classes {','.join(map(str, bad))}: the dataset has {len(class_names)} classes "
                        f"(labels 0..{len(class_names) - 1})")
    label_map = np.full(len(class_names), -1, np.int32)
    label_map[list(classes)] = np.arange(len(classes))
    notes = [*source.notes, f"kept classes {','.join(map(str, classes))} as labels 0..{len(classes) - 1}"]
    return dataclasses.replace(source, class_names=tuple(class_names[c] for c in classes),
                               train=source.train.relabel(label_map), val=source.val.relabel(label_map), notes=notes)


def check_classes(config: DataConfig, source: Source) -> list[str]:
    """Refuse fewer than two classes with training images: a one-class run has loss 0 and top-1 100 % from
    the first step and looks like a success. Returns a warning naming classes that have no training images."""
    class_names = source.class_names
    counts = source.train.label_counts(len(class_names))
    present = list(class_names) if counts is None else [
        name for name, count in zip(class_names, counts, strict=True) if count]
    if len(present) < 2:
        kept = f" with --classes {','.join(map(str, config.classes))}" if config.classes is not None else ""
        raise DataError(f"dataset {config.dataset!r}{kept}: {len(present)} class(es) with training images "
                        f"({', '.join(present) or 'none'}); a classifier needs at least 2")
    missing = [name for name in class_names if name not in set(present)]
    return [f"warning: no training images for class(es) {', '.join(missing)}"] if missing else []


def held_out(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded split of indices: ``fraction`` of each class held out, at least one, but never
    a class's last image (a class with one image trains and is not validated)."""
    rng = np.random.default_rng(SPLIT_SEED)
    val = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        val.extend(members[:min(len(members) - 1, max(1, round(fraction * len(members))))])
    val_mask = np.zeros(len(labels), bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
