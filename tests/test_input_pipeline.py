"""The training pipeline's window decoding (``transforms.decode_window``): the same crop boxes and pixels as
decoding whole files, hence the same batches, resumed or over 2 processes; its resize against torchvision's
``resized_crop`` on PIL images; and the ``--suite input`` benchmark at toy sizes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as F

from jaxnets.cli import benchmark as cli
from jaxnets.data import DataConfig, load_dataset, tf, transforms
from jaxnets.data.transforms import crop_box, decode_file, decode_window, resize_crop

# JPEG variants of a training folder: PIL's subsampling (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, PIL's default and
# most photos'), progressive, grayscale; a PNG takes the whole-decode branch.
VARIANTS = {"420.jpg": {"subsampling": 2}, "422.jpg": {"subsampling": 1}, "444.jpg": {"subsampling": 0},
            "progressive.jpg": {"subsampling": 2, "progressive": True}, "gray.jpg": {}, "plain.png": {}}


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth color areas plus noise: chroma that varies within a few pixels, where upsampling shows."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def _write(path, variant: str, pixels: np.ndarray) -> None:
    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 1 << 20)  # PIL's progressive encoder needs the whole scan
    image = Image.fromarray(pixels)
    if variant.startswith("gray"):
        image = image.convert("L")
    image.save(path, quality=90, **VARIANTS[variant])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of each variant, 150x110 (not whole blocks: edge blocks are partial)."""
    root = tmp_path_factory.mktemp("window")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for copy in range(2):
            for name in VARIANTS:
                _write(root / label / f"{copy}{name}", name, _photo(rng, 110, 150))
    return root


@pytest.mark.parametrize("name", ["420.jpg", "422.jpg", "progressive.jpg"])
def test_a_jpeg_window_has_the_pixels_of_the_whole_decoded_image(folder, name, monkeypatch):
    """``decode_window`` equals ``decode_file`` cropped to the same box, exactly, for 40 boxes of
    ``RandomResizedCrop``. Without the margin (``JPEG_MARGIN = 0``), libjpeg upsamples subsampled chroma at the
    window's right edge as at the image's: that column is off by up to ~30 levels (4:2:0 and 4:2:2 here)."""
    path = tf.constant(str(folder / "a" / f"0{name}"))
    whole = decode_file(path).numpy()
    seeds = [tf.constant([7, k], tf.int64) for k in range(40)]

    def worst() -> float:
        window = tf.function(lambda seed: decode_window(path, 3, lambda shape: crop_box(shape, seed)))
        differences = []
        for seed in seeds:
            top, left, height, width = crop_box(tf.constant(whole.shape), seed).numpy()
            cut = window(seed).numpy()
            assert cut.shape == (height, width, 3) and cut.dtype == np.uint8
            differences.append(np.abs(cut - whole[top:top + height, left:left + width]).max())
        return max(differences)
    assert worst() == 0
    monkeypatch.setattr(transforms, "JPEG_MARGIN", 0)
    assert worst() > 5  # the margin is what makes the window exact


@pytest.mark.parametrize("in_chans", [3, 1])
def test_window_decoding_gives_the_batches_of_whole_decoding_resumed_and_over_two_processes(folder, in_chans):
    """The training batches of a folder of every variant (4:2:0, 4:2:2, 4:4:4, progressive, gray JPEGs, PNG) are
    those of decoding each file whole and cropping it (the path before window decoding): the same boxes from the
    same seeds, the same pixels. Resuming at step 1 and two processes' halves give the same batches too."""
    config = DataConfig(dataset=str(folder), image_size=24, batch_size=4, in_chans=in_chans, val_fraction=0.25,
                        mean=(0.5,) * in_chans, std=(0.25,) * in_chans)
    dataset = load_dataset(config)
    assert dataset.train.paths is not None and dataset.train.window_decode
    whole = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train, window_decode=False))
    for epoch in (0, 1):
        ours = [batch["image"] for batch in dataset.train_batches(epoch)]
        reference = [batch["image"] for batch in whole.train_batches(epoch)]
        assert len(ours) == len(reference) == dataset.steps_per_epoch >= 2
        np.testing.assert_array_equal(np.stack(ours), np.stack(reference))
    resumed = [batch["image"] for batch in dataset.train_batches(1, start_step=1)]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(ours[1:]))
    halves = [[batch["image"] for batch in load_dataset(config, p, 2).train_batches(1)] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), np.stack(ours))


BOXES = [(0, 0, 110, 150), (10, 20, 90, 70), (50, 60, 24, 24), (5, 7, 100, 75), (30, 40, 12, 16)]


@pytest.mark.parametrize("size", [24, 64])
def test_the_crop_resize_is_torchvisions_resized_crop_on_pil_images(size):
    """``resize_crop`` (bilinear, antialiased) of a uint8 crop against torchvision's ``resized_crop`` of the PIL
    image with ``antialias=True`` (PIL's bilinear filter) for the same box, shrinking 6x to enlarging 5x: within
    1 level (PIL rounds to uint8 and works in fixed point; TensorFlow keeps floats), 0.35 levels on average. A
    resize without antialiasing is 3-10 levels off on average where it shrinks (up to 52)."""
    pixels = _photo(np.random.default_rng(1), 110, 150)
    pil = Image.fromarray(pixels)
    for top, left, height, width in BOXES:
        ours = resize_crop(tf.constant(pixels[top:top + height, left:left + width]), size).numpy()
        reference = np.asarray(F.resized_crop(pil, top, left, height, width, [size, size], antialias=True), np.float32)
        difference = np.abs(ours - reference)
        assert difference.max() <= 1.0 + 1e-4 and difference.mean() < 0.35, (top, left, height, width)


def test_input_benchmark_runs_at_tiny_sizes(tmp_path):
    """``jaxnets-benchmark --suite input --tiny``: every pipeline timed, the report's table and ratios filled."""
    report, js = tmp_path / "input.md", tmp_path / "input.json"
    assert cli.main(["--suite", "input", "--tiny", "--system-malloc", "--output", str(report), "--json", str(js)]) == 0
    rows = {row["name"]: row for row in json.loads(js.read_text())["rows"]}
    assert set(rows) == {"jaxnets train", "jaxnets train, whole decode", "jaxnets train, tuned", "jaxnets eval",
                         "torchvision train", "torchvision eval", "tf.data anchor",
                         "tf.data anchor, antialiased"}
    assert all(row["images_per_s"] > 0 and len(row["times"]) == len(row["cpu"]) == 1 for row in rows.values())
    assert all(row["images_per_cpu_s"] > 0 for row in rows.values())  # /proc read (Linux)
    text = report.read_text()
    assert "| jaxnets train / torchvision train |" in text and "Projected to 16 such cores" in text
