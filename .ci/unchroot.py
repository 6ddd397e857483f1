"""Run a command at the root of a mount namespace of its own, out of a chroot.

The cgroup v2 lane's VM runs CI's command in a chroot (its initramfs
mounts the host's tree and chroots into it), and the kernel refuses to
create a user namespace from inside a chroot (unshare(2): EPERM), which
every corral job does: a real host, whose root is its mount namespace's,
has no such limit. So, as switch_root does: leave the chroot for the
initramfs's root (PID 1's), make a mount namespace of our own, move the
tree we were chrooted in onto its root, and enter it; then run the
command in the directory we started in.

    python .ci/unchroot.py COMMAND [ARG...]

Outside a chroot it runs the command as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

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
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
