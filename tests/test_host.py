"""jaxnets.host: freed memory stays in the process, so a new buffer costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What XLA:CPU does on every step: allocate a large buffer, write it, free it. Counted with glibc's malloc
# directly, so that no asynchronous free of the JAX runtime blurs the count.
FAULTS_OF_A_REUSED_BUFFER = """
import ctypes, ctypes.util, resource, sys
from jaxnets import host
if sys.argv[1] == "retain" and not host.retain_freed_memory():
    sys.exit(3)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
size = 2**27
libc.free(ctypes.memset(libc.malloc(size), 1, size))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(ctypes.memset(libc.malloc(size), 1, size))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BUFFER, mode], capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip("no glibc mallopt here")
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_memory_is_reused_without_page_faults():
    pages = 2**27 // 4096
    assert faults("default") > pages // 2  # glibc gave the buffer back to the kernel: fresh pages again
    assert faults("retain") < pages // 100
