"""A file held with `flock` for a process's life, holding its pid: how one
corrald keeps a state directory or a cgroup parent to itself.

The kernel lets go of an flock however the process ends, so a lock file
left by a crash is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; `holder` is the pid it wrote ("?" if none)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.path = path
        self.holder = holder


def take_lock(path: Path) -> int:
    """Lock `path` (created 0600 if need be) for this process and write our
    pid into it; return the descriptor, which holds the lock while open.

    Raises LockHeld if another process holds it, OSError if the file cannot
    be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockHeld(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
