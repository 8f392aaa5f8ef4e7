"""``--coordinator`` is checked before JAX sees it: a one-line error naming the flag, not an IndexError
from deep inside ``jax.distributed`` (or a process that waits for a coordinator that cannot exist)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxnets import parallel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("address, expected", [
    ("localhost:1234", ("localhost", 1234)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("[::1]:1", ("[::1]", 1)),
])
def test_host_and_port(address, expected):
    assert parallel.parse_coordinator(address) == expected


@pytest.mark.parametrize("address", ["notahost", "host:", ":1234", "host:0", "host:65536", "host:abc",
                                     "host:-1", "host: 12", ""])
def test_anything_else_names_the_flag_and_the_value(address):
    with pytest.raises(ValueError, match=r"^--coordinator ") as error:
        parallel.parse_coordinator(address)
    assert repr(address) in str(error.value) and "\n" not in str(error.value)


def test_initialize_checks_before_starting_jax_distributed():
    with pytest.raises(ValueError, match="--coordinator 'notahost': expected host:port"):
        parallel.initialize("notahost", 1, 0)


def test_train_py_reports_a_bad_coordinator_in_one_line(tmp_path):
    env = {**os.environ, "JAXNETS_ALLOCATOR": "glibc"}
    done = subprocess.run([sys.executable, "train.py", "--coordinator", "notahost", "--num-processes", "1",
                           "--process-id", "0", "--workdir", str(tmp_path / "run"), "--compile-cache", ""],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "train.py: error: --coordinator 'notahost': expected host:port with a port from 1 to 65535 "
        "(e.g. 10.0.0.1:1234)"]
