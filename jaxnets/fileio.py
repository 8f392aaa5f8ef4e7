"""Writing files so that a crash never leaves one half-written, and a failed write says where and why.

Every file jaxnets writes for a user to keep (weights, ``config.json``, ``metrics.jsonl`` snapshots, plots)
goes through ``atomic_path``: written next to its destination under a temporary name, flushed to disk, then
renamed over it, so readers see the old file or the new one, never a mix. A write the storage refuses (a
full disk, no permission, a read-only or vanished directory, an I/O error) is a ``StorageError`` naming the
path and the cause in one line.
"""

from __future__ import annotations

import contextlib
import errno as errnos
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


# How TensorStore (orbax's array storage) reports the system's error: in its message, not as an OSError.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_SYSTEM_WORDS = {errnos.ENOSPC: "No space left on device", errnos.EDQUOT: "Disk quota exceeded",
                 errnos.EACCES: "Permission denied", errnos.EPERM: "Operation not permitted",
                 errnos.EROFS: "Read-only file system", errnos.ENOENT: "No such file or directory",
                 errnos.EIO: "Input/output error"}


def storage_errno(error: BaseException) -> int | None:
    """The system error code of a storage failure anywhere in ``error``'s chain (an ``OSError``, or a
    TensorStore error that quotes one), None when it is no storage failure (then it is a bug to show)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StorageError) and error.errno:
            return error.errno
        if isinstance(error, OSError) and error.errno:
            return error.errno
        text = str(error)
        if match := _TENSORSTORE_OS_ERROR.search(text):
            return int(match.group(1))
        for code, words in _SYSTEM_WORDS.items():
            if words in text:
                return code
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """A storage failure of the block (an ``OSError``, or a library's error quoting the system's, as
    safetensors' and TensorStore's do) as a ``StorageError`` naming ``path`` (and ``what`` it is)."""
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
