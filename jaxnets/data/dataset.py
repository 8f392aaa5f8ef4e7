"""``Dataset``: a train and a validation ``Split`` for this process, batched, augmented and evaluated the same
way whatever the source, through the ``Split`` interface only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from jaxnets.data.config import DataConfig
from jaxnets.data.lazy_tf import tf
from jaxnets.data.split import Shard, Split, epoch_seed
from jaxnets.data.transforms import augmentation, eval_transform
from jaxnets.errors import UserError

Batch = dict[str, np.ndarray]


@dataclass
class Dataset:
    """A train and a validation split for this process, and how to batch them.

    ``train_batches(epoch, start_step)`` yields this process's share of each global training batch
    (``{'image': float32 NHWC, 'label': int32}``); ``eval_batches(split)`` covers the whole split, the
    last batch padded, with a ``mask`` of real examples.
    """

    name: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    config: DataConfig
    process_index: int = 0
    process_count: int = 1
    notes: list[str] = field(default_factory=list)  # how the data was split / cleaned: for the log

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shard(self) -> Shard:
        return Shard(self.process_index, self.process_count)

    @property
    def local_batch_size(self) -> int:
        return self.shard.local(self.config.batch_size)

    @property
    def local_eval_batch_size(self) -> int:
        return self.shard.local(self._eval_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.train.steps_per_epoch(self.config.batch_size, self.shard)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The rest of epoch ``epoch`` from ``start_step``: full batches only (the remainder is dropped,
        and is a different sample each epoch)."""
        cfg = self.config
        ds = self.train.train_examples(cfg.batch_size, self.shard, cfg.seed, epoch, start_step)
        augment = augmentation(cfg, epoch_seed(cfg.seed, epoch))
        ds = ds.map(lambda image, label, pos: {"image": augment(image, pos), "label": label},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _numpy(ds.batch(self.local_batch_size, drop_remainder=True))

    def eval_batches(self, split: str = "val") -> Iterator[Batch]:
        """Every example of ``split`` ('train' or 'val') once, eval-transformed; padded batches with ``mask``.
        Every process yields the same number of batches (the compiled step is collective)."""
        ds = self._split(split).eval_examples(self._eval_batch_size, self.shard)
        transform = eval_transform(self.config)
        ds = ds.map(lambda image, label, m: {"image": transform(image), "label": label, "mask": m},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _numpy(ds.batch(self.local_eval_batch_size))

    def iterate(self, split: str = "train", train: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(images, labels)`` of every example of ``split`` on this process, without padding: what a
        linear probe or feature extractor consumes. ``train=True`` gives one augmented epoch instead."""
        if train:
            for batch in self.train_batches(epoch=0):
                yield batch["image"], batch["label"]
            return
        for batch in self.eval_batches(split):
            keep = batch["mask"]
            if keep.any():
                yield batch["image"][keep], batch["label"][keep]

    @property
    def _eval_batch_size(self) -> int:
        return self.config.eval_batch_size or self.config.batch_size

    def _split(self, split: str) -> Split:
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def _numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(2).as_numpy_iterator()
