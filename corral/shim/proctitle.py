"""A process's name and command line, as `ps` shows them.

The shim and init are forked from the spawner and never exec, so their
command line (/proc/PID/cmdline, what `ps ax` shows) would stay the
spawner's, `python -I -m corral.shim.spawner FD`: the same for every shim,
and the host's path to Python in the PID 1 a job sees.

The kernel reads a process's command line from the process's own memory:
the argv strings the kernel copied to the top of its stack at exec, from
arg_start to arg_end (/proc/self/stat). A process may write over them, as
setproctitle(3) does; Python keeps its own copies (sys.argv,
sys.orig_argv) and never reads them again. The area cannot grow:
prctl(PR_SET_MM_ARG_START) would move it, but needs CAP_SYS_RESOURCE,
which root may lack. So a title longer than the spawner's command line is
cut short.
"""

from __future__ import annotations

import ctypes
import os

from corral.shim import libc

# arg_start and arg_end are fields 48 and 49 of /proc/PID/stat (proc(5));
# these are their indices among the fields after comm, which is field 2.
_ARG_START = 48 - 3
_ARG_END = 49 - 3
# Large enough for /proc/self/stat (52 numbers and a 15-byte comm).
_STAT_SIZE = 4096


def set_title(name: str, *arguments: str) -> None:
    """Name this process `name`, as comm (`ps -o comm`, pgrep: 15 bytes at
    most) and as its command line `name arguments...` (`ps ax`), cut to fit
    the process's argv area, less a byte for the final NUL. /proc must be
    mounted; OSError if it is not, or this process has no argv area.

    Imports nothing: init may call it after its jail is up, as long as
    /proc/self is its own (it calls it before, with the host's /proc).
    """
    libc.set_name(name)
    fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.read(fd, _STAT_SIZE)
    finally:
        os.close(fd)
    start, end = argument_area(stat)
    ctypes.memmove(start, fitted(" ".join((name, *arguments)).encode(), end - start), end - start)


def argument_area(stat: bytes) -> tuple[int, int]:
    """arg_start and arg_end from the text of /proc/PID/stat; OSError if
    they are not there, or are not an area (a kernel thread's are 0)."""
    # comm may hold spaces and parentheses: the fields follow its last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        start, end = int(fields[_ARG_START]), int(fields[_ARG_END])
    except (IndexError, ValueError):
        raise OSError(f"/proc/self/stat has no argument area: {stat[:80]!r}") from None
    if not 0 < start < end:
        raise OSError(f"/proc/self/stat has no argument area: {start:#x}-{end:#x}")
    return start, end


def fitted(title: bytes, size: int) -> bytes:
    """`title` as the `size` bytes of an argv area: cut to size - 1 bytes and
    padded with NULs. The last byte must stay NUL: if it is not, the kernel
    takes the area for one that setproctitle(3) extended into the
    environment strings, and reads on into those."""
    return title[: size - 1].ljust(size, b"\0")
