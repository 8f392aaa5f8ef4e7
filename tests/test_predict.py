"""``python -m jaxnets.predict``: preprocessing against torchvision's transforms, batching, and the CLI.

Preprocessing must equal torchvision's eval pipeline on the same file exactly (the README's "identical
pixels": same PIL resize, same float32 arithmetic); the CLI's probabilities must equal torchvision's (4 decimals).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch_oracle import oracle_model
from torchvision import transforms
from torchvision.transforms import v2

import jaxnets
from jaxnets import predict
from jaxnets.cli import predict as predict_cli
from jaxnets.final_weights import FINAL_WEIGHTS
from jaxnets.registry import EvalTransform
from jaxnets.weights import save_weights


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A random image with structure at several scales, so resampling errors would show."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def write_image(path, height: int, width: int, mode: str, seed: int = 0):
    image = Image.fromarray(smooth_image(height, width, seed))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(smooth_image(height, width, seed + 1)[..., 0]))
    elif mode == "P":
        image = image.quantize(64)
        image.info["transparency"] = 0
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def torchvision_eval(path, name: str = "resnet18") -> np.ndarray:
    """torchvision's pipeline: PIL ``convert('RGB')`` and the weights' own ``transforms()`` (HWC)."""
    preset = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
    with Image.open(path) as image:
        return preset(image.convert("RGB")).numpy().transpose(1, 2, 0)


CASES = [  # (height, width, mode, suffix)
    (300, 241, "RGB", ".jpg"), (233, 347, "RGB", ".png"), (256, 256, "L", ".jpg"), (200, 150, "RGBA", ".png"),
    (517, 389, "P", ".png"), (224, 900, "LA", ".png"), (120, 90, "RGB", ".png"),  # upsampled
]


@pytest.mark.parametrize(("height", "width", "mode", "suffix"), CASES)
def test_preprocess_equals_torchvision_exactly(tmp_path, height, width, mode, suffix):
    path = write_image(tmp_path / f"image{suffix}", height, width, mode)
    ours = predict.preprocess(predict.read_image(path))
    expected = torchvision_eval(path)
    assert ours.shape == expected.shape == (224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)  # measured: 0.0 difference on every case
    classic = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize(EvalTransform().mean, EvalTransform().std)])
    with Image.open(path) as image:
        np.testing.assert_array_equal(ours, classic(image.convert("RGB")).numpy().transpose(1, 2, 0))


def test_center_crop_pads_small_images_like_torchvision():
    image = Image.fromarray(smooth_image(100, 61, 3))
    expected = transforms.CenterCrop(80)(image)
    assert np.array_equal(np.asarray(predict.center_crop(image, 80)), np.asarray(expected))


class CountingModel:
    """Counts how often the forward pass is traced (= compiled) by ``jax.jit``."""

    def __init__(self, model):
        self.model, self.traces = model, 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torch_model = oracle_model("resnet18")
    variables = jaxnets.from_torch_state_dict("resnet18", {k: v.numpy() for k, v in torch_model.state_dict().items()})
    path = save_weights(tmp_path_factory.mktemp("weights") / "resnet18.safetensors", "resnet18", variables)
    return torch_model, variables, path


def test_classify_compiles_once_and_padding_changes_nothing(resnet18):
    _, variables, _ = resnet18
    model = CountingModel(jaxnets.create_model("resnet18"))
    images = np.random.default_rng(0).standard_normal((5, 32, 32, 3)).astype(np.float32)
    batched = predict.classify(model, variables, images, batch_size=2)  # batches of 2, 2, 1 (+1 padding)
    assert model.traces == 1
    one_batch = predict.classify(jaxnets.create_model("resnet18"), variables, images, batch_size=5)
    np.testing.assert_allclose(batched, one_batch, rtol=0, atol=1e-5 * (1 + np.abs(one_batch).max()))


def test_cli_prints_top_k_like_torchvision_and_reports_unreadable_files(resnet18, tmp_path, capsys):
    torch_model, _, weights = resnet18
    good = [write_image(tmp_path / "a.jpg", 300, 241, "RGB"), write_image(tmp_path / "b.png", 233, 347, "P", 1),
            write_image(tmp_path / "c.png", 256, 300, "L", 2)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:200])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    argv = ["--model", "resnet18", "--weights", str(weights), "--top", "3", "--batch-size", "2",
            str(good[0]), str(broken), str(good[1]), str(not_an_image), str(tmp_path / "missing.jpg"), str(good[2])]

    assert predict_cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 4  # one line per unreadable file, one summary
    for bad in (broken, not_an_image, tmp_path / "missing.jpg"):
        assert f"jaxnets-predict: error: {bad}: cannot read image" in err
    assert "3 of 6 image(s) could not be read" in err

    with torch.no_grad():
        probs = torch.softmax(torch_model(torch.stack([torch.from_numpy(torchvision_eval(p).transpose(2, 0, 1))
                                                       for p in good])), -1).numpy()
    lines = out.splitlines()
    assert lines[0::4] == [str(p) for p in good]
    categories = jaxnets.imagenet_categories()
    for i, expected in enumerate(probs):
        best = np.argsort(-expected)[:3]
        assert lines[4 * i + 1: 4 * i + 4] == [f"  {expected[j]:7.4f}  {categories[j]}" for j in best]


def test_cli_uses_class_names_recorded_with_fine_tuned_weights(resnet18, tmp_path, capsys):
    _, variables, _ = resnet18
    variables = {**variables, "params": {**variables["params"],
                                         "fc": {"kernel": variables["params"]["fc"]["kernel"][:, :3],
                                                "bias": np.array([0.0, 50.0, 0.0], np.float32)}}}
    weights = save_weights(tmp_path / "tiny.safetensors", "resnet18", variables,
                           metadata={"categories": ["ant", "bee", "cat"]})
    image = write_image(tmp_path / "x.png", 64, 64, "RGB")
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), "--top", "5", str(image)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(image) and len(out.splitlines()) == 4 and out.splitlines()[1].endswith("  bee")
    run = tmp_path / "run"  # a train.py run directory stands for its final weights, which name their model
    run.mkdir()
    (run / FINAL_WEIGHTS).write_bytes(weights.read_bytes())
    assert predict_cli.main(["--weights", str(run), "--top", "5", str(image)]) == 0
    assert capsys.readouterr().out == out


def test_cli_uses_the_eval_sizes_recorded_with_fine_tuned_weights(resnet18, tmp_path, capsys):
    """train.py records the sizes it validated at; predict shows the model those, not ImageNet's 256/224."""
    torch_model, variables, _ = resnet18
    weights = save_weights(tmp_path / "small.safetensors", "resnet18", variables,
                           metadata={"eval_transform": {"resize_size": 73, "crop_size": 64}})
    image = write_image(tmp_path / "y.jpg", 150, 110, "RGB")
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), "--top", "2", str(image)]) == 0
    out = capsys.readouterr().out.splitlines()

    ref = EvalTransform()
    preset = transforms.Compose([transforms.Resize(73, antialias=True), transforms.CenterCrop(64),
                                 transforms.ToTensor(), transforms.Normalize(ref.mean, ref.std)])
    with Image.open(image) as pil, torch.no_grad():
        probs = torch.softmax(torch_model(preset(pil.convert("RGB"))[None]), -1).numpy()[0]
    categories = jaxnets.imagenet_categories()
    assert out[1:] == [f"  {probs[j]:7.4f}  {categories[j]}" for j in np.argsort(-probs)[:2]]


def test_cli_rejects_weights_of_another_model(resnet18, capsys):
    assert predict_cli.main(["--model", "resnet34", "--weights", str(resnet18[2]), "x.jpg"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds resnet18 weights, not resnet34" in err


@pytest.mark.parametrize("entry, message", [
    ({"resize_size": 73.0, "crop_size": 64.0}, "crop_size=64.0, expected an integer from 1 to 8192"),
    ({"resize_size": True, "crop_size": 64}, "resize_size=True, expected an integer from 64 to 8192"),
    ({"resize_size": 40, "crop_size": 64}, "resize_size=40, expected an integer from 64 to 8192"),
    ({"crop_size": 0}, "crop_size=0, expected an integer from 1 to 8192"),
    ({"resize_size": 10**9, "crop_size": 64}, "resize_size=1000000000, expected an integer from 64 to 8192"),
    ({"resize_size": 73}, "expected {'crop_size': int, 'resize_size': int (optional), 'mean'"),
    ("64px", "expected {'crop_size': int, 'resize_size': int (optional), 'mean'"),
    ({"crop_size": 64, "std": [0.2, 0.2]}, "std=[0.2, 0.2], expected 3 finite numbers > 0 (in_chans=3)"),
])
def test_malformed_eval_sizes_are_a_one_line_error_naming_the_file(resnet18, tmp_path, capsys, entry, message):
    _, variables, _ = resnet18
    weights = save_weights(tmp_path / "bad.safetensors", "resnet18", variables, metadata={"eval_transform": entry})
    image = write_image(tmp_path / "z.png", 40, 40, "RGB")
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), str(image)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"jaxnets-predict: error: {weights}: metadata eval_transform") and message in err


def test_crop_size_alone_resizes_as_training_does(resnet18, tmp_path):
    _, variables, _ = resnet18
    weights = save_weights(tmp_path / "crop.safetensors", "resnet18", variables,
                           metadata={"eval_transform": {"crop_size": 64}})
    transform = predict.eval_transform("resnet18", jaxnets.weights.load_weights(weights))
    assert (transform.resize_size, transform.crop_size) == (73, 64)  # round(64 * 256 / 224), as DataConfig


def test_sixteen_bit_grayscale_is_read_as_training_reads_it(tmp_path):
    """TensorFlow (train.py's decoder) keeps each 16-bit value's high byte; PIL's convert('RGB') saturates."""
    import tensorflow as tf

    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(np.asarray(predict.read_image(path)), decoded)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_one_unreadable_file(resnet18, tmp_path, capsys, monkeypatch):
    _, _, weights = resnet18
    good = write_image(tmp_path / "good.png", 64, 64, "RGB")
    huge = write_image(tmp_path / "huge.png", 400, 400, "RGB")
    # 400 x 400 is then more than twice the limit (an error); the good image resized to 256 x 256 and cropped to
    # 224 x 224 is under the limit itself (PIL warns above it: a limit under 224 x 224 warned on every good image).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 70_000)
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), str(huge), str(good)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[:1] == [str(good)], err
    assert f"jaxnets-predict: error: {huge}: cannot read image (Image size (160000 pixels) exceeds limit" in err


# --- models of other channel counts: predict reads what the weights file records --------------------------------


def _adapted(resnet18, tmp_path, in_chans: int):
    """resnet18's weights adapted to ``in_chans`` and saved as train.py saves a run's: with its options and the
    eval transform (sizes and the statistics for its channels); and torchvision's resnet18 with that stem."""
    torch_model, _, path = resnet18
    model, variables = jaxnets.load_pretrained("resnet18", weights=path, in_chans=in_chans)
    transform = EvalTransform().for_channels(in_chans).at_crop(64)
    weights = save_weights(tmp_path / f"c{in_chans}.safetensors", "resnet18", variables,
                           model_options=jaxnets.model_options("resnet18", model),
                           metadata={"eval_transform": transform.to_record()})
    adapted = copy.deepcopy(torch_model)
    adapted.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    adapted.conv1.weight.data = torch.from_numpy(np.ascontiguousarray(
        variables["params"]["conv1"]["kernel"].transpose(3, 2, 0, 1)))
    return weights, transform, adapted.eval()


def _printed(out: str, probs: np.ndarray, top: int) -> list[str]:
    categories = jaxnets.imagenet_categories()
    return [f"  {probs[j]:7.4f}  {categories[j]}" for j in np.argsort(-probs)[:top]]


def test_a_grayscale_model_classifies_grayscale_images_as_torchvision(resnet18, tmp_path, capsys):
    """in_chans=1 recorded: images are read as grayscale ('L', as training decodes them) and normalized with the
    1-channel statistics; torchvision's transforms on the 'L' image and its model with the same stem agree."""
    weights, transform, torch_model = _adapted(resnet18, tmp_path, 1)
    image = write_image(tmp_path / "gray.png", 150, 110, "L")
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), "--top", "3", str(image)]) == 0
    out = capsys.readouterr().out.splitlines()
    preset = transforms.Compose([transforms.Resize(73, antialias=True), transforms.CenterCrop(64),
                                 transforms.ToTensor(), transforms.Normalize(transform.mean, transform.std)])
    with Image.open(image) as pil, torch.no_grad():
        assert preset(pil)[None].shape == (1, 1, 64, 64)
        probs = torch.softmax(torch_model(preset(pil)[None]), -1).numpy()[0]
    assert out == [str(image), *_printed(out, probs, 3)]


def test_npy_arrays_are_read_resized_and_normalized_per_channel(resnet18, tmp_path, capsys):
    """in_chans=5 recorded: ``.npy`` arrays (H, W, 5), scaled by dtype and each channel resized like an image;
    against torchvision's tensor transforms (antialiased bilinear resize, center crop, normalize): 1e-5."""
    weights, transform, torch_model = _adapted(resnet18, tmp_path, 5)
    rng = np.random.default_rng(3)
    pixels = np.stack([smooth_image(150, 110, seed)[..., 0] for seed in range(5)], -1)
    np.save(tmp_path / "bands.npy", pixels)  # uint8: / 255
    np.save(tmp_path / "bands16.npy", pixels.astype(np.uint16) * 257)  # uint16: / 65535, the same values
    ours = predict.load_input(tmp_path / "bands.npy", transform)
    np.testing.assert_allclose(predict.load_input(tmp_path / "bands16.npy", transform), ours, rtol=0, atol=1e-5)
    preset = v2.Compose([v2.Resize(73, antialias=True), v2.CenterCrop(64), v2.Normalize(transform.mean, transform.std)])
    theirs = preset(torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255)).numpy().transpose(1, 2, 0)
    assert ours.shape == (64, 64, 5) and np.abs(ours - theirs).max() <= 1e-5
    np.save(tmp_path / "wrong.npy", rng.uniform(0, 1, (30, 30, 3)).astype(np.float32))
    image = write_image(tmp_path / "rgb.png", 40, 40, "RGB")
    argv = ["--model", "resnet18", "--weights", str(weights), "--top", "2", str(tmp_path / "bands.npy"),
            str(tmp_path / "wrong.npy"), str(image)]
    assert predict_cli.main(argv) == 1
    out, err = capsys.readouterr()
    with torch.no_grad():
        probs = torch.softmax(torch_model(torch.from_numpy(ours.transpose(2, 0, 1))[None]), -1).numpy()[0]
    assert out.splitlines() == [str(tmp_path / "bands.npy"), *_printed(out, probs, 2)]
    assert err.splitlines() == [
        f"jaxnets-predict: error: {tmp_path / 'wrong.npy'}: cannot read image (array of shape (30, 30, 3) has 3 "
        f"channel(s); the model takes in_chans=5)",
        f"jaxnets-predict: error: {image}: cannot read image (an image file gives 1 or 3 channels; the model takes "
        f"in_chans=5: give .npy arrays (H, W, 5))",
        "jaxnets-predict: error: 2 of 3 image(s) could not be read"]


def test_backbone_weights_have_nothing_to_classify_with(resnet18, tmp_path, capsys):
    _, _, path = resnet18
    model, variables = jaxnets.load_pretrained("resnet18", weights=path, features_only=True)
    weights = save_weights(tmp_path / "backbone.safetensors", "resnet18", variables,
                           model_options=jaxnets.model_options("resnet18", model))
    assert predict_cli.main(["--model", "resnet18", "--weights", str(weights), "x.png"]) == 1
    assert capsys.readouterr().err == (f"jaxnets-predict: error: {weights}: resnet18 backbone weights (features_only): "
                                       "no classifier to classify with\n")
