"""Class activation maps from the commands: ``jaxnets-predict --cam`` and ``jaxnets-evaluate --cam-errors``.

A 3-class ResNet-18 with random weights, shown 32-px crops (its header records the eval sizes), explains two small
gray images of different shapes; gray, so that the heat colours stand out of the image: where the map is hot the
overlay is red (jet's top), where it is cold blue (jet's bottom).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxnets
from jaxnets import explain, predict
from jaxnets.cli import evaluate as evaluate_cli
from jaxnets.cli import predict as predict_cli
from jaxnets.data import pil_eval
from jaxnets.errors import UserError
from jaxnets.eval_transform import EvalTransform
from jaxnets.evaluate.run import _cam_example
from jaxnets.explain.pictures import title_band, to_original
from jaxnets.predict import classification
from jaxnets.weights import load_weights, save_weights

CATEGORIES = ["ant", "bee", "cat"]
LAYER = "layer2"  # 4 x 4 at a 32-px crop: a map with structure


def random_variables(model, seed: int = 5):
    """He-initialised kernels, BatchNorm at identity: random weights without compiling ``model.init`` (10 s)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    def leaf(path, shape):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(shape.shape) * np.sqrt(2 / np.prod(shape.shape[:-1]))).astype(np.float32)
        return np.full(shape.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    variables = random_variables(jaxnets.create_model("resnet18", num_classes=len(CATEGORIES)))
    return save_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors", "resnet18", variables,
                        metadata={"categories": CATEGORIES, "eval_transform": {"resize_size": 36, "crop_size": 32}})


def gray_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(60, 200, (4, 4), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse.resize((width, height), Image.Resampling.BICUBIC).save(path)
    return path


def test_predict_writes_one_overlay_per_image_at_its_original_size(weights, tmp_path, capsys, monkeypatch):
    images = [gray_image(tmp_path / "a" / "x.png", 50, 40, 0), gray_image(tmp_path / "b" / "x.png", 37, 61, 1)]
    out_dir = tmp_path / "cams"
    argv = ["--weights", str(weights), "--batch-size", "1", "--cam", "gradcam", "--cam-dir", str(out_dir),
            "--cam-layer", LAYER, *map(str, images)]
    calls = []
    cam = explain.cam
    monkeypatch.setattr(explain, "cam", lambda *args, **kwargs: calls.append(kwargs) or cam(*args, **kwargs))
    assert predict_cli.main(argv) == 0
    assert calls == [{"batch_size": 1}]  # one call for both chunks: a short last chunk would compile another batch
    monkeypatch.undo()
    written = [out_dir / "x.gradcam.png", out_dir / "x-2.gradcam.png"]  # a shared stem gets a number
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"wrote {path}" for path in written]
    assert sorted(out_dir.iterdir()) == sorted(written)

    # The maps are explain.cam's on the inputs predict classifies, for the top class.
    weights_file = load_weights(weights)
    model, variables = jaxnets.weights.instantiate(weights_file)
    transform = predict.eval_transform("resnet18", weights_file)
    inputs = np.stack([predict.load_input(path, transform) for path in images])
    logits = predict.classify(model, variables, inputs, batch_size=1)
    targets = np.argmax(logits, -1)
    maps = explain.cam(model, variables, inputs, "gradcam", LAYER, targets, batch_size=1)
    probs = predict.softmax(logits)
    for image, path, cam_map, target, row in zip(images, written, maps, targets, probs, strict=True):
        original = Image.open(image)
        picture = np.asarray(Image.open(path), np.int32)
        assert picture.shape == (original.height, original.width, 3)
        expected = explain.overlay(original, cam_map, explain.caption(CATEGORIES[target], row[target]),
                                   transform=transform)
        assert np.abs(picture - np.asarray(expected, np.int32)).max() <= 1

        # Heat: on a gray image, red where the map is hot, blue where it is cold (below the title's band).
        heat, inside = to_original(cam_map, original.size, transform)
        band = title_band(original.size)
        red_minus_blue = (picture[..., 0] - picture[..., 2])[band:]
        hot, cold = ((heat > 0.95) & inside)[band:], ((heat < 0.05) & inside)[band:]
        assert hot.any() and cold.any()
        assert (red_minus_blue[hot] > 40).all() and (red_minus_blue[cold] < -40).all()
        # The title: a darkened band with white text across the top, which the untitled overlay lacks.
        plain = np.asarray(explain.overlay(original, cam_map, transform=transform), np.int32)
        assert (picture[:band].min(-1) > 200).any() and not (plain[:band].min(-1) > 200).any()
        assert picture[:band].mean() < plain[:band].mean()


def test_a_map_is_drawn_on_what_the_input_was_before_the_eval_transform(tmp_path):
    """Image files as the model reads them (gray for a 1-channel model); .npy arrays as their pixels, gray (the
    channels' mean) unless they have 3 channels."""
    image = gray_image(tmp_path / "g.png", 9, 7, 0)
    transform = EvalTransform(36, 32)
    rgb = classification.cam_background(image, transform)
    assert rgb.mode == "RGB" and rgb.size == (9, 7)
    assert classification.cam_background(image, transform.for_channels(1)).mode == "L"
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 4), np.uint8)
    np.save(tmp_path / "four.npy", pixels)
    np.save(tmp_path / "three.npy", pixels[..., :3])
    np.testing.assert_array_equal(classification.cam_background(tmp_path / "three.npy", transform), pixels[..., :3])
    np.testing.assert_array_equal(classification.cam_background(tmp_path / "four.npy", transform),
                                  np.round(pixels.mean(-1)).astype(np.uint8))


@pytest.mark.parametrize("flags, message", [
    (["--cam-dir", "out"], "--cam-dir needs --cam METHOD"),
    (["--cam-layer", "layer2"], "--cam-layer needs --cam METHOD"),
    (["--cam", "gradcam"], "--cam gradcam needs --cam-dir DIR"),
    (["--cam", "gradcam", "--cam-dir", "out", "--cam-layer", "layer9"],
     "--cam-layer layer9: not a feature node of resnet18; choose one of relu, layer1, layer2, layer3, layer4"),
])
def test_cam_flag_errors_are_one_line_naming_the_flag(weights, tmp_path, capsys, flags, message):
    image = gray_image(tmp_path / "x.png", 20, 20, 0)
    assert predict_cli.main(["--weights", str(weights), *flags, str(image)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_cam_method_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--cam", "gradcam+", "--cam-dir", "out", "x.png"])
    assert exit_info.value.code == 1
    assert "invalid choice: 'gradcam+'" in capsys.readouterr().err and all(
        method in predict_cli.build_parser().format_help() for method in explain.METHODS)


# --- jaxnets-evaluate --cam-errors -------------------------------------------------------------------------------


def test_evaluate_draws_the_surest_mistakes_and_the_shakiest_hits(weights, tmp_path, capsys):
    folder = tmp_path / "data"
    for c, name in enumerate(CATEGORIES):
        for i in range(2):
            gray_image(folder / name / f"{i}.png", 30 + 7 * i, 40 - 5 * c, 10 * c + i)
    out_dir = tmp_path / "report"
    argv = ["--weights", str(weights), "--dataset", str(folder), "--preprocess", "torchvision", "--batch-size", "1",
            "--worker-kind", "thread", "--workers", "1", "--no-progress", "--output", str(out_dir),
            "--cam-errors", "2", "--cam-method", "layercam", "--cam-layer", LAYER]
    assert evaluate_cli.main(argv) == 0
    report = json.loads((out_dir / "eval.json").read_text())

    # Each sheet is the contact sheet of explain's overlays of the examples eval.json ranks as the extremes.
    rows = report["predictions"]
    labels = np.array([row["label"] for row in rows])
    predicted = np.array([row["top5"][0][0] for row in rows])
    confidence = np.array([row["top5"][0][1] for row in rows])
    mistakes, hits = explain.confidence_extremes(labels, predicted, confidence, 2)
    assert len(mistakes) and len(hits)  # the random model gets some right and some wrong: both sheets are drawn
    weights_file = load_weights(weights)
    model, variables = jaxnets.weights.instantiate(weights_file)
    transform = predict.eval_transform("resnet18", weights_file)
    chosen = np.concatenate([mistakes, hits])
    inputs = np.stack([predict.load_input(rows[i]["file"], transform) for i in chosen])
    maps = explain.cam(model, variables, inputs, "layercam", LAYER, predicted[chosen], batch_size=1)
    overlays = [explain.overlay(Image.open(rows[i]["file"]), cam_map,
                                explain.caption(CATEGORIES[predicted[i]], confidence[i], CATEGORIES[labels[i]]),
                                transform=transform) for i, cam_map in zip(chosen, maps, strict=True)]
    expected = {"cam_mistakes.png": explain.contact_sheet(overlays[:len(mistakes)],
                                                          f"the {len(mistakes)} most confident mistakes (layercam)"),
                "cam_hits.png": explain.contact_sheet(overlays[len(mistakes):],
                                                      f"the {len(hits)} least confident hits (layercam)")}
    out = capsys.readouterr().out
    for name, sheet in expected.items():
        assert f"wrote {out_dir / name}" in out
        written = np.asarray(Image.open(out_dir / name), np.int32)
        assert written.shape == np.asarray(sheet).shape
        assert np.abs(written - np.asarray(sheet, np.int32)).max() <= 2  # eval.json rounds the probabilities


@pytest.mark.parametrize("flags, message", [
    (["--cam-method", "gradcam"], "--cam-method needs --cam-errors N"),
    (["--cam-layer", "layer2"], "--cam-layer needs --cam-errors N"),
    (["--cam-errors", "0"], "--cam-errors must be at least 1"),
    (["--cam-errors", "2", "--cam-layer", "layer9"],
     "--cam-layer layer9: not a feature node of resnet18; choose one of relu, layer1, layer2, layer3, layer4"),
])
def test_evaluate_cam_flag_errors_name_the_flag(weights, tmp_path, capsys, flags, message):
    gray_image(tmp_path / "data" / "ant" / "0.png", 20, 20, 0)
    argv = ["--weights", str(weights), "--dataset", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--no-progress", *flags]
    try:
        status = evaluate_cli.main(argv)
    except SystemExit as exit_info:  # a flag argparse refuses (its usage, then one error line)
        status = exit_info.code
    assert status == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("jaxnets-evaluate: error: ") and message in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # refused before the evaluation


def test_evaluate_refuses_maps_of_multi_label_weights(weights, tmp_path, capsys):
    weights_file = load_weights(weights)
    multi = save_weights(tmp_path / "multi.safetensors", "resnet18", weights_file.variables,
                         metadata={**weights_file.metadata, "multi_label": True})
    gray_image(tmp_path / "data" / "ant" / "0.png", 20, 20, 0)
    argv = ["--weights", str(multi), "--dataset", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--no-progress", "--cam-errors", "1"]
    assert evaluate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cam-errors" in err and "multi-label" in err
    assert not (tmp_path / "out").exists()


def test_evaluate_reads_in_memory_examples_again_as_pil_evaluates_them():
    """Digits-like splits hold decoded pixels: their maps are of the inputs ``--preprocess torchvision`` makes."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
    transform = EvalTransform(36, 32)
    picture, model_input = _cam_example(pixels, transform)
    assert picture is pixels
    np.testing.assert_array_equal(model_input, pil_eval.load(pixels, transform))
    gray = transform.for_channels(1)
    _, model_input = _cam_example(pixels[..., :1], gray)
    np.testing.assert_array_equal(model_input, pil_eval.preprocess(Image.fromarray(pixels[..., 0]), gray)[..., None])
    with pytest.raises(UserError, match="--cam-errors: images of 3 channel"):
        _cam_example(pixels, gray)
