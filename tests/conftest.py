"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: in one process, importing
torchvision after tensorflow crashes (seen with torch 2.14 / tensorflow 2.21), and pytest-xdist runs
tests of several files in one worker.
"""

import torch  # noqa: F401
import torchvision  # noqa: F401

import jax  # noqa: E402 - after torch, as above
import pytest  # noqa: E402

from jaxnets import training  # noqa: E402


@pytest.fixture(autouse=True)
def _compilation_cache_left_as_found():
    """``train_and_evaluate`` sets the process's compilation cache: a later test in the same worker must not
    write into a directory pytest has deleted, nor read compilations another test left."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        training.setup_compilation_cache(before or "")
