"""Source: a folder of images in class subfolders, ``root/<class>/<image>``, with ``train/`` and ``val/`` (or
``validation/``) split folders or without (then validation is held out of each class). Files that
TensorFlow cannot decode are skipped when the folder is scanned (each is decoded once, ``image_checks``), and
reported. Examples may also be ``.npy`` arrays ``(H, W, C)`` (``arrays``): any number of channels, where image
files give 1 (``in_chans=1``, read as grayscale) or 3 (RGB).

A run scans its folder once (``cached_in``, ``load_dataset(index_dir=...)``): the file index, labels and skipped
files are kept in the workdir (``INDEX_DIR``), so a resumed run and every process but the first read them instead
of listing and decoding a million files again. On a multi-process run the first process lists the folder, every
process decodes its share of the files, and the first one writes the index the others then read. The index is
keyed by the folder's listing: the name of every entry and the modification time of every directory of the scanned
tree; adding, removing or renaming a file or class folder, or replacing a file by another (a move over it), makes it
stale, and it is rebuilt. A file overwritten in place (same name, same folder, no rename) is not noticed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

import numpy as np

from jaxnets import fileio
from jaxnets._version import __version__
from jaxnets.data.arrays import ARRAY_EXTENSION, check_array, is_array_file
from jaxnets.data.config import ChannelMismatch, DataConfig, DataError
from jaxnets.data.image_checks import check_images
from jaxnets.data.indexed import IndexedSplit
from jaxnets.data.labels import SPLIT_SEED, held_out
from jaxnets.data.split import Source
from jaxnets.data.transforms import IMAGE_CHANNELS, IMAGE_EXTENSIONS

VAL_DIRS = ("val", "validation")
INDEX_DIR = "folder-index"  # in the run's workdir: one index file per folder and channel count
EXAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, ARRAY_EXTENSION)
_INDEX_FORMAT = 1  # raised whenever what an index file holds, or how a folder is listed, changes
_NAME = attrgetter("name")
_index_dir: ContextVar[Path | None] = ContextVar("folder_index_dir", default=None)
T = TypeVar("T")


def recognizes(config: DataConfig) -> bool:
    """An existing folder, or a name that can only be a path (then ``load`` says that it does not exist)."""
    name = config.dataset
    return Path(name).expanduser().is_dir() or os.sep in name or name.startswith(".")


@contextlib.contextmanager
def cached_in(directory: str | os.PathLike | None) -> Iterator[None]:
    """While the block runs, a folder's scan is read from and written to ``directory/INDEX_DIR`` (the run's
    workdir, a local or shared file system); None: every load scans the folder."""
    token = _index_dir.set(None if directory is None else Path(directory) / INDEX_DIR)
    try:
        yield
    finally:
        _index_dir.reset(token)


def load(config: DataConfig, process_count: int) -> Source:
    """The folder's train and validation splits, with notes on the layout found and the files skipped."""
    root = Path(config.dataset).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {config.dataset!r} does not exist")
    scan = scan_folder(root, config.in_chans)
    if "val" in scan.parts:
        train, val, notes = scan.parts["train"], scan.parts["val"], [f"folder {root}: {scan.layout} splits"]
    else:
        train, val, notes = _hold_out_folder(root, scan.layout, scan.parts["all"], scan.class_names,
                                             config.val_fraction)
    return folder_source(root, scan.class_names, train, val, [*scan.notes, *notes], scan.skipped)


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


@dataclass
class FolderScan:
    """What one scan of a folder found: its layout (for the log), class names, the readable examples of each
    scanned part ('train' and 'val' for split folders, else 'all') and the unreadable files, with why."""

    layout: str
    class_names: tuple[str, ...]
    parts: dict[str, IndexedSplit]
    skipped: list[str]
    notes: list[str] = field(default_factory=list)  # where the index came from


@dataclass(frozen=True)
class Peers:
    """The processes that scan a folder together: this one's ``index``, their ``count``, and ``any``: True on
    every process when its argument is true on any, a collective that every process must reach."""

    index: int = 0
    count: int = 1
    any: Callable[[bool], bool] = bool


def peers() -> Peers:
    """The processes of this JAX program (``jax.distributed``), one when it has not started several. A program
    that has not imported JAX cannot have started them: the data package does not import it for a lone process."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return Peers()
    from jaxnets import parallel

    return Peers(jax.process_index(), jax.process_count(), parallel.any_process)


def scan_folder(root: Path, in_chans: int) -> FolderScan:
    """``root``'s examples: listed, each file checked (``file_problems``); within ``cached_in``, read from the
    index in the workdir when the folder's listing is unchanged, else scanned by every process together and
    written there."""
    directory = _index_dir.get()
    if directory is None:
        listing = _list_folder(root, in_chans)
        return listing.checked(file_problems(listing.paths, in_chans))
    return _IndexedScan(root, in_chans, directory, peers()).run()


# --- the layout and the listing -------------------------------------------------------------------------------------


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


@dataclass
class _Listing:
    """The candidate example files of a folder, in scan order, with each one's label and part, and the
    ``fingerprint`` of the listing they came from (what an index is keyed by)."""

    layout: str
    class_names: tuple[str, ...]
    part_names: tuple[str, ...]
    paths: list[str]
    labels: list[int]
    parts: list[int]  # index into part_names, per path
    fingerprint: str
    channels: int
    note: list[str] = field(default_factory=list)  # why the index was not used, for the log

    def checked(self, problems: Sequence[str | None]) -> FolderScan:
        """The scan: the readable files of each part, and the others with why (``problems``, one per path)."""
        good = np.array([problem is None for problem in problems], bool)
        paths = np.array(self.paths, dtype=object).astype(str) if self.paths else np.zeros(0, str)
        labels, parts = np.array(self.labels, np.int32), np.array(self.parts, np.int32)
        splits = {name: IndexedSplit(labels[good & (parts == i)], paths=paths[good & (parts == i)],
                                     channels=self.channels) for i, name in enumerate(self.part_names)}
        skipped = [f"{path} ({problem})" for path, problem in zip(self.paths, problems, strict=True) if problem]
        return FolderScan(self.layout, self.class_names, splits, skipped)


def _list_folder(root: Path, in_chans: int) -> _Listing:
    """The layout of ``root`` and its candidate files: image files and ``.npy`` arrays under ``<part>/<class>/``
    (subfolders included), sorted as paths are; an image file where ``in_chans`` is neither 1 nor 3 is a
    ``ChannelMismatch`` (the run is set up for other data). A class folder of val/ that train/ lacks is a
    ``DataError``."""
    train_dir, val_dir = _split_dirs(root)
    if train_dir is not None and val_dir is not None:
        class_names = _class_dirs(train_dir)
        unknown = sorted(set(_class_dirs(val_dir)) - set(class_names))
        if unknown:
            raise DataError(f"{val_dir}: class folder(s) {', '.join(unknown)} are not in {train_dir}")
        layout, scanned = f"train/ and {val_dir.name}/", {"train": train_dir, "val": val_dir}
    else:
        scanned_dir = train_dir or root
        class_names = _class_dirs(scanned_dir)
        layout = "train/ without val/" if train_dir else "no train/ and val/ subfolders"
        scanned = {"all": scanned_dir}
    digest = hashlib.sha256(json.dumps([_INDEX_FORMAT, __version__, os.path.abspath(root), in_chans, layout,
                                        class_names, EXAMPLE_EXTENSIONS]).encode())
    paths, labels, parts = [], [], []
    for part, directory in enumerate(scanned.values()):
        _walk_dir(directory, digest, [])  # the part's own entries: a class folder added, removed or renamed
        for label, name in enumerate(class_names):
            found: list[str] = []
            if (directory / name).is_dir():
                _walk_dir(directory / name, digest, found, examples=True)
            paths += found
            labels += [label] * len(found)
            parts += [part] * len(found)
    image = next((path for path in paths if not is_array_file(path)), None)
    if image is not None and in_chans not in IMAGE_CHANNELS:
        raise ChannelMismatch(in_chans, f"{image} is an image file, which decodes to 1 or 3 channels",
                              " or ".join(map(str, IMAGE_CHANNELS)),
                              f"give {in_chans}-channel examples as .npy arrays (H, W, {in_chans})")
    return _Listing(layout, class_names, tuple(scanned), paths, labels, parts, digest.hexdigest(), in_chans)


def _walk_dir(directory: Path, digest, found: list[str], examples: bool = False) -> None:
    """Add ``directory``'s modification time and entries to ``digest``; with ``examples``, append its example
    files to ``found`` and descend into its subfolders (not into links to folders), in path order. The time is
    read before the entries, so a change made while they are listed leaves a newer time: the index is stale."""
    try:
        mtime = directory.stat().st_mtime_ns
        with os.scandir(directory) as scanning:
            entries = sorted(scanning, key=_NAME)
    except OSError as error:
        raise DataError(f"cannot read folder {directory}: {error.strerror}") from None
    digest.update(f"{directory}\0{mtime}\0{len(entries)}\0".encode())
    digest.update("\0".join([entry.name for entry in entries]).encode("utf-8", "surrogateescape") + b"\n")
    if not examples:
        return
    for entry in entries:
        name = entry.name
        dot = name.rfind(".")  # the suffix as pathlib's: a name's last dot, neither first nor last
        if 0 < dot < len(name) - 1 and name[dot:].lower() in EXAMPLE_EXTENSIONS and entry.is_file():
            found.append(entry.path)
        elif entry.is_dir(follow_symlinks=False):
            _walk_dir(Path(entry.path), digest, found, examples=True)


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


def file_problems(paths: Sequence[str], in_chans: int) -> list[str | None]:
    """For each example file, why it cannot be read (None when it can): image files decoded as the pipeline
    will decode them (``check_images``), ``.npy`` arrays by ``check_array`` (a few threads: they read files)."""
    arrays = [path for path in paths if is_array_file(path)]
    images = [path for path in paths if not is_array_file(path)]
    with ThreadPoolExecutor(8) as pool:
        problems = dict(zip(arrays, pool.map(lambda path: check_array(path, in_chans), arrays), strict=True))
    problems.update(zip(images, check_images(images, in_chans), strict=True))
    return [problems[path] for path in paths]


# --- the index in the workdir ---------------------------------------------------------------------------------------


class _IndexedScan:
    """A folder scanned by every process together, or read from its index (``scan_folder``). The processes run
    the same steps (``_step``); process 0 lists the folder and reads or writes the index."""

    def __init__(self, root: Path, in_chans: int, directory: Path, peers: Peers) -> None:
        self.root, self.in_chans, self.peers = root, in_chans, peers
        name = hashlib.sha256(json.dumps([os.path.abspath(root), in_chans]).encode()).hexdigest()[:16]
        self.path = directory / f"{name}.npz"
        self.pending = directory / f"{name}.listing.npz"  # process 0's listing, for the others' share of the checks

    def run(self) -> FolderScan:
        first, peers = self.peers.index == 0, self.peers
        found = self._step(self._open if first else None)  # process 0: the index, or the listing to check
        if peers.any(isinstance(found, FolderScan)):  # process 0's verdict, on every process
            read = self._step(None if first else lambda: self._read_index(None)[0])
            return found if first else read
        listing = found if first else self._step(lambda: _read_listing(self.pending, self.in_chans))
        if first:
            self._step(None)
        share = slice(peers.index, None, peers.count)
        problems = self._step(lambda: self._check_share(listing, share))
        scan = self._step(lambda: self._merge(listing, problems) if first else None)
        if first:
            self._step(None)
            return scan
        return self._step(lambda: self._read_index(None)[0])

    def _step(self, work: Callable[[], T] | None) -> T | None:
        """``work`` (None: nothing on this process), then every process learns whether any failed: the one that
        did raises its error, the others one naming the folder, so that none waits for a collective forever."""
        result, error = None, None
        if work is not None:
            try:
                result = work()
            except Exception as caught:  # noqa: BLE001 - raised below, after every process knows
                error = caught
        if self.peers.any(error is not None):
            if error is not None:
                raise error
            raise DataError(f"folder {self.root}: another process failed to scan it (its log says why)")
        return result

    def _open(self) -> FolderScan | _Listing:
        """Process 0: the index when it matches the folder's listing, else the listing (saved for the others)."""
        listing = _list_folder(self.root, self.in_chans)
        scan, note = self._read_index(listing.fingerprint)
        if scan is not None:
            return scan
        listing.note = note
        if self.peers.count > 1:
            _write_listing(self.pending, listing)
        return listing

    def _check_share(self, listing: _Listing, share: slice) -> list[str | None]:
        """This process's share of the checks; the others write theirs next to the index for process 0."""
        problems = file_problems(listing.paths[share], self.in_chans)
        if self.peers.index:
            fileio.write_text(self._share_path(self.peers.index), json.dumps(problems))
        return problems

    def _share_path(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.share-{index}-of-{self.peers.count}.json")

    def _merge(self, listing: _Listing, own: list[str | None]) -> FolderScan:
        """Process 0: every share's problems in listing order, the scan written as the index; the listing and the
        shares removed."""
        problems: list[str | None] = [None] * len(listing.paths)
        problems[0::self.peers.count] = own
        for index in range(1, self.peers.count):
            path = self._share_path(index)
            try:
                problems[index::self.peers.count] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise DataError(f"cannot read {path}, process {index}'s checks of {self.root}: {error}; is "
                                "the workdir shared by every process?") from None
        scan = listing.checked(problems)
        _write_index(self.path, listing, scan)
        for path in (self.pending, *(self._share_path(i) for i in range(1, self.peers.count))):
            path.unlink(missing_ok=True)
        scan.notes = [*listing.note, f"folder index: scanned {len(listing.paths)} files of {self.root}, "
                      f"index written to {self.path}"]
        return scan

    def _read_index(self, fingerprint: str | None) -> tuple[FolderScan | None, list[str]]:
        """The scan in the index file, None when there is none or it was not made from ``fingerprint`` (None:
        any, as process 0 read it), with a note saying why it is not used. An unreadable or corrupt index is
        noted, and scanned again; a process other than 0 raises, as process 0 has just read or written it."""
        if fingerprint is not None and not self.path.exists():
            return None, []
        try:
            meta, arrays = _read_npz(self.path)
            if meta["fingerprint"] != fingerprint and fingerprint is not None:
                return None, [f"folder index {self.path} is out of date (files or folders of {self.root} were "
                              "added, removed, renamed or replaced): scanning the folder again"]
            scan = _scan_from(meta, arrays, self.in_chans)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            if fingerprint is None:
                raise DataError(f"cannot read the folder index {self.path} process 0 wrote: {error}; is the "
                                "workdir shared by every process?") from None
            return None, [f"folder index {self.path} is unreadable ({type(error).__name__}: {error}): scanning the "
                          "folder again"]
        why = "process 0 wrote it or found it current" if fingerprint is None else "the folder's listing is unchanged"
        scan.notes = [f"folder index: {sum(map(len, scan.parts.values())) + len(scan.skipped)} files of "
                      f"{self.root} read from {self.path} ({why}: not scanned again)"]
        return scan, []


def _joined(strings: Sequence[str]) -> np.ndarray:
    """Strings as one uint8 array, NUL-separated (no path holds a NUL)."""
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), np.uint8)


def _split(array: np.ndarray, count: int) -> list[str]:
    strings = array.tobytes().decode("utf-8", "surrogateescape").split("\0") if count else []
    if len(strings) != count:
        raise ValueError(f"{len(strings)} strings where {count} were written")
    return strings


def _write_npz(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` and ``meta`` (JSON, with the SHA-256 of the arrays) as one ``.npz`` file, written atomically."""
    meta = {**meta, "sha256": _digest(arrays)}
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """What ``_write_npz`` wrote; a ``ValueError`` when the arrays do not hash to what it recorded."""
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    if meta.get("format") != _INDEX_FORMAT:
        raise ValueError(f"index format {meta.get('format')!r}, not {_INDEX_FORMAT}")
    if _digest(arrays) != meta["sha256"]:
        raise ValueError("its contents do not match their checksum")
    return meta, arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f"{name}\0{arrays[name].dtype.str}\0{arrays[name].shape}\0".encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _listing_meta(listing: _Listing) -> dict:
    return {"format": _INDEX_FORMAT, "fingerprint": listing.fingerprint, "layout": listing.layout,
            "class_names": list(listing.class_names), "part_names": list(listing.part_names),
            "channels": listing.channels}


def _write_listing(path: Path, listing: _Listing) -> None:
    _write_npz(path, {**_listing_meta(listing), "count": len(listing.paths)},
               {"paths": _joined(listing.paths), "labels": np.array(listing.labels, np.int32),
                "parts": np.array(listing.parts, np.int32)})


def _read_listing(path: Path, in_chans: int) -> _Listing:
    try:
        meta, arrays = _read_npz(path)
        return _Listing(meta["layout"], tuple(meta["class_names"]), tuple(meta["part_names"]),
                        _split(arrays["paths"], meta["count"]), arrays["labels"].tolist(), arrays["parts"].tolist(),
                        meta["fingerprint"], in_chans)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"cannot read {path}, process 0's listing of the folder: {error}; is the workdir shared "
                        "by every process?") from None


def _write_index(path: Path, listing: _Listing, scan: FolderScan) -> None:
    arrays: dict[str, np.ndarray] = {"skipped": _joined(scan.skipped)}
    counts = {}
    for name, split in scan.parts.items():
        arrays[f"{name}.paths"], arrays[f"{name}.labels"] = _joined(split.paths.tolist()), split.labels
        counts[name] = len(split)
    _write_npz(path, {**_listing_meta(listing), "counts": counts, "skipped": len(scan.skipped)}, arrays)


def _scan_from(meta: dict, arrays: dict[str, np.ndarray], in_chans: int) -> FolderScan:
    parts = {}
    for name in meta["part_names"]:
        paths, labels = _split(arrays[f"{name}.paths"], meta["counts"][name]), arrays[f"{name}.labels"]
        if len(labels) != len(paths) or labels.dtype != np.int32:
            raise ValueError(f"{len(labels)} labels of {labels.dtype} for {len(paths)} files")
        parts[name] = IndexedSplit(labels, paths=np.array(paths, dtype=str) if paths else np.zeros(0, str),
                                   channels=in_chans)
    return FolderScan(meta["layout"], tuple(meta["class_names"]), parts, _split(arrays["skipped"], meta["skipped"]))
