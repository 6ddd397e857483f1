"""What a job may not see or write of the kernel's files, nor reach of the
host's daemons: masks over its /proc and /sys, and over /run.

/proc and /sys are the job's own mounts, but some of their files speak of
the host (its kernel's memory, timers, keys of every user, firmware) and
some write to it (sysctls, the sysrq trigger) for whoever holds the
capability. Docker's default (moby, oci/defaults.go) hides the first
kind behind /dev/null or an empty read-only tmpfs and makes the second
read-only; so does corral, with the same lists.

/run is where the host's daemons put their unix sockets, and a read-only
mount does not stop a connect(): an empty read-only tmpfs goes over it
(and over /var/run where that is a directory, not the usual link to it).

Each function is one step of init's `_contain`, raises OSError naming
what failed, and skips a path this kernel or host does not have.
"""

from __future__ import annotations

import contextlib
import os
import stat

from corral.shim import libc
from corral.shim.mounts import HARDENED, REMOUNT_READ_ONLY

MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
HIDDEN_PATHS = ("/run", "/var/run")
_EMPTY = "size=4k,nr_inodes=1,mode=0555"


def _kind(path: str) -> int | None:
    """The file type of `path` (not following a last link); None if absent."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return stat.S_IFMT(os.lstat(path).st_mode)
    return None


def _cover(path: str, kind: int) -> None:
    """An empty read-only directory over a directory, /dev/null over a file."""
    if kind == stat.S_IFDIR:
        libc.mount("tmpfs", path, "tmpfs", libc.MS_RDONLY | HARDENED, _EMPTY)
    else:
        libc.mount("/dev/null", path, None, libc.MS_BIND, None)
        # Not nodev: /dev/null is a device, and must open.
        libc.mount(None, path, None, REMOUNT_READ_ONLY | libc.MS_NOSUID | libc.MS_NOEXEC, None)


def mask_kernel_files() -> None:
    """Cover MASKED_PATHS, make READ_ONLY_PATHS read-only (the job's /proc,
    /sys and /dev are mounted already)."""
    for path in MASKED_PATHS:
        if (kind := _kind(path)) is not None:
            _cover(path, kind)
    keep_kernel_files_read_only()


def keep_kernel_files_read_only() -> None:
    """READ_ONLY_PATHS read-only: at the jail's start, and again after
    `--rw /` cleared read-only everywhere."""
    for path in READ_ONLY_PATHS:
        if _kind(path) is not None:
            libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC, None)
            libc.mount(None, path, None, REMOUNT_READ_ONLY | HARDENED, None)


def hide_daemon_sockets() -> None:
    """An empty read-only tmpfs over each of HIDDEN_PATHS that is a
    directory (a link to one, as /var/run to /run, is covered with it)."""
    for path in HIDDEN_PATHS:
        if _kind(path) == stat.S_IFDIR:
            libc.mount("tmpfs", path, "tmpfs", libc.MS_RDONLY | HARDENED, _EMPTY)


__all__ = [
    "HIDDEN_PATHS",
    "MASKED_PATHS",
    "READ_ONLY_PATHS",
    "hide_daemon_sockets",
    "keep_kernel_files_read_only",
    "mask_kernel_files",
]
