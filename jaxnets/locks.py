"""One writer per directory (a run's workdir) or per file (an entry of the weights cache).

The lock is ``flock`` on a lock file: the kernel releases it when the process that holds it ends, however it
ends (SIGKILL, a crash, power loss), so a lock is never left behind to clear by hand. The file keeps the
holder's host, pid and start time for the message a second writer gets. Readers (predict, evaluation) never
take it. On network filesystems ``flock`` is as good as the filesystem's locking: NFSv4 and Lustre/GPFS
mounted with locking hold across hosts; a filesystem without locks (``ENOLCK``/``EOPNOTSUPP``) is said once
on stderr and the writer goes on unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jaxnets.errors import UserError
from jaxnets.fileio import writing

LOCK_FILE = ".jaxnets.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_POLL_SECONDS = 0.5


class DirectoryInUse(UserError):
    """Another process holds the lock."""


def holder_info() -> dict[str, object]:
    """What a second writer is told about this one."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, what: str = "--workdir", target: str | os.PathLike | None = None,
         lock_file: str = LOCK_FILE, wait: float = 0.0, enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``directory/lock_file`` for the ``with`` block (the directory is created if missing).

    Another holder: ``DirectoryInUse`` at once, naming ``what`` (the flag or role of the directory), the
    ``target`` it protects (default: the directory) and the holder; with ``wait`` > 0, wait up to that many
    seconds for it first. ``enabled=False`` (the processes of a multi-process run other than process 0)
    takes nothing."""
    if not enabled:
        yield None
        return
    directory = Path(directory)
    path = directory / lock_file
    fd, locked = _open_locked(directory, path, what, f"{what} {target or directory}", wait)
    try:
        if not locked:
            yield None
            return
        with writing(path, f"the lock of {what}"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (a writer that removes it does so holding it: _open_locked)


def _open_locked(directory: Path, path: Path, what: str, label: str, wait: float) -> tuple[int, bool]:
    """The lock file's descriptor, and whether it is locked (False: a filesystem without locks). A lock taken on a
    file that is no longer at ``path`` (a failed start removes the lock file it created, ``jaxnets.run_setup``, while
    this process waited on it) protects nothing: the file is opened again, created anew."""
    deadline = time.monotonic() + wait
    while True:
        with writing(path, f"the lock of {what}"):
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _acquire(fd, label, max(0.0, deadline - time.monotonic()))
            if not locked or _is_at(fd, path):
                return fd, locked
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` (not one removed or replaced since it was opened)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (here.st_dev, here.st_ino)


def _acquire(fd: int, label: str, wait: float) -> bool:
    """Take the lock on ``fd`` (protecting ``label``, for messages): True when taken, False on a filesystem
    without locks (said on stderr)."""
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DirectoryInUse(f"{label} is in use by another process ({_describe(fd)}); wait for it "
                                     "to end" + (f" or use another {label.split()[0]}" if label.startswith("--")
                                                 else "")) from None
            if not told:
                print(f"waiting for {label}: in use by another process ({_describe(fd)})", file=sys.stderr,
                      flush=True)
                told = True
            time.sleep(_POLL_SECONDS)
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            print(f"warning: {label}: the filesystem has no file locks ({os.strerror(error.errno)}); make sure no "
                  "other process writes there", file=sys.stderr)
            return False


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its name yet"
