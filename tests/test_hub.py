"""Weights from the Hugging Face Hub, offline: timm itself writes its Hub files (random weights, randomized
BatchNorm statistics) into a local cache laid out as the Hub client's, and jaxnets loads them with
HF_HUB_OFFLINE=1 and gives timm's logits.

Models: resnet18 (BasicBlock, torchvision's keys) and vgg11_bn (timm's own VGG layout, with BatchNorm), at 224 px,
where timm's VGG equals torchvision's. A Bottleneck with groups (resnext50_32x4d; resnet50 and wide_resnet50_2
differ from it only in the widths and groups bound) is loaded from a Hub repo, by jaxnets and by timm, in
test_push.py; vgg16 and vgg16_bn take vgg11_bn's code path with more (slower, on CPU) layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import jax
import numpy as np
import pytest
import timm
import torch
from timm.models._hub import save_for_hf

import jaxnets
from jaxnets.errors import UserError
from jaxnets.weights import TIMM_CFG_KEY, TIMM_WEIGHTS, WeightsError, hub, timm_layout

TOLERANCE = 1e-4  # max |jax - timm| <= TOLERANCE * (1 + max |timm|), float32 logits
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    return offline_hub_cache(monkeypatch, tmp_path)


def offline_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hub-client cache under tmp_path, downloads off; the jaxnets cache under tmp_path too."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time by the client
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "jaxnets"))
    return cache


def snapshot(cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """The snapshot folder of ``repo_id`` at ``commit`` in the client's cache layout, ``refs/<ref>`` pointing to it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def random_timm_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """timm's ``arch`` with random weights and random BatchNorm statistics (else eval mode hides their mapping)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def timm_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    diff = float(np.max(np.abs(np.asarray(actual) - expected)))
    assert diff <= TOLERANCE * (1 + float(np.max(np.abs(expected)))), diff


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_timm_hub_repo_gives_timm_logits(hf_cache, arch):
    model = random_timm_model(arch)
    repo_id = f"timm/{arch}.test_in1k"
    save_for_hf(model, snapshot(hf_cache, repo_id), safe_serialization=True)
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3), np.float32)
    expected = timm_logits(model, x)
    del model

    weights_file = jaxnets.weights.open_pretrained(f"hf-hub:{repo_id}")  # the repo names its model
    assert weights_file.path == hub.cached_hub_path(repo_id, COMMIT)
    jax_model, variables = jaxnets.weights.instantiate(weights_file)
    assert_close(jax.jit(jax_model.apply)(variables, x), expected)

    recorded = weights_file.metadata
    blob = hf_cache / f"models--timm--{arch}.test_in1k" / "snapshots" / COMMIT / "model.safetensors"
    assert recorded["hub"] == {"repo_id": repo_id, "revision": "main", "commit": COMMIT,
                               "file": "model.safetensors", "sha256": jaxnets.weights.file_sha256(blob)}
    config = json.loads((blob.parent / "config.json").read_text())
    assert recorded[TIMM_CFG_KEY] == config["pretrained_cfg"]
    assert recorded["licence"] == config["pretrained_cfg"].get("license")
    assert ("note" in recorded) == arch.startswith("vgg")


def test_vgg_layout_both_ways():
    """timm's VGG keys and shapes (a model on the meta device: no weights made) map to torchvision's and back."""
    import torchvision

    with torch.device("meta"):
        timm_shapes = {k: tuple(v.shape) for k, v in timm.create_model("vgg16", pretrained=False).state_dict().items()}
        reference = {k: tuple(v.shape) for k, v in torchvision.models.vgg16().state_dict().items()}
    timm_state = {k: np.empty(shape, np.float32) for k, shape in timm_shapes.items()}  # untouched memory: fast
    torchvision_state = timm_layout.from_timm_state_dict("vgg16", timm_state)
    assert {k: v.shape for k, v in torchvision_state.items()} == reference
    back = timm_layout.to_timm_state_dict("vgg16", torchvision_state)
    assert {k: v.shape for k, v in back.items()} == timm_shapes
    assert all(np.shares_memory(back[k], timm_state[k]) for k in timm_state)  # reshapes, not copies
    fc1 = np.arange(8 * 512 * 7 * 7, dtype=np.float32).reshape(8, 512, 7, 7)
    flat = timm_layout.from_timm_state_dict("vgg16", {"pre_logits.fc1.weight": fc1})["classifier.0.weight"]
    assert np.array_equal(flat, torch.flatten(torch.from_numpy(fc1), 1).numpy())  # torch's C, H, W flatten order
    assert timm_layout.to_timm_state_dict("resnet18", {"fc.weight": 1}) == {"fc.weight": 1}


def test_registered_tags_are_timms():
    from timm.models import get_pretrained_cfg

    for model, tags in TIMM_WEIGHTS.items():
        assert model in jaxnets.list_models()
        for tag, entry in tags.items():
            cfg = get_pretrained_cfg(f"{model}.{tag}").to_dict()
            assert cfg["hf_hub_id"] == entry.repo_id
            mine = entry.pretrained_cfg()
            for key in ("crop_pct", "interpolation", "crop_mode", "test_crop_pct", "license"):
                assert mine.get(key) == cfg.get(key), (model, tag, key)
            for key in ("input_size", "test_input_size", "mean", "std"):
                assert mine.get(key) == (list(cfg[key]) if cfg.get(key) else None), (model, tag, key)


def test_tag_resolves_to_its_repo(hf_cache, monkeypatch):
    opened = []
    monkeypatch.setattr(hub, "open_hub", lambda name, model, timm_tag=None: opened.append((name, timm_tag))
                        or (_ for _ in ()).throw(WeightsError("stop")))
    with pytest.raises(WeightsError, match="stop"):
        jaxnets.load_pretrained("resnet50", weights="a1_in1k")
    assert opened == [(hub.HubName("timm/resnet50.a1_in1k", "main"), TIMM_WEIGHTS["resnet50"]["a1_in1k"])]


def test_weights_names():
    from jaxnets.registry import is_weights_name

    assert all(is_weights_name(n) for n in ("IMAGENET1K_V2", "a1_in1k", "dino", "hf-hub:timm/resnet50.a1_in1k"))
    assert not any(is_weights_name(n) for n in ("./a1_in1k", "w.safetensors", "runs/x", Path("dino")))
    with pytest.raises(UserError, match=r"^resnet18: no weights named 'a1h_in1k'; torchvision's for resnet18: "
                                        r"IMAGENET1K_V1 \(DEFAULT = IMAGENET1K_V1\); timm's: fb_swsl_ig1b_ft_in1k, "
                                        r"fb_ssl_yfcc100m_ft_in1k, a1_in1k; .*a file so named: \./a1h_in1k$"):
        jaxnets.load_pretrained("resnet18", weights="a1h_in1k")


def test_bad_hub_inputs_are_one_line(hf_cache):
    with pytest.raises(WeightsError, match=r"^hf-hub:nobody/nothing: not in the Hugging Face cache .*"
                                           r"\(HF_HUB_OFFLINE=1\); check the repo name, or download it once online$"):
        jaxnets.load_pretrained("hf-hub:nobody/nothing")
    folder = snapshot(hf_cache, "someone/vit")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224", "num_classes": 1000}))
    with pytest.raises(WeightsError, match=r"^hf-hub:someone/vit: architecture 'vit_base_patch16_224' \(its "
                                           r"config.json\) is not a jaxnets model; jaxnets has alexnet, vgg11, "):
        jaxnets.load_pretrained("hf-hub:someone/vit")
    with pytest.raises(WeightsError, match=r"^hf-hub:someone/vit: neither model.safetensors nor pytorch_model.bin"):
        (folder / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
        jaxnets.load_pretrained("resnet18", weights="hf-hub:someone/vit")
    with pytest.raises(WeightsError, match=r"^hf-hub:someone/vit: holds resnet18 weights, not resnet34$"):
        jaxnets.load_pretrained("resnet34", weights="hf-hub:someone/vit")
    with pytest.raises(WeightsError, match=r"^hf-hub:a/b@: expected hf-hub:ORG/REPO or"):
        jaxnets.load_pretrained("hf-hub:a/b@")


def test_missing_huggingface_hub_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(WeightsError, match=r"^hf-hub:timm/x: Hub weights need huggingface_hub \(pip install .*\[hub\]"):
        jaxnets.load_pretrained("hf-hub:timm/x")


def test_convert_cli_takes_hub_names(hf_cache, tmp_path, capsys):
    from jaxnets.cli import convert

    save_for_hf(random_timm_model("resnet18"), snapshot(hf_cache, "me/r18"), safe_serialization=True)
    out = tmp_path / "r18.safetensors"
    assert convert.main(["hf-hub:me/r18", "--out", str(out), "--verify"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"resnet18: hf-hub:me/r18@{COMMIT} (sha256 ") and f"-> {out}; verified" in line, line
    assert jaxnets.load_weights(out).sha256 == jaxnets.load_weights(hub.cached_hub_path("me/r18", COMMIT)).sha256
    assert convert.main(["resnet18", "--weights", "a1h_in1k"]) == 1
    assert "resnet18: no weights named 'a1h_in1k'" in capsys.readouterr().err
