"""Source ``'digits'``: scikit-learn's 1797 handwritten digits (8x8, embedded in scikit-learn), as RGB (or, with
``in_chans=1``, grayscale) images in memory; a run that needs no download and no data folder."""

from __future__ import annotations

import numpy as np

from jaxnets.data.config import DIGITS, DataConfig
from jaxnets.data.indexed import IndexedSplit
from jaxnets.data.labels import SPLIT_SEED, held_out
from jaxnets.data.split import Source
from jaxnets.data.transforms import check_channels


def recognizes(config: DataConfig) -> bool:
    return config.dataset == DIGITS


def load(config: DataConfig, process_count: int) -> Source:
    """The digits, ``config.val_fraction`` of each class held out for validation."""
    from sklearn.datasets import load_digits

    check_channels(1, config.in_chans, "the digits (grayscale)")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], config.in_chans, axis=-1)  # gray as RGB, as PIL's convert("RGB")
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = held_out(labels, config.val_fraction)
    class_names = tuple(str(c) for c in digits.target_names)
    kind = "RGB" if config.in_chans == 3 else "grayscale"
    notes = [f"digits: scikit-learn's 1797 8x8 handwritten digits as {kind}; held out {len(val_idx)} for validation "
             f"({config.val_fraction:.0%} of each class, split seed {SPLIT_SEED})"]
    return Source(DIGITS, class_names, IndexedSplit(labels[train_idx], images[train_idx]),
                  IndexedSplit(labels[val_idx], images[val_idx]), notes)
