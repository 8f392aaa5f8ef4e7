"""A training loop's controls: a signal stops it cleanly (checkpoint, then exit), and an early estimate of how
long its steps will take."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax

from jaxnets import parallel
from jaxnets.run_io import RunLog


class StopSignal:
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, exit cleanly.

    In a run of several processes the signal may reach one process only (a preempted host): ``requested`` is the
    collective answer, the same on every process, and the loop asks it only at points every process reaches (the
    same steps), so that all stop at one step and save together. ``signum`` is this process's own signal, read
    for its exit status only."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """The handlers for the body (in the main thread only: elsewhere Python cannot install them). A second
        signal, or one during the final save, is absorbed: the save it would interrupt completes."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                # None: a handler installed outside Python (JAX's preemption notifier), which Python cannot put back
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def requested(self) -> bool:
        """Whether any process has received a stop signal (collective: every process must call it at the same
        point). Processes that received none stop as if by SIGTERM."""
        if parallel.any_process(self.signum is not None):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum  # the first signal is the one the exit status reports


class DurationEstimate:
    """One log line, early in a run, with how long its training steps will take (timed after the first step,
    which compiles) and how to make it shorter: a run that would take hours on a CPU says so in seconds."""

    STEPS = 5  # timed steps

    def __init__(self, step: int, stop_step: int, run: RunLog):
        self.first, self.stop_step, self.run = step + 1, stop_step, run
        self.started: float | None = None

    def after(self, step: int, metrics: Any) -> None:
        if step not in (self.first, self.first + self.STEPS) or self.first + self.STEPS > self.stop_step:
            return
        jax.block_until_ready(metrics)
        if step == self.first:
            self.started = time.perf_counter()
            return
        per_step = (time.perf_counter() - self.started) / self.STEPS
        remaining = per_step * (self.stop_step - step)
        advice = "" if remaining < 300 else (" (shorten it with --epochs, --steps or a smaller --image-size; "
                                             "evaluation comes on top)")
        self.run.print(f"estimated training time: {duration(remaining)} for {self.stop_step - step} more steps "
                       f"at {per_step:.2f} s/step{advice}")


def duration(seconds: float) -> str:
    """``'1 h 05 min'`` or ``'3 min 07 s'``."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"
