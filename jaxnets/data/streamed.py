"""Splits read as streams: each process reads only its own sub-split, in a fixed order, and shuffles one pass of
it with a buffer seeded by ``(seed, epoch)``: an epoch sees each example at most once (the remainder past the last
whole batch is dropped). The order is deterministic too, but depends on the number of processes.
"""

from __future__ import annotations

from abc import abstractmethod

from jaxnets.data.lazy_tf import tf
from jaxnets.data.split import Shard, Split, epoch_seed

SHUFFLE_BUFFER = 16_384


class StreamedSplit(Split):
    """A split streamed per process; ``host_sizes[p]`` examples for process p. A subclass says where a
    process's examples come from (``host_dataset``); batching them is common to every stream."""

    host_sizes: list[int]

    @abstractmethod
    def host_dataset(self, shard: Shard) -> tf.data.Dataset:
        """``(uint8 image (h, w, channels), int32 label)`` of this process's sub-split, in a fixed order."""

    def __len__(self) -> int:
        return sum(self.host_sizes)

    def steps_per_epoch(self, batch_size: int, shard: Shard) -> int:
        return min(self.host_sizes) // shard.local(batch_size)

    def train_examples(self, batch_size: int, shard: Shard, seed: int, epoch: int, start_step: int) -> tf.data.Dataset:
        local = shard.local(batch_size)
        # One pass over this process's examples, reshuffled each epoch: each example at most once (a pass repeated
        # before the shuffle, with a buffer larger than the split, would draw some twice and miss others). Every
        # process has at least steps_per_epoch local batches, so cutting each pass there keeps the processes in step.
        buffer = max(1, min(SHUFFLE_BUFFER, self.host_sizes[shard.index]))
        ds = self.host_dataset(shard).shuffle(buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
        ds = ds.take(self.steps_per_epoch(batch_size, shard) * local).enumerate().skip(start_step * local)
        # Per-example seed from its position in this process's stream, distinct across processes.
        return ds.map(lambda pos, ex: (ex[0], ex[1], pos * shard.count + shard.index))

    def eval_examples(self, batch_size: int, shard: Shard) -> tf.data.Dataset:
        local = shard.local(batch_size)
        num_batches = -(-max(self.host_sizes) // local)
        ds = self.host_dataset(shard).map(lambda image, label: (image, label, True))
        filler = ds.take(1).map(lambda image, label, _: (image, label, False)).repeat()
        return ds.concatenate(filler).take(num_batches * local)
