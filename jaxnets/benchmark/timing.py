"""What the model benchmark and the per-convolution timing share: the cores both libraries are given, how a
call is timed, and torchvision's model of a name. One home, so that the two measurements stay comparable."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any


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
