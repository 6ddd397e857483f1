"""The few system calls Python 3.11 lacks, through ctypes, each checked.

Every wrapper raises OSError with the errno and a name for the call, like
the os module does. Nothing here allocates after the jail is up except the
ctypes call itself, so it is safe to use in init after the mounts change.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

# glibc's soname; ctypes.util.find_library would import subprocess and
# tempfile into every shim, which makes each fork of one slower.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# <linux/mount.h>, <fcntl.h>, <linux/openat2.h>: the new mount API and
# openat2 have the same numbers on every architecture
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28
# <linux/securebits.h>: keep capabilities across a change of uid
SECBIT_NO_SETUID_FIXUP = 1 << 2

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16

# <linux/close_range.h>; close_range is 436 on every architecture
CLOSE_RANGE_CLOEXEC = 1 << 2
_SYS_CLOSE_RANGE = 436

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_CREATE = 0x100
IN_IGNORED = 0x8000
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
INOTIFY_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of name

# <linux/capability.h>
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_RESOURCE = 24


def _check(result: int, call: str, detail: str = "") -> int:
    if result == -1:
        errno = ctypes.get_errno()
        where = f"{call}({detail})" if detail else call
        raise OSError(errno, f"{where}: {os.strerror(errno)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | None,
    flags: int,
    data: str | None,
) -> None:
    target = os.fsencode(target)
    _check(
        _libc.mount(
            os.fsencode(source) if source is not None else None,
            target,
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        "mount",
        target.decode(errors="backslashreplace"),
    )


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def mount_setattr(
    path: bytes, *, attr_set: int = 0, attr_clr: int = 0, fd: int | None = None
) -> None:
    """Change the mount at `path`, or the one `fd` is (a detached tree from
    open_tree, say), and every mount below it (mount_setattr(2), Linux 5.12)."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(AT_FDCWD if fd is None else fd),
        ctypes.c_char_p(b"" if fd is not None else path),
        ctypes.c_uint(AT_RECURSIVE | (AT_EMPTY_PATH if fd is not None else 0)),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, "mount_setattr", path.decode(errors="backslashreplace"))


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(path: bytes, flags: int, resolve: int, dir_fd: int = AT_FDCWD) -> int:
    """open `path` with the lookup restricted by `resolve` (openat2(2), Linux 5.6)."""
    how = _OpenHow(flags, 0, resolve)
    result = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(result, "openat2", path.decode(errors="backslashreplace"))


def open_tree(fd: int, flags: int) -> int:
    """A descriptor of the mount at `fd` (with OPEN_TREE_CLONE, a detached
    copy of it, and with AT_RECURSIVE of every mount below it), open_tree(2)."""
    result = _libc.syscall(
        _SYS_OPEN_TREE, ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_uint(flags | AT_EMPTY_PATH)
    )
    return _check(result, "open_tree")


def move_mount(tree: int, to_fd: int) -> None:
    """Attach the mount tree `tree` at the place `to_fd` is (move_mount(2))."""
    result = _libc.syscall(
        _SYS_MOVE_MOUNT,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_int(to_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(result, "move_mount")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), "umount2", target)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", name)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        "prctl",
        str(option),
    )


def set_name(name: str) -> None:
    """The process name `ps` shows (15 bytes at most)."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(ctypes.c_int(PR_SET_NAME), buffer, 0, 0, 0), "prctl", "PR_SET_NAME")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def has_capability(capability: int) -> bool:
    """Whether this process has `capability` in its effective set."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), ctypes.byref(data)), "capget")
    return bool(data[capability // 32].effective >> capability % 32 & 1)


def clear_capabilities() -> None:
    """Empty this process's effective, permitted and inheritable sets (and ambient)."""
    set_capabilities(0)


def set_capabilities(mask: int) -> None:
    """Make this process's effective and permitted sets `mask` (bit n:
    capability n), its inheritable and ambient sets empty."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i, word in enumerate((mask & 0xFFFFFFFF, mask >> 32)):
        data[i].effective = data[i].permitted = word
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def limit_bounding_set(keep: int, last: int) -> None:
    """Drop every capability up to `last` not in `keep` from the bounding set."""
    for capability in range(last + 1):
        if not keep >> capability & 1:
            prctl(PR_CAPBSET_DROP, capability)


def cloexec_from(first: int) -> None:
    """Mark every descriptor from `first` up close-on-exec (close_range(2), Linux 5.11)."""
    result = _libc.syscall(
        _SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF), CLOSE_RANGE_CLOEXEC
    )
    _check(result, "close_range")


# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 1
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks (posix_fallocate has no mode)."""
    if _libc.fallocate64(fd, mode, offset, length) == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))  # as os.write would say it


def inotify_init(flags: int = IN_NONBLOCK | IN_CLOEXEC) -> int:
    return _check(_libc.inotify_init1(ctypes.c_int(flags)), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(
        _libc.inotify_add_watch(ctypes.c_int(fd), os.fsencode(path), ctypes.c_uint32(mask)),
        "inotify_add_watch",
        path,
    )


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(ctypes.c_int(fd), ctypes.c_int(wd)), "inotify_rm_watch")


def interface_up(name: str) -> None:
    """Bring a network interface up, as `ip link set NAME up` does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(f"{IFNAMSIZ}sH", name.encode(), 0)
        flags = struct.unpack_from(f"{IFNAMSIZ}sH", _ioctl(sock, SIOCGIFFLAGS, request))[1]
        _ioctl(sock, SIOCSIFFLAGS, struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags | IFF_UP))


def _ioctl(sock: socket.socket, request: int, argument: bytes) -> bytes:
    # ifreq is 40 bytes on 64-bit Linux; pad so the kernel never reads past it.
    return fcntl.ioctl(sock.fileno(), request, argument.ljust(40, b"\0"))
