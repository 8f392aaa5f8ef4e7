"""jaxnets.host: freed memory stays in the process, so a new buffer costs no page faults; command-line
programs restart on tcmalloc where the system has it; the XLA:CPU compile options apply where XLA accepts
them."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import pytest

from jaxnets import host, kernels

# What XLA:CPU does on every step: allocate a large buffer, write it, free it. Counted with glibc's malloc
# directly, so that no asynchronous free of the JAX runtime blurs the count.
FAULTS_OF_A_REUSED_BUFFER = """
import ctypes, ctypes.util, resource, sys
from jaxnets import host, kernels
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


def test_tcmalloc_environment_preloads_it_once():
    env = host.tcmalloc_environment({"PATH": "/bin"}, "libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env["PATH"] == "/bin"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"  # freed memory stays in the process
    # A preload of the user's is kept, and so is a tcmalloc setting of theirs.
    env = host.tcmalloc_environment({"LD_PRELOAD": "libfoo.so", "TCMALLOC_RELEASE_RATE": "1"}, "libtcmalloc.so.4")
    assert env["LD_PRELOAD"] == "libtcmalloc.so.4 libfoo.so" and env["TCMALLOC_RELEASE_RATE"] == "1"
    assert host.tcmalloc_environment(env, "libtcmalloc.so.4") is None  # the restarted process: never again
    for environ, library in [({}, None), ({"JAXNETS_ALLOCATOR": "glibc"}, "libtcmalloc.so.4"),
                             ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "libtcmalloc.so.4")]:
        assert host.tcmalloc_environment(environ, library) is None


# A command line with arguments, as train.py's: what it runs on once use_tcmalloc has had its say.
RESTARTED = """
import os, sys
from jaxnets import host, kernels
host.use_tcmalloc()
print(host.running_allocator(), os.environ.get("TCMALLOC_RELEASE_RATE"), host.retain_freed_memory(), sys.argv[1:])
"""


def restarted(**environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESTARTED, "--model", "resnet18"], capture_output=True, text=True,
                          env={**os.environ, **environ})


def test_use_tcmalloc_restarts_the_command_on_it_where_the_system_has_it():
    run = restarted()
    assert run.returncode == 0, run.stderr
    # Where the system has no tcmalloc (pip cannot install it), the command goes on, on glibc.
    on_tcmalloc = host.tcmalloc_library() is not None
    expected = "tcmalloc 0 False" if on_tcmalloc else "glibc None True"
    assert run.stdout.strip() == f"{expected} ['--model', 'resnet18']"
    assert restarted(JAXNETS_ALLOCATOR="glibc").stdout.startswith("glibc None True")


def test_unknown_allocator_choice_is_a_one_line_error():
    run = restarted(JAXNETS_ALLOCATOR="jemalloc")
    assert run.returncode == 1 and not run.stdout
    assert run.stderr.strip() == "error: JAXNETS_ALLOCATOR='jemalloc': expected 'tcmalloc' or 'glibc'"


@pytest.fixture
def fresh_options():
    host._cpu_options_accepted.cache_clear()
    with kernels.using("eigen_conv"):  # the variant these options are
        yield
    host._cpu_options_accepted.cache_clear()


def test_xla_cpu_options_keep_convolutions_out_of_ynnpack(fresh_options):
    options = host.xla_cpu_options()
    if not options:
        pytest.skip("this XLA:CPU has no YNNPACK fusion options")
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    conv = partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert "__ynn_fusion" not in jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()


def test_xla_cpu_options_are_empty_where_xla_rejects_them(fresh_options, monkeypatch):
    monkeypatch.setattr(host, "_CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    assert host.xla_cpu_options() == {}


def test_xla_cpu_options_only_where_the_kernel_choice_wants_eigen_convolutions(fresh_options):
    if not host.xla_cpu_options():
        pytest.skip("this XLA:CPU has no YNNPACK fusion options")
    with kernels.using("matmul_1x1,maxpool_jvp,batchnorm_vjp"):
        assert host.xla_cpu_options() == {}
        assert host.xla_cpu_options(kernels.resolve("eigen_conv"))  # a step's own choice, given
    assert host.xla_cpu_options(kernels.resolve("xla")) == {}
