"""The benchmark's command line: ``jaxnets-benchmark`` installed, ``python -m jaxnets.benchmark`` from anywhere.

Flags and what is timed: ``jaxnets.benchmark.models``; ``--help`` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxnets import errors, host
from jaxnets.benchmark import models


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxnets-benchmark``: the benchmark on this process's command line (or ``argv``), its messages naming
    the command the user ran. On the command line it first restarts on tcmalloc where the system has it,
    unless ``--system-malloc``."""
    if argv is None and "--system-malloc" not in sys.argv[1:]:
        host.use_tcmalloc()  # replaces the process: never done for an in-process call with argv
    return models.main(argv, prog=errors.command("benchmark"))


if __name__ == "__main__":
    with errors.invoked_as("benchmark", models.PROG):
        sys.exit(main())
