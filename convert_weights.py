"""``python convert_weights.py``: ``jaxnets-convert`` from a source checkout (see ``jaxnets.cli.convert``).

Convert torchvision weights to jaxnets weights files, and jaxnets weights back to PyTorch; ``--help`` lists
the flags. Error messages and examples name this script, the command a checkout's user has.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxnets import errors
from jaxnets.cli import convert as cli

PROG = "convert_weights.py"  # what error lines start with
HOW = "python convert_weights.py"  # what hints tell the user to run


def build_parser() -> argparse.ArgumentParser:
    """``jaxnets-convert``'s parser, named as this script."""
    with errors.invoked_as("convert", HOW):
        return cli.build_parser(PROG)


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxnets.cli.convert.main``, with messages naming this script."""
    with errors.invoked_as("convert", HOW):
        return cli.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
