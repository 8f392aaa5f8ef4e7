"""``python -m jaxnets.predict``: ``jaxnets-predict`` from anywhere (see ``jaxnets.cli.predict``)."""

import sys

from jaxnets import errors
from jaxnets.cli import predict as cli

if __name__ == "__main__":
    with errors.invoked_as("predict", "python -m jaxnets.predict"):
        sys.exit(cli.main())
