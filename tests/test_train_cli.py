"""train.py as a user meets it: one-line errors with exit status 1, and a tiny run on an image folder
(with a corrupt file) that leaves every artifact of a run directory."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxnets import locks
from jaxnets.cli import train as cli
from jaxnets.config import TrainConfig, resolve
from jaxnets.run_description import FEW_IMAGES_PER_CLASS, small_data_warning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def _error(capsys, argv: list[str]) -> str:
    assert train.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ")
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--dataset", "no_such_dataset_xyz"], "unknown dataset 'no_such_dataset_xyz'"),
    (["--dataset", "./missing/folder"], "does not exist"),
    (["--model", "alexnet", "--image-size", "32"], "alexnet needs at least 63 px"),
    (["--model", "resnet18", "--no-aux"], "--no-aux: resnet18 has no auxiliary heads"),
    (["--config", "no/such/config.json"], "--config no/such/config.json: no such file"),
])
def test_bad_input_is_one_line_and_exit_status_1(capsys, tmp_path, argv, message):
    """... and leaves nothing behind: not the workdir, nor the folder above it, both new."""
    assert message in _error(capsys, [*argv, "--workdir", str(tmp_path / "runs" / "run"), "--compile-cache", ""])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_leaves_nothing_it_created_and_keeps_what_was_there(capsys, tmp_path, offline):
    """--pretrained offline fails once the data is loaded and the run's files are open (its checkpoints folder,
    metrics.jsonl, the lock): a new workdir goes again, a user's folder is left as it was."""
    argv = ["--model", "resnet18", "--pretrained", "--steps", "1", "--compile-cache", ""]
    new = tmp_path / "runs" / "new"
    assert "cannot download https://download.pytorch.org/models/" in _error(capsys, [*argv, "--workdir", str(new)])
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert "cannot download" in _error(capsys, [*argv, "--workdir", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "kept"


def test_a_writer_waiting_on_a_lock_that_a_failed_start_removes_locks_the_new_file(tmp_path):
    """A failed start removes the lock file it created while holding it (run_setup.owned_workdir): a writer that
    had opened it and waits must not take the removed file's lock (two writers would then hold 'the' lock), but
    one on the file at the path."""
    workdir = tmp_path / "run"
    held = threading.Event()
    seen: list[bool] = []

    def second_writer() -> None:
        held.wait()
        with locks.hold(workdir, wait=30) as path:
            seen.append(path is not None and path.exists() and json.loads(path.read_text())["pid"] == os.getpid())

    waiter = threading.Thread(target=second_writer)
    waiter.start()
    with locks.hold(workdir) as path:
        held.set()
        time.sleep(1.0)  # the waiter has opened the file and polls for its lock
        path.unlink()
    waiter.join(60)
    assert seen == [True]


def test_tiny_run_on_an_image_folder_leaves_a_complete_run_directory(capsys, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "c" / "corrupt.png").write_bytes(b"\x89PNG truncated")
    workdir = tmp_path / "run"
    argv = ["--model", "resnet18", "--dataset", str(tmp_path / "images"), "--image-size", "16", "--batch-size", "4",
            "--epochs", "1", "--steps", "2", "--log-every", "1", "--no-progress", "--workdir", str(workdir),
            "--compile-cache", str(tmp_path / "cache")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(f"run directory: {workdir}") == 2  # printed at the start and at the end
    assert "are few to train resnet18 from scratch at 16 px" in out  # small_data_warning
    assert "skipped 1 unreadable image file(s)" in out and "corrupt.png" in out
    for name in ("config.json", "metrics.jsonl", "curves.png", "confusion_matrix.png", "final_weights.safetensors"):
        assert (workdir / name).is_file(), name
    config = json.loads((workdir / "config.json").read_text())
    assert config["image_size"] == 16 and config["num_classes"] == 3 and config["lr"] == 0.1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert {"step", "epoch", "loss", "top1", "count"} <= set(records[-1]) and records[-1]["split"] == "val"

    # The same workdir with another model is refused, and it is kept as it was: a failed start removes only what
    # it created.
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert "holds a checkpoint (step 2) of a different run" in _error(capsys, [*argv, "--model", "resnet34"][2:])
    assert (workdir / "checkpoints" / "2").is_dir() and locks.LOCK_FILE in before
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before

    # --config replays the run: the recorded settings resolve to the very same config.json ...
    recorded = (workdir / "config.json").read_text()
    assert resolve(cli.config_from_args(["--config", str(workdir / "config.json")])).to_json() == recorded
    # ... and flags given with it override the file's settings, nothing else.
    replayed = json.loads(resolve(cli.config_from_args(["--config", str(workdir / "config.json"), "--lr", "0.2",
                                                         "--no-hflip"])).to_json())
    assert {k: v for k, v in replayed.items() if replayed[k] != config[k]} == {"lr": 0.2, "hflip": False}


@pytest.mark.parametrize("text,message", [
    ('{"batch_size": 8, "learning_rate": 0.1}', "c.json: unknown setting 'learning_rate'"),
    ('{"batch_size": "8"}', 'c.json: batch_size must be int or null, got "8"'),
    ('{"hflip": 1}', "c.json: hflip must be bool or null, got 1"),
    ('{"step_epochs": [1, "2"]}', 'c.json: step_epochs must be list of int, got [1, "2"]'),
    ('[1, 2]', "c.json: expected a JSON object of settings, got list"),
    ('{"lr": 0.1', "c.json: not JSON"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_setting(capsys, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(text)
    assert f"train.py: error: --config {message}" in _error(capsys, ["--config", "c.json"])


def test_every_setting_is_a_flag_whose_default_is_the_fields():
    """The flags are generated from TrainConfig: each field with a flag group has exactly one, parsing no
    flags gives TrainConfig's defaults, and the defaults resolved from the data are the fields' own."""
    parser = cli.build_parser("train.py")
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert dests == {name for name, f in fields.items() if f.metadata["group"] is not None}
    assert cli.config_from_args([]) == TrainConfig()
    help_text = parser.format_help()
    for name, field in fields.items():
        if field.metadata["auto"] is not None:
            assert str(field.metadata["auto"]) in " ".join(help_text.split()), name
    digits, folder = resolve(TrainConfig()), resolve(TrainConfig(dataset="some/folder", optimizer="adamw"))
    assert (digits.batch_size, digits.epochs, digits.weight_decay, digits.hflip) == (32, 10, 5e-4, False)
    assert (folder.batch_size, folder.epochs, folder.weight_decay, folder.lr) == (128, 90, 0.05, 1e-3)


def test_a_from_scratch_run_on_few_images_per_class_is_warned_once_and_pointed_to_what_works():
    """The warning's rule: from scratch, not the embedded digits, fewer than FEW_IMAGES_PER_CLASS per class."""
    folder = resolve(TrainConfig(model="resnet18", dataset="some/folder"))
    line = small_data_warning(folder, 39, 3)
    assert line.startswith("warning: 39 training images for 3 classes (13 per class) are few to train resnet18 from "
                           "scratch at 224 px") and "\n" not in line
    assert all(flag in line for flag in ("--pretrained", "--image-size", "--linear-probe"))
    assert small_data_warning(folder, 3 * FEW_IMAGES_PER_CLASS - 1, 3) is not None
    assert small_data_warning(folder, 3 * FEW_IMAGES_PER_CLASS, 3) is None
    assert small_data_warning(dataclasses.replace(folder, pretrained="IMAGENET1K_V1"), 39, 3) is None
    assert small_data_warning(resolve(TrainConfig(model="resnet18")), 1437, 10) is None  # digits at 16 px
