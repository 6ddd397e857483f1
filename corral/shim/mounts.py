"""The job's mounts: what init does to the mount namespace it unshared.

Each function is one step of the jail; the order they run in lives in
init's `_contain`, and only there. Every function raises OSError naming
what failed (init reports it, with the step, on the exec channel).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from corral.shim import libc

HARDENED = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
REMOUNT_READ_ONLY = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY
DEV_FLAGS = libc.MS_NOSUID | libc.MS_NOEXEC  # the job's /dev: devices, nothing to run
# The job's /dev: character devices (major, minor), as every container has.
DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
# The job's own mounts over host paths. A writable path at or under one of
# them names the host's path, which the job's mount hides: it is opened
# before the mount and bound at the same path inside it (see carry_writable).
PRIVATE_MOUNTS = (b"/tmp", b"/dev/shm")
# Per-mount flags a bind remount must repeat or lose (mountinfo's names).
MOUNT_FLAGS = {
    b"nosuid": libc.MS_NOSUID,
    b"nodev": libc.MS_NODEV,
    b"noexec": libc.MS_NOEXEC,
    b"noatime": libc.MS_NOATIME,
    b"nodiratime": libc.MS_NODIRATIME,
    b"relatime": libc.MS_RELATIME,
}


def make_private() -> None:
    """Stop mount propagation to and from the host: on systemd hosts / is
    shared, and without this the job's mounts would leak to the host."""
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE, None)


def mount_proc_and_sys() -> None:
    """A fresh /proc (of the job's PID namespace) and a read-only /sys (of
    its network namespace, so /sys/class/net shows the job's interfaces)."""
    libc.mount("proc", "/proc", "proc", HARDENED, None)
    libc.mount("sysfs", "/sys", "sysfs", HARDENED | libc.MS_RDONLY, None)


def open_host_shm() -> int | None:
    """An O_PATH descriptor of the host's /dev/shm, before the job's /dev
    hides it (None if the host has none: a writable path under it is then
    not found)."""
    try:
        return os.open("/dev/shm", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def make_dev() -> None:
    """A /dev of the job's own, as containers have: the host's holds its disks
    and every other device, guarded by file permissions alone (and root's
    jobs have none). The usual character devices, a private devpts for
    ptys, /dev/shm (mounted when the job comes) and /dev/mqueue; then read-only.
    """
    libc.mount("tmpfs", "/dev", "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "size=64k,mode=755")
    for name, (major, minor) in DEVICES.items():
        path = f"/dev/{name}"
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # whatever the umask
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(f"/dev/{name}", 0o755)
    libc.mount(
        "devpts", "/dev/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )  # fmt: skip
    libc.mount("mqueue", "/dev/mqueue", "mqueue", HARDENED, None)
    libc.mount(None, "/dev", None, REMOUNT_READ_ONLY | DEV_FLAGS, None)


def install_account(files: dict[str, bytes]) -> None:
    """The job's own /etc files (name -> content: passwd, group), bound
    read-only over the host's. Written to the job's /dev, made writable for
    the moment, and unlinked once bound: the job sees them at /etc alone.
    A file the host lacks is left out (there is nothing to bind over)."""
    libc.mount(None, "/dev", None, libc.MS_REMOUNT | libc.MS_BIND | DEV_FLAGS, None)
    for name, content in files.items():
        target = f"/etc/{name}"
        if not os.path.isfile(target):
            continue
        source = f"/dev/.{name}"
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            os.write(fd, content)
        finally:
            os.close(fd)
        libc.mount(source, target, None, libc.MS_BIND, None)
        libc.mount(None, target, None, REMOUNT_READ_ONLY | HARDENED, None)
        os.unlink(source)
    libc.mount(None, "/dev", None, REMOUNT_READ_ONLY | DEV_FLAGS, None)


def keep_sys_read_only() -> None:
    """/sys as it was mounted, after `--rw /` cleared read-only everywhere."""
    libc.mount(None, "/sys", None, REMOUNT_READ_ONLY | HARDENED, None)


def mount_private_tmp(size: int, *, shm: bool) -> None:
    """The job's own tmpfs of `size` bytes at /tmp, or (`shm`) at /dev/shm,
    private so POSIX shared memory and semaphores stay in the job."""
    options = f"size={size},mode=1777"
    if shm:
        libc.mount("tmpfs", "/dev/shm", "tmpfs", HARDENED, options)
    else:
        libc.mount("tmpfs", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, options)


def make_writable(path: bytes) -> None:
    """Bind `path` (and the mounts below it) onto itself, writable.

    The path must be the real one: a symbolic link on the way could lead
    anywhere (one planted by a job with write access to a parent, say). So
    it is looked up once, by openat2 with RESOLVE_NO_SYMLINKS (ELOOP for a
    link anywhere on the way), and everything after works on what that
    opened: open_tree clones the mounts there, mount_setattr makes the clone
    writable while it is detached, move_mount attaches it at the same
    place. A link swapped in meanwhile (renameat2 RENAME_EXCHANGE) is never
    followed: no step looks the path up again.
    """
    if path == b"/":
        set_read_only(path, False)
        return
    fd = _open_without_links(path)
    try:
        clone = libc.OPEN_TREE_CLONE | libc.OPEN_TREE_CLOEXEC | libc.AT_RECURSIVE
        tree = libc.open_tree(fd, clone)
        try:
            try:
                libc.mount_setattr(path, attr_clr=libc.MOUNT_ATTR_RDONLY, fd=tree)
                writable = True
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                writable = False  # before Linux 5.12: remounted once in place
            libc.move_mount(tree, fd)
        finally:
            os.close(tree)
    finally:
        os.close(fd)
    if not writable:
        remount_each(path, False)


def _open_without_links(path: bytes) -> int:
    """An O_PATH descriptor of `path`, looked up without following any
    symbolic link (ELOOP naming the path if one is on the way)."""
    flags = os.O_PATH | os.O_CLOEXEC
    resolve = libc.RESOLVE_NO_SYMLINKS | libc.RESOLVE_NO_MAGICLINKS
    try:
        return libc.openat2(path, flags, resolve)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _through_a_link(path) from None
        if exc.errno == errno.ENOSYS:
            raise OSError(
                errno.ENOSYS,
                "writable paths need Linux 5.6 or later (openat2 and open_tree bind "
                "them without following a link swapped in on the way)",
            ) from None
        raise OSError(exc.errno, f"open({_shown(path)}): {os.strerror(exc.errno or 0)}") from None


def _through_a_link(path: bytes) -> OSError:
    return OSError(
        errno.ELOOP, f"{_shown(path)} passes through a symbolic link; give the path it leads to"
    )


def _shown(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def under_private_mount(path: bytes) -> bool:
    """`path` is at or under /tmp or /dev/shm, which the job has its own of."""
    return any(path == mount or inside(path, mount) for mount in PRIVATE_MOUNTS)


def inside(path: bytes, directory: bytes) -> bool:
    """`path` is strictly below `directory` (both normalised, absolute)."""
    return path.startswith(directory.rstrip(b"/") + b"/")


def open_host_path(path: bytes, host_shm: int | None) -> int:
    """An O_PATH descriptor of the host's `path`, at or under /tmp or /dev/shm,
    for carry_writable once the job's own mount there hides it.

    `host_shm` is the host's /dev/shm, opened before the job's /dev hid it.
    What was opened is checked to be `path` itself (ELOOP if the way there
    passes through a symbolic link: one planted in the world-writable /tmp
    could lead anywhere), and the same descriptor is what gets bound, so no
    link swapped in between the check and the bind is followed.
    """
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        if path == b"/dev/shm" or inside(path, b"/dev/shm"):
            if host_shm is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            below = b"." if path == b"/dev/shm" else path.removeprefix(b"/dev/shm/")
            fd = os.open(below, flags, dir_fd=host_shm)
        else:
            fd = os.open(path, flags)
    except OSError as exc:
        raise OSError(exc.errno, f"open({_shown(path)}): {exc.strerror}") from None
    if os.readlink(b"/proc/self/fd/%d" % fd) != path:  # the path the kernel took
        os.close(fd)
        raise _through_a_link(path)
    return fd


def carry_writable(path: bytes, fd: int) -> None:
    """Bind the host's `path` (open as `fd`) at `path` in the job's own /tmp or
    /dev/shm, writable, as make_writable does in place; the host's whole
    /tmp or /dev/shm (the job then has none of its own) in their place.

    The mount point is made in the job's fresh tmpfs, never on the host: a
    directory for a directory, an empty file for anything else.
    """
    if path not in PRIVATE_MOUNTS:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    libc.mount(b"/proc/self/fd/%d" % fd, path, None, libc.MS_BIND | libc.MS_REC, None)
    set_read_only(path, False)


def set_read_only(path: bytes, read_only: bool) -> None:
    """Make the mount at `path` and every mount below it read-only, or writable."""
    try:
        if read_only:
            libc.mount_setattr(path, attr_set=libc.MOUNT_ATTR_RDONLY)
        else:
            libc.mount_setattr(path, attr_clr=libc.MOUNT_ATTR_RDONLY)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        remount_each(path, read_only)


def remount_each(path: bytes, read_only: bool) -> None:
    """mount_setattr's work before Linux 5.12: remount each mount, keeping its flags.

    A mount hidden under another cannot be named by its path, nor reached
    by the job; a mount point that is gone is skipped.
    """
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    prefix = path.rstrip(b"/") + b"/"
    for line in lines:
        fields = line.split(b" ")
        point = _unescape(fields[4])
        if point != path and not point.startswith(prefix):
            continue
        flags = libc.MS_REMOUNT | libc.MS_BIND
        flags |= libc.MS_RDONLY if read_only else 0
        for option in fields[5].split(b","):
            flags |= MOUNT_FLAGS.get(option, 0)
        with contextlib.suppress(FileNotFoundError):
            libc.mount(None, point, None, flags, None)


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    if b"\\" not in field:
        return field
    parts = field.split(b"\\")
    return parts[0] + b"".join(bytes([int(p[:3], 8)]) + p[3:] for p in parts[1:])
