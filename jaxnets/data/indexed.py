"""Splits whose examples are addressable by index: decoded images in memory, or image files.

One global shuffled order per epoch, a function of ``(seed, epoch)``, is cut into global batches and each
process loads only its slice of every batch, so the global batch is the same whatever the number of
processes, and a resumed run sees the same data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from jaxnets.data.arrays import ARRAY_EXTENSION
from jaxnets.data.lazy_tf import tf
from jaxnets.data.split import Shard, Split
from jaxnets.data.transforms import IMAGE_CHANNELS, decode_file


@dataclass
class IndexedSplit(Split):
    """Examples addressable by index: decoded images in memory, or image files. Training examples of files are
    their paths (``Split.train_examples``): the augmentation decodes them."""

    labels: np.ndarray  # int32 (n,)
    images: np.ndarray | None = None  # uint8 (n, h, w, channels)
    paths: np.ndarray | None = None  # str (n,)
    channels: int = 3  # what files are decoded to (transforms.decode_file)
    # Training yields image files' paths, of which the augmentation decodes only the crop window
    # (decodes_windows); False decodes whole files here first (the same batches: the benchmark's reference).
    window_decode: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray, labels: np.ndarray | None = None) -> IndexedSplit:
        return IndexedSplit(self.labels[keep] if labels is None else labels,
                            None if self.images is None else self.images[keep],
                            None if self.paths is None else self.paths[keep], self.channels, self.window_decode)

    def loader(self):
        """A tf function: index -> (image (h, w, channels), label)."""
        labels = tf.constant(self.labels, tf.int32)
        if self.images is not None:
            images = tf.constant(self.images)
            return lambda i: (tf.gather(images, i), tf.gather(labels, i))
        paths = tf.constant(self.paths)
        return lambda i: (decode_file(tf.gather(paths, i), self.channels), tf.gather(labels, i))

    @functools.cached_property
    def decodes_windows(self) -> bool:
        """Whether training yields paths, for the augmentation to decode their crop windows: image files only (1 or
        3 channels, no ``.npy`` array among them), unless ``window_decode`` is off."""
        return (self.window_decode and self.paths is not None and self.channels in IMAGE_CHANNELS
                and not np.char.endswith(np.char.lower(self.paths.astype(str)), ARRAY_EXTENSION).any())

    def steps_per_epoch(self, batch_size: int, shard: Shard) -> int:
        return len(self) // batch_size

    def train_examples(self, batch_size: int, shard: Shard, seed: int, epoch: int, start_step: int) -> tf.data.Dataset:
        steps = self.steps_per_epoch(batch_size, shard)
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        order = order[:steps * batch_size].reshape(steps, batch_size)
        positions = np.arange(order.size).reshape(order.shape)
        columns = _columns(batch_size, shard)
        index, position = order[start_step:, columns].ravel(), positions[start_step:, columns].ravel()
        if self.decodes_windows:
            return tf.data.Dataset.from_tensor_slices((self.paths[index], self.labels[index], position))
        return self._load(index, position)

    def eval_examples(self, batch_size: int, shard: Shard) -> tf.data.Dataset:
        return self._load(*padded_layout(len(self), shard.local(batch_size), shard))

    def relabel(self, label_map: np.ndarray) -> IndexedSplit:
        keep = label_map[self.labels] >= 0
        return self.subset(keep, label_map[self.labels][keep])

    def label_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def _load(self, index: np.ndarray, extra: np.ndarray) -> tf.data.Dataset:
        """``(image, label, extra)`` of the examples at ``index``, in order."""
        load = self.loader()
        ds = tf.data.Dataset.from_tensor_slices((index, extra))
        return ds.map(lambda i, x: (*load(i), x), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def padded_layout(size: int, local: int, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """``(example index, real)`` of this process's rows of every global batch (``local`` rows per process) over
    ``size`` examples: global batch ``b`` holds examples ``b * B ... b * B + B - 1``, the last one padded with
    masked fillers (example 0), so every example counts once and every process has the same number of batches.
    ``train.py``'s evaluation and ``jaxnets-evaluate``'s PIL pipeline both lay batches out so."""
    total = local * shard.count
    num_batches = -(-size // total)
    index = np.arange(num_batches * total)
    mask = index < size
    rows = np.where(mask, index, 0).reshape(num_batches, total)
    columns = _columns(local * shard.count, shard)
    return rows[:, columns].ravel(), mask.reshape(num_batches, total)[:, columns].ravel()


def _columns(batch_size: int, shard: Shard) -> slice:
    """This process's columns of a global batch."""
    local = shard.local(batch_size)
    return slice(shard.index * local, (shard.index + 1) * local)
