"""Whether the input pipeline will read an image file, found when a folder is scanned rather than when a training
run reaches the file: each file is decoded once, by the pipeline's own decoder (``transforms.decode_image``, at
the run's channel count), so the verdict is TensorFlow's and not a prediction of it. ``tf.data`` decodes a
folder in parallel on every core; the few files that fail are decoded again one by one for TensorFlow's reason.

One case decodes without an error and still has to be refused: an 8-bit BMP with a color palette, whose palette
indices TensorFlow returns as gray levels (training on them would be silent corruption)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from jaxnets.data.lazy_tf import tf
from jaxnets.data.transforms import decode_image

DECODED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")  # PIL's names of what decode_image reads
_BMP = b"BM"  # a BMP file's first bytes
_OP_NOISE = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$")  # around TensorFlow's own message


def check_images(paths: Sequence[str], channels: int = 3) -> list[str | None]:
    """For each image file, why the pipeline cannot read it (None when it can), as ``check_image`` says; the
    files are decoded in parallel with ``tf.data`` and only those it flags (failures, BMPs) are checked again."""
    if not paths:
        return []
    flagged = _flagged(paths, channels)
    return [check_image(path, channels) if i in flagged else None for i, path in enumerate(paths)]


def check_image(path: str, channels: int = 3) -> str | None:
    """Why the pipeline cannot read ``path`` as an image of ``channels`` (1 or 3) channels, in one line, None
    when it can: the file's read error, TensorFlow's error decoding it (naming the format PIL finds in the
    header: a TIFF named .png is "TIFF data"), or the palette of a color-palette BMP."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    try:
        decode_image(tf.constant(data), channels)
    except tf.errors.OpError as error:
        kind = _pil_header(path)[0]
        if kind is not None and kind not in DECODED_FORMATS:
            return f"{kind} data, not JPEG, PNG, GIF, BMP or WebP"
        message = _OP_NOISE.sub("", error.message.splitlines()[0] if error.message else "")
        return f"TensorFlow cannot decode this {kind or 'image'} file: {message or type(error).__name__}"[:200]
    if data[:2] == _BMP and _pil_header(path)[1] == "P":
        return "8-bit color-palette BMP: TensorFlow would read the palette indices as gray levels"
    return None


def _flagged(paths: Sequence[str], channels: int) -> set[int]:
    """Indices of the files to check one by one: those the pipeline's decoder fails on, and BMPs (which may
    decode to the wrong pixels); every file is read and decoded once, in parallel."""
    def probe(index: tf.Tensor, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        data = tf.io.read_file(path)
        # The decoded shape is an output, so the decoding is never pruned from the graph.
        return index, tf.strings.substr(data, 0, 2) == _BMP, tf.shape(decode_image(data, channels))

    decoded = (tf.data.Dataset.from_tensor_slices(list(paths)).enumerate()
               .map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
               .ignore_errors()  # a file that fails drops out: its index is missing below
               .batch(4096))
    flagged = set(range(len(paths)))
    for indices, is_bmp, _ in decoded.as_numpy_iterator():
        flagged.difference_update(indices[~is_bmp].tolist())
    return flagged


def _pil_header(path: str) -> tuple[str | None, str | None]:
    """The format and mode PIL reads in the file's header (e.g. TIFF, RGB); None where PIL knows none."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format, image.mode
    except Exception:  # noqa: BLE001 - not an image PIL knows: TensorFlow's message says the rest
        return None, None
