"""``tf``: TensorFlow, imported on first use by every module of the input pipeline."""

from __future__ import annotations

import contextlib
import os
import sys


class _LazyTensorFlow:
    """``tensorflow``, imported on first use: importing it costs seconds, and torchvision imported after
    TensorFlow segfaults (clashing native libraries in torch 2.x + tf 2.2x), so a process that only
    defines datasets, or imports torchvision first, stays safe. TensorFlow never sees the GPUs."""

    _module = None

    def __getattr__(self, name: str):
        if _LazyTensorFlow._module is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            with _native_stderr_silenced():
                import tensorflow

            tensorflow.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators JAX uses
            _LazyTensorFlow._module = tensorflow
        return getattr(_LazyTensorFlow._module, name)


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow 2.21's C++ logs two lines twice at import ("All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on"), before TF_CPP_MIN_LOG_LEVEL applies: file descriptor 2 goes to
    /dev/null for the import only. Python's own errors still raise, and print after it is restored."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor at all: nothing to silence
        yield
        return
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


tf = _LazyTensorFlow()
