"""Every Python block of the README runs as printed (issue 20), in order, in one namespace, as a reader would paste
them, with only the substitutions an offline CPU test needs: smaller images, and torchvision's weights replaced by
random torchvision weights placed in the cache (there is no download here)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torchvision

import jaxnets
from jaxnets import trees
from jaxnets.weights import save_weights, self_supervised
from jaxnets.weights.cache import HOME_ENV
from jaxnets.weights.hub import TIMM_WEIGHTS
from jaxnets.weights.pretrained import cached_weights_path
from jaxnets.weights.self_supervised import SELF_SUPERVISED

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit the offline Hub cache's refs/main names

README = Path(__file__).resolve().parents[1] / "README.md"

# (text in the README, what the test runs instead, how often it occurs): each must still be found, so a README
# change that makes a substitution silently stop applying fails here.
SUBSTITUTIONS = [
    ("224", "64", None),                           # image sizes: the same code on 64 px images
    ('name = "resnet50"', 'name = "resnet18"', 1),  # the transfer-learning block: a smaller model to train
    # the first block's calls (init, eval, train, pre_logits) on a smaller ResNet: its op-by-op init is the
    # slowest part of the test (resnet50's shapes and channels are checked from the backbone block on)
    ('create_model("resnet50", num_classes=10, dtype=jnp.bfloat16)',
     'create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)', 1),
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def offline(blocks: list[str]) -> list[str]:
    joined = "\n".join(blocks)
    for old, _, count in SUBSTITUTIONS:
        found = joined.count(old)
        assert found and (count is None or found == count), (old, found)
    for old, new, _ in SUBSTITUTIONS:
        blocks = [block.replace(old, new) for block in blocks]
    return blocks


@pytest.fixture
def pretrained_cache(tmp_path, monkeypatch):
    """torchvision's resnet50 with random weights, converted, under both of its published weights' cache names."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    state = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
    variables = jaxnets.from_torch_state_dict("resnet50", state)
    for version in jaxnets.get_spec("resnet50").weight_versions:
        save_weights(cached_weights_path("resnet50", version), "resnet50", variables)
    hub_repos_and_backbones(tmp_path, monkeypatch, state, variables)
    torch_resnet18 = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
    save_weights(cached_weights_path("resnet18"), "resnet18", jaxnets.from_torch_state_dict("resnet18",
                                                                                            torch_resnet18))


def hub_repos_and_backbones(tmp_path, monkeypatch, state, variables):
    """The Hub repos the README names, in an offline Hub-client cache as timm lays them out (config.json and
    model.safetensors: timm's ResNet keys are torchvision's), and the self-supervised backbones in jaxnets' cache."""
    import huggingface_hub.constants
    from safetensors.numpy import save_file

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time by the client
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for tag in ("a1_in1k", "fb_swsl_ig1b_ft_in1k"):
        weights = TIMM_WEIGHTS["resnet50"][tag]
        folder = cache / f"models--timm--resnet50.{tag}" / "snapshots" / COMMIT
        folder.mkdir(parents=True)
        (folder.parents[1] / "refs").mkdir()
        (folder.parents[1] / "refs" / "main").write_text(COMMIT)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(folder / "model.safetensors"))
        config = {"architecture": "resnet50", "num_classes": 1000, "pretrained_cfg": weights.pretrained_cfg()}
        (folder / "config.json").write_text(json.dumps(config))
    backbone = {k: v for k, v in trees.flatten(variables).items() if "/fc/" not in k}
    for name in ("dino", "swav"):
        save_weights(self_supervised.cached_path("resnet50", SELF_SUPERVISED[name]), "resnet50",
                     trees.unflatten(backbone), model_options={"features_only": True})


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, pretrained_cache, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "the README's Python examples were not found"
    monkeypatch.chdir(tmp_path)  # what the blocks write (runs/probe, r18-stablehlo) goes here
    module = types.ModuleType("readme_blocks")  # a real module: Flax's dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for number, block in enumerate(offline(blocks), 1):
        exec(compile(block, f"README.md, Python block {number}", "exec"), namespace)
    out = capsys.readouterr().out
    # What the blocks print and compute, as the README's comments say.
    assert "FeatureInfo(index=4, node='layer4', channels=2048, reduction=32)" in out
    assert [m.shape for m in namespace["maps"]] == [(8, 32, 32, 64), (8, 16, 16, 256), (8, 8, 8, 512),
                                                     (8, 4, 4, 1024), (8, 2, 2, 2048)]
    assert [p.shape for p in namespace["pyramid"]] == [(8, 16, 16, 256), (8, 8, 8, 256), (8, 4, 4, 256),
                                                        (8, 2, 2, 256)]
    assert [c.shape[-1] for c in (namespace["c3"], namespace["c4"], namespace["c5"])] == [512, 1024, 2048]
    assert np.isfinite(float(namespace["loss"])) and 0.0 <= namespace["metrics"]["top1"] <= 1.0
    assert 0.0 <= namespace["accuracy"] <= 1.0 and (tmp_path / "digits_resnet18.safetensors").is_file()  # NNX
    cams = np.asarray(namespace["cams"])  # the class activation maps, laid on the photos at their own size
    assert cams.shape == (2, 64, 64) and cams.min() >= 0.0 and cams.max() <= 1.0
    assert [picture.size for picture in namespace["pictures"]] == [(640, 427)] * 2 and (tmp_path / "cams.png").is_file()
    exported = namespace["logits"]
    assert exported.shape == (4, 1000)
    model, variables = namespace["model"], namespace["variables"]
    np.testing.assert_allclose(exported, model.apply(variables, np.zeros((4, 64, 64, 3), np.float32)),
                               rtol=1e-4, atol=1e-4 * (1 + float(np.abs(exported).max())))
    assert jax.tree.leaves(namespace["fpn_variables"])
