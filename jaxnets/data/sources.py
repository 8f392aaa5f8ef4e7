"""Which source reads a dataset, and ``load_dataset``: the one entry point from a ``DataConfig`` to this
process's ``Dataset``.

``SOURCES`` is asked in order; the first source whose recognizer accepts ``config.dataset`` loads it. A new
source (a Hugging Face ``datasets`` split, tar shards, ...) is a module with a recognizer and a loader
returning a ``Source`` of ``Split``s, and one line in this table.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxnets.data import digits, folder, multilabel_folder, tfds
from jaxnets.data.config import DataConfig, DataError, TooFewExamples, check_config
from jaxnets.data.dataset import Dataset
from jaxnets.data.labels import check_classes, keep_classes
from jaxnets.data.split import Source

Recognizer = Callable[[DataConfig], bool]
Loader = Callable[[DataConfig, int], Source]  # (config, process count) -> the dataset's splits

SOURCES: tuple[tuple[Recognizer, Loader], ...] = (
    (digits.recognizes, digits.load),  # 'digits'
    (multilabel_folder.recognizes, multilabel_folder.load),  # --multi-label: a folder with a labels.csv
    (folder.recognizes, folder.load),  # an existing folder, or a name that can only be a path
    (tfds.recognizes, tfds.load),  # any other name: last
)


def load_dataset(config: DataConfig, process_index: int = 0, process_count: int = 1, *,
                 index_dir: str | os.PathLike | None = None) -> Dataset:
    """Resolve ``config.dataset``: ``'digits'``, an existing folder, or a TFDS name (prepared in
    ``config.data_dir`` or downloadable). Raises ``DataError`` with a one-line reason. ``index_dir`` (a run's
    workdir): where a folder's scan is cached, so that a resumed run and the processes but the first skip it
    (``folder.cached_in``); None scans a folder on every load."""
    check_config(config)
    load = next((load for recognizes, load in SOURCES if recognizes(config)), None)
    if load is None:
        raise DataError(f"unknown dataset {config.dataset!r}: no data source recognizes it")
    with folder.cached_in(index_dir):
        source = load(config, process_count)
    if config.classes is not None:
        source = keep_classes(source, config.classes)
    notes = [*source.notes, *check_classes(config, source)]
    dataset = Dataset(source.name, source.class_names, source.train, source.val, config, process_index,
                      process_count, notes)
    if dataset.steps_per_epoch < 1:
        raise TooFewExamples(f"dataset {source.name!r}: {len(source.train)} training examples, fewer than one "
                             f"global batch of {config.batch_size}; lower --batch-size", len(source.train))
    return dataset
