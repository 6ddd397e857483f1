"""The job's terminal: a pty of the job's own devpts, opened by init, and
its size, which the shim changes on request and logs.

init opens the master inside the job's mount namespace (`/dev/ptmx` leads
to the job's devpts instance, `mounts.make_dev`), so the command's `tty`
names the job's pts and the host's devpts is never touched; it hands the
master to the shim on the input channel. The shim keeps its own copy here
for resizes: TIOCSWINSZ on the master makes the kernel send SIGWINCH to
the terminal's foreground process group.

Each size the terminal has goes into output.log as a marker record,
`[0, time_ns, {"resize": [columns, rows]}]`, the first before any output,
so the log alone replays as a terminal session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from typing import Any

from corral import ipc, ipc_input
from corral.job import MAX_TTY_SIDE

# <asm-generic/ioctls.h>: Python 3.11's termios lacks these two.
TIOCSPTLCK = 0x40045431  # lock (1) or unlock (0) the slave
TIOCGPTN = 0x80045430  # the pty's number, N of /dev/pts/N
# struct winsize: rows and columns, then the pixel sizes nobody sets.
WINSIZE = struct.Struct("=HHHH")
INT = struct.Struct("=i")
# The job's devpts (newinstance, ptmxmode=0666): /dev/ptmx leads to pts/ptmx.
PTMX = "/dev/ptmx"
PTS = "/dev/pts"
# What devpts gives a new slave (its mode=0620): its owner reads and
# writes, its group may write (write(1), wall).
SLAVE_MODE = 0o620
# The marker key of a terminal's size in output.log (readers ignore keys
# they do not know).
RESIZE = "resize"
# Refusals of a Resize, as corrald passes them on.
NO_TERMINAL = "the job has no terminal: it was started without -t"
JOB_ENDED = "the job has ended"


def _ioctl(fd: int, request: int, name: str, argument: bytes) -> bytes:
    """fcntl.ioctl, its OSError naming the request."""
    try:
        return fcntl.ioctl(fd, request, argument)
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl({name}): {exc.strerror}") from None


def set_size(master: int, columns: int, rows: int) -> None:
    """Give the terminal of `master` its size (TIOCSWINSZ); OSError if it cannot."""
    _ioctl(master, termios.TIOCSWINSZ, "TIOCSWINSZ", WINSIZE.pack(rows, columns, 0, 0))


def get_size(fd: int) -> tuple[int, int]:
    """The size of the terminal of `fd` (either side), columns by rows."""
    rows, columns, _, _ = WINSIZE.unpack(
        _ioctl(fd, termios.TIOCGWINSZ, "TIOCGWINSZ", bytes(WINSIZE.size))
    )
    return columns, rows


def open_terminal(size: tuple[int, int], uid: int, gid: int) -> tuple[int, str]:
    """A new pty of the job's devpts, `size` (columns, rows), its slave the
    run-as user's: the master (close-on-exec, not this process's
    controlling terminal) and the slave's path. For init, as root (the
    chown needs it). OSError naming the call that failed.
    """
    master = os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _ioctl(master, TIOCSPTLCK, "TIOCSPTLCK", INT.pack(0))
        (number,) = INT.unpack(_ioctl(master, TIOCGPTN, "TIOCGPTN", bytes(INT.size)))
        set_size(master, *size)
        path = f"{PTS}/{number}"
        # The slave is root's (init opened the master); the command opens it
        # by path as the run-as user.
        os.chown(path, uid, gid)
        os.chmod(path, SLAVE_MODE)
    except OSError:
        os.close(master)
        raise
    return master, path


Mark = Callable[[dict[str, Any]], None]


class Terminal:
    """The shim's hold on a job's terminal: its size, changed on request,
    and a marker in the log for each size it has had.

    A Resize that comes while the job starts (no master yet) is kept and
    applied when the master comes.
    """

    def __init__(self, size: tuple[int, int], mark: Mark) -> None:
        self.size = size  # what the job's terminal is, or is to be
        self._mark = mark
        self._master: int | None = None
        self._set = size  # what init set, or the last TIOCSWINSZ here
        self.ended = False

    def connect(self, master: int) -> None:
        """The master has come (ours to close): apply a size asked for
        meanwhile, and log the size the job starts with."""
        if self.ended:
            os.close(master)
            return
        self._master = master
        if self.size != self._set:
            self._apply()
        self._mark({RESIZE: list(self.size)})

    def resize(self, columns: int, rows: int) -> ipc_input.Resized | ipc.Refusal:
        """Resize the terminal (the job gets SIGWINCH) and log its new size;
        a Refusal for a size out of bounds or a job that has ended."""
        if not (1 <= columns <= MAX_TTY_SIDE and 1 <= rows <= MAX_TTY_SIDE):
            return ipc.Refusal(
                message=f"a terminal's size must be between 1 and {MAX_TTY_SIDE} "
                f"columns and rows, not {columns}x{rows}"
            )
        if self.ended:
            return ipc.Refusal(message=JOB_ENDED)
        self.size = (columns, rows)
        if self._master is not None:
            self._apply()
            self._mark({RESIZE: [columns, rows]})
        return ipc_input.Resized()

    def close(self) -> None:
        """The job has ended: let go of the master."""
        self.ended = True
        if self._master is not None:
            os.close(self._master)
            self._master = None

    def _apply(self) -> None:
        assert self._master is not None
        # The slave's side may be gone already (the job ending): the size
        # is still the terminal's, and nobody is left to tell.
        with contextlib.suppress(OSError):
            set_size(self._master, *self.size)
            self._set = self.size
