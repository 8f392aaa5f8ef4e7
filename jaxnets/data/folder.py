"""Source: a folder of images in class subfolders, ``root/<class>/<image>``, with ``train/`` and ``val/`` (or
``validation/``) split folders or without (then validation is held out of each class). Files that
TensorFlow cannot decode are skipped when the folder is scanned (each is decoded once, ``image_checks``), and
reported. Examples may also be ``.npy`` arrays ``(H, W, C)`` (``arrays``): any number of channels, where image
files give 1 (``in_chans=1``, read as grayscale) or 3 (RGB)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxnets.data.arrays import ARRAY_EXTENSION, check_array, is_array_file
from jaxnets.data.config import ChannelMismatch, DataConfig, DataError
from jaxnets.data.image_checks import check_images
from jaxnets.data.indexed import IndexedSplit
from jaxnets.data.labels import SPLIT_SEED, held_out
from jaxnets.data.split import Source
from jaxnets.data.transforms import IMAGE_CHANNELS, IMAGE_EXTENSIONS

VAL_DIRS = ("val", "validation")


def recognizes(config: DataConfig) -> bool:
    """An existing folder, or a name that can only be a path (then ``load`` says that it does not exist)."""
    name = config.dataset
    return Path(name).expanduser().is_dir() or os.sep in name or name.startswith(".")


def load(config: DataConfig, process_count: int) -> Source:
    """The folder's train and validation splits, with notes on the layout found and the files skipped."""
    root = Path(config.dataset).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {config.dataset!r} does not exist")
    train_dir, val_dir = _split_dirs(root)
    if train_dir is not None and val_dir is not None:
        class_names, train, val, skipped = _train_val_folders(train_dir, val_dir, config.in_chans)
        notes = [f"folder {root}: train/ and {val_dir.name}/ splits"]
    else:
        scanned = train_dir or root
        class_names = _class_dirs(scanned)
        examples, skipped = _scan(scanned, class_names, config.in_chans)
        layout = "train/ without val/" if train_dir else "no train/ and val/ subfolders"
        train, val, notes = _hold_out_folder(root, layout, examples, class_names, config.val_fraction)
    return folder_source(root, class_names, train, val, notes, skipped)


def folder_source(root: Path, class_names: tuple[str, ...], train: IndexedSplit, val: IndexedSplit,
                  notes: list[str], skipped: list[str]) -> Source:
    """A folder's ``Source``, its notes naming every unreadable file skipped (one line each, so the log says which
    files to fix, not just how many); a split left empty is a ``DataError``."""
    if skipped:
        notes += [f"skipped {len(skipped)} unreadable image file(s):", *(f"  {entry}" for entry in skipped)]
    for split_name, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise DataError(f"folder {root}: no readable {split_name} images")
    return Source(root.name, class_names, train, val, notes)


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


def _train_val_folders(train_dir: Path, val_dir: Path, in_chans: int):
    class_names = _class_dirs(train_dir)
    train, skipped_train = _scan(train_dir, class_names, in_chans)
    unknown = sorted(set(_class_dirs(val_dir)) - set(class_names))
    if unknown:
        raise DataError(f"{val_dir}: class folder(s) {', '.join(unknown)} are not in {train_dir}")
    val, skipped_val = _scan(val_dir, class_names, in_chans)
    return class_names, train, val, skipped_train + skipped_val


def _hold_out_folder(root: Path, layout: str, examples: IndexedSplit, class_names: Sequence[str], fraction: float):
    """Train and validation splits held out of ``examples``, with notes for the log."""
    train_idx, val_idx = held_out(examples.labels, fraction)
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


def _scan(root: Path, class_names: Sequence[str], in_chans: int = 3) -> tuple[IndexedSplit, list[str]]:
    """Image files (and ``.npy`` arrays) under ``root/<class>/``, sorted; unreadable ones are skipped and returned.
    An image file where ``in_chans`` is neither 1 nor 3, or an array of other than ``in_chans`` channels, is a
    ``ChannelMismatch``: the run is set up for other data."""
    candidates = []
    for label, name in enumerate(class_names):
        directory = root / name
        if directory.is_dir():
            candidates += [(str(p), label) for p in sorted(directory.rglob("*"))
                           if p.suffix.lower() in (*IMAGE_EXTENSIONS, ARRAY_EXTENSION) and p.is_file()]
    image = next((path for path, _ in candidates if not is_array_file(path)), None)
    if image is not None and in_chans not in IMAGE_CHANNELS:
        raise ChannelMismatch(in_chans, f"{image} is an image file, which decodes to 1 or 3 channels",
                              " or ".join(map(str, IMAGE_CHANNELS)),
                              f"give {in_chans}-channel examples as .npy arrays (H, W, {in_chans})")

    problems = file_problems([path for path, _ in candidates], in_chans)
    good = [c for c, problem in zip(candidates, problems, strict=True) if problem is None]
    skipped = [f"{path} ({problem})" for (path, _), problem in zip(candidates, problems, strict=True) if problem]
    paths = np.array([p for p, _ in good], dtype=object).astype(str) if good else np.zeros(0, str)
    return IndexedSplit(np.array([label for _, label in good], np.int32), paths=paths, channels=in_chans), skipped


def file_problems(paths: Sequence[str], in_chans: int) -> list[str | None]:
    """For each example file, why it cannot be read (None when it can): image files decoded as the pipeline
    will decode them (``check_images``), ``.npy`` arrays by ``check_array`` (a few threads: they read files)."""
    arrays = [path for path in paths if is_array_file(path)]
    images = [path for path in paths if not is_array_file(path)]
    with ThreadPoolExecutor(8) as pool:
        problems = dict(zip(arrays, pool.map(lambda path: check_array(path, in_chans), arrays), strict=True))
    problems.update(zip(images, check_images(images, in_chans), strict=True))
    return [problems[path] for path in paths]
