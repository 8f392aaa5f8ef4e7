"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: in one process, importing
torchvision after tensorflow crashes (seen with torch 2.14 / tensorflow 2.21), and pytest-xdist runs
tests of several files in one worker.
"""

import urllib.error

import jax
import pytest
import torch
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


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, empty torch hub and jaxnets caches, whatever the machine running the tests has: torchvision's
    weights cannot be had."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXNETS_HOME", str(tmp_path / "jaxnets"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
