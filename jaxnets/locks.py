"""One writer per directory: a run's workdir, the weights cache.

The lock is ``flock`` on a file in the directory: the kernel releases it when the process that holds it
ends, however it ends (SIGKILL, a crash, power loss), so a lock is never left behind to clear by hand. The
file keeps the holder's host, pid and start time for the message a second writer gets. Readers (predict,
evaluation) never take it. On network filesystems ``flock`` is as good as the filesystem's locking: NFSv4 and
Lustre/GPFS mounted with locking hold across hosts; a filesystem without locks (``ENOLCK``/``EOPNOTSUPP``) is
said once on stderr and the run goes on unlocked.
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

LOCK_FILE = ".jaxnets.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class DirectoryInUse(UserError):
    """Another process holds the directory's lock."""


def holder_info() -> dict[str, object]:
    """What a second writer is told about this one."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, what: str = "--workdir", enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``directory``'s lock for the ``with`` block (created if missing); ``DirectoryInUse`` at once,
    naming ``what`` (the flag or role of the directory) and the holder, when another process has it.
    ``enabled=False`` (the processes of a multi-process run other than process 0) takes nothing."""
    if not enabled:
        yield None
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryInUse(f"{what} {directory} is in use by another run ({_describe(fd)}); wait for it to "
                                 f"end or use another {what}") from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            print(f"warning: {what} {directory}: the filesystem has no file locks ({os.strerror(error.errno)}); "
                  f"make sure no other run uses it", file=sys.stderr)
            yield None
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next run's open)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its name yet"
