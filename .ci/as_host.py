"""Run a command as on a host: at the root of a mount namespace, with loopback up.

The cgroup v2 lane's VM is no host in two ways that matter to corral's
tests. Its init runs CI's command in a chroot (it mounts the host's tree
and chroots into it), and the kernel refuses to create a user namespace
from inside a chroot (unshare(2): EPERM), which every corral job does;
and nothing brings its loopback interface up, so a client cannot reach a
corrald on 127.0.0.1. A real host has neither limit. So, as switch_root
does: leave the chroot for the initramfs's root (PID 1's), make a mount
namespace of our own, move the tree we were chrooted in onto its root,
and enter it; bring `lo` up; then run the command in the directory we
started in.

    python .ci/as_host.py COMMAND [ARG...]

On a host it only runs the command.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: unchroot.py COMMAND [ARG...]")
    command = sys.argv[1:]
    here = os.getcwd()
    chrooted = os.stat("/") != os.stat("/proc/1/root/")
    if chrooted:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        os.chdir("/")  # the tree we are chrooted in: a mount of its own
        os.chroot("/proc/1/root")  # PID 1's root; our working directory stays
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(
            libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /"
        )
        _check(libc.mount(b".", b"/", None, MS_MOVE, None), "mount --move . /")
        os.chroot(".")
        os.chdir(here)
    if Path("/sys/class/net/lo/operstate").read_text().strip() == "down":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
