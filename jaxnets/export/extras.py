"""The optional dependencies of the export formats, and the one-line error naming the pip extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from jaxnets.errors import UserError, install_hint

# What each format's converter (and the runtime that verifies it) needs beyond jaxnets' own dependencies, and the
# extra of pyproject.toml that installs it. TensorFlow (SavedModel, TFLite conversion) is a base dependency.
EXTRAS = {"onnx": "onnx", "saved_model": "tf-export", "tflite": "tf-export"}


class MissingDependency(UserError):
    """An export format's optional dependency is not installed: the message names the pip extra."""


def require(module: str, format: str) -> ModuleType:
    """``import module``, or a ``MissingDependency`` naming the extra that installs it for ``format``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing(module, format, error) from None


def missing(module: str, format: str, error: ImportError) -> MissingDependency:
    """The error for ``module``, needed by ``format``, failing to import with ``error``."""
    return MissingDependency(f"export format {format} needs {module.split('.')[0]}, which is not installed "
                             f"({error}): {install_hint(EXTRAS.get(format, format))}")
