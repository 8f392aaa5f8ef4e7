"""Source: any TFDS image-classification dataset with (image, label) supervised keys, prepared in
``config.data_dir`` or downloaded and prepared there. Streamed: each process reads its own sub-split
(``tfds.split_for_jax_process``). Without a validation split, the first ``val_fraction`` of train is held out.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxnets.data.config import DataConfig, DataError
from jaxnets.data.labels import SPLIT_SEED
from jaxnets.data.lazy_tf import tf
from jaxnets.data.split import Shard, Source
from jaxnets.data.streamed import StreamedSplit
from jaxnets.data.transforms import check_channels, to_channels
from jaxnets.errors import did_you_mean, first_line

_TFDS_HOST = "storage.googleapis.com"  # TFDS's prepared copies, and the source of many of its datasets


def recognizes(config: DataConfig) -> bool:
    """Any name: TFDS is the last source asked, and says whether it knows the name."""
    return True


@dataclass
class TfdsSplit(StreamedSplit):
    """One TFDS split (string with slicing), streamed; ``host_sizes[p]`` examples for process p."""

    builder: object
    split: str
    host_sizes: list[int]
    label_map: np.ndarray | None = None  # original label -> new label, -1 to drop
    channels: int = 3  # what the images are converted to (transforms.to_channels)
    multi_hot: int = 0  # a multi-label dataset's class count: its label sequences become multi-hot rows

    def host_dataset(self, shard: Shard) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        split = tfds.split_for_jax_process(self.split, process_index=shard.index, process_count=shard.count)
        read_config = tfds.ReadConfig(shuffle_seed=SPLIT_SEED, interleave_cycle_length=1)
        ds = self.builder.as_dataset(split=split, shuffle_files=False, as_supervised=True, read_config=read_config)
        ds = ds.map(lambda image, label: (to_channels(image, self.channels), self._label(label)))
        if self.label_map is not None:
            table = tf.constant(self.label_map, tf.int32)
            ds = ds.map(lambda image, label: (image, tf.gather(table, label))).filter(lambda _, label: label >= 0)
        return ds

    def _label(self, label: tf.Tensor) -> tf.Tensor:
        """A class index, or (multi-label) a sequence of them as a multi-hot int32 row."""
        label = tf.cast(label, tf.int32)
        if not self.multi_hot:
            return label
        return tf.minimum(tf.reduce_sum(tf.one_hot(label, self.multi_hot, dtype=tf.int32), axis=0), 1)

    def relabel(self, label_map: np.ndarray) -> TfdsSplit:
        if self.multi_hot:
            raise DataError(f"TFDS {self.builder.name}: --classes does not apply to multi-label data")
        return TfdsSplit(self.builder, self.split, self._count_kept(label_map), label_map, self.channels)

    def _count_kept(self, label_map: np.ndarray) -> list[int]:
        """Examples per process after a class filter: one pass over the labels (images are not decoded)."""
        import tensorflow_datasets as tfds

        label_key = self.builder.info.supervised_keys[1]
        counts = []
        for p in range(len(self.host_sizes)):
            host_split = tfds.split_for_jax_process(self.split, process_index=p, process_count=len(self.host_sizes))
            ds = self.builder.as_dataset(split=host_split, shuffle_files=False,
                                         decoders=tfds.decode.PartialDecoding({label_key: True}))
            labels = np.fromiter((ex[label_key] for ex in ds.as_numpy_iterator()), np.int64)
            counts.append(int(np.sum(label_map[labels] >= 0)))
        return counts


def load(config: DataConfig, process_count: int) -> Source:
    """The TFDS dataset ``config.dataset``, prepared first if it is not (a ``DataError`` saying why, when that
    fails), with its validation split or a held-out part of train."""
    import tensorflow_datasets as tfds

    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except Exception:  # noqa: BLE001 - tfds raises many types for an unknown name (cifar-10: a ValueError)
        raise DataError(f"unknown dataset {name!r}: not 'digits', not an existing folder, and not a TFDS dataset"
                        f"{_did_you_mean(name)}") from None
    if not builder.info.supervised_keys:
        raise DataError(f"TFDS dataset {name!r} has no (image, label) supervised keys")
    if not _is_prepared(builder):
        # A manual-download dataset (ImageNet) prepares from local files: no network needed, none checked.
        offline = None if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else _offline_reason()
        reason = offline or _download_and_prepare(builder)
        if reason:
            raise DataError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and could not be "
                            f"downloaded ({reason}); prepare it there"
                            + ("" if config.data_dir else " or pass --data-dir where it is prepared"))
    image_feature = builder.info.features[builder.info.supervised_keys[0]]
    shape = getattr(image_feature, "shape", None)
    check_channels(shape[-1] if shape else None, config.in_chans, f"TFDS {name}'s images {tuple(shape or ())}")
    splits = builder.info.splits
    class_names, multi_label = _classes(builder.info.features[builder.info.supervised_keys[1]])
    if multi_label != config.multi_label:
        raise DataError(f"TFDS dataset {name!r}: " + ("its labels are sequences of classes (multi-label): pass "
                                                      "--multi-label" if multi_label else
                                                      "--multi-label needs labels that are sequences of classes; "
                                                      "its label is one class per image"))
    if "validation" in splits:
        train_split, val_split = "train", "validation"
        notes = [f"TFDS {name}: train / validation splits"]
    else:
        percent = round(100 * config.val_fraction)
        train_split, val_split = f"train[{percent}%:]", f"train[:{percent}%]"
        notes = [f"TFDS {name}: no validation split; held out the first {percent}% of train ({val_split})"]
    multi_hot = len(class_names) if multi_label else 0
    return Source(name, class_names, _tfds_split(builder, train_split, process_count, config.in_chans, multi_hot),
                  _tfds_split(builder, val_split, process_count, config.in_chans, multi_hot), notes)


def _did_you_mean(name: str) -> str:
    """``'; did you mean cifar10?'`` for ``cifar-10``: the TFDS datasets spelled closest to ``name`` (its part
    before a config or version), or nothing."""
    import tensorflow_datasets as tfds

    try:
        known = tfds.list_builders(with_community_datasets=False)
    except Exception:  # noqa: BLE001 - a suggestion is a courtesy: never the error itself
        return ""
    return did_you_mean(name.split("/")[0].split(":")[0], known, cutoff=0.75)


def _classes(label_feature) -> tuple[tuple[str, ...], bool]:
    """The class names of a label feature, and whether it is multi-label (a ``Sequence`` of ``ClassLabel``)."""
    import tensorflow_datasets as tfds

    if isinstance(label_feature, tfds.features.Sequence):
        return tuple(label_feature.feature.names), True
    return tuple(label_feature.names), False


def _offline_reason() -> str | None:
    """Why no download can start, found in a moment rather than after tfds's retries (ten per file with
    growing waits: 3.5 minutes offline). Only the plain case is decided here: no proxy is set (environment
    or system settings, as ``requests`` finds them) and the TFDS host's name does not resolve; anything
    else is left to tfds to try."""
    if urllib.request.getproxies():
        return None
    try:
        socket.getaddrinfo(_TFDS_HOST, 443)
    except socket.gaierror as error:
        return f"no network: {_TFDS_HOST} does not resolve ({error.strerror}) and no proxy is set"
    return None


def _download_and_prepare(builder) -> str | None:
    """tfds's download and preparation; the first line of its error, if it fails."""
    try:
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - network, manual-download and format errors alike
        return first_line(error)[:200]
    return None


def _is_prepared(builder) -> bool:
    try:
        with _no_absl_warning("has no dataset_info.json"):
            return bool(builder.is_prepared())
    except AttributeError:  # older tfds
        return Path(builder.data_dir, "dataset_info.json").exists()


@contextlib.contextmanager
def _no_absl_warning(text: str) -> Iterator[None]:
    """Without tfds's log records containing ``text`` (through absl's logger): asked whether a dataset is prepared,
    tfds warns "Variant folder ... has no dataset_info.json" even where no folder exists, a misleading line
    above the download, or the error saying the dataset is not prepared, that follows."""
    logger = logging.getLogger("absl")

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _tfds_split(builder, split: str, process_count: int, channels: int, multi_hot: int = 0) -> TfdsSplit:
    import tensorflow_datasets as tfds

    host_splits = [tfds.split_for_jax_process(split, process_index=p, process_count=process_count)
                   for p in range(process_count)]
    return TfdsSplit(builder, split, [_tfds_size(builder, s) for s in host_splits], channels=channels,
                     multi_hot=multi_hot)


def _tfds_size(builder, split) -> int:
    """Examples in a (sub)split: from the dataset info, else the dataset's cardinality (mock data)."""
    try:
        return builder.info.splits[split].num_examples
    except KeyError:
        cardinality = int(builder.as_dataset(split=split).cardinality())
        if cardinality < 0:
            raise DataError(f"TFDS dataset {builder.name!r}: size of split {split} unknown") from None
        return cardinality
