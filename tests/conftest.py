"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: in one process, importing
torchvision after tensorflow crashes (seen with torch 2.14 / tensorflow 2.21), and pytest-xdist runs
tests of several files in one worker.
"""

import jax
import pytest
import torch  # noqa: F401
import torchvision  # noqa: F401

from jaxnets import host


@pytest.fixture(autouse=True)
def _compilation_cache_left_as_found():
    """``train_and_evaluate`` sets the process's compilation cache: a later test in the same worker must not
    write into a directory pytest has deleted, nor read compilations another test left."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        host.setup_compilation_cache(before or "")
