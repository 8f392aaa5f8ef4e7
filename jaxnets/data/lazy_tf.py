"""``tf``: TensorFlow, imported on first use by every module of the input pipeline."""

from __future__ import annotations

import os


class _LazyTensorFlow:
    """``tensorflow``, imported on first use: importing it costs seconds, and torchvision imported after
    TensorFlow segfaults (clashing native libraries in torch 2.x + tf 2.2x), so a process that only
    defines datasets, or imports torchvision first, stays safe. TensorFlow never sees the GPUs."""

    _module = None

    def __getattr__(self, name: str):
        if _LazyTensorFlow._module is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import tensorflow

            tensorflow.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses
            _LazyTensorFlow._module = tensorflow
        return getattr(_LazyTensorFlow._module, name)


tf = _LazyTensorFlow()
