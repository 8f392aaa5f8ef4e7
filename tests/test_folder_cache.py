"""A folder is scanned once per run: the file index, labels and skipped files are cached in the workdir, so that a
resumed run and every process but the first read them instead of listing and decoding the folder again. The
index is what a scan gives (torchvision's ``ImageFolder`` lists the same files with the same labels); a changed
folder or a corrupt index file is scanned again. Several processes are threads here, joined by a barrier that
stands in for ``parallel.any_process``."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from jaxnets.data import DataConfig, DataError, load_dataset
from jaxnets.data import folder as folder_module
from jaxnets.data.folder import INDEX_DIR, Peers


def _write_folder(root: Path, classes=("cat", "dog", "fox"), per_class=4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    return root


def _config(root: Path) -> DataConfig:
    return DataConfig(dataset=str(root), image_size=8, batch_size=2)


@pytest.fixture
def checks(monkeypatch) -> Counter:
    """How many files each thread (process) checked: ``folder.file_problems`` counted."""
    counted: Counter = Counter()
    check = folder_module.file_problems

    def counting(paths, in_chans):
        counted[threading.current_thread().name] += len(paths)
        return check(paths, in_chans)

    monkeypatch.setattr(folder_module, "file_problems", counting)
    return counted


def _examples(dataset) -> list[tuple]:
    return [(split, str(path), int(label)) for split in ("train", "val")
            for path, label in zip(getattr(dataset, split).paths, getattr(dataset, split).labels, strict=True)]


def test_the_cached_index_is_the_scan_and_a_resumed_run_reads_it(tmp_path, checks):
    root = _write_folder(tmp_path / "data" / "train")
    _write_folder(tmp_path / "data" / "val", classes=("dog", "fox"), per_class=2)
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    config, workdir = _config(tmp_path / "data"), tmp_path / "run"
    scanned = load_dataset(config)
    assert checks["MainThread"] == 17

    first = load_dataset(config, index_dir=workdir)
    assert checks["MainThread"] == 34 and len(list((workdir / INDEX_DIR).iterdir())) == 1
    resumed = load_dataset(config, index_dir=workdir)
    assert checks["MainThread"] == 34  # nothing decoded again
    assert any("not scanned again" in note for note in resumed.notes)
    for dataset in (first, resumed):
        assert dataset.class_names == scanned.class_names == ("cat", "dog", "fox")
        assert _examples(dataset) == _examples(scanned)
        assert [n for n in dataset.notes if "broken.jpg" in n] == [n for n in scanned.notes if "broken.jpg" in n]
    # The oracle: torchvision lists the same files, in the same order, with the same labels.
    for split, directory in (("train", root), ("val", tmp_path / "data" / "val")):
        reference = ImageFolder(str(directory), allow_empty=True).samples
        reference = [(path, resumed.class_names.index(Path(path).parent.name)) for path, _ in reference]
        ours = [(path, label) for s, path, label in _examples(resumed) if s == split]
        assert ours == [sample for sample in reference if not sample[0].endswith("broken.jpg")]


@pytest.mark.parametrize("change", ["add a file", "rename a class", "replace a file"])
def test_a_changed_folder_is_scanned_again(tmp_path, checks, change):
    root = _write_folder(tmp_path / "pets")
    config, workdir = _config(root), tmp_path / "run"
    load_dataset(config, index_dir=workdir)
    if change == "add a file":
        Image.new("RGB", (9, 9)).save(root / "cat" / "new.png")
    elif change == "rename a class":
        (root / "fox").rename(root / "wolf")
    else:  # a new file moved over an old one: the same names, other pixels
        Image.new("RGB", (9, 9)).save(tmp_path / "other.png")
        os.replace(tmp_path / "other.png", root / "dog" / "1.png")
    checked = checks["MainThread"]
    changed = load_dataset(config, index_dir=workdir)
    assert checks["MainThread"] == checked + 12 + (change == "add a file")
    assert any("out of date" in note for note in changed.notes)
    assert _examples(changed) == _examples(load_dataset(config))
    assert changed.class_names == (("cat", "dog", "wolf") if change == "rename a class" else ("cat", "dog", "fox"))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage"])
def test_a_corrupt_index_is_rebuilt_with_a_log_line(tmp_path, checks, damage):
    root = _write_folder(tmp_path / "pets")
    config, workdir = _config(root), tmp_path / "run"
    expected = _examples(load_dataset(config, index_dir=workdir))
    (index,) = (workdir / INDEX_DIR).iterdir()
    data = bytearray(index.read_bytes())
    if damage == "flip a byte":
        at = data.index(b"dog/") + 1  # inside a stored path: the file still opens, its checksum fails
        data[at] ^= 0x01
    index.write_bytes(bytes(data[:len(data) // 2]) if damage == "truncate" else
                      b"\0garbage" if damage == "garbage" else bytes(data))
    checked = checks["MainThread"]
    rebuilt = load_dataset(config, index_dir=workdir)
    assert checks["MainThread"] == checked + 12
    assert [note for note in rebuilt.notes if "unreadable" in note and str(index) in note]
    assert _examples(rebuilt) == expected
    assert _examples(load_dataset(config, index_dir=workdir)) == expected and checks["MainThread"] == checked + 12


class _Processes:
    """``count`` processes as threads: each gets its ``Peers``, whose ``any`` meets the others at a barrier."""

    def __init__(self, count: int, monkeypatch) -> None:
        self.count, self.flags, self.barrier = count, [False] * count, threading.Barrier(count, timeout=60)
        self.listings: Counter = Counter()
        monkeypatch.setattr(folder_module, "peers", self.peers)
        listing = folder_module._list_folder

        def counting(*args):
            self.listings[threading.current_thread().name] += 1
            return listing(*args)

        monkeypatch.setattr(folder_module, "_list_folder", counting)

    def peers(self) -> Peers:
        index = int(threading.current_thread().name.removeprefix("process "))
        return Peers(index, self.count, lambda flag: self._any(index, flag))

    def _any(self, index: int, flag: bool) -> bool:
        self.flags[index] = flag
        self.barrier.wait()
        result = any(self.flags)
        self.barrier.wait()
        return result

    def run(self, work) -> list:
        """``work(process index)`` on every process; what each returned, or raised."""
        results: list = [None] * self.count

        def target(index: int) -> None:
            try:
                results[index] = work(index)
            except Exception as error:  # noqa: BLE001 - returned to the test
                results[index] = error

        threads = [threading.Thread(target=target, args=(i,), name=f"process {i}") for i in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a process waits forever"
        return results


def test_processes_check_their_share_and_read_the_index_of_the_first(tmp_path, checks, monkeypatch):
    root = _write_folder(tmp_path / "pets", per_class=5)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    config, workdir = _config(root), tmp_path / "run"
    expected = _examples(load_dataset(config))
    processes = _Processes(2, monkeypatch)
    first = processes.run(lambda p: load_dataset(config, p, 2, index_dir=workdir))
    assert [checks["process 0"], checks["process 1"]] == [8, 8]  # 16 files, half each
    assert processes.listings == {"process 0": 1}  # the others never list the folder
    assert all(_examples(dataset) == expected for dataset in first)
    assert len(os.listdir(workdir / INDEX_DIR)) == 1  # the index: no listing or shares left
    resumed = processes.run(lambda p: load_dataset(config, p, 2, index_dir=workdir))
    assert [checks["process 0"], checks["process 1"]] == [8, 8] and processes.listings == {"process 0": 2}
    assert all(_examples(dataset) == expected for dataset in resumed)
    assert [dataset.local_batch_size for dataset in resumed] == [1, 1]


def test_an_error_on_one_process_stops_every_process(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data" / "val")  # class folders in val/ but no train/: process 0 refuses the layout
    processes = _Processes(2, monkeypatch)
    errors = processes.run(lambda p: load_dataset(_config(tmp_path / "data"), p, 2, index_dir=tmp_path / "run"))
    assert isinstance(errors[0], DataError) and "no train/ split" in str(errors[0])
    assert isinstance(errors[1], DataError) and "another process failed" in str(errors[1])
