"""init: PID 1 of a job's namespaces, and the command it forks.

The shim forks init after `unshare(CLONE_NEWPID)`, so init is PID 1 of a
new PID namespace. It waits for the shim to put it in the job's cgroup,
builds the jail (new mount, network, UTS and IPC namespaces; private
mounts, a fresh /proc and /sys, a size-limited /tmp, `lo` up, the job's
hostname, no_new_privs), then forks the command. The command drops to the
run-as user and execs; init stays root so its parent-death signal holds,
reaps orphans, forwards SIGTERM and SIGINT, and when the command ends
writes its exact wait status to the shim and exits, taking the namespace,
and every process left in it, with it.

Everything here runs in forked children of a single-threaded process:
no threads, no imports after the jail is up (the standard library may be
unreadable by then), and every failure is reported on the exec channel as
a `Failure` and ends the process with `os._exit`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
from dataclasses import dataclass
from typing import NoReturn

from corral.job import pack
from corral.shim import libc

# Signals the shim blocks before forking init: init takes them with
# sigwaitinfo (PID 1 would otherwise drop TERM/INT from the shim).
INIT_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT})
RELEASE = b"R"
WAIT_STATUS = struct.Struct("=i")
# The command is the one the OOM killer should pick, never init.
COMMAND_OOM_SCORE_ADJ = b"1000"
EXIT_SETUP_FAILED = 125


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InitConfig:
    """Everything init needs, resolved by the shim before the fork."""

    hostname: str
    tmp_size: int
    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    cwd: bytes
    credentials: Credentials
    # Pipe ends, all inherited from the shim.
    release_fd: int  # read: RELEASE once init is in the cgroup; EOF means the shim died
    exec_fd: int  # write, O_CLOEXEC: a Failure, or EOF once the command has exec'd
    result_fd: int  # write: the command's wait status
    stdout_fd: int  # write ends for the command
    stderr_fd: int


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
    try:
        _jail(config)
    except _StepError as exc:
        report(config.exec_fd, exc.step, exc.error)
        os._exit(EXIT_SETUP_FAILED)
    try:
        command = os.fork()
    except OSError as exc:  # EAGAIN: the pids limit, or the host's
        report(config.exec_fd, "fork", exc)
        os._exit(EXIT_SETUP_FAILED)
    if command == 0:
        _run_command(config)
    # init keeps none of the command's ends: their EOFs belong to the command.
    for fd in (config.exec_fd, config.stdout_fd, config.stderr_fd):
        os.close(fd)
    os._exit(_reap_until(command, config.result_fd))


class _StepError(Exception):
    def __init__(self, step: str, error: OSError | str) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


def _step(step: str, call: object, *args: object) -> None:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as exc:
        raise _StepError(step, exc) from None


def _jail(config: InitConfig) -> None:
    # A dead shim means a dead job: set the death signal, then learn whether
    # the shim is still there by waiting for its release (getppid() is 0 in
    # a new PID namespace, so it cannot tell us).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.read(config.release_fd, 1) != RELEASE:
        os._exit(EXIT_SETUP_FAILED)
    os.close(config.release_fd)
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWNET | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
    _step("namespaces", libc.unshare, flags)
    # On systemd hosts / is shared: without this our mounts leak to the host.
    _step("mounts", libc.mount, "none", "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
    hardened = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
    _step("mounts", libc.mount, "proc", "/proc", "proc", hardened, None)
    _step("mounts", libc.mount, "sysfs", "/sys", "sysfs", hardened | libc.MS_RDONLY, None)
    tmp_options = f"size={config.tmp_size},mode=1777"
    _step(
        "mounts", libc.mount, "tmpfs", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, tmp_options
    )
    # The host's /dev/shm would let jobs share POSIX shared memory and
    # semaphores past the new IPC namespace, and outlive them.
    if os.path.isdir("/dev/shm"):
        shm_options = f"size={config.tmp_size},mode=1777"
        _step("mounts", libc.mount, "tmpfs", "/dev/shm", "tmpfs", hardened, shm_options)
    if os.path.isdir("/dev/mqueue"):
        _step("mounts", libc.mount, "mqueue", "/dev/mqueue", "mqueue", hardened, None)
    _step("network", libc.interface_up, "lo")
    # A new network namespace forbids unprivileged ping; allow it, as hosts do.
    try:
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write("0 2147483647")
    except OSError:
        pass
    _step("hostname", libc.sethostname, config.hostname)
    # Inherited by the command: setuid bits and file capabilities give nothing.
    _step("no_new_privs", libc.prctl, libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.set_name("corral-init")


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


def _run_command(config: InitConfig) -> NoReturn:
    """In init's child: become the command. Never returns."""
    step = "exec"
    try:
        step = "signals"
        _reset_signals()
        step = "oom_score_adj"
        with open("/proc/self/oom_score_adj", "wb") as f:
            f.write(COMMAND_OOM_SCORE_ADJ)
        step = "stdio"
        _stdio(config)
        step = "user"
        _drop_privileges(config.credentials)
        step = "cwd"
        os.chdir(config.cwd)
        step = "exec"
        path = _resolve(config.argv[0], config.env)
        os.execve(path, list(config.argv), config.env)
    except OSError as exc:
        report(config.exec_fd, step, exc)
    except Exception as exc:
        report(config.exec_fd, step, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ and we block others: undo it all,
    or the command inherits them across exec."""
    for signum in signal.valid_signals():
        if signum in {signal.SIGKILL, signal.SIGSTOP}:
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _stdio(config: InitConfig) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(config.stdout_fd, 1)
    os.dup2(config.stderr_fd, 2)
    # Only 0-2 stay open across exec; the exec channel is O_CLOEXEC.
    os.closerange(3, config.exec_fd)
    os.closerange(config.exec_fd + 1, os.sysconf("SC_OPEN_MAX"))


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
