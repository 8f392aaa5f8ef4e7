"""Writing files so that a crash never leaves one half-written, and a failed write says where and why.

Every file jaxnets writes for a user to keep (weights, ``config.json``, ``metrics.jsonl`` snapshots, plots)
goes through ``atomic_path``: written next to its destination under a temporary name, flushed to disk, then
renamed over it, so readers see the old file or the new one, never a mix. A write the storage refuses (a
full disk, no permission, a read-only or vanished directory, an I/O error) is a ``StorageError`` naming the
path and the cause in one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxnets.errors import UserError


class StorageError(UserError):
    """The storage refused a write: the message names the path and the cause (``no space left on device``);
    ``errno`` is the system's code (``errno.ENOSPC``), None when the cause came without one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def describe_os_error(error: OSError) -> str:
    """``no space left on device``: the cause in the words of the system, without errno numbers or paths."""
    return os.strerror(error.errno).lower() if error.errno else (str(error) or type(error).__name__)


# How libraries quote the system's error code in their messages, not as an ``OSError``: TensorStore (orbax's array
# storage) as ``[os_error_code=28]``, safetensors (Rust's io::Error) as ``(os error 28)`` or ``Os { code: 28, ...``.
# A code, never words: a message that merely mentions "Permission denied" is no evidence of a storage failure.
_QUOTED_OS_ERROR = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)|\bOs \{ code: (\d+)")


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its explicit causes (``raise ... from``), outermost first. Never the implicit ``__context__``:
    an exception raised while another was being handled is not caused by it (a bug in an ``except`` block is a bug)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def storage_errno(error: BaseException) -> int | None:
    """The system error code of a storage failure: an ``OSError`` with an errno, or a library's error that quotes
    one (TensorStore's, safetensors'), as ``error`` or one of its explicit causes. None otherwise: then it is no
    storage failure, and (in jaxnets) a bug to show with its traceback."""
    for link in causes(error):
        if isinstance(link, StorageError | OSError) and link.errno:
            return link.errno
        if match := _QUOTED_OS_ERROR.search(str(link)):
            return int(next(group for group in match.groups() if group))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """A storage failure of the block (``storage_errno``) as a ``StorageError`` naming ``path`` (and ``what`` it
    is); any other exception passes unchanged, with its traceback."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        code = storage_errno(error)
        if code is None:
            raise
        label = f"{what} {path}" if what else str(path)
        raise StorageError(f"could not write {label}: {os.strerror(code).lower()}", code) from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, fsync it and rename it over ``path``.
    A crash or an exception leaves ``path`` as it was, never half-written."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` replaced atomically by ``text`` (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
