"""Pushing to the Hub, offline: the Hub client's upload is intercepted, the uploaded folder checked (files, card),
then loaded back from a local Hub cache by jaxnets and by timm itself: logits equal.

resnext50_32x4d (a Bottleneck with groups) fine-tuned for 5 classes at 64 px: the push writes a non-ImageNet head,
class names, and an eval transform other than ImageNet's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import jax
import numpy as np
import pytest
import timm
from huggingface_hub import HfApi
from test_hub import COMMIT, assert_close, offline_hub_cache, random_timm_model, snapshot, timm_logits

import jaxnets
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.hub_upload import hub_config, model_card, push_to_hub

CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
TRANSFORM = EvalTransform(resize_size=73, crop_size=64)


@pytest.fixture
def run_dir(tmp_path):
    """A train.py run directory: final weights (random, randomized BatchNorm statistics), metrics, curves, config."""
    model = random_timm_model("resnext50_32x4d")
    model.reset_classifier(len(CLASSES))
    variables = jaxnets.from_torch_state_dict("resnext50_32x4d", model.state_dict())
    run = tmp_path / "run"
    jaxnets.save_weights(run / "final_weights.safetensors", "resnext50_32x4d", variables,
                         metadata={"source": "train.py", "dataset": "flowers", "categories": CLASSES,
                                   "eval_transform": TRANSFORM.to_record(), "val_top1": 0.9})
    records = [{"step": 10, "epoch": 1.0, "split": "train", "loss": 1.2},
               {"step": 10, "epoch": 1.0, "split": "val", "loss": 0.4, "top1": 0.9, "top5": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "config.json").write_text(json.dumps({"model": "resnext50_32x4d", "pretrained": "a1_in1k"}))
    return run


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    return offline_hub_cache(monkeypatch, tmp_path)


@pytest.fixture
def uploads(monkeypatch, tmp_path):
    """HfApi's repo creation and upload, intercepted: each upload's folder is copied, its arguments kept."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls.append(("upload_folder", repo_id, kwargs))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
                                          commit_message=kwargs["commit_message"], commit_description="",
                                          oid=COMMIT)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id,
                                                                                          kw)))
    return calls


def test_push_and_load_back_in_jaxnets_and_timm(run_dir, uploads, hf_cache, tmp_path):
    url = push_to_hub(run_dir, "me/flowers", private=True, revision="v1", commit_message="first", token="hf_x")
    assert url == f"https://huggingface.co/me/flowers/commit/{COMMIT}"
    assert [(c[0], c[1]) for c in uploads] == [("create_repo", "me/flowers"), ("create_branch", "me/flowers"),
                                               ("upload_folder", "me/flowers")]
    assert uploads[0][2]["private"] is True
    assert uploads[2][2] == {"revision": "v1", "commit_message": "first"}
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "classes.txt", "config.json", "curves.png",
                                                          "model.safetensors"]
    assert (uploaded / "classes.txt").read_text().split("\n")[:-1] == CLASSES
    card = (uploaded / "README.md").read_text()
    for expected in ("license: apache-2.0", "timm's timm/resnext50_32x4d.a1_in1k; licence: apache-2.0", "flowers",
                     "| val | 1.0 | 10 | 0.9 | 1 | 0.4 |", "![training curves](curves.png)",
                     "Resize the shorter side to 73 (bilinear), center crop 64",
                     'jaxnets.load_pretrained("hf-hub:me/flowers")',
                     'timm.create_model("hf-hub:me/flowers", pretrained=True)'):
        assert expected in card, expected

    shutil.copytree(uploaded, snapshot(hf_cache, "me/flowers"), dirs_exist_ok=True)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3), np.float32)
    original, original_variables = jaxnets.load_pretrained("resnext50_32x4d", weights=run_dir / "final_weights"
                                                           ".safetensors")
    expected = np.asarray(jax.jit(original.apply)(original_variables, x))
    del original_variables

    model, variables = jaxnets.load_pretrained("hf-hub:me/flowers")
    assert_close(jax.jit(model.apply)(variables, x), expected)
    weights_file = jaxnets.weights.open_pretrained(None, "hf-hub:me/flowers")
    assert weights_file.metadata["categories"] == CLASSES
    assert weights_file.metadata["licence"] == "apache-2.0"
    assert weights_file.metadata["eval_transform"] == TRANSFORM.to_record()

    timm_model = timm.create_model("hf-hub:me/flowers", pretrained=True).eval()
    assert_close(timm_logits(timm_model, x), expected)
    # timm's eval transform is the file's: resize 73 (floor(64 / crop_pct)), crop 64
    config = timm.data.resolve_data_config({}, model=timm_model)
    transform = timm.data.create_transform(**config)
    assert (transform.transforms[0].size, transform.transforms[1].size) == (73, [64, 64])


def test_vgg_config_and_card():
    """A VGG's config names timm's classifier (its weights' layout: test_hub's test_vgg_layout_both_ways), and its
    card says where timm's VGG and jaxnets' agree."""
    spec = jaxnets.get_spec("vgg11")
    weights_file = jaxnets.WeightsFile(name="vgg11", variables={}, model_options={}, metadata={}, num_classes=3)
    config = hub_config(spec, weights_file, EvalTransform(), ["a", "b", "c"], "mit", None)
    assert (config["architecture"], config["num_classes"], config["pretrained_cfg"]["classifier"],
            config["pretrained_cfg"]["first_conv"]) == ("vgg11", 3, "head.fc", "features.0")
    card = model_card("me/vgg", spec, weights_file, EvalTransform(), ["a", "b", "c"], "mit", None, [], False)
    assert "only at 224 px input" in card


def test_push_errors_are_one_line(run_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(UserError, match=r"^me/flowers: no Hugging Face token: log in \(hf auth login\), set "
                                        r"HF_TOKEN, or pass a token$"):
        push_to_hub(run_dir, "me/flowers")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^me/flowers: upload to the Hugging Face Hub failed \(Cannot reach "):
        push_to_hub(run_dir, "me/flowers", token="hf_x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty: a directory without final_weights.safetensors"):
        push_to_hub(empty, "me/flowers", token="hf_x")


def test_cli_reports_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxnets.cli.push", str(tmp_path / "missing.safetensors"),
                             "me/x", "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    missing = tmp_path / "missing.safetensors"
    assert result.stderr.strip().splitlines() == [f"python -m jaxnets.cli.push: error: {missing}: no such file"]


def test_dry_run_writes_the_folder(run_dir, tmp_path):
    from jaxnets.cli import push as cli

    assert cli.main([str(run_dir), "me/flowers", "--dry-run", str(tmp_path / "out"), "--license", "mit"]) == 0
    assert "license: mit" in (tmp_path / "out" / "README.md").read_text()
    assert Path(tmp_path / "out" / "model.safetensors").is_file()
