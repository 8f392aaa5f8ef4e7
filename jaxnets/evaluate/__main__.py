"""``python -m jaxnets.evaluate``: ``jaxnets-evaluate`` from anywhere (see ``jaxnets.cli.evaluate``)."""

import sys

from jaxnets import errors
from jaxnets.cli import evaluate as cli

if __name__ == "__main__":
    with errors.invoked_as("evaluate", "python -m jaxnets.evaluate"):
        sys.exit(cli.main())
