"""Settings that make XLA:CPU steps faster: how the process allocates memory, how XLA compiles.

XLA:CPU allocates a step's buffers afresh on every call. glibc serves large allocations with
``mmap`` and gives them back to the kernel on ``free``, so every step touches hundreds of MB of
new pages, and on a VM each page fault costs about a microsecond (a 128 MiB elementwise op: 25 ms
instead of 6). Keeping freed memory in the process removes that cost: ResNet-50 training step
2.38 -> 2.13 s, inference 487 -> 428 ms on a 2-core CPU.

Better still is tcmalloc, where the system has it (``apt install libtcmalloc-minimal4``): XLA's
convolutions call oneDNN's sgemm, which allocates a workspace for every block product, and glibc's
malloc spends about 5 % of a ResNet-50 step finding them in its one retained arena. ``use_tcmalloc``
restarts a command-line program on tcmalloc: training steps ResNet-50 1.51 -> 1.31 s, ResNet-18
680 -> 543 ms, VGG-16 4.92 -> 4.13 s, GoogLeNet 714 -> 555 ms on a 2-core CPU.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default; its own (Eigen) convolutions are
faster for these networks on x86, the backward pass above all (a 56x56x64 3x3 conv: 72 -> 41 ms
forward + backward). ``xla_cpu_options`` gives the jitted steps the compile option that keeps them,
where ``jaxnets.kernels`` chooses that variant (``eigen_conv``) for this CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxnets import kernels
from jaxnets.errors import UserError

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    Serves every allocation from the heap (no ``mmap``) and trims the heap only beyond 2 GiB of
    free space. The process keeps its peak memory; a training or benchmark process wants that.
    Returns whether the settings took effect (False off Linux/glibc, and on tcmalloc, whose
    ``TCMALLOC_RELEASE_RATE=0`` does the same: nothing changes).
    """
    if not sys.platform.startswith("linux") or running_allocator() == "tcmalloc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all([bool(mallopt(param, value)) for param, value in settings])


# tcmalloc's sonames, by preference, and its setting that keeps freed memory (as retain_freed_memory does).
TCMALLOC_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
TCMALLOC_SETTINGS = {"TCMALLOC_RELEASE_RATE": "0"}
ALLOCATOR_VARIABLE = "JAXNETS_ALLOCATOR"  # 'tcmalloc' (default: where the system has it) or 'glibc'
_RESTARTED_VARIABLE = "JAXNETS_RESTARTED_ON_TCMALLOC"  # set in the restarted process: never restart twice


def tcmalloc_library() -> str | None:
    """The first of ``TCMALLOC_LIBRARIES`` the dynamic linker can find (not loaded here), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for soname in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(soname.removeprefix("lib").split(".so")[0])
        if found == soname:
            return soname
    return None


def _loaded_tcmalloc() -> str | None:
    """The file name of the tcmalloc mapped into this process (it was preloaded), or None."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    return next((Path(line.split()[-1]).name for line in maps.read_text().splitlines()
                 if "/libtcmalloc" in line), None)


def running_allocator() -> str:
    """'tcmalloc' when this process's malloc is tcmalloc's (it was preloaded), else 'glibc'."""
    return "tcmalloc" if _loaded_tcmalloc() else "glibc"


def tcmalloc_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment that restarts a program on ``library`` (tcmalloc), or None where it should run as
    it is: no tcmalloc, ``JAXNETS_ALLOCATOR=glibc``, tcmalloc preloaded already, or already restarted."""
    choice = environ.get(ALLOCATOR_VARIABLE, "tcmalloc")
    if choice not in ("tcmalloc", "glibc"):
        raise UserError(f"{ALLOCATOR_VARIABLE}={choice!r}: expected 'tcmalloc' or 'glibc'")
    preload = environ.get("LD_PRELOAD", "")
    if library is None or choice == "glibc" or "libtcmalloc" in preload or _RESTARTED_VARIABLE in environ:
        return None
    return {**TCMALLOC_SETTINGS, **environ, "LD_PRELOAD": f"{library} {preload}".strip(), _RESTARTED_VARIABLE: "1"}


def use_tcmalloc() -> None:
    """Restart this program on tcmalloc where the system has it and it is not running on it yet.

    tcmalloc must be the allocator from the process's first allocation, hence a restart (``exec`` of
    the same command line with ``LD_PRELOAD``). Call it first thing in a command-line entry point,
    never in a library or a test: it replaces the process. ``JAXNETS_ALLOCATOR=glibc`` opts out.
    """
    # On tcmalloc already (restarted, or preloaded by the user): no library search, no restart.
    library = None if running_allocator() == "tcmalloc" else tcmalloc_library()
    try:
        environment = tcmalloc_environment(os.environ, library)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def allocator_description(retained: bool) -> str:
    """What serves this process's memory, for reports; ``retained``: what ``retain_freed_memory`` returned."""
    library = _loaded_tcmalloc()
    if library:
        return f"tcmalloc ({library}, jaxnets.host.use_tcmalloc)"
    if retained:
        return "glibc, freed memory retained (jaxnets.host.retain_freed_memory)"
    return "glibc defaults"


# YNNPACK keeps the matrix products and reductions it is fast at; convolutions stay with XLA.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def xla_cpu_options(choice: kernels.KernelChoice | None = None) -> dict[str, Any]:
    """``compiler_options`` for ``jax.jit`` of a model step: the options above where the kernel choice (``choice``,
    default ``kernels.current()``: call it where the step is built, as ``kernels.bind``) has Eigen convolutions
    (``eigen_conv``), on a CPU backend whose XLA accepts them; else ``{}`` (GPUs, other XLA versions, CPUs where
    YNNPACK's convolutions are chosen)."""
    import jax

    if jax.default_backend() != "cpu" or not (choice or kernels.current()).uses("eigen_conv"):
        return {}
    return dict(_CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else {}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this XLA knows the options (checked once by compiling a tiny function)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(jnp.negative, compiler_options=_CPU_COMPILER_OPTIONS).lower(jnp.ones(2)).compile()
    except Exception:  # an XLA without these options: its defaults are what there is
        return False
    return True


def setup_compilation_cache(directory: str | None) -> None:
    """Persistent XLA compilation cache, so that a second run (or a resumed one) does not recompile.

    ``None`` is the default directory, ``''`` switches the cache off. The setting is the process's: JAX opens
    its cache once, so a change of directory also resets it (else a second run in one process, or one that
    asked for no cache, would go on writing to the first run's directory)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "jaxnets", "jax_compilation_cache")
    directory = directory or None
    if jax.config.jax_compilation_cache_dir == directory:
        return
    compilation_cache.set_cache_dir(directory)
    if directory:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
