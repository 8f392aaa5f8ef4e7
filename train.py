"""``python train.py``: ``jaxnets-train`` from a source checkout (see ``jaxnets.cli.train``).

    python train.py --model resnet34                       # embedded digits, no download, a few minutes
    python train.py --model resnet50 --dataset tf_flowers --data-dir ~/tensorflow_datasets --pretrained
    python train.py --model resnet18 --dataset /path/to/images --epochs 30

``--help`` lists the flags; error lines start with ``train.py: error:``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxnets import errors
from jaxnets.cli import train as cli

PROG = "train.py"  # what error lines start with


def build_parser():
    return cli.build_parser(PROG)


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxnets.cli.train.main``, its messages naming this script."""
    with errors.invoked_as("train", f"python {PROG}"):
        return cli.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
