"""The benchmark's command line: ``jaxnets-benchmark`` installed, ``python -m jaxnets.benchmark`` from anywhere.

Flags and what is timed: ``jaxnets.benchmark.models``; ``--help`` lists them. ``--suite gpu`` is the one-shot
GPU check (``jaxnets.benchmark.gpu``), ``--suite kernels`` the measurement of the kernel variants per CPU
(``jaxnets.benchmark.kernel_choice``); each has its own ``--help``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxnets import errors, host
from jaxnets.benchmark import models

SUITES = ("models", "gpu", "kernels")


def split_suite(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--suite NAME`` (or ``--suite=NAME``) anywhere in ``argv``: the suite and the remaining arguments."""
    rest, suite, args = [], "models", list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--suite" and args:
            suite = args.pop(0)
        elif arg.startswith("--suite="):
            suite = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return suite, rest


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxnets-benchmark``: the benchmark on this process's command line (or ``argv``), its messages naming
    the command the user ran. On the command line it first restarts on tcmalloc where the system has it,
    unless ``--system-malloc``."""
    suite, rest = split_suite(sys.argv[1:] if argv is None else argv)
    prog = errors.command("benchmark")
    if suite not in SUITES:
        print(f"{prog}: error: --suite: unknown suite {suite!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if suite == "kernels":  # a driver of child processes: no allocator of its own to choose
        from jaxnets.benchmark import kernel_choice
        return kernel_choice.main(rest, prog=f"{prog} --suite kernels")
    if argv is None and "--system-malloc" not in rest:
        host.use_tcmalloc()  # replaces the process: never done for an in-process call with argv
    if suite == "gpu":
        from jaxnets.benchmark import gpu
        return gpu.main(rest, prog=f"{prog} --suite gpu")
    return models.main(rest, prog=prog)


if __name__ == "__main__":
    with errors.invoked_as("benchmark", models.PROG):
        sys.exit(main())
