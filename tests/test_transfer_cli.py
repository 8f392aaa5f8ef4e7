"""Transfer learning end to end through train.py on the embedded digits: a backbone trained on digits 0-4
transfers to digits 5-9 (frozen backbone, linear probe), and bad transfer flags fail with one clear line."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from test_transfer import random_variables

import jaxnets
from jaxnets.weights import load_weights, save_weights

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)

# Small and fast: resnet18 on 16 px digits, batch 32 (22 steps per epoch on five classes), no warmup, no
# persistent compilation cache but in the end-to-end test (it is global JAX state: conftest puts it back).
COMMON = ["--model", "resnet18", "--warmup-epochs", "0", "--no-progress", "--compile-cache", ""]
WEIGHTS = "final_weights.safetensors"


def train(workdir: Path, *args: str) -> dict:
    """Run train.py in-process; the last validation record of the run."""
    assert train_cli.main([*COMMON, "--workdir", str(workdir), *args]) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "val"][-1]


def flat_variables(path: Path) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(load_weights(path).variables).items()}


def test_a_backbone_trained_on_digits_0_4_transfers_to_5_9(tmp_path, capsys):
    """Pretrain on 0-4; then, on 5-9 with the same small budget, a frozen-backbone run beats training from
    scratch and leaves every backbone parameter and BatchNorm statistic bit-identical; a linear probe on the
    same backbone works through train.py too. One test: the pretraining is its most expensive part."""
    cache = ("--compile-cache", str(tmp_path / "cache"))  # pretraining and scratch are one program (5 classes)
    train(tmp_path / "pretrain", "--classes", "0-4", "--epochs", "2", *cache)
    backbone = tmp_path / "pretrain" / WEIGHTS
    # The eval sizes it was validated at (16 px digits: shorter side 18, crop 16), for jaxnets.predict.
    assert load_weights(backbone).metadata["eval_transform"] == {"resize_size": 18, "crop_size": 16,
                                                                 "mean": [0.485, 0.456, 0.406],
                                                                 "std": [0.229, 0.224, 0.225]}
    # The same 22 steps, hyperparameters and data order for both. Measured (2026-11-25): lr 0.4 -> transfer
    # 0.704, scratch 0.201; default lr 0.1 with its warmup -> 0.665 / 0.391.
    budget = ["--classes", "5-9", "--epochs", "1", "--lr", "0.4", *cache]
    capsys.readouterr()
    transfer = train(tmp_path / "transfer", *budget, "--pretrained", str(backbone), "--freeze", "backbone")
    # The log says what is frozen: all but the 512 x 5 + 5 classifier, BatchNorm layers on running statistics.
    assert re.search(r"--freeze backbone: frozen 11\.2M / trainable 2\.6k params; BatchNorm on running statistics "
                     r"in bn1, layer1", capsys.readouterr().out)
    scratch = train(tmp_path / "scratch", *budget)
    print(f"digits 5-9 after 22 steps: frozen 0-4 backbone top1 {transfer['top1']:.3f}, "
          f"from scratch {scratch['top1']:.3f}")
    assert transfer["top1"] > scratch["top1"]

    before, after = flat_variables(backbone), flat_variables(tmp_path / "transfer" / WEIGHTS)
    assert before.keys() == after.keys()
    for key, value in after.items():
        if key.startswith("params/fc/"):
            assert not np.array_equal(value, before[key]), f"{key} did not train"
        else:  # parameters and BatchNorm statistics of the frozen backbone
            np.testing.assert_array_equal(value, before[key], err_msg=key)

    probe_dir = tmp_path / "probe"
    assert train_cli.main([*COMMON, "--workdir", str(probe_dir), "--classes", "5-9", "--linear-probe", "logreg",
                           "--pretrained", str(backbone)]) == 0
    metrics = json.loads((probe_dir / "probe_metrics.json").read_text())
    print(f"logreg probe on digits 5-9 with the 0-4 backbone: {metrics}")
    assert metrics["top1"] > 0.8
    features = np.load(probe_dir / "probe_features.npz")
    assert features["train_features"].shape[1] == 512
    assert len(features["val_labels"]) == metrics["num_val"]
    assert (probe_dir / "probe_classifier.joblib").is_file()


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    """A resnet18 weights file for 5 classes (random values: the bad-flag runs stop before training)."""
    model = jaxnets.create_model("resnet18", num_classes=5)
    return save_weights(tmp_path_factory.mktemp("weights") / WEIGHTS, "resnet18", random_variables(model, 16))


@pytest.mark.parametrize("args, message", [
    (["--freeze", "layer5"], "resnet18: freeze pattern 'layer5' matches no parameter; top-level modules: bn1, "),
    (["--freeze", "backbone,fc"], "resnet18: freeze 'backbone,fc' leaves nothing trainable"),
    (["--freeze", "conv1", "--backbone-lr-mult", "-1"], "--backbone-lr-mult must be > 0, got -1.0"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1], got 0.0"),
    (["--model", "vgg11", "--freeze", "backbone"], "holds resnet18 weights, not vgg11"),
])
def test_bad_transfer_flags_fail_with_one_line(resnet18_weights, tmp_path, capsys, args, message):
    """From a weights file: the errors come after loading it, before anything compiles."""
    argv = [*COMMON, "--workdir", str(tmp_path), "--classes", "5-9", "--steps", "1", "--pretrained",
            str(resnet18_weights), *args]
    assert train_cli.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: ") and message in errors[0], errors
    assert not (tmp_path / WEIGHTS).exists()
