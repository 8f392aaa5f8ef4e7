"""``jaxnets-benchmark --suite kernels``: each of jaxnets' kernel variants against torchvision eager, on this CPU
as it is and limited to AVX2: the measurement behind ``jaxnets.kernels.CPU_CHOICES``.

One process per CPU limit builds jaxnets' training step and eval forward (``jaxnets.benchmark.models``) once
for each ``--kernels`` setting (every tuned variant, none, and every tuned variant but one; each step is built
under its setting, ``kernels.using``), and torchvision's eager step, then times them all in turns, round after round.
A machine whose load changes (other jobs on a shared CPU) slows the calls of a round alike, so the table gives
the median over rounds of each round's ratio: every setting against torchvision, and against all tuned.
An AVX2-only CPU is emulated on an AVX-512 one by limiting both libraries: ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``
(XLA's generated code) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (the oneDNN kernels of torch and of XLA's matmuls).

    jaxnets-benchmark --suite kernels --iters 5 --output kernels.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxnets import errors, kernels

PROG = "python -m jaxnets.benchmark --suite kernels"
# How to make this CPU behave as each class for both libraries (environment of the child processes).
ISA_LIMITS = {"native": {}, "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
MODES = ("train", "infer")


def kernel_settings() -> dict[str, str]:
    """Label -> ``--kernels`` value: all tuned, none, and all but each one."""
    settings = {"tuned": "tuned", "xla": "xla"}
    for left_out in kernels.VARIANTS:
        settings[f"tuned - {left_out}"] = ",".join(v for v in kernels.VARIANTS if v != left_out)
    return settings


def describe_limits(isas: Sequence[str]) -> str:
    return "; ".join(f"{isa}: " + (" ".join(f"{k}={v}" for k, v in ISA_LIMITS[isa].items()) or "none")
                     for isa in isas)


# --- one CPU limit, in this process ------------------------------------------------------------------------


def measure(labels: Sequence[str], args: argparse.Namespace) -> dict:
    """Seconds of every call of every round: ``{'context': ..., mode: {label or 'torch': [s, ...]}}``."""
    import jax

    from jaxnets import host
    from jaxnets.benchmark import models
    from jaxnets.benchmark.timing import num_threads, time_interleaved

    settings = kernel_settings()
    host.retain_freed_memory()
    images, labels_ = models.synthetic_batch(args.batch_size, args.image_size)
    result: dict = {"context": {"date": time.strftime("%Y-%m-%d"), "device": models.device_description(),
                                "cpu_vector_extensions": kernels.vector_extensions(), "jax": jax.__version__}}
    for mode in MODES:
        calls, kernel_lines = [], {}
        for label in labels:
            with kernels.using(settings[label], source="--kernels") as choice:  # setup_jax builds the step under it
                calls.append(models.setup_jax(args.model, mode, images, labels_, models.DTYPES["float32"]).call)
            kernel_lines[label] = choice.describe()
        calls.append(models.setup_torch(args.model, mode, images, labels_, "float32", num_threads()))
        times = time_interleaved(calls, args.warmup, args.iters)
        result[mode] = dict(zip([*labels, "torch"], times, strict=True))
        result["context"]["kernels"] = kernel_lines
        calls = None
        gc.collect()
    import torch

    result["context"]["torch"] = torch.__version__
    return result


# --- the driver: one child per CPU limit -------------------------------------------------------------------


def run_child(isa: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process limited to ``isa`` (the limits are process-wide, read at start)."""
    command = [sys.executable, "-m", "jaxnets.benchmark", "--suite", "kernels", "--child", "--model", args.model,
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--iters",
               str(args.iters), "--warmup", str(args.warmup), "--settings", "+".join(args.settings)]
    environ = {**os.environ, **ISA_LIMITS[isa]}
    if isa != "native" and os.environ.get("XLA_FLAGS"):
        environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {ISA_LIMITS[isa]['XLA_FLAGS']}"
    done = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def round_ratios(times: dict[str, list[float]], label: str, against: str) -> list[float]:
    """Per round, ``against``'s seconds over ``label``'s: above 1, ``label`` is faster."""
    return [b / a for a, b in zip(times[label], times[against], strict=True)]


def table(results: dict[str, dict], labels: Sequence[str]) -> str:
    """Markdown: per CPU limit and setting, median jaxnets ms, and the median per-round speed ratios against
    torchvision and against all tuned (with their ranges), for training and inference."""
    header = "| CPU limit | jaxnets kernels |"
    rule = "|---|---|"
    for mode in MODES:
        header += f" {mode} ms | {mode} vs torch | (range) | {mode} vs tuned |"
        rule += "---:|---:|---|---:|"
    lines = [header + " torch train ms | torch infer ms |", rule + "---:|---:|"]
    for isa, result in results.items():
        for label in labels:
            cells = []
            for mode in MODES:
                times = result[mode]
                vs_torch = round_ratios(times, label, "torch")
                vs_tuned = statistics.median(round_ratios(times, label, "tuned")) if "tuned" in times else None
                cells += [f"{statistics.median(times[label]) * 1e3:.0f}", f"{statistics.median(vs_torch):.2f}",
                          f"{min(vs_torch):.2f}-{max(vs_torch):.2f}", "–" if vs_tuned is None else f"{vs_tuned:.2f}"]
            torch_ms = [f"{statistics.median(result[m]['torch']) * 1e3:.0f}" for m in MODES]
            lines.append(f"| {isa} | {label} | {' | '.join(cells)} | {' | '.join(torch_ms)} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = errors.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (every setting and torch, in turns)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--isa", default="native,avx2", help=f"CPU limits to run under: {', '.join(ISA_LIMITS)}")
    parser.add_argument("--settings", default=None,
                        help=f"'+'-joined labels to run (default: all of {', '.join(kernel_settings())})")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one CPU limit, JSON out
    args = parser.parse_args(argv)
    args.isa = [isa.strip() for isa in args.isa.split(",")]
    if unknown := [isa for isa in args.isa if isa not in ISA_LIMITS]:
        parser.error(f"--isa: unknown {', '.join(unknown)}; choose from {', '.join(ISA_LIMITS)}")
    settings = kernel_settings()
    args.settings = list(settings) if args.settings is None else [s.strip() for s in args.settings.split("+")]
    if unknown := [s for s in args.settings if s not in settings]:
        parser.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(settings)}")
    if min(args.iters, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--iters and --batch-size must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    if args.child:
        import torchvision  # noqa: F401  before anything imports TensorFlow

        print(json.dumps(measure(args.settings, args)))
        return 0
    return errors.run_cli(prog, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    results = {}
    for isa in args.isa:
        start = time.perf_counter()
        results[isa] = run_child(isa, args)
        print(f"{isa}: {time.perf_counter() - start:.0f} s", flush=True)
    context = next(iter(results.values()))["context"]
    kernel_lines = "; ".join(f"{label}: {line}" for label, line in context["kernels"].items())
    text = "\n".join([
        f"Measured {context['date']} on {context['device']} (jax {context['jax']}, torch {context['torch']}), "
        f"{args.model} batch {args.batch_size}, {args.image_size} px, float32: every setting built in one "
        f"process per CPU limit and timed in turns with torchvision eager, {args.iters} rounds after {args.warmup} "
        "of warm-up; medians of the per-round ratios (above 1: faster).",
        f"CPU vector extensions: {context['cpu_vector_extensions']}. Limits: {describe_limits(args.isa)}.",
        f"Kernels: {kernel_lines}.", "", table(results, args.settings)])
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0
