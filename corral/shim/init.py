"""init: PID 1 of a job's namespaces, and the command it spawns.

The shim forks init after `unshare(CLONE_NEWPID)`, so init is PID 1 of a
new PID namespace. init builds the jail (new mount, network, UTS and IPC
namespaces; private mounts, every host mount read-only, a fresh /proc and
/sys, a size-limited /tmp and /dev/shm, the paths the job may write bound
writable (a host path under /tmp or /dev/shm carried into the job's own
one), `lo` up, the job's hostname, no_new_privs) while the shim puts it in the
job's cgroup, becomes what the command must be (the run-as user, its cwd,
the OOM score), waits for the shim's release, and spawns the command with
posix_spawn. Then it reaps orphans, forwards SIGTERM and SIGINT, and when
the command ends writes its exact wait status to the shim and exits,
taking the namespace, and every process left in it, with it.

init runs as the run-as user too, as tini does in a container: it holds
nothing the command could not have. Its parent-death signal is set again
after the change of user (which clears it), and the change makes it
undumpable, so the command cannot ptrace it. Signals the job sends to
PID 1 are dropped by the kernel, except TERM and INT, which init forwards
to the command.

Everything here runs in a forked child of a single-threaded process: no
threads, no imports after the jail is up (the standard library may be
unreadable by then). Every failure is reported on the exec channel as a
msgpack map naming the step, and ends the process with `os._exit`; success
is `STARTED`, written once the command has exec'd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, ParamSpec, TypeVar

from corral.job import pack, unpack
from corral.shim import libc

# Signals the shim blocks before forking init: init takes them with
# sigwaitinfo (PID 1 would otherwise drop TERM/INT from the shim).
INIT_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT})
JOB_HEADER = struct.Struct("=I")
# init's word on the exec channel once the command has exec'd.
STARTED = {"started": True}
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
WAIT_STATUS = struct.Struct("=i")
# The command is the one the OOM killer should pick, never init.
COMMAND_OOM_SCORE_ADJ = b"1000"
EXIT_SETUP_FAILED = 125
HARDENED = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
REMOUNT_READ_ONLY = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY
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
# before the mount and bound at the same path inside it (see _carry_writable).
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


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InitConfig:
    """What init gets at the fork, before the job is known."""

    hostname: str
    # Pipe ends, all inherited from the shim.
    job_fd: int  # read: the JobConfig (JOB_HEADER + msgpack); the shim holds the other end
    exec_fd: int  # write, O_CLOEXEC: STARTED, or the step that failed
    result_fd: int  # write: the command's wait status
    stdout_fd: int  # write ends for the command
    stderr_fd: int


@dataclass(frozen=True, slots=True)
class JobConfig:
    """The job, sent to init once it is in the job's cgroup with its limits set."""

    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    cwd: bytes
    credentials: Credentials
    tmp_size: int
    writable: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        body = pack(
            {
                "argv": list(self.argv),
                "env": [[key, value] for key, value in self.env.items()],
                "cwd": self.cwd,
                "uid": self.credentials.uid,
                "gid": self.credentials.gid,
                "groups": list(self.credentials.groups),
                "tmp_size": self.tmp_size,
                "writable": list(self.writable),
            }
        )
        return JOB_HEADER.pack(len(body)) + body

    @classmethod
    def decode(cls, body: bytes) -> JobConfig:
        wire = unpack(body)
        credentials = Credentials(wire["uid"], wire["gid"], tuple(wire["groups"]))
        env = {key: value for key, value in wire["env"]}
        return cls(
            tuple(wire["argv"]),
            env,
            wire["cwd"],
            credentials,
            wire["tmp_size"],
            tuple(wire["writable"]),
        )


def report(fd: int, step: str, error: OSError | str) -> None:
    """Tell the shim which step failed and why (one msgpack map, one write)."""
    if isinstance(error, OSError):
        failure = {"step": step, "errno": error.errno or 0, "message": error.strerror or str(error)}
    else:
        failure = {"step": step, "errno": 0, "message": error}
    with contextlib.suppress(OSError):  # if the shim is gone, nobody is left to tell
        os.write(fd, pack(failure))


def run_init(config: InitConfig) -> NoReturn:
    """Body of init, in the child the shim forked. Never returns."""
    # init's stderr may be corrald's (a warm sandbox is built before the job
    # has a directory to log to) and would hold it open: init speaks only
    # on the exec channel.
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 2)
    os.close(null)
    try:
        job = _prepare(config)
        command = _spawn(config, job)
    except _StepError as exc:
        report(config.exec_fd, exc.step, exc.error)
        os._exit(EXIT_SETUP_FAILED)
    except Exception as exc:  # a bug: say what it was, where the caller of start sees it
        report(config.exec_fd, "init", f"{type(exc).__name__}: {exc}")
        os._exit(EXIT_SETUP_FAILED)
    with contextlib.suppress(OSError):
        os.write(config.exec_fd, pack(STARTED))
    # init keeps none of the command's ends: their EOFs belong to the command.
    for fd in (config.exec_fd, config.stdout_fd, config.stderr_fd):
        os.close(fd)
    os._exit(_reap_until(command, config.result_fd))


class _StepError(Exception):
    def __init__(self, step: str, error: OSError | str) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _step(step: str, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """call(*args, **kwargs)'s result; an OSError becomes the failure of `step`."""
    try:
        return call(*args, **kwargs)
    except OSError as exc:
        raise _StepError(step, exc) from None


def _prepare(config: InitConfig) -> JobConfig:
    """Everything between the fork and the command, in the order it must happen."""
    # A dead shim means a dead job: the shim may die at any point from here
    # (or have died already: then the job never comes, only EOF).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    host_shm = _jail(config)
    # The jail is built ahead of the job (in a warm sandbox, long before);
    # the job comes once init is in the job's cgroup and its limits are set.
    job = _receive_job(config.job_fd)
    carried: dict[bytes, int] = {}  # host paths the job's own mounts will hide, opened
    for path in job.writable:
        if _under_private_mount(path):
            carried[path] = _step("writable", _open_host_path, path, host_shm)
        else:
            _step("writable", _make_writable, path)
    if b"/" in job.writable:  # all of it, but sysfs stays as it was mounted
        _step("mounts", libc.mount, None, "/sys", None, REMOUNT_READ_ONLY | HARDENED, None)
    # The job's own /tmp and /dev/shm, unless it was given the host's whole.
    tmp_options = f"size={job.tmp_size},mode=1777"
    if b"/tmp" not in carried:
        tmp_flags = libc.MS_NOSUID | libc.MS_NODEV
        _step("mounts", libc.mount, "tmpfs", "/tmp", "tmpfs", tmp_flags, tmp_options)
    if b"/dev/shm" not in carried:
        # Private, so POSIX shared memory and semaphores stay in the job.
        _step("mounts", libc.mount, "tmpfs", "/dev/shm", "tmpfs", HARDENED, tmp_options)
    for path, fd in carried.items():
        # A path inside another carried one is already there, in the host's directory.
        if not any(_inside(path, other) for other in carried):
            _step("writable", _carry_writable, path, fd)
    for fd in [*carried.values(), *([] if host_shm is None else [host_shm])]:
        os.close(fd)
    # The command is the process the OOM killer should pick; init inherits
    # the score it passes on (only root may lower it later).
    _step("oom_score_adj", _write, "/proc/self/oom_score_adj", COMMAND_OOM_SCORE_ADJ)
    _step("user", _drop_privileges, job.credentials)
    # Changing credentials cleared the death signal: set it again, then make
    # sure the shim did not die before it was set (the job pipe's only
    # writer is the shim, so a hang-up there means it is gone).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    lifeline = select.poll()
    lifeline.register(config.job_fd, select.POLLIN)
    if any(events & select.POLLHUP for _, events in lifeline.poll(0)):
        os._exit(EXIT_SETUP_FAILED)
    os.close(config.job_fd)
    _step("cwd", os.chdir, job.cwd)
    return job


def _receive_job(fd: int) -> JobConfig:
    """Read the job from the shim; exit quietly at EOF (the shim is gone, or
    discarded a sandbox nobody claimed)."""

    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                os._exit(EXIT_SETUP_FAILED)
            data += chunk
        return data

    (size,) = JOB_HEADER.unpack(read_exactly(JOB_HEADER.size))
    try:
        return JobConfig.decode(read_exactly(size))
    except (ValueError, TypeError, KeyError) as exc:
        raise _StepError("job", f"unreadable job from the shim: {exc}") from None


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _jail(config: InitConfig) -> int | None:
    """Build the jail; return an O_PATH descriptor of the host's /dev/shm
    (None if it has none), which the job's own /dev hides from here on."""
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWNET | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
    _step("namespaces", libc.unshare, flags)
    # On systemd hosts / is shared: without this our mounts leak to the host.
    _step("mounts", libc.mount, "none", "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
    # The host is the job's to read, never to write, whatever the run-as
    # user's file permissions say: the job writes its own /tmp and /dev/shm
    # (mounted once the job comes) and the paths it was given as writable.
    _step("mounts", _set_read_only, b"/", True)
    _step("mounts", libc.mount, "proc", "/proc", "proc", HARDENED, None)
    _step("mounts", libc.mount, "sysfs", "/sys", "sysfs", HARDENED | libc.MS_RDONLY, None)
    try:
        host_shm: int | None = os.open("/dev/shm", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # no /dev/shm: a writable path under it will not be found
        host_shm = None
    _step("dev", _make_dev)
    _step("network", libc.interface_up, "lo")
    # A new network namespace forbids unprivileged ping; allow it, as hosts do.
    with contextlib.suppress(OSError):
        _write("/proc/sys/net/ipv4/ping_group_range", b"0 2147483647")
    _step("hostname", libc.sethostname, config.hostname)
    # Inherited by the command: setuid bits and file capabilities give nothing.
    _step("no_new_privs", libc.prctl, libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.set_name("corral-init")
    return host_shm


def _make_dev() -> None:
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
    libc.mount(None, "/dev", None, REMOUNT_READ_ONLY | libc.MS_NOSUID | libc.MS_NOEXEC, None)


def _make_writable(path: bytes) -> None:
    """Bind `path` (and the mounts below it) onto itself, writable.

    The path must be the real one: a symbolic link on the way could lead
    anywhere (one planted by another job with write access to a parent, say).
    The check and the bind are two steps: a link swapped in between by a
    process with write access to a parent directory is not caught.
    """
    if os.path.realpath(path) != path:
        raise _through_a_link(path)
    if path != b"/":
        libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC, None)
    _set_read_only(path, False)


def _through_a_link(path: bytes) -> OSError:
    return OSError(
        errno.ELOOP, f"{_shown(path)} passes through a symbolic link; give the path it leads to"
    )


def _shown(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _under_private_mount(path: bytes) -> bool:
    return any(path == mount or _inside(path, mount) for mount in PRIVATE_MOUNTS)


def _inside(path: bytes, directory: bytes) -> bool:
    """`path` is strictly below `directory` (both normalised, absolute)."""
    return path.startswith(directory.rstrip(b"/") + b"/")


def _open_host_path(path: bytes, host_shm: int | None) -> int:
    """An O_PATH descriptor of the host's `path`, at or under /tmp or /dev/shm,
    for _carry_writable once the job's own mount there hides it.

    `host_shm` is the host's /dev/shm, opened before the job's /dev hid it.
    What was opened is checked to be `path` itself (ELOOP if the way there
    passes through a symbolic link: one planted in the world-writable /tmp
    could lead anywhere), and the same descriptor is what gets bound, so no
    link swapped in between the check and the bind is followed.
    """
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        if path == b"/dev/shm" or _inside(path, b"/dev/shm"):
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


def _carry_writable(path: bytes, fd: int) -> None:
    """Bind the host's `path` (open as `fd`) at `path` in the job's own /tmp or
    /dev/shm, writable, as _make_writable does in place; the host's whole
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
    _set_read_only(path, False)


def _set_read_only(path: bytes, read_only: bool) -> None:
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


def _reap_until(command: int, result_fd: int) -> int:
    """Forward signals and reap orphans until the command ends; return init's exit code."""
    while True:
        info = signal.sigwaitinfo(INIT_SIGNALS)
        if info.si_signo in FORWARDED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(command, info.si_signo)
            continue
        while True:  # SIGCHLDs merge: reap everything that is ready
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid == 0:
                break
            if pid == command:
                with contextlib.suppress(OSError):
                    os.write(result_fd, WAIT_STATUS.pack(status))
                return 0


# -- the command -------------------------------------------------------------------


def _spawn(config: InitConfig, job: JobConfig) -> int:
    """Start the command and return its pid, once it has exec'd.

    posix_spawn (a vfork in glibc) costs the same whatever init's size,
    where a fork would copy a Python process's page tables. init already
    is what the command must be (user, no_new_privs, cwd, OOM score), so
    the child only sets up stdio and signals, then execs.
    """
    # Only 0-2 may reach the command: everything else closes on exec.
    try:
        libc.cloexec_from(3)
    except OSError:  # before Linux 5.11
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(name) > 2:
                    os.set_inheritable(int(name), False)
    try:
        path = _resolve(job.argv[0], job.env)
        return os.posix_spawn(
            path,
            list(job.argv),
            job.env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, config.stdout_fd, 1),
                (os.POSIX_SPAWN_DUP2, config.stderr_fd, 2),
            ],
            # Python ignores SIGPIPE and SIGXFSZ and init blocks others:
            # the command starts with every signal at its default, unblocked.
            setsigdef=DEFAULT_SIGNALS,
            setsigmask=(),
        )
    except OSError as exc:
        raise _StepError("exec", exc) from None


def _drop_privileges(credentials: Credentials) -> None:
    if credentials.uid == 0:
        return
    # Order matters: groups and gid while we still may, then uid. Leaving
    # root clears every capability (no SECBIT_KEEP_CAPS); clear them again
    # explicitly so the job's CapEff is 0 even if that ever changes.
    os.setgroups(list(credentials.groups))
    os.setgid(credentials.gid)
    os.setuid(credentials.uid)
    libc.clear_capabilities()


def _resolve(program: bytes, env: dict[bytes, bytes]) -> bytes:
    """execvpe's search, without its lazy imports; FileNotFoundError naming PATH if absent."""
    if b"/" in program:
        return program
    search = env.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")
    denied: OSError | None = None
    for directory in search.split(b":"):
        candidate = os.path.join(directory or b".", program)
        try:
            if os.path.isfile(candidate):
                if os.access(candidate, os.X_OK):
                    return candidate
                denied = PermissionError(errno.EACCES, "permission denied", candidate)
        except OSError:
            continue
    if denied is not None:
        raise denied
    raise FileNotFoundError(
        errno.ENOENT, f"not found in PATH={search.decode(errors='replace')}", program
    )
