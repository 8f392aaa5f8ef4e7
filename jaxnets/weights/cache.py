"""The weights cache: where converted weights live and the lock of an entry while it is written.

Every route that converts on first use (torchvision's weights, timm's and other Hub repos, self-supervised
backbones) writes into this one directory, under this one lock rule; it is its own module so that those routes
depend on it and not on each other.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from jaxnets import locks
from jaxnets.weights.fileformat import PathLike

HOME_ENV = "JAXNETS_HOME"
DEFAULT_HOME = "~/.cache/jaxnets"
CACHE_WAIT_SECONDS = 1800.0  # a first use waits this long for another process converting the same weights


def cache_dir() -> Path:
    """Where converted weights live: ``$JAXNETS_HOME/weights`` (default ``~/.cache/jaxnets``)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / "weights"


def cache_writer(path: PathLike, wait: float = 0.0) -> contextlib.AbstractContextManager:
    """The lock of one cache entry while it is written (nothing when ``path`` is not in the cache): two
    conversions into the same entry would race; readers never take it."""
    path = Path(path)
    in_cache = path.parent.absolute() == cache_dir().absolute()
    return locks.hold(path.parent, what="the weights cache entry", target=path, lock_file=f".{path.name}.lock",
                      wait=wait, enabled=in_cache)

