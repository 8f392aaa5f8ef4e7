"""train.py as a user meets it: one-line errors with exit status 1, and a tiny run on an image folder
(with a corrupt file) that leaves every artifact of a run directory."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxnets.cli import train as cli
from jaxnets.config import TrainConfig, resolve

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
    assert message in _error(capsys, [*argv, "--workdir", str(tmp_path / "run"), "--compile-cache", ""])


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
    assert "skipped 1 unreadable image file(s)" in out and "corrupt.png" in out
    for name in ("config.json", "metrics.jsonl", "curves.png", "confusion_matrix.png", "final_weights.safetensors"):
        assert (workdir / name).is_file(), name
    config = json.loads((workdir / "config.json").read_text())
    assert config["image_size"] == 16 and config["num_classes"] == 3 and config["lr"] == 0.1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert {"step", "epoch", "loss", "top1", "count"} <= set(records[-1]) and records[-1]["split"] == "val"

    # The same workdir with another model is refused, and its checkpoint is kept.
    assert "holds a checkpoint (step 2) of a different run" in _error(capsys, [*argv, "--model", "resnet34"][2:])
    assert (workdir / "checkpoints" / "2").is_dir()

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
