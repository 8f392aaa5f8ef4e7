"""Settings that make XLA:CPU steps faster: how the process allocates memory, how XLA compiles.

XLA:CPU allocates a step's buffers afresh on every call. glibc serves large allocations with
``mmap`` and gives them back to the kernel on ``free``, so every step touches hundreds of MB of
new pages, and on a VM each page fault costs about a microsecond (a 128 MiB elementwise op: 25 ms
instead of 6). Keeping freed memory in the process removes that cost: ResNet-50 training step
2.38 -> 2.13 s, inference 487 -> 428 ms on a 2-core CPU.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default; its own (Eigen) convolutions are
faster for these networks on x86, the backward pass above all (a 56x56x64 3x3 conv: 72 -> 41 ms
forward + backward). ``xla_cpu_options`` gives the jitted steps the compile option that keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    Serves every allocation from the heap (no ``mmap``) and trims the heap only beyond 2 GiB of
    free space. The process keeps its peak memory; a training or benchmark process wants that.
    Returns whether the settings took effect (False off Linux/glibc, where nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all([bool(mallopt(param, value)) for param, value in settings])


# YNNPACK keeps the matrix products and reductions it is fast at; convolutions stay with XLA.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def xla_cpu_options() -> dict[str, Any]:
    """``compiler_options`` for ``jax.jit`` of a model step: the options above on a CPU backend whose XLA
    accepts them (checked once by compiling a tiny function), else ``{}`` (GPUs, other XLA versions)."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.negative, compiler_options=_CPU_COMPILER_OPTIONS).lower(jnp.ones(2)).compile()
    except Exception:  # an XLA without these options: its defaults are what there is
        return {}
    return dict(_CPU_COMPILER_OPTIONS)
