"""The interface between the data sources and ``Dataset``: a ``Split`` is one split's examples as ``tf.data``
datasets of images (pixel values 0..255: uint8, or float32 for ``.npy`` arrays; the channels the model takes),
whatever their origin; a ``Source`` is what a source's loader gives for a dataset.

``Dataset`` batches, augments and evaluates through this interface only, so a new kind of split (a Hugging
Face ``datasets`` split, tar shards, ...) implements these methods and needs no change elsewhere. Two kinds
exist: ``IndexedSplit`` (examples addressable by index) and ``StreamedSplit`` (a stream per process).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from jaxnets.data.lazy_tf import tf


@dataclass(frozen=True)
class Shard:
    """This process's place among all the processes: each loads its own slice of every global batch."""

    index: int = 0
    count: int = 1

    def local(self, global_batch: int) -> int:
        """This process's share of a global batch."""
        return global_batch // self.count


class Split(ABC):
    """One split of a dataset, as the input pipeline reads it. Batch sizes are global (all processes)."""

    @abstractmethod
    def __len__(self) -> int:
        """Examples in the split, all processes together."""

    @abstractmethod
    def steps_per_epoch(self, batch_size: int, shard: Shard) -> int:
        """Global batches of ``batch_size`` in one training epoch; the same on every process."""

    @abstractmethod
    def train_examples(self, batch_size: int, shard: Shard, seed: int, epoch: int, start_step: int) -> tf.data.Dataset:
        """``(image (h, w, channels), int32 label, int64 position)`` of this process's share of every global
        batch of epoch ``epoch`` from step ``start_step``, in batch order, a deterministic function of
        ``(seed, epoch)``. ``position`` seeds the example's augmentation: distinct within the epoch, also
        across processes, and the same whatever ``start_step`` is. ``image`` may also be an image file's path
        (a string scalar, ``IndexedSplit``'s files): the augmentation (``transforms.augmentation``) then decodes
        only its crop window."""

    @abstractmethod
    def eval_examples(self, batch_size: int, shard: Shard) -> tf.data.Dataset:
        """``(image, int32 label, bool mask)``: every example of the split once over all processes
        (``mask`` True), padded with masked fillers to the same number of local batches on every process:
        the compiled evaluation step is collective."""

    @abstractmethod
    def relabel(self, label_map: np.ndarray) -> Split:
        """The split with each label ``l`` replaced by ``label_map[l]``, examples mapped to -1 dropped."""

    def label_counts(self, num_classes: int) -> np.ndarray | None:
        """Examples per label, or None when only a pass over the data could tell (every class is then taken
        to be present)."""
        return None


@dataclass
class Source:
    """What a source's loader gives for a dataset: its name, class names, splits and notes for the log."""

    name: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    notes: list[str] = field(default_factory=list)  # how the data was split / cleaned


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s random draws (shuffle buffer, augmentation) for run seed ``seed``."""
    return int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))
