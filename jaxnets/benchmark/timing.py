"""What the benchmarks share: the cores both libraries are given, how a call is timed, torchvision's model of a
name, and the report flags and files (``--output``, ``--json``, ``--system-malloc``, ``--tiny`` defaults). One
home, so that the measurements stay comparable and every suite reports alike."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxnets import errors


def num_threads() -> int:
    """Cores this process may run on: XLA's CPU thread pool size, and what torch is given."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its work is done), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: Sequence[Callable[[], Any]], warmup: int, iters: int) -> list[list[float]]:
    """Seconds of each timed call of each of ``fns``, calling them in turn, so that a machine whose load
    changes during the run (shared CI, other jobs) slows all of them alike and their ratio holds."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, fn_times in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                fn_times.append(time.perf_counter() - start)
    return times


def torchvision_model(name: str) -> Any:
    """torchvision's ``name`` with random weights (GoogLeNet told to initialize, which silences its warning)."""
    import torchvision

    return torchvision.models.get_model(name, weights=None, **({"init_weights": True} if name == "googlenet" else {}))


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """``--output`` (the markdown), ``--json`` (rows and context) and ``--system-malloc``, as every suite has them."""
    parser.add_argument("--output", type=Path, default=None, help="write the markdown here too")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and context as JSON here")
    parser.add_argument("--system-malloc", action="store_true", help="the host's malloc as it is (see the model "
                                                                     "benchmark's --system-malloc)")


def fill_defaults(args: argparse.Namespace, defaults: Mapping[str, tuple[Any, Any]]) -> None:
    """Set each flag left at None to its ``(tiny, full)`` default, by ``args.tiny``."""
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)


def write_report(args: argparse.Namespace, text: str, payload: Mapping[str, Any]) -> None:
    """Print the markdown, then write it to ``--output`` and ``payload`` to ``--json`` where asked."""
    print(text, flush=True)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")


def check_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
    """Each flag given (not None) at least its minimum: argparse's one-line error naming the flag otherwise."""
    for flag, minimum in minimums.items():
        value = getattr(args, flag)
        if value is not None and value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")


def run_suite(argv: Sequence[str] | None, prog: str, parse_args: Callable[[Sequence[str] | None, str], Any],
              body: Callable[[argparse.Namespace], int]) -> int:
    """A suite's command line: parse (recording the command as run, for the report), then ``body`` under
    ``errors.run_cli`` (a user error one line, a bug its traceback); the exit status."""
    args = parse_args(argv, prog)
    args.command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    return errors.run_cli(prog, lambda: body(args))
