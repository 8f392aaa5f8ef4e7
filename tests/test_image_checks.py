"""The check that folder images will decode: the whole folder decoded in parallel by ``tf.data`` gives the
verdict of the pipeline's own decoder, file by file, at the run's channel count."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jaxnets.data import tf
from jaxnets.data.image_checks import check_image, check_images
from jaxnets.data.transforms import decode_image


def _encoded(fmt: str, mode: str = "RGB", **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.kron(pixels, np.ones((4, 4, 1), np.uint8))).convert(mode).save(out, fmt, **options)
    return out.getvalue()


def _decodes(data: bytes, channels: int) -> bool:
    """Whether the pipeline's decoder reads ``data`` at ``channels``: the oracle."""
    try:
        decode_image(tf.constant(data), channels)
    except tf.errors.OpError:
        return False
    return True


@pytest.mark.parametrize("channels", [3, 1])
def test_a_folder_checked_in_parallel_gets_the_verdict_of_each_file_decoded_alone(tmp_path, channels):
    """Good files, cut ones, other formats and a palette BMP in one call: the parallel pass flags exactly the
    files the decoder fails on (and BMPs), and each flagged file gets its own one-line reason."""
    files = {"good.jpg": _encoded("JPEG"), "good.png": _encoded("PNG"), "good.gif": _encoded("GIF"),
             "good.webp": _encoded("WEBP"), "gray.bmp": _encoded("BMP", mode="L"), "rgb.bmp": _encoded("BMP"),
             "palette.bmp": _encoded("BMP", mode="P"), "tiff.png": _encoded("TIFF"), "empty.jpg": b"",
             "text.jpg": b"not a jpeg"}
    files.update({f"cut{cut}.jpg": _encoded("JPEG")[:cut] for cut in (2, 100, 400, -2)})
    files.update({f"cut{cut}.png": _encoded("PNG")[:cut] for cut in (8, 60, -4)})
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    problems = check_images(paths, channels)
    assert problems == [check_image(path, channels) for path in paths]
    for (name, data), problem in zip(files.items(), problems, strict=True):
        if name == "palette.bmp":  # decodes, to the palette indices: refused all the same
            assert _decodes(data, channels) and "color-palette BMP" in problem
        else:
            assert (problem is None) == _decodes(data, channels), (name, problem)
        assert problem is None or "\n" not in problem
    assert problems[paths.index(str(tmp_path / "good.jpg"))] is None


def test_a_one_channel_run_reads_bmp_and_gif_as_the_luma_of_their_rgb(tmp_path):
    """TensorFlow 2.21 refuses BMP and GIF at 1 channel (it decodes those to 3 or 4): the pipeline decodes them as
    RGB and takes the luma, as it does WebP, so a one-channel run reads them; the check agrees with the decoder."""
    for name, data in {"x.bmp": _encoded("BMP"), "x.gif": _encoded("GIF"), "x.png": _encoded("PNG")}.items():
        (tmp_path / name).write_bytes(data)
        assert check_image(str(tmp_path / name), 3) is None
        assert check_image(str(tmp_path / name), 1) is None and _decodes(data, 1), name
        if name != "x.png":  # PNG keeps its decoder's own grayscale
            gray = decode_image(tf.constant(data), 1).numpy()
            assert np.array_equal(gray, tf.image.rgb_to_grayscale(decode_image(tf.constant(data), 3)).numpy())


def test_a_file_that_cannot_be_read_is_named_with_the_reason(tmp_path):
    assert check_images([str(tmp_path / "gone.jpg")]) == ["cannot read the file: No such file or directory"]
    assert check_images([]) == []
