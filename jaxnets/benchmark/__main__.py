"""``python -m jaxnets.benchmark``: ``jaxnets-benchmark`` from anywhere (see ``jaxnets.cli.benchmark``)."""

import sys

from jaxnets import errors
from jaxnets.benchmark.models import PROG
from jaxnets.cli import benchmark as cli

if __name__ == "__main__":
    with errors.invoked_as("benchmark", PROG):
        sys.exit(cli.main())
