"""Datasets -> ``tf.data`` pipelines -> per-host numpy batches.

Three sources: the embedded scikit-learn digits, any TFDS image-classification dataset, and a folder of
class subfolders. Digits and folders are *indexed*: one global shuffled order per epoch, a function of
``(seed, epoch)``, is cut into global batches and each process loads only its slice of every batch, so
the global batch is the same whatever the number of processes and a resumed run sees the same data.
TFDS datasets are *streamed*: each process reads only its own sub-split (``tfds.split_for_jax_process``)
and shuffles it with a buffer seeded by ``(seed, epoch)``; the order is deterministic too, but depends
on the number of processes.

Augmentation (random resized crop, horizontal flip) uses stateless random ops seeded per example, so
a batch's pixels do not depend on thread scheduling or on where the run was resumed. Evaluation is
torchvision's eval transform: resize the shorter side, center crop. TensorFlow only runs on the CPU.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jaxnets.errors import UserError


class _LazyTensorFlow:
    """``tensorflow``, imported on first use: importing it costs seconds, and torchvision imported after
    TensorFlow segfaults (clashing native libraries in torch 2.x + tf 2.2x), so a process that only
    defines datasets, or imports torchvision first, stays safe. TensorFlow never sees the GPUs."""

    _module = None

    def __getattr__(self, name: str):
        if _LazyTensorFlow._module is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import tensorflow

            tensorflow.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses
            _LazyTensorFlow._module = tensorflow
        return getattr(_LazyTensorFlow._module, name)


tf = _LazyTensorFlow()

Batch = dict[str, np.ndarray]

DIGITS = "digits"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")  # what decode_rgb reads
VAL_DIRS = ("val", "validation")
SPLIT_SEED = 0  # held-out splits are fixed, whatever --seed is, so runs with different seeds compare
SHUFFLE_BUFFER = 16_384


class DataError(UserError):
    """A dataset that cannot be used, with a one-line reason naming the dataset, folder or file."""


@dataclass(frozen=True)
class DataConfig:
    """What the input pipeline needs; batch sizes are global (all processes together)."""

    dataset: str = DIGITS
    data_dir: str | None = None
    image_size: int = 224
    resize_size: int | None = None  # eval: shorter side before the center crop; default image_size * 256/224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 64
    eval_batch_size: int | None = None  # default batch_size
    seed: int = 0
    val_fraction: float = 0.2  # held out of train when the dataset has no validation split
    classes: tuple[int, ...] | None = None  # keep these labels only, remapped to 0..k-1
    min_crop_scale: float = 0.08  # RandomResizedCrop scale=(min, 1)
    hflip: bool = True

    @property
    def eval_resize(self) -> int:
        return self.resize_size or round(self.image_size * 256 / 224)


def parse_classes(text: str) -> tuple[int, ...]:
    """``'0,1,2'``, ``'5-9'`` or ``'0-2,7'`` -> a tuple of labels, in the order given."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            labels.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise DataError(f"--classes {text!r}: expected comma-separated labels or ranges like 0,1,2 or 5-9") from None
    if not labels or len(set(labels)) != len(labels) or min(labels) < 0:
        raise DataError(f"--classes {text!r}: expected distinct non-negative labels")
    return tuple(labels)


# --- examples: where the pixels come from ----------------------------------------------------------


@dataclass
class IndexedSplit:
    """Examples addressable by index: decoded images in memory, or image files."""

    labels: np.ndarray  # int32 (n,)
    images: np.ndarray | None = None  # uint8 (n, h, w, 3)
    paths: np.ndarray | None = None  # str (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray, labels: np.ndarray | None = None) -> IndexedSplit:
        return IndexedSplit(self.labels[keep] if labels is None else labels,
                            None if self.images is None else self.images[keep],
                            None if self.paths is None else self.paths[keep])

    def loader(self):
        """A tf function: index -> (uint8 image (h, w, 3), label)."""
        labels = tf.constant(self.labels, tf.int32)
        if self.images is not None:
            images = tf.constant(self.images)
            return lambda i: (tf.gather(images, i), tf.gather(labels, i))
        paths = tf.constant(self.paths)
        return lambda i: (_decode_file(tf.gather(paths, i)), tf.gather(labels, i))


@dataclass
class TfdsSplit:
    """One TFDS split (string with slicing), streamed; ``host_sizes[p]`` examples for process p."""

    builder: object
    split: str
    host_sizes: list[int]
    label_map: np.ndarray | None = None  # original label -> new label, -1 to drop

    def __len__(self) -> int:
        return sum(self.host_sizes)

    def host_dataset(self, process_index: int, process_count: int) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        split = tfds.split_for_jax_process(self.split, process_index=process_index, process_count=process_count)
        read_config = tfds.ReadConfig(shuffle_seed=SPLIT_SEED, interleave_cycle_length=1)
        ds = self.builder.as_dataset(split=split, shuffle_files=False, as_supervised=True, read_config=read_config)
        ds = ds.map(lambda image, label: (_to_rgb(image), tf.cast(label, tf.int32)))
        if self.label_map is not None:
            table = tf.constant(self.label_map, tf.int32)
            ds = ds.map(lambda image, label: (image, tf.gather(table, label))).filter(lambda _, label: label >= 0)
        return ds


Split = IndexedSplit | TfdsSplit


# --- the dataset ---------------------------------------------------------------------------------


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
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.process_count

    @property
    def local_eval_batch_size(self) -> int:
        return (self.config.eval_batch_size or self.config.batch_size) // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        if isinstance(self.train, TfdsSplit):
            return min(self.train.host_sizes) // self.local_batch_size
        return len(self.train) // self.config.batch_size

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The rest of epoch ``epoch`` from ``start_step``: full batches only (the remainder is dropped,
        and is a different sample each epoch)."""
        epoch_seed = _epoch_seed(self.config.seed, epoch)
        steps, local = self.steps_per_epoch, self.local_batch_size
        if isinstance(self.train, TfdsSplit):
            ds = self.train.host_dataset(self.process_index, self.process_count).repeat()
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=epoch_seed, reshuffle_each_iteration=False)
            ds = ds.take(steps * local).enumerate().skip(start_step * local)
            # Per-example seed from its position in this process's stream, distinct across processes.
            ds = ds.map(lambda pos, ex: (ex[0], ex[1], pos * self.process_count + self.process_index))
        else:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train))
            order = order[:steps * self.config.batch_size].reshape(steps, self.config.batch_size)
            columns = slice(self.process_index * local, (self.process_index + 1) * local)
            positions = np.arange(order.size).reshape(order.shape)
            load = self.train.loader()
            ds = tf.data.Dataset.from_tensor_slices((order[start_step:, columns].ravel(),
                                                     positions[start_step:, columns].ravel()))
            ds = ds.map(lambda i, pos: (*load(i), pos), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        augment = self._augment(epoch_seed)
        ds = ds.map(lambda image, label, pos: {"image": augment(image, pos), "label": label},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _numpy(ds.batch(local, drop_remainder=True))

    def eval_batches(self, split: str = "val") -> Iterator[Batch]:
        """Every example of ``split`` ('train' or 'val') once, eval-transformed; padded batches with ``mask``.
        Every process yields the same number of batches (the compiled step is collective)."""
        source = self._split(split)
        local, total = self.local_eval_batch_size, self.local_eval_batch_size * self.process_count
        if isinstance(source, TfdsSplit):
            ds = source.host_dataset(self.process_index, self.process_count)
            num_batches = -(-max(source.host_sizes) // local)
            ds = ds.map(lambda image, label: (image, label, True))
            filler = ds.take(1).map(lambda image, label, _: (image, label, False)).repeat()
            ds = ds.concatenate(filler).take(num_batches * local)
        else:
            num_batches = -(-len(source) // total)
            index = np.arange(num_batches * total)
            mask = index < len(source)
            rows = np.where(mask, index, 0).reshape(num_batches, total)
            columns = slice(self.process_index * local, (self.process_index + 1) * local)
            load = source.loader()
            ds = tf.data.Dataset.from_tensor_slices((rows[:, columns].ravel(),
                                                     mask.reshape(num_batches, total)[:, columns].ravel()))
            ds = ds.map(lambda i, m: (*load(i), m), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        transform = self._eval_transform()
        ds = ds.map(lambda image, label, m: {"image": transform(image), "label": label, "mask": m},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _numpy(ds.batch(local))

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

    def _split(self, split: str) -> Split:
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def _augment(self, epoch_seed: int):
        cfg = self.config

        def augment(image: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
            seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(position, tf.int64)])
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            image = random_resized_crop(image, cfg.image_size, crop_seed, scale=(cfg.min_crop_scale, 1.0))
            if cfg.hflip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            return self._normalize(image)
        return augment

    def _eval_transform(self):
        cfg = self.config
        return lambda image: self._normalize(center_crop(resize_shorter(image, cfg.eval_resize), cfg.image_size))

    def _normalize(self, image: tf.Tensor) -> tf.Tensor:
        mean = tf.constant(self.config.mean, tf.float32) * 255.0
        std = tf.constant(self.config.std, tf.float32) * 255.0
        return (tf.cast(image, tf.float32) - mean) / std


# --- transforms (float32 pixels in 0..255) ------------------------------------------------------


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """torchvision's ``RandomResizedCrop`` bounds: a crop of area fraction in ``scale`` and aspect ratio
    (width / height) in ``ratio``, up to rounding to whole pixels, tried 10 times, else torchvision's
    fallback: a center crop of the image's aspect ratio clamped into ``ratio``. Within those bounds crops
    are drawn as TensorFlow's ``sample_distorted_bounding_box`` draws them, not with torchvision's
    distribution (area uniform, ratio log-uniform). Bilinear, antialiased resize."""
    shape = tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=scale, aspect_ratio_range=ratio,
        min_object_covered=0.0,  # else (default 0.1, the whole image being the box) no crop is under 10 %
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    # TensorFlow falls back to the whole image, whatever its aspect ratio (a 3:2 photo is squeezed by 1.5);
    # torchvision to a center crop of that ratio clamped into ``ratio``. Only an out-of-range whole image
    # differs: a sampled crop has its ratio in range.
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    too_wide, too_tall = width / height > ratio[1], width / height < ratio[0]
    clamped = tf.stack([tf.where(too_tall, tf.cast(tf.round(width / ratio[0]), tf.int32), shape[0]),
                        tf.where(too_wide, tf.cast(tf.round(height * ratio[1]), tf.int32), shape[1])])
    fallback = tf.reduce_all(tf.equal(crop_size[:2], shape[:2])) & (too_wide | too_tall)
    crop_hw = tf.where(fallback, clamped, crop_size[:2])
    begin_hw = tf.where(fallback, (shape[:2] - clamped) // 2, begin[:2])
    crop = tf.slice(image, tf.concat([begin_hw, [0]], 0), tf.concat([crop_hw, [-1]], 0))
    return tf.image.resize(tf.cast(crop, tf.float32), (size, size), "bilinear", antialias=True)


def resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, the longer one is truncated."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.where(shape == tf.reduce_min(shape), float(size), tf.floor(shape * scale))
    return tf.image.resize(tf.cast(image, tf.float32), tf.cast(new, tf.int32), "bilinear", antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``CenterCrop(size)``: offsets rounded as ``int(round((h - size) / 2))``."""
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return tf.slice(image, [top, left, 0], [size, size, 3])


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    return decode_rgb(tf.io.read_file(path))


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """An image file's bytes as uint8 RGB (H, W, 3), as training reads every folder image."""
    # TensorFlow's WebP decoder returns the channels the file has (a WebP with transparency refuses to give
    # 3): decode a still WebP as it is and drop the alpha, as PIL's convert("RGB") does. Everything else,
    # animated WebP included (which decode_webp would need as RGBA), goes to decode_image, asked for RGB.
    head = tf.strings.substr(data, 0, 21) + b"\0" * 21  # RIFF header, padded: short files read as zeros
    flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]  # extended header (VP8X) flags
    animated = (tf.strings.substr(head, 12, 4) == b"VP8X") & (tf.bitwise.bitwise_and(flags, 2) > 0)
    still_webp = (tf.strings.substr(head, 8, 4) == b"WEBP") & ~animated
    image = tf.cond(still_webp, lambda: tf.io.decode_webp(data)[0, :, :, :3],
                    lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.cast(image, tf.uint8)


def _numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(2).as_numpy_iterator()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))


# --- sources -----------------------------------------------------------------------------------------


def load_dataset(config: DataConfig, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Resolve ``config.dataset``: ``'digits'``, an existing folder, or a TFDS name (prepared in
    ``config.data_dir`` or downloadable). Raises ``DataError`` with a one-line reason."""
    _check_config(config)
    if config.dataset == DIGITS:
        name, class_names, train, val, notes = _digits(config)
    elif Path(config.dataset).expanduser().is_dir():
        name, class_names, train, val, notes = _folder(config)
    elif os.sep in config.dataset or config.dataset.startswith("."):
        raise DataError(f"dataset folder {config.dataset!r} does not exist")
    else:
        name, class_names, train, val, notes = _tfds(config, process_count)
    if config.classes is not None:
        class_names, train, val = _keep_classes(config.classes, class_names, train, val)
        notes.append(f"kept classes {','.join(map(str, config.classes))} as labels 0..{len(class_names) - 1}")
    notes += _check_classes(config, class_names, train)
    dataset = Dataset(name, class_names, train, val, config, process_index, process_count, notes)
    if dataset.steps_per_epoch < 1:
        raise DataError(f"dataset {name!r}: {len(train)} training examples, fewer than one global batch of "
                        f"{config.batch_size}; lower --batch-size")
    return dataset


def _digits(config: DataConfig):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = _held_out(labels, config.val_fraction)
    class_names = tuple(str(c) for c in digits.target_names)
    notes = [f"digits: scikit-learn's 1797 8x8 handwritten digits as RGB; held out {len(val_idx)} for validation "
             f"({config.val_fraction:.0%} of each class, split seed {SPLIT_SEED})"]
    return (DIGITS, class_names, IndexedSplit(labels[train_idx], images[train_idx]),
            IndexedSplit(labels[val_idx], images[val_idx]), notes)


def _check_config(config: DataConfig) -> None:
    """A ``DataError`` naming the first ``DataConfig`` field that the pipeline could not honour: TensorFlow
    would fail on it at the first batch, many lines deep, or (a zero std) produce infinite pixels."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = (
        ("image_size", config.image_size, "an integer >= 1", is_int(config.image_size) and config.image_size >= 1),
        ("resize_size", config.resize_size, f"None or an integer >= image_size ({config.image_size})",
         config.resize_size is None or (is_int(config.resize_size) and config.resize_size >= config.image_size)),
        ("batch_size", config.batch_size, "an integer >= 1", is_int(config.batch_size) and config.batch_size >= 1),
        ("eval_batch_size", config.eval_batch_size, "None or an integer >= 1",
         config.eval_batch_size is None or (is_int(config.eval_batch_size) and config.eval_batch_size >= 1)),
        ("mean", config.mean, "3 finite numbers", len(config.mean) == 3 and np.isfinite(config.mean).all()),
        ("std", config.std, "3 finite numbers > 0",
         len(config.std) == 3 and np.isfinite(config.std).all() and min(config.std) > 0),
        ("val_fraction", config.val_fraction, "in (0, 1)", 0 < config.val_fraction < 1),
        ("min_crop_scale", config.min_crop_scale, "in (0, 1]", 0 < config.min_crop_scale <= 1),
    )
    for field_name, value, expected, ok in problems:
        if not ok:
            raise DataError(f"DataConfig.{field_name} must be {expected}, got {value!r}")


def _check_classes(config: DataConfig, class_names: Sequence[str], train: Split) -> list[str]:
    """Refuse fewer than two classes with training images: a one-class run has loss 0 and top-1 100 % from
    the first step and looks like a success. Returns a warning naming classes that have no training images."""
    present = list(class_names)
    if isinstance(train, IndexedSplit):
        counts = np.bincount(train.labels, minlength=len(class_names))
        present = [name for name, count in zip(class_names, counts, strict=True) if count]
    if len(present) < 2:
        kept = f" with --classes {','.join(map(str, config.classes))}" if config.classes is not None else ""
        raise DataError(f"dataset {config.dataset!r}{kept}: {len(present)} class(es) with training images "
                        f"({', '.join(present) or 'none'}); a classifier needs at least 2")
    missing = [name for name in class_names if name not in set(present)]
    return [f"warning: no training images for class(es) {', '.join(missing)}"] if missing else []


def _held_out(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
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


def _folder(config: DataConfig):
    root = Path(config.dataset).expanduser()
    train_dir, val_dir = _split_dirs(root)
    if train_dir is not None and val_dir is not None:
        class_names, train, val, skipped = _train_val_folders(train_dir, val_dir)
        notes = [f"folder {root}: train/ and {val_dir.name}/ splits"]
    else:
        source = train_dir or root
        class_names = _class_dirs(source)
        examples, skipped = _scan(source, class_names)
        layout = "train/ without val/" if train_dir else "no train/ and val/ subfolders"
        train, val, notes = _hold_out_folder(root, layout, examples, class_names, config.val_fraction)
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}")
    for split_name, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise DataError(f"folder {root}: no readable {split_name} images")
    return root.name, class_names, train, val, notes


def _split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """``root``'s train/ and val/ (or validation/) split folders, None when absent. Without val/, train/ is a
    split only when it holds class subfolders: a flat folder may have a class named "train"."""
    val_dir = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
    train_dir = root / "train"
    if not train_dir.is_dir() or (val_dir is None and not _has_subfolders(train_dir)):
        train_dir = None
    if train_dir is None and val_dir is not None and _has_subfolders(val_dir):
        raise DataError(f"folder {root}: {val_dir.name}/ holds class folders but there is no train/ split beside it")
    return train_dir, val_dir


def _has_subfolders(directory: Path) -> bool:
    return bool(_subfolders(directory))


def _train_val_folders(train_dir: Path, val_dir: Path):
    class_names = _class_dirs(train_dir)
    train, skipped_train = _scan(train_dir, class_names)
    unknown = sorted(set(_class_dirs(val_dir)) - set(class_names))
    if unknown:
        raise DataError(f"{val_dir}: class folder(s) {', '.join(unknown)} are not in {train_dir}")
    val, skipped_val = _scan(val_dir, class_names)
    return class_names, train, val, skipped_train + skipped_val


def _hold_out_folder(root: Path, layout: str, examples: IndexedSplit, class_names: Sequence[str], fraction: float):
    """Train and validation splits held out of ``examples``, with notes for the log."""
    train_idx, val_idx = _held_out(examples.labels, fraction)
    if len(train_idx) and not len(val_idx):
        raise DataError(f"folder {root}: no class has two readable images, so none can be held out for validation")
    notes = [f"folder {root}: {layout}; held out {len(val_idx)} images for validation ({fraction:.0%} of each class, "
             f"split seed {SPLIT_SEED})"]
    single = [class_names[label] for label, count in enumerate(np.bincount(examples.labels, minlength=len(class_names)))
              if count == 1]
    if single:
        notes.append(f"warning: class(es) {', '.join(single)} have a single image, used for training and not validated")
    return examples.subset(train_idx), examples.subset(val_idx), notes


def _subfolders(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise DataError(f"cannot read folder {root}: {error.strerror}") from None


def _class_dirs(root: Path) -> tuple[str, ...]:
    names = _subfolders(root)
    if not names:
        raise DataError(f"folder {root} has no class subfolders (expected {root}/<class>/<image> files)")
    return tuple(names)


def _scan(root: Path, class_names: Sequence[str]) -> tuple[IndexedSplit, list[str]]:
    """Image files under ``root/<class>/``, sorted; unreadable ones are skipped and returned."""
    candidates = []
    for label, name in enumerate(class_names):
        directory = root / name
        if directory.is_dir():
            candidates += [(str(p), label) for p in sorted(directory.rglob("*"))
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(_check_image, [path for path, _ in candidates]))
    good = [c for c, problem in zip(candidates, problems, strict=True) if problem is None]
    skipped = [f"{path} ({problem})" for (path, _), problem in zip(candidates, problems, strict=True) if problem]
    paths = np.array([p for p, _ in good], dtype=object).astype(str) if good else np.zeros(0, str)
    return IndexedSplit(np.array([label for _, label in good], np.int32), paths=paths), skipped


def _check_image(path: str) -> str | None:
    """Why TensorFlow's decoder would fail on ``path`` mid-run (None when it will not): PIL checks the header
    and structure; a per-format check catches what PIL's ``verify`` lets through (other formats under an image
    extension, such as a TIFF named .png, and truncated files) without decoding pixels, which costs ~8x more."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            kind, mode = image.format, image.mode
            image.verify()
        check = _FORMAT_CHECKS.get(kind)
        if check is None:
            return f"{kind} data, not JPEG, PNG, GIF, BMP or WebP"
        with open(path, "rb") as file:
            return check(file, mode)
    except Exception as error:  # noqa: BLE001 - any failure means "skip this file"
        return f"{type(error).__name__}: {error}".splitlines()[0][:120]


def _tail(file: BinaryIO, size: int = 64) -> bytes:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read()


def _jpeg_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow fails on a JPEG without its end-of-image marker: a file cut short. The marker ends the file
    (zero padding aside) but for data appended after the image (motion photos): then walk the markers."""
    if _tail(file).rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    file.seek(0)
    return None if _jpeg_has_end(file.read()) else "truncated JPEG: no end-of-image marker"


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not stuffing (ff 00), restart markers or fill bytes


def _jpeg_has_end(data: bytes) -> bool:
    """Whether the marker segments, skipped by their lengths, and scans reach end-of-image before the data ends."""
    pos = 2  # after start-of-image
    while match := _JPEG_MARKER.search(data, pos):
        marker = data[match.end() - 1]
        if marker == 0xD9:
            return True
        pos = match.end()
        if marker != 0x01:  # every marker but TEM has a length, which counts its own two bytes
            pos += int.from_bytes(data[pos:pos + 2], "big")
            if pos > len(data):
                return False
    return False


def _png_problem(file: BinaryIO, mode: str) -> str | None:
    """PIL's ``verify`` checks chunks up to IEND but not IEND's CRC, without which TensorFlow fails."""
    if _PNG_END in _tail(file):
        return None
    file.seek(0)
    return None if _PNG_END in file.read() else "truncated PNG: no complete IEND chunk"


_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # length, type and CRC of the (empty) end chunk


def _gif_problem(file: BinaryIO, mode: str) -> str | None:
    """Walk the GIF blocks: TensorFlow (giflib) fails when an image's data is cut short."""
    data = file.read()
    pos, images = 13 + _gif_table_size(data[10]), 0
    while pos < len(data) and data[pos] != 0x3B:  # up to the trailer; giflib tolerates its absence
        if data[pos] == 0x21:  # extension: label, then data sub-blocks
            pos += 2
        elif data[pos] == 0x2C:  # image: descriptor, local color table, LZW code size, then data sub-blocks
            pos += 11 + _gif_table_size(data[pos + 9] if pos + 9 < len(data) else 0)
            images += 1
        else:
            return f"corrupt GIF: unknown block 0x{data[pos]:02x} at byte {pos}"
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        if pos >= len(data):
            return "truncated GIF: image data cut short"
        pos += 1  # the zero-length terminator
    return None if images else "GIF without an image"


def _gif_table_size(flags: int) -> int:
    return 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0


def _bmp_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow reads uncompressed 24- and 32-bit BMPs and 8-bit ones as gray levels (it ignores the palette,
    so a color-palette BMP would train on its palette indices), and needs the exact size its header implies."""
    header = file.read(34)
    offset, width, height, bits, compression = struct.unpack("<10xI4xii2xHI", header)
    if bits not in (8, 24, 32) or compression != 0:
        return f"BMP with {bits} bits per pixel, compression {compression}: TensorFlow reads uncompressed 8/24/32-bit"
    if bits == 8 and mode != "L":
        return "8-bit color-palette BMP: TensorFlow would read the palette indices as gray levels"
    expected = offset + (bits // 8 * width + 3) // 4 * 4 * abs(height)
    size = file.seek(0, os.SEEK_END)
    return None if size == expected else f"BMP of {size} bytes, its header implies {expected}: truncated or padded"


def _webp_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow decodes an animated WebP only to RGBA, so asked for RGB (as training asks) it fails."""
    header = file.read(21)
    animated = header[12:16] == b"VP8X" and header[20] & 0x02  # the extended header's animation flag
    return "animated WebP: TensorFlow decodes WebP animations to RGBA only" if animated else None


_FORMAT_CHECKS = {"JPEG": _jpeg_problem, "MPO": _jpeg_problem, "PNG": _png_problem, "GIF": _gif_problem,
                  "BMP": _bmp_problem, "WEBP": _webp_problem}  # PIL's name -> what TensorFlow needs beyond PIL's verify


def _tfds(config: DataConfig, process_count: int):
    import tensorflow_datasets as tfds

    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except Exception as error:  # noqa: BLE001 - tfds raises many types for an unknown name
        raise DataError(f"unknown dataset {name!r}: not 'digits', not an existing folder, and not a TFDS dataset "
                        f"({type(error).__name__})") from None
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
    splits = builder.info.splits
    label_feature = builder.info.features[builder.info.supervised_keys[1]]
    class_names = tuple(label_feature.names)
    if "validation" in splits:
        train_split, val_split = "train", "validation"
        notes = [f"TFDS {name}: train / validation splits"]
    else:
        percent = round(100 * config.val_fraction)
        train_split, val_split = f"train[{percent}%:]", f"train[:{percent}%]"
        notes = [f"TFDS {name}: no validation split; held out the first {percent}% of train ({val_split})"]
    return (name, class_names, _tfds_split(builder, train_split, process_count),
            _tfds_split(builder, val_split, process_count), notes)


_TFDS_HOST = "storage.googleapis.com"  # TFDS's prepared copies, and the source of many of its datasets


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
        return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return None


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.is_prepared())
    except AttributeError:  # older tfds
        return Path(builder.data_dir, "dataset_info.json").exists()


def _tfds_split(builder, split: str, process_count: int) -> TfdsSplit:
    import tensorflow_datasets as tfds

    host_splits = [tfds.split_for_jax_process(split, process_index=p, process_count=process_count)
                   for p in range(process_count)]
    return TfdsSplit(builder, split, [_tfds_size(builder, s) for s in host_splits])


def _tfds_size(builder, split) -> int:
    """Examples in a (sub)split: from the dataset info, else the dataset's cardinality (mock data)."""
    try:
        return builder.info.splits[split].num_examples
    except KeyError:
        cardinality = int(builder.as_dataset(split=split).cardinality())
        if cardinality < 0:
            raise DataError(f"TFDS dataset {builder.name!r}: size of split {split} unknown") from None
        return cardinality


def _keep_classes(classes: tuple[int, ...], class_names: tuple[str, ...], train: Split, val: Split):
    bad = [c for c in classes if c >= len(class_names)]
    if bad:
        raise DataError(f"--classes {','.join(map(str, bad))}: the dataset has {len(class_names)} classes "
                        f"(labels 0..{len(class_names) - 1})")
    label_map = np.full(len(class_names), -1, np.int32)
    label_map[list(classes)] = np.arange(len(classes))
    return tuple(class_names[c] for c in classes), _remap(train, label_map), _remap(val, label_map)


def _remap(split: Split, label_map: np.ndarray) -> Split:
    if isinstance(split, IndexedSplit):
        keep = label_map[split.labels] >= 0
        return split.subset(keep, label_map[split.labels][keep])
    return TfdsSplit(split.builder, split.split, _count_kept(split, label_map), label_map)


def _count_kept(split: TfdsSplit, label_map: np.ndarray) -> list[int]:
    """Examples per process after a class filter: one pass over the labels (images are not decoded)."""
    import tensorflow_datasets as tfds

    label_key = split.builder.info.supervised_keys[1]
    counts = []
    for p in range(len(split.host_sizes)):
        host_split = tfds.split_for_jax_process(split.split, process_index=p, process_count=len(split.host_sizes))
        ds = split.builder.as_dataset(split=host_split, shuffle_files=False,
                                      decoders=tfds.decode.PartialDecoding({label_key: True}))
        labels = np.fromiter((ex[label_key] for ex in ds.as_numpy_iterator()), np.int64)
        counts.append(int(np.sum(label_map[labels] >= 0)))
    return counts
