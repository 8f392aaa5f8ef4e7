"""train.py as a user meets it: one-line errors with exit status 1, and a tiny run on an image folder
(with a corrupt file) that leaves every artifact of a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
