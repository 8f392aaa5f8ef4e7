"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: in one process, importing
torchvision after tensorflow crashes (seen with torch 2.14 / tensorflow 2.21), and pytest-xdist runs
tests of several files in one worker.
"""

import os
import urllib.error

# torch's OpenMP threads spin while they wait: with two test workers (and XLA's threads) on two cores, one
# GoogLeNet train pass took 21 s of CPU with 2 threads and 0.35 s with 1 (docs/performance.md, "The test suite").
# One thread per worker, and in the processes the tests start (before torch reads it).
os.environ["OMP_NUM_THREADS"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402, F401

from jaxnets import host  # noqa: E402

torch.set_num_threads(1)


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
