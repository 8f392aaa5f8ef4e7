"""Examples stored as numpy arrays, ``.npy`` files of shape ``(H, W, C)`` (or ``(H, W)``, one channel): any
number of channels, for multispectral or otherwise non-RGB data, where image files hold 1 or 3.

The values are scaled as torchvision's ``ToDtype(torch.float32, scale=True)`` scales an image: uint8 by 1/255,
uint16 by 1/65535, and floating-point arrays are taken as already in [0, 1]; then normalized with the model's
per-channel mean and std, as images are. ``load_array`` gives them in the pipeline's pixel units (0..255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxnets.data.config import ChannelMismatch, DataError

ARRAY_EXTENSION = ".npy"
# Array dtype -> the factor that brings its values to pixel units 0..255 (what an 8-bit image holds).
PIXEL_SCALE = {np.dtype(np.uint8): 1.0, np.dtype(np.uint16): 255.0 / 65535.0, np.dtype(np.float16): 255.0,
               np.dtype(np.float32): 255.0, np.dtype(np.float64): 255.0}


def is_array_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ARRAY_EXTENSION)


def array_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a ``.npy`` file, from its header (memory-mapped: the data is not read)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return tuple(array.shape), array.dtype


def check_array(path: str | Path, in_chans: int) -> str | None:
    """Why the ``.npy`` file ``path`` cannot be read as an example (None when it can): not a numpy array file,
    another rank or an unsupported dtype. A channel count other than ``in_chans`` is a ``ChannelMismatch``: not a file
    to skip but a run set up for other data."""
    try:
        shape, dtype = array_header(path)
    except (OSError, ValueError, EOFError) as error:
        return f"not a readable .npy file ({type(error).__name__}: {error})".splitlines()[0][:120]
    if len(shape) not in (2, 3) or 0 in shape:
        return f"array of shape {shape}, expected (H, W, C) or (H, W)"
    if np.dtype(dtype) not in PIXEL_SCALE:
        return f"array of dtype {dtype}, expected uint8, uint16 or float (in [0, 1])"
    channels = shape[2] if len(shape) == 3 else 1
    if channels != in_chans:
        raise ChannelMismatch(in_chans, f"{path} has shape {shape} ({channels} channel(s))", str(channels),
                              f"the model takes (H, W, {in_chans}) arrays: pass --in-chans {channels}")
    return None


def load_array(path: str | Path | bytes) -> np.ndarray:
    """A ``.npy`` example as float32 ``(H, W, C)`` in pixel units 0..255 (``PIXEL_SCALE``)."""
    if isinstance(path, np.ndarray):  # from tf.numpy_function: a 0-d array of bytes
        path = path.item()
    array = np.load(path.decode() if isinstance(path, bytes) else path, allow_pickle=False)
    if array.ndim == 2:
        array = array[:, :, None]
    scale = PIXEL_SCALE.get(array.dtype)
    if scale is None or array.ndim != 3:
        raise DataError(f"{path}: array of shape {array.shape} and dtype {array.dtype}: expected (H, W, C) of uint8, "
                        f"uint16 or float")
    return np.ascontiguousarray(array.astype(np.float32) * np.float32(scale))
