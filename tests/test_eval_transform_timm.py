"""The eval transform of timm's checkpoints (``EvalTransform.from_timm_cfg``), with timm itself as the oracle.

timm describes each checkpoint's evaluation in its ``pretrained_cfg`` (input size, ``crop_pct``, crop mode,
interpolation, mean, std); ``timm.data.resolve_data_config`` reads it and ``create_transform(is_training=False)``
applies it. jaxnets restates those rules without importing timm; here timm's own objects check them: the sizes of
the transform timm builds for real cfgs, its pixels on real photos (scikit-learn's two sample photos, in a few
shapes; max |diff| = 0 in float32, since both resample with PIL and normalize in float32), and a
``jaxnets-evaluate`` run on weights carrying a cfg (timm's resnet18 with random weights and randomized BatchNorm
statistics): timm's per-image top-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from jaxnets.cli.evaluate import main
from jaxnets.data import pil_eval
from jaxnets.errors import UserError
from jaxnets.eval_transform import TIMM_CFG_KEY, EvalTransform
from jaxnets.evaluate import REPORT_FILE
from jaxnets.mapping import from_torch_state_dict
from jaxnets.weights import save_weights

# bicubic crop_pct 0.95 (test: 288 px, 1.0); bilinear 0.875, no test size; bilinear 176 px (test: 224, 0.965);
# bicubic 0.875 (test: 288, 0.95)
CFGS = ("resnet50.a1_in1k", "resnet18.fb_swsl_ig1b_ft_in1k", "resnet50.tv2_in1k", "wide_resnet50_2.racm_in1k")
PROB_TOLERANCE = 1e-4  # |softmax probability, jaxnets - timm|, float32


def timm_cfg(name: str, **changes) -> dict:
    """timm's pretrained_cfg of ``name`` as a weights file stores it: through JSON (tuples become lists)."""
    return json.loads(json.dumps({**timm.models.get_pretrained_cfg(name).to_dict(), **changes}))


def timm_transform(cfg: dict, size: str = "default"):
    return timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg,
                                                                       use_test_size=size == "test"),
                                      is_training=False)


@pytest.mark.parametrize("size", ["default", "test"])
@pytest.mark.parametrize("name", CFGS)
def test_from_timm_cfg_is_what_timm_resolves_and_builds(name, size):
    cfg = timm_cfg(name)
    if size == "test" and cfg.get("test_input_size") is None:
        with pytest.raises(UserError, match=r"^w: no test size \(test_input_size, test_crop_pct\)"):
            EvalTransform.from_timm_cfg(cfg, size=size, where="w")
        return
    ours = EvalTransform.from_timm_cfg(cfg, size=size)
    resolved = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict(),
                                             use_test_size=size == "test")
    resize, crop = timm_transform(cfg, size).transforms[:2]  # timm's Resize and CenterCrop
    assert ours.crop_size == resolved["input_size"][1] == resolved["input_size"][2] == crop.size[0]
    assert ours.resize_size == (resize.size if isinstance(resize.size, int) else resize.size[0])
    assert ours.interpolation == resolved["interpolation"]
    assert ours.crop_mode == resolved["crop_mode"] == "center"
    assert ours.mean == tuple(resolved["mean"]) and ours.std == tuple(resolved["std"])
    assert EvalTransform().from_record(ours.to_record(), min_size=1, where="w") == ours


def test_a_cfg_missing_keys_takes_timm_s_defaults_and_one_jaxnets_cannot_apply_is_one_line():
    cfg = {"input_size": [3, 160, 160], "crop_pct": None, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    ours = EvalTransform.from_timm_cfg(cfg)
    resolved = timm.data.resolve_data_config(pretrained_cfg=cfg)
    assert (ours.crop_size, ours.resize_size, ours.interpolation, ours.crop_mode, ours.mean, ours.std) == (
        resolved["input_size"][1], timm_transform(cfg).transforms[0].size, resolved["interpolation"],
        resolved["crop_mode"], tuple(resolved["mean"]), tuple(resolved["std"]))
    for key, value, message in (("input_size", [3, 224, 192], r"input_size=\[3, 224, 192\], expected \[channels, "),
                                ("interpolation", "lanczos", r"interpolation='lanczos', jaxnets applies bilinear or"),
                                ("crop_pct", 1.5, r"crop_pct=1.5, expected a number in \(0, 1\]"),
                                ("std", [0.2, 0.0, 0.2], r"std=\[0.2, 0.0, 0.2\], expected 3 finite numbers > 0")):
        with pytest.raises(UserError, match=f"^f.safetensors: {message}"):
            EvalTransform.from_timm_cfg({**cfg, key: value}, where="f.safetensors")


def test_a_record_written_before_interpolation_was_recorded_loads_as_it_was_evaluated():
    old = {"resize_size": 73, "crop_size": 64, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    loaded = EvalTransform().from_record(old, min_size=1, where="w")
    assert (loaded.interpolation, loaded.crop_mode, loaded.resize_size) == ("bilinear", "center", 73)
    with pytest.raises(UserError, match=r"^w: crop_mode='zoom', expected one of center, squash, border$"):
        EvalTransform().from_record({**old, "crop_mode": "zoom"}, min_size=1, where="w")


def photos(directory: Path) -> list[Path]:
    """Real photos in a few shapes (wide, tall, small: upsampled) and both formats."""
    paths = []
    for n, array in enumerate(load_sample_images().images):  # china.jpg, flower.jpg: 427 x 640 RGB
        photo = Image.fromarray(array)
        for name, image in ((f"p{n}_full.jpg", photo),
                            (f"p{n}_tall.png", photo.transpose(Image.Transpose.ROTATE_90).resize((230, 347))),
                            (f"p{n}_small.jpg", photo.resize((150, 100))),
                            (f"p{n}_wide.png", photo.crop((0, 150, 640, 330)))):
            paths.append(directory / name)
            image.save(paths[-1], quality=92) if name.endswith(".jpg") else image.save(paths[-1])
    return paths


@pytest.mark.parametrize(("name", "changes", "size"), [
    ("resnet50.a1_in1k", {}, "default"),  # bicubic, crop_pct 0.95: resize 235, not the 256/224 rule's 236
    ("resnet18.fb_swsl_ig1b_ft_in1k", {}, "default"),  # bilinear, 0.875
    ("resnet50.a1_in1k", {}, "test"),  # 288 px, crop_pct 1.0
    ("resnet50.tv2_in1k", {"crop_mode": "squash"}, "default"),
    ("resnet50.a1_in1k", {"crop_mode": "border", "crop_pct": 1.0, "mean": [0.2, 0.6, 0.9]}, "default"),
])
def test_pixels_are_timm_s_eval_transform_to_the_last_bit(tmp_path, name, changes, size):
    cfg = timm_cfg(name, **changes)
    ours, theirs = EvalTransform.from_timm_cfg(cfg, size=size), timm_transform(cfg, size)
    for path in photos(tmp_path):
        expected = theirs(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
        actual = pil_eval.load(path, ours)
        assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
        assert np.max(np.abs(actual - expected)) == 0.0, path.name


@pytest.mark.parametrize("transform", [EvalTransform(), EvalTransform(resize_size=232), EvalTransform().at_crop(64),
                                       EvalTransform(resize_size=300, interpolation="bicubic", crop_mode="squash")])
def test_to_timm_cfg_makes_timm_show_the_model_what_jaxnets_shows_it(tmp_path, transform):
    cfg = json.loads(json.dumps(transform.to_timm_cfg()))
    assert EvalTransform.from_timm_cfg(cfg) == transform
    theirs = timm_transform(cfg)
    for path in photos(tmp_path)[:4]:
        expected = theirs(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
        assert np.max(np.abs(pil_eval.load(path, transform) - expected)) == 0.0, path.name


def randomized_timm_resnet18(num_classes: int) -> torch.nn.Module:
    """timm's resnet18, random weights and BatchNorm statistics far from 0 and 1 (a mapping that mixed them up
    would show)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_evaluate_shows_weights_with_a_timm_cfg_timm_s_pixels_and_gives_timm_s_top5(tmp_path, capsys):
    classes = [f"c{i}" for i in range(10)]
    model = randomized_timm_resnet18(len(classes))
    # timm's a1_in1k cfg at 64 px, to be quick: crop_pct 0.95, bicubic; its test size 80 px, crop_pct 1.0
    cfg = timm_cfg("resnet18.a1_in1k", input_size=[3, 64, 64], test_input_size=[3, 80, 80])
    variables = from_torch_state_dict("resnet18", model.state_dict())
    weights = save_weights(tmp_path / "w.safetensors", "resnet18", variables,
                           metadata={TIMM_CFG_KEY: cfg, "categories": classes})
    root = tmp_path / "val"
    for i, path in enumerate(photos(tmp_path)):
        (root / classes[i % 3]).mkdir(parents=True, exist_ok=True)
        path.rename(root / classes[i % 3] / path.name)
    files = sorted(root.glob("*/*"))  # ImageFolder's order: class, then file
    for size in ("default", "test"):
        out = tmp_path / size
        assert main(["--weights", str(weights), "--dataset", str(root), "--eval-size", size, "--batch-size", "4",
                     "--workers", "1", "--worker-kind", "thread", "--output", str(out), "--no-progress"]) == 0
        report = json.loads((out / REPORT_FILE).read_text())
        transform = timm_transform(cfg, size)
        with torch.no_grad():
            logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
        probs = torch.softmax(logits, 1).numpy()
        assert [p["file"] for p in report["predictions"]] == [str(f) for f in files]
        for row, p in zip(probs, report["predictions"], strict=True):
            ours = np.array(p["top5"])
            assert ours[:, 0].astype(int).tolist() == np.argsort(-row, kind="stable")[:5].tolist()
            assert np.max(np.abs(ours[:, 1] - row[ours[:, 0].astype(int)])) <= PROB_TOLERANCE
        crop = {"default": 64, "test": 80}[size]
        assert report["eval_transform"]["crop_size"] == crop and report["eval_transform"]["interpolation"] == "bicubic"
        assert f"eval transform from timm's pretrained_cfg in the weights ({size} size)" in " ".join(report["notes"])
    capsys.readouterr()
    assert main(["--weights", str(weights), "--dataset", str(root), "--preprocess", "tf", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bicubic interpolation" in err and "use --preprocess torchvision" in err
    plain = save_weights(tmp_path / "plain.safetensors", "resnet18", variables, metadata={"categories": classes})
    assert main(["--weights", str(plain), "--dataset", str(root), "--eval-size", "test", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--eval-size test: {plain} has no test size" in err


def test_a_run_from_weights_with_other_statistics_normalizes_with_them(tmp_path):
    """``train.py --pretrained`` weights whose timm cfg normalizes with 0.5/0.5 (resnet34.ra4_e3600_r224_in1k's):
    the run's images are normalized as those weights saw theirs, not with ImageNet's statistics; without
    ``--pretrained``, with torchvision's; and for one input channel by the stem-adaptation rule."""
    from jaxnets.config import TrainConfig
    from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD

    cfg = timm_cfg("resnet34.ra4_e3600_r224_in1k")
    assert cfg["mean"] == [0.5] * 3 != list(IMAGENET_MEAN)  # the reference: timm's own cfg
    variables = from_torch_state_dict("resnet18", randomized_timm_resnet18(10).state_dict())
    weights = save_weights(tmp_path / "ra4.safetensors", "resnet18", variables, metadata={TIMM_CFG_KEY: cfg})
    run = TrainConfig(model="resnet18", pretrained=str(weights))
    assert (run.data_config().mean, run.data_config().std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    fresh = TrainConfig(model="resnet18").data_config()
    assert (fresh.mean, fresh.std) == (IMAGENET_MEAN, IMAGENET_STD)
    gray = TrainConfig(model="resnet18", pretrained=str(weights), in_chans=1).data_config()
    assert (gray.mean, gray.std) == ((0.5,), (0.5,))
