"""What the evaluation reads: one split of a dataset (``jaxnets.data``, as ``train.py`` reads it), its labels
mapped to the model's outputs, as padded and masked batches for this process, preprocessed either by
torchvision's PIL pipeline (``jaxnets.data.pil_eval``, in threads) or by ``train.py``'s tf.data one.

Every example is in exactly one global batch; the last one is padded with masked fillers, so nothing is
dropped and nothing counts twice, and every process yields the same number of batches (the compiled step is
collective). Global batch ``b`` holds examples ``b * B ... b * B + B - 1`` of an indexed split (a folder, the
digits); process ``p`` loads its columns ``p * B/P ...`` of each.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets.data import (
    VAL_DIRS,
    DataConfig,
    DataError,
    Dataset,
    IndexedSplit,
    Shard,
    Split,
    TfdsSplit,
    load_dataset,
    pil_eval,
)
from jaxnets.data.indexed import padded_layout
from jaxnets.data.labels import SPLIT_SEED
from jaxnets.eval_transform import EvalTransform

PREPROCESS = ("torchvision", "tf")
PIL_CHANNELS = 3  # --preprocess torchvision reads RGB images, as torchvision's folder loader does
SPLITS = ("val", "train", "all")
Batch = dict[str, np.ndarray]


@dataclass
class EvalData:
    """One split to evaluate, its labels already the model's output indices (examples of classes the model
    does not know are dropped, and said so in ``notes``)."""

    name: str
    split_name: str
    split: Split
    dataset: Dataset  # the tf.data path batches through it; its config has the transform and the batch size
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shard(self) -> Shard:
        return self.dataset.shard

    @property
    def global_batch(self) -> int:
        return self.dataset.config.eval_batch_size

    def num_batches(self) -> int:
        """Global batches of the pass: the same on every process."""
        local = self.shard.local(self.global_batch)
        if isinstance(self.split, IndexedSplit):
            return -(-len(self.split) // (local * self.shard.count))
        return -(-max(self.split.host_sizes) // local)

    def describe(self, index: int) -> str | None:
        """The file of example ``index`` (its place in the pass), where the split has files."""
        paths = getattr(self.split, "paths", None)
        return str(paths[index]) if paths is not None and index < len(paths) else None

    def source(self, index: int) -> Any:
        """The original image of example ``index`` (its place in the pass): its file, or its decoded pixels
        (H, W, channels); None for a split read as a stream (TFDS), whose examples have no place to return to."""
        split = self.split
        if not isinstance(split, IndexedSplit):
            return None
        return split.paths[index] if split.paths is not None else split.images[index]

    def batches(self, preprocess: str, transform: EvalTransform, workers: int,
                kind: str = "process") -> Iterator[Batch]:
        """This process's share of every global batch: ``{'image', 'label', 'mask'}``; ``workers`` processes or
        threads (``kind``) decode for ``--preprocess torchvision``, which reads RGB images only: a model of
        other ``in_chans`` (the transform's channel count) is evaluated through ``train.py``'s pipeline."""
        if preprocess != "tf" and transform.in_chans != PIL_CHANNELS:
            raise DataError(f"--preprocess torchvision reads RGB images; this model takes in_chans="
                            f"{transform.in_chans} channels: use --preprocess tf")
        if preprocess == "tf":
            if transform.interpolation != "bilinear" or transform.crop_mode != "center":
                raise DataError(f"--preprocess tf resizes the shorter side bilinearly and crops the center only; "
                                f"these weights are evaluated with {transform.interpolation} interpolation, crop mode "
                                f"{transform.crop_mode}: use --preprocess torchvision")
            return dataclasses.replace(self.dataset, val=self.split).eval_batches("val")
        return _pil_batches(self._sources(), transform, self.shard.local(self.global_batch), self.num_batches(),
                            workers, kind)

    def _sources(self) -> Iterator[tuple[Any, int, bool]]:
        """``(image source, label, real)`` of this process's examples in batch order, fillers included."""
        split, shard = self.split, self.shard
        if isinstance(split, IndexedSplit):
            local = shard.local(self.global_batch)
            index, mask = padded_layout(len(split), local, shard)
            items = split.paths if split.paths is not None else split.images
            return ((items[i], int(split.labels[i]), bool(m)) for i, m in zip(index, mask, strict=True))
        if isinstance(split, TfdsSplit):
            stream = ((data, label, True) for data, label in _tfds_encoded(split, shard))
            return _padded_stream(stream, self.num_batches() * shard.local(self.global_batch))
        raise DataError(f"--preprocess torchvision reads image files, digits and TFDS datasets; "
                        f"{type(split).__name__} is none of them: use --preprocess tf")


def _padded_stream(stream: Iterator[tuple[Any, int, bool]], length: int) -> Iterator[tuple[Any, int, bool]]:
    """``stream`` padded to ``length`` with its first example, masked (a stream's length is only known per
    process; every process pads to the longest)."""
    first = None
    count = 0
    for item in stream:
        if first is None:
            first = item
        count += 1
        yield item
    if first is None and length:
        raise DataError("this process has no examples to evaluate")
    for _ in range(length - count):
        yield first[0], first[1], False


def _tfds_encoded(split: TfdsSplit, shard: Shard) -> Iterator[tuple[bytes, int]]:
    """This process's TFDS examples as the encoded image files (PIL decodes them, as torchvision decodes the
    original files) and their labels, in ``TfdsSplit.host_dataset``'s order."""
    import tensorflow_datasets as tfds

    image_key = split.builder.info.supervised_keys[0]
    sub = tfds.split_for_jax_process(split.split, process_index=shard.index, process_count=shard.count)
    ds = split.builder.as_dataset(split=sub, shuffle_files=False, as_supervised=True,
                                  read_config=tfds.ReadConfig(shuffle_seed=SPLIT_SEED, interleave_cycle_length=1),
                                  decoders={image_key: tfds.decode.SkipDecoding()})
    for data, label in ds.as_numpy_iterator():
        label = int(label) if split.label_map is None else int(split.label_map[label])
        if label >= 0:
            yield data, label


def _pil_batches(sources: Iterator[tuple[Any, int, bool]], transform: EvalTransform, local: int, num_batches: int,
                 workers: int, kind: str) -> Iterator[Batch]:
    """Local batches of PIL-preprocessed images, loaded by ``workers`` processes or threads (``kind``) a few
    batches ahead."""
    loaded = pil_eval.ordered_map(partial(pil_eval.load_example, transform=transform), sources, workers,
                                  ahead=max(2 * local, 4 * workers), kind=kind)
    crop = transform.crop_size
    for _ in range(num_batches):
        images = np.empty((local, crop, crop, PIL_CHANNELS), np.float32)
        labels, mask = np.zeros(local, np.int32), np.zeros(local, bool)
        for row, (image, label, real) in enumerate(itertools.islice(loaded, local)):
            images[row], labels[row], mask[row] = image, label, real
        yield {"image": images, "label": labels, "mask": mask}


# --- from a dataset name to the split to evaluate ------------------------------------------------------


def load_eval_data(dataset: str, data_dir: str | None, split: str | None, transform: EvalTransform,
                   global_batch: int, outputs: Sequence[Sequence[str]], shard: Shard | None = None,
                   val_fraction: float = DataConfig.val_fraction) -> EvalData:
    """The split ``split`` of ``dataset`` (as ``train.py`` reads it), labels mapped to the model's outputs.

    ``split`` None is the validation split where the dataset has one (a folder's ``val/``, TFDS
    ``validation``, the digits' held-out part), and every image of a folder without one (ImageNet's val
    layout: class folders only). ``val_fraction``: what a dataset without a validation split holds out of its
    training images, as ``train.py --val-fraction`` (``jaxnets.data``'s one rule: the same images for the same
    fraction). ``outputs[i]`` are the names output ``i`` answers to (ImageNet's: its WordNet id and its name)."""
    shard = shard or Shard()
    if split is not None and split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=transform.crop_size,
                        val_resize_size=transform.resize_size, in_chans=transform.in_chans, mean=transform.mean,
                        std=transform.std,
                        batch_size=shard.count, eval_batch_size=global_batch, val_fraction=val_fraction)
    data = load_dataset(config, shard.index, shard.count)
    folder = Path(dataset).expanduser()
    flat_folder = folder.is_dir() and not any((folder / d).is_dir() for d in VAL_DIRS)
    split = split or ("all" if flat_folder else "val")
    notes = list(data.notes)
    if split == "all":
        if not (isinstance(data.train, IndexedSplit) and isinstance(data.val, IndexedSplit)):
            raise DataError(f"--split all: {data.name} is streamed (TFDS); evaluate its val or train split")
        chosen = _merged(data.train, data.val)
        # The source's first note says how it held out validation images, which --split all takes back.
        notes = [f"{data.name}: all {len(chosen)} images", *notes[1:]]
    else:
        chosen = data.train if split == "train" else data.val
    label_map, mapping_notes = map_classes(data.class_names, outputs)
    if not np.array_equal(label_map, np.arange(len(label_map))):  # relabelling a TFDS split reads every label
        chosen = chosen.relabel(label_map)
    return EvalData(data.name, split, chosen, data, notes + mapping_notes)


def _merged(a: IndexedSplit, b: IndexedSplit) -> IndexedSplit:
    """Both splits in one, in ``ImageFolder``'s order (class, then file) where they are files."""
    labels = np.concatenate([a.labels, b.labels])
    if a.paths is not None and b.paths is not None:
        paths = np.concatenate([a.paths, b.paths])
        order = np.lexsort((paths, labels))
        return IndexedSplit(labels[order], paths=paths[order], channels=a.channels)
    return IndexedSplit(labels, images=np.concatenate([a.images, b.images]), channels=a.channels)


def map_classes(class_names: Sequence[str], outputs: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Dataset label -> model output index (-1: a class the model does not know, whose images are left out).

    A class folder named ``n01440764`` is ImageNet's output 0 whatever the other folders are: classes are
    matched by name (for ImageNet weights: WordNet id or category name, where unique); when no name matches
    and the counts agree, by position (with a note); otherwise it is an error naming both sides."""
    known: dict[str, int] = {}
    ambiguous: set[str] = set()
    for index, names in enumerate(outputs):
        for name in dict.fromkeys(names):
            if name in known and known[name] != index:
                ambiguous.add(name)
            known.setdefault(name, index)
    lookup = {name: index for name, index in known.items() if name not in ambiguous}
    mapped = np.array([lookup.get(name, -1) for name in class_names], np.int32)
    matched = int(np.sum(mapped >= 0))
    if matched == len(class_names):
        return mapped, [f"classes matched to the model's outputs by name ({matched} of {len(outputs)})"]
    if matched:
        missing = [name for name, index in zip(class_names, mapped, strict=True) if index < 0]
        return mapped, [f"left out the images of {len(missing)} class(es) the model does not know: "
                        f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}"]
    if len(class_names) == len(outputs):
        return np.arange(len(class_names), dtype=np.int32), [
            f"warning: no class name of the dataset is one of the model's; matched its {len(class_names)} "
            f"classes to the model's outputs by position"]
    raise DataError(f"the dataset's {len(class_names)} classes ({', '.join(class_names[:5])}, ...) match none of "
                    f"the model's {len(outputs)} outputs ({', '.join(outputs[0][:1])}, ...) by name, and their "
                    f"numbers differ")
