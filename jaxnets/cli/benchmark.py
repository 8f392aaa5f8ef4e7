"""``jaxnets-benchmark`` (``python -m jaxnets.benchmark``): jaxnets against torchvision, timed side by side.

Flags and what is timed: ``jaxnets.benchmark.models``; ``--help`` lists them. ``--suite gpu`` is the one-shot
GPU check (``jaxnets.benchmark.gpu``), ``--suite kernels`` the measurement of the kernel variants per CPU
(``jaxnets.benchmark.kernel_choice``), ``--suite nnx`` the NNX modules against their Linen models
(``jaxnets.benchmark.nnx_vs_linen``), ``--suite input`` the input pipelines against torchvision's ``DataLoader``
(``jaxnets.benchmark.input_pipeline``); each has its own ``--help``. The benchmark is a tool on top of the
library, never part of it: this command imports it when it runs, and nothing else in jaxnets imports this
module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxnets import errors, host

SUITES = ("models", "gpu", "kernels", "nnx", "input")


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
        errors.print_error(prog, f"--suite: unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        return errors.USAGE_STATUS
    if suite == "kernels":  # a driver of child processes: no allocator of its own to choose
        from jaxnets.benchmark import kernel_choice
        return kernel_choice.main(rest, prog=f"{prog} --suite kernels")
    if argv is None and "--system-malloc" not in rest:
        host.use_tcmalloc()  # replaces the process: never done for an in-process call with argv
    if suite == "gpu":
        from jaxnets.benchmark import gpu
        return gpu.main(rest, prog=f"{prog} --suite gpu")
    if suite == "nnx":
        from jaxnets.benchmark import nnx_vs_linen
        return nnx_vs_linen.main(rest, prog=f"{prog} --suite nnx")
    if suite == "input":
        from jaxnets.benchmark import input_pipeline
        return input_pipeline.main(rest, prog=f"{prog} --suite input")
    from jaxnets.benchmark import models
    return models.main(rest, prog=prog)
