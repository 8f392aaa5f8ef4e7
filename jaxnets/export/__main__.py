"""``python -m jaxnets.export``: ``jaxnets-export`` from anywhere (see ``jaxnets.cli.export``)."""

import sys

from jaxnets import errors
from jaxnets.cli import export as cli

if __name__ == "__main__":
    with errors.invoked_as("export", "python -m jaxnets.export"):
        sys.exit(cli.main())
