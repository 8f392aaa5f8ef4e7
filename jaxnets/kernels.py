"""Which formulation runs where a layer or compile option has a tuned variant: one place, per backend and CPU.

Five parts of jaxnets exist twice, computing the same numbers: XLA's own formulation, and one tuned by
measurement on XLA:CPU, where XLA's lowering was slow.

- ``matmul_1x1``: 1x1 convolutions as (pixels x channels) matrix products (``tuned_kernels.pointwise_conv``)
  instead of ``lax.conv_general_dilated``;
- ``maxpool_jvp``: max pooling as a row pass then a column pass with its own JVP (``tuned_kernels.separable_max_pool``)
  instead of one 2-D ``reduce_window`` and XLA's select-and-scatter gradient;
- ``batchnorm_vjp``: training-mode BatchNorm with a hand-written gradient (``tuned_kernels.batch_norm_train``)
  instead of the differentiated formula;
- ``small_map_matmul``: convolutions whose output map is at most 2x2 pixels as one matrix product of their
  patches (``tuned_kernels.small_map_conv``) instead of ``lax.conv_general_dilated``;
- ``eigen_conv``: XLA:CPU's own (Eigen) convolutions instead of YNNPACK's, a compile option
  (``host.xla_cpu_options``).

Each was measured faster on CPUs only, so GPUs and TPUs run XLA's formulation until a measurement there
says otherwise. On CPUs the choice depends on the vector extensions XLA may use (``cpu_class``): the
table ``CPU_CHOICES`` records what ``jaxnets-benchmark --suite kernels`` measured on each class.

The choice is explicit: ``with kernels.using("xla"): ...`` sets it for the code inside (a ``contextvars``
context, so threads and asyncio tasks each keep their own), ``kernels.current()`` is the innermost one. A
setting is ``xla`` (XLA's formulations everywhere), ``tuned`` (every tuned variant), ``auto`` (by backend and
CPU, as above) or a set of the variant names above (exactly those tuned). ``JAXNETS_KERNELS`` (same settings,
the list comma-separated) only sets the process default, used outside any ``using``.

The layers read the choice while they are traced, and ``jax.jit`` does not key its cache on it: a step or a
forward function is built with ``bind``, which captures the choice current when it is built and applies it
whenever the function is traced, whatever the context at call time.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from jaxnets.errors import UserError

ENV_VARIABLE = "JAXNETS_KERNELS"
VARIANTS = ("matmul_1x1", "maxpool_jvp", "batchnorm_vjp", "small_map_matmul", "eigen_conv")
DESCRIPTIONS = {  # variant: (tuned, XLA's), for reports
    "matmul_1x1": ("1x1 conv as matmul", "1x1 conv as conv"),
    "maxpool_jvp": ("separable max pool + own JVP", "reduce_window max pool"),
    "batchnorm_vjp": ("hand-written BatchNorm grad", "autodiff BatchNorm grad"),
    "small_map_matmul": ("conv of <=2x2 maps as matmul", "conv of <=2x2 maps as conv"),
    "eigen_conv": ("Eigen convolutions", "YNNPACK convolutions"),
}

# The tuned variants each CPU class runs, by measurement (``--suite kernels``: ResNet-50 and GoogLeNet, batch 16,
# every setting timed in turns in one process; docs/performance.md has the numbers). On AVX-512
# and on AVX2 (emulated on an AVX-512 EPYC) each tuned variant made training faster or left it as it was, and
# none changed inference beyond the noise; ``small_map_matmul`` was measured per convolution on both (7-40x on
# 1x1 and 2x2 maps, docs/performance.md). A class not listed was never measured: it runs XLA's formulations.
CPU_CHOICES: Mapping[str, frozenset[str]] = {
    "avx512": frozenset(VARIANTS),
    "avx2": frozenset(VARIANTS),
}

# x86 CPU classes by the flag in /proc/cpuinfo that defines them, best first.
_CPU_CLASS_FLAGS = (("avx512", "avx512f"), ("avx2", "avx2"))
# XLA_FLAGS' --xla_cpu_max_isa values (XLA's CpuFeature names) at or above each class.
_ISA_AT_LEAST = {"avx512": ("AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX"),
                 "avx2": ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX")}


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The tuned variants that run (``tuned``), and why (``reason``: the override, or backend and CPU)."""

    tuned: frozenset[str]
    reason: str

    def uses(self, variant: str) -> bool:
        if variant not in VARIANTS:
            raise KeyError(f"unknown kernel variant {variant!r}; known: {', '.join(VARIANTS)}")
        return variant in self.tuned

    def describe(self) -> str:
        """One line for logs and reports: each variant's formulation, then the reason."""
        parts = [DESCRIPTIONS[v][0 if v in self.tuned else 1] for v in VARIANTS]
        return f"{', '.join(parts)} ({self.reason})"

    def setting(self) -> str:
        """The explicit setting that gives this choice anywhere ('xla' or the tuned names, comma-separated): how a
        child process (``--kernels``) runs what this one chose."""
        return ",".join(v for v in VARIANTS if v in self.tuned) or "xla"


Setting = str | Collection[str]  # 'auto', 'xla', 'tuned', or variant names (comma-separated in text)
F = TypeVar("F", bound=Callable[..., Any])
# The choice set by the innermost ``using`` (None: the process default).
_CHOICE: contextvars.ContextVar[KernelChoice | None] = contextvars.ContextVar("jaxnets_kernels", default=None)


def parse_setting(text: str, source: str = ENV_VARIABLE) -> str | frozenset[str]:
    """'auto', 'xla', 'tuned', or a comma-separated list of variant names; ``source`` (the variable, a command-line
    option) names the setting in the error."""
    text = text.strip()
    if text in ("auto", "xla", "tuned"):
        return text
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - set(VARIANTS))
    if unknown or not names:
        raise UserError(f"{source}={text!r}: expected auto, xla, tuned or a comma-separated list of "
                        f"{', '.join(VARIANTS)}")
    return names


def choose(setting: str | frozenset[str], backend: str, cpu: str, source: str = ENV_VARIABLE) -> KernelChoice:
    """The variants for ``backend`` ('cpu', 'gpu', 'tpu', ...) and CPU class ``cpu`` under ``setting``;
    ``source`` is where an explicit setting came from, for the reason."""
    if isinstance(setting, frozenset):
        return KernelChoice(setting, f"{source}={','.join(v for v in VARIANTS if v in setting)}")
    if setting == "xla":
        return KernelChoice(frozenset(), f"{source}=xla")
    if setting == "tuned":
        return KernelChoice(frozenset(VARIANTS), f"{source}=tuned")
    if backend != "cpu":
        return KernelChoice(frozenset(), f"{backend} backend: XLA's own")
    measured = cpu in CPU_CHOICES
    return KernelChoice(CPU_CHOICES.get(cpu, frozenset()),
                        f"{cpu} CPU" + ("" if measured else ", not measured: XLA's own"))


def resolve(setting: Setting | KernelChoice, source: str = "kernels.using") -> KernelChoice:
    """The choice a setting means here and now (``auto``: for the default JAX backend and this CPU)."""
    if isinstance(setting, KernelChoice):
        return setting
    parsed = parse_setting(setting if isinstance(setting, str) else ",".join(setting), source)
    if parsed == "auto":
        import jax

        return choose(parsed, jax.default_backend(), cpu_class(), source)
    return choose(parsed, "", "", source)


def default() -> KernelChoice:
    """The process default: ``JAXNETS_KERNELS`` (read each time), else ``auto``."""
    return resolve(os.environ.get(ENV_VARIABLE, "auto"), ENV_VARIABLE)


def current() -> KernelChoice:
    """The choice now: the innermost ``using``, else the process default."""
    choice = _CHOICE.get()
    return choice if choice is not None else default()


@contextlib.contextmanager
def using(setting: Setting | KernelChoice, source: str = "kernels.using") -> Iterator[KernelChoice]:
    """Run the body under ``setting`` ('xla', 'tuned', 'auto', variant names, or a ``KernelChoice``), resolved on
    entry; yields the choice. ``source`` names the setting in reports and errors (e.g. ``--kernels``)."""
    choice = resolve(setting, source)
    token = _CHOICE.set(choice)
    try:
        yield choice
    finally:
        _CHOICE.reset(token)


def bind(fn: F, choice: Setting | KernelChoice | None = None) -> F:
    """``fn`` running under ``choice`` (default: the choice current now, when the step is built) every time it runs,
    so that ``jax.jit(bind(step))`` traces ``step`` under the choice of its builder, whatever the context at call
    time. The choice is the wrapper's ``kernel_choice`` attribute (reports, compile options)."""
    bound = current() if choice is None else resolve(choice)

    @functools.wraps(fn)
    def under_choice(*args: Any, **kwargs: Any) -> Any:
        with using(bound):
            return fn(*args, **kwargs)

    under_choice.kernel_choice = bound  # type: ignore[attr-defined]
    return under_choice  # type: ignore[return-value]


def uses(variant: str) -> bool:
    """Whether the tuned ``variant`` runs now (read at trace time by the layers)."""
    return current().uses(variant)


def cpu_class() -> str:
    """'avx512', 'avx2' or 'baseline': the best vector extension of this CPU that XLA may use (capped by
    ``--xla_cpu_max_isa`` in ``XLA_FLAGS``); 'baseline' also for CPUs jaxnets cannot read (non-x86)."""
    return classify(cpu_flags(), xla_max_isa(os.environ.get("XLA_FLAGS", "")))


def classify(flags: frozenset[str], max_isa: str | None = None) -> str:
    for name, flag in _CPU_CLASS_FLAGS:
        if flag in flags and (max_isa is None or max_isa in _ISA_AT_LEAST[name]):
            return name
    return "baseline"


def xla_max_isa(xla_flags: str) -> str | None:
    """The ``--xla_cpu_max_isa`` value in ``XLA_FLAGS`` (the last one counts), upper case, or None."""
    found = re.findall(r"--xla_cpu_max_isa=([A-Za-z0-9_]+)", xla_flags)
    return found[-1].upper() if found else None


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512f``, ...); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return frozenset()


def vector_extensions() -> str:
    """The CPU's SIMD extensions for reports, e.g. 'avx2, avx512f, avx512_bf16, ... (XLA capped at AVX2)'."""
    flags = cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "asimd", "sve")))
    text = ", ".join(simd) if simd else "unknown"
    caps = [f"XLA at {cap} (--xla_cpu_max_isa)" for cap in [xla_max_isa(os.environ.get("XLA_FLAGS", ""))] if cap]
    caps += [f"oneDNN at {cap} (ONEDNN_MAX_CPU_ISA)" for cap in [os.environ.get("ONEDNN_MAX_CPU_ISA")] if cap]
    return text + (f"; capped: {', '.join(caps)}" if caps else "")
