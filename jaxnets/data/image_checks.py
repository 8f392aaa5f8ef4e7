"""Whether TensorFlow's decoder will read an image file, found when a folder is scanned rather than when a
training run reaches the file: PIL checks header and structure, and one check per format catches what PIL's
``verify`` lets through (another format under an image extension, a file cut short, pixels TensorFlow would
misread), reading bytes without decoding pixels."""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO


def check_image(path: str) -> str | None:
    """Why TensorFlow's decoder would fail on ``path`` mid-run (None when it will not): PIL checks the header
    and structure; a per-format check catches what PIL's ``verify`` lets through (other formats under an image
    extension, such as a TIFF named .png, and truncated files) without decoding pixels, which costs ~8x more."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            kind, mode = image.format, image.mode
            image.verify()
        check = _FORMAT_CHECKS.get(kind)
        if check is None:
            return f"{kind} data, not JPEG, PNG, GIF, BMP or WebP"
        with open(path, "rb") as file:
            return check(file, mode)
    except Exception as error:  # noqa: BLE001 - any failure means "skip this file"
        return f"{type(error).__name__}: {error}".splitlines()[0][:120]


def _tail(file: BinaryIO, size: int = 64) -> bytes:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read()


def _jpeg_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow fails on a JPEG without its end-of-image marker: a file cut short. The marker ends the file
    (zero padding aside) but for data appended after the image (motion photos): then walk the markers."""
    if _tail(file).rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    file.seek(0)
    return None if _jpeg_has_end(file.read()) else "truncated JPEG: no end-of-image marker"


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not stuffing (ff 00), restart markers or fill bytes


def _jpeg_has_end(data: bytes) -> bool:
    """Whether the marker segments, skipped by their lengths, and scans reach end-of-image before the data ends."""
    pos = 2  # after start-of-image
    while match := _JPEG_MARKER.search(data, pos):
        marker = data[match.end() - 1]
        if marker == 0xD9:
            return True
        pos = match.end()
        if marker != 0x01:  # every marker but TEM has a length, which counts its own two bytes
            pos += int.from_bytes(data[pos:pos + 2], "big")
            if pos > len(data):
                return False
    return False


def _png_problem(file: BinaryIO, mode: str) -> str | None:
    """PIL's ``verify`` checks chunks up to IEND but not IEND's CRC, without which TensorFlow fails."""
    if _PNG_END in _tail(file):
        return None
    file.seek(0)
    return None if _PNG_END in file.read() else "truncated PNG: no complete IEND chunk"


_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # length, type and CRC of the (empty) end chunk


def _gif_problem(file: BinaryIO, mode: str) -> str | None:
    """Walk the GIF blocks: TensorFlow (giflib) fails when an image's data is cut short."""
    data = file.read()
    pos, images = 13 + _gif_table_size(data[10]), 0
    while pos < len(data) and data[pos] != 0x3B:  # up to the trailer; giflib tolerates its absence
        if data[pos] == 0x21:  # extension: label, then data sub-blocks
            pos += 2
        elif data[pos] == 0x2C:  # image: descriptor, local color table, LZW code size, then data sub-blocks
            pos += 11 + _gif_table_size(data[pos + 9] if pos + 9 < len(data) else 0)
            images += 1
        else:
            return f"corrupt GIF: unknown block 0x{data[pos]:02x} at byte {pos}"
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        if pos >= len(data):
            return "truncated GIF: image data cut short"
        pos += 1  # the zero-length terminator
    return None if images else "GIF without an image"


def _gif_table_size(flags: int) -> int:
    return 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0


def _bmp_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow reads uncompressed 24- and 32-bit BMPs and 8-bit ones as gray levels (it ignores the palette,
    so a color-palette BMP would train on its palette indices), and needs the exact size its header implies."""
    header = file.read(34)
    offset, width, height, bits, compression = struct.unpack("<10xI4xii2xHI", header)
    if bits not in (8, 24, 32) or compression != 0:
        return f"BMP with {bits} bits per pixel, compression {compression}: TensorFlow reads uncompressed 8/24/32-bit"
    if bits == 8 and mode != "L":
        return "8-bit color-palette BMP: TensorFlow would read the palette indices as gray levels"
    expected = offset + (bits // 8 * width + 3) // 4 * 4 * abs(height)
    size = file.seek(0, os.SEEK_END)
    return None if size == expected else f"BMP of {size} bytes, its header implies {expected}: truncated or padded"


def _webp_problem(file: BinaryIO, mode: str) -> str | None:
    """TensorFlow decodes an animated WebP only to RGBA, so asked for RGB (as training asks) it fails."""
    header = file.read(21)
    animated = header[12:16] == b"VP8X" and header[20] & 0x02  # the extended header's animation flag
    return "animated WebP: TensorFlow decodes WebP animations to RGBA only" if animated else None


_FORMAT_CHECKS = {"JPEG": _jpeg_problem, "MPO": _jpeg_problem, "PNG": _png_problem, "GIF": _gif_problem,
                  "BMP": _bmp_problem, "WEBP": _webp_problem}  # PIL's name -> what TensorFlow needs beyond PIL's verify

