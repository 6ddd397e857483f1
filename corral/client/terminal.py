"""The local terminal of `corral run -i`, `run -it` and `attach`: raw
mode, the window's size, and our stdin read from trio.

Theory of operation.

Raw mode. With `-t` the job has a terminal of its own, and ours must pass
every key through untouched: no line editing, no echo (the job's terminal
echoes), no signals from ctrl-c (the job gets the byte and decides). That is
raw mode, and it belongs to the terminal, not to our process: a terminal
left raw outlives us, and the person's shell then shows no echo and ignores
ctrl-c. So `raw_mode` restores the exact attributes it saved on every way
out (a return, an error, a KeyboardInterrupt from a SIGINT sent with
kill, a trio cancellation). It
restores with TCSADRAIN, so the job's last output is written in the raw
mode it was meant for, and retries when a signal (a SIGWINCH while the
window is dragged) interrupts that wait.

Our stdin from trio. trio reads a descriptor without blocking its thread
only if the descriptor is in non-blocking mode, and O_NONBLOCK is a flag of
the open file description, which a terminal shares with the shell that
started us (and usually with our own stdout and stderr). A shell that gets
its terminal back non-blocking reads EAGAIN and may exit. So `open_input`
saves the flag before trio sets it and puts it back on `aclose`. While the
source is open, a write to the same terminal through a blocking API (print,
sys.stdout) may raise BlockingIOError: write output through trio too, and
close what was opened last first. Regular files, and the few devices
like /dev/null, cannot be waited on (epoll refuses them) and never block
long, so they are read in a worker thread instead; terminals, pipes and
sockets never are, so a cancelled receive never leaves a thread reading
one. Either way we read only when asked,
never ahead: bytes that arrive after we stop are left for whoever reads
the descriptor next.

The detach keys (`DEFAULT_DETACH_KEYS`, `parse_detach_keys`, `DetachMatcher`)
are `corral.client.detach_keys`'s, where the parser finds them without
trio; they are imported here too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import struct
import termios
from collections.abc import Iterator
from typing import Any

import trio

from corral.client.detach_keys import (
    DEFAULT_DETACH_KEYS,
    DetachMatcher,
    parse_detach_keys,
)

# What one read asks for: a pipe's buffer, more than anyone types at once.
RECEIVE_SIZE = 65536
_WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, columns, x and y pixels


def window_size(fd: int) -> tuple[int, int] | None:
    """(columns, rows) of the terminal on `fd`; None if `fd` is not a
    terminal or its size is unknown (0). OSError if `fd` is not open."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return None
        raise
    rows, columns, _, _ = _WINSIZE.unpack(packed)
    if rows == 0 or columns == 0:
        return None
    return columns, rows


# termios.tcgetattr's list: iflag, oflag, cflag, lflag, ispeed, ospeed, cc.
TermAttrs = list[Any]


def make_raw(attrs: TermAttrs) -> TermAttrs:
    """`attrs` changed as cfmakeraw(3) does: bytes in and out unchanged,
    no echo, no line editing, no signals, a read returns at one byte."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(
        termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
        | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
    )  # fmt: skip
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def restore(fd: int, attrs: TermAttrs) -> None:
    """Put the terminal's attributes back, after what was written to it has
    gone out (TCSADRAIN). A terminal that has gone away (EIO: hung up)
    has nothing to restore; any other failure raises termios.error."""
    while True:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
            return
        except termios.error as exc:
            # The drain is interruptible: a signal (SIGWINCH) must not leave it raw.
            if exc.args[0] == errno.EINTR:
                continue
            if exc.args[0] == errno.EIO:
                return
            raise


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[TermAttrs | None]:
    """The terminal on `fd` in raw mode inside the block, and its saved
    attributes restored exactly on every way out. Yields the saved
    attributes; a no-op yielding None if `fd` is not a terminal."""
    if not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, make_raw(saved))
        yield saved
    finally:
        restore(fd, saved)


class InputSource(trio.abc.AsyncResource):
    """A descriptor's bytes read from trio, only when asked. Make one with
    `open_input`; `aclose` leaves the descriptor open and as it was."""

    def __init__(
        self, fd: int, stream: trio.lowlevel.FdStream | None, blocking: bool | None
    ) -> None:
        self.fd = fd
        self._stream = stream  # on a dup of fd, or None: read in a thread
        # fd's O_NONBLOCK before, to put back (None: our stream has a
        # description of its own, fd's was never touched)
        self._blocking = blocking
        self._closed = False
        self._busy = False

    @property
    def threaded(self) -> bool:
        """Whether reads run in a worker thread (a regular file)."""
        return self._stream is None

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        """Up to `max_bytes` bytes, as soon as there are some; b'' at the end
        (a terminal that hangs up ends too). trio.ClosedResourceError after
        aclose, trio.BusyResourceError if another task is receiving."""
        if self._closed:
            raise trio.ClosedResourceError("the input source is closed")
        if self._busy:
            raise trio.BusyResourceError("another task is reading this input")
        self._busy = True
        try:
            if self._stream is None:
                # Not abandoned on cancel: what the thread read is returned, not lost.
                return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)
            try:
                return await self._stream.receive_some(max_bytes)
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EIO:
                    return b""  # the terminal is gone: no more input
                raise
        finally:
            self._busy = False

    async def aclose(self) -> None:
        """Stop reading: close our dup and put O_NONBLOCK back as it was."""
        if not self._closed:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
                if self._blocking is not None:
                    with contextlib.suppress(OSError):  # fd closed by its owner first
                        os.set_blocking(self.fd, self._blocking)
        await trio.lowlevel.checkpoint()


def open_input(fd: int) -> InputSource:
    """A source of `fd`'s bytes (our stdin, say) for trio. `fd` stays ours
    to close, after the source's `aclose`. OSError if `fd` is not open."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or not _pollable(fd):
        return InputSource(fd, None, None)
    blocking = os.get_blocking(fd)
    copy = _own_terminal(fd)
    shared = copy is None
    if copy is None:
        copy = os.dup(fd)
    try:
        stream = trio.lowlevel.FdStream(copy)  # sets O_NONBLOCK on copy's description
    except BaseException:
        os.close(copy)
        os.set_blocking(fd, blocking)
        raise
    # O_NONBLOCK went on a description of our own: nothing to put back.
    return InputSource(fd, stream, blocking if shared else None)


def _own_terminal(fd: int) -> int | None:
    """The terminal on `fd` opened anew, None if it is no terminal (or
    cannot be). A shell opens its terminal once for stdin, stdout and
    stderr: a dup of stdin shares its open file description, O_NONBLOCK
    included, and a write to our stdout could then fail with EAGAIN when the
    job writes faster than the terminal shows. A description of our own
    keeps stdout blocking."""
    if not os.isatty(fd):
        return None
    try:
        name = os.ttyname(fd)
        if "ptmx" in name:  # a pty's master: opening its name makes another pty
            return None
        copy = os.open(name, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(copy).st_rdev != os.fstat(fd).st_rdev:  # the name leads elsewhere now
        os.close(copy)
        return None
    return copy


def _pollable(fd: int) -> bool:
    """Whether epoll can wait on `fd`: not for regular files, directories,
    /dev/null and other devices that are always ready."""
    with select.epoll() as probe:
        try:
            probe.register(fd, select.EPOLLIN)
        except PermissionError:  # EPERM: "does not support epoll"
            return False
        probe.unregister(fd)
    return True


__all__ = [
    "DEFAULT_DETACH_KEYS",
    "RECEIVE_SIZE",
    "DetachMatcher",
    "InputSource",
    "TermAttrs",
    "make_raw",
    "open_input",
    "parse_detach_keys",
    "raw_mode",
    "restore",
    "window_size",
]
