"""init: PID 1 of a job's namespaces, and the command it spawns.

The shim forks init after `unshare(CLONE_NEWPID)`, so init is PID 1 of a
new PID namespace. init builds the jail (new mount, network, UTS and IPC
namespaces, and a cgroup namespace once it is in the job's cgroup; private
mounts, every host mount read-only, a fresh /proc and
/sys with the kernel's host-wide files masked or read-only and /run
hidden (`masks`), a size-limited /tmp and /dev/shm, the paths the job may write bound
writable (a host path under /tmp or /dev/shm carried into the job's own
one), `lo` up, the job's hostname, no_new_privs) while the shim puts it in the
job's cgroup, becomes what the command must be (the run-as user, its cwd,
the OOM score), waits for the shim's release, and spawns the command with
posix_spawn: its stdin /dev/null, a pipe, or a terminal of the job's own,
whose end init hands the shim first (the input channel). Then it reaps
orphans, forwards SIGTERM and SIGINT, and when the command ends writes its
exact wait status to the shim and exits, taking the namespace, and every
process left in it, with it.

init runs as the run-as user too, as tini does in a container: it holds
nothing the command could not have. Its parent-death signal is set again
after the change of user (which clears it), and the change makes it
undumpable, so the command cannot ptrace it. Signals the job sends to
PID 1 are dropped by the kernel, except TERM and INT, which init forwards
to the command.

Everything here runs in a forked child of a single-threaded process: no
threads, no imports after the jail is up (the standard library may be
unreadable by then). Every failure is reported on the exec channel as an
`ipc.InitFailure` naming the step and errno, and ends the process with
`os._exit`; success is `ipc.Started`, written once the command has exec'd.
The mounts are `mounts`'s; the order of every step is `_contain`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

from corral import ipc, ipc_fds, ipc_input
from corral.shim import libc, masks, mounts, proctitle, seccomp, terminal, userns
from corral.shim.mounts import remount_each
from corral.shim.oom import COMMAND_OOM_SCORE_ADJ

# remount_each is the mounts' fallback before Linux 5.12; tests run it here.
__all__ = ["INIT_SIGNALS", "WAIT_STATUS", "InitConfig", "remount_each", "run_init"]

# Signals the shim blocks before forking init: init takes them with
# sigwaitinfo (PID 1 would otherwise drop TERM/INT from the shim).
INIT_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT})
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
WAIT_STATUS = struct.Struct("=i")
EXIT_SETUP_FAILED = 125
NAMESPACES = libc.CLONE_NEWNS | libc.CLONE_NEWNET | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC


@dataclass(frozen=True, slots=True)
class InitConfig:
    """What init gets at the fork, before the job is known."""

    hostname: str
    # Pipe ends, all inherited from the shim.
    job_fd: int  # read: the ipc.JobConfig, framed; the shim holds the other end
    exec_fd: int  # write, O_CLOEXEC: ipc.Started, or ipc.InitFailure
    result_fd: int  # write: the command's wait status
    stdout_fd: int  # write ends for the command
    stderr_fd: int
    # SOCK_SEQPACKET, close-on-exec: the input channel, where init hands the
    # shim the job's input end (ipc_input.InputEnd) before it says Started.
    input_fd: int


def report(fd: int, word: ipc.InitWord) -> None:
    """Tell the shim how setup ended (one message, one write)."""
    with contextlib.suppress(OSError):  # if the shim is gone, nobody is left to tell
        os.write(fd, word.encode())


def run_init(config: InitConfig) -> NoReturn:
    """Body of init, in the child the shim forked. Never returns."""
    # init's stderr may be corrald's (a warm sandbox is built before the job
    # has a directory to log to) and would hold it open: init speaks only
    # on the exec channel.
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 2)
    os.close(null)
    try:
        job, stdio = _contain(config)
        command = _spawn(job, stdio)
    except _StepError as exc:
        report(config.exec_fd, ipc.InitFailure.of(exc.step, exc.error))
        os._exit(EXIT_SETUP_FAILED)
    except Exception as exc:  # a bug: say what it was, where the caller of start sees it
        report(config.exec_fd, ipc.InitFailure.of("init", f"{type(exc).__name__}: {exc}"))
        os._exit(EXIT_SETUP_FAILED)
    report(config.exec_fd, ipc.Started())
    # init keeps none of the command's ends: their EOFs belong to the command.
    for fd in (config.exec_fd, config.stdout_fd, config.stderr_fd, *stdio.close):
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


def _contain(config: InitConfig) -> tuple[ipc.JobConfig, _Stdio]:
    """Every step between the fork and the command, in the one order they
    must happen in: the job, and the command's stdio; _StepError names the
    step that failed.

    Two halves: the jail is built ahead of the job (in a warm sandbox, long
    before); the job comes once init is in the job's cgroup and its limits
    are set, and the rest needs the job.
    """
    # A dead shim means a dead job: the shim may die at any point from here
    # (or have died already: then the job never comes, only EOF).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The job's `ps` shows its PID 1 as corral-init, not the spawner's
    # command line with the host's path to Python in it; named first, so a
    # shim looking for shims by name never takes init for one.
    _step("name", proctitle.set_title, "corral-init")
    _step("namespaces", libc.unshare, NAMESPACES)
    _step("mounts", mounts.make_private)
    # The host is the job's to read, never to write, whatever the run-as
    # user's file permissions say: the job writes its own /tmp and /dev/shm
    # (mounted once the job comes) and the paths it was given as writable.
    _step("mounts", mounts.set_read_only, b"/", True)
    _step("mounts", mounts.mount_proc_and_sys)
    host_shm = mounts.open_host_shm()  # before the job's /dev hides it
    _step("dev", mounts.make_dev)
    _step("network", libc.interface_up, "lo")
    _open_network()
    last_capability = _step("user", userns.last_capability)
    syscalls = _step("seccomp", seccomp.Filter)  # built now, loaded last
    # After the sysctls of _open_network: /proc/sys is read-only from here on.
    _step("mounts", masks.mask_kernel_files)
    _step("mounts", masks.hide_daemon_sockets)
    _step("hostname", libc.sethostname, config.hostname)
    # Inherited by the command: setuid bits and file capabilities give nothing.
    _step("no_new_privs", libc.prctl, libc.PR_SET_NO_NEW_PRIVS, 1)

    job = _receive_job(config.job_fd)
    # init is in the job's cgroup now (the job comes only then): a cgroup
    # namespace rooted there shows the job its cgroup as / and none of the
    # host's paths (the slice, the owner's name, corrald's own cgroup).
    _step("cgroup", libc.unshare, libc.CLONE_NEWCGROUP)
    carried: dict[bytes, int] = {}  # host paths the job's own mounts will hide, opened
    for path in job.writable:
        if mounts.under_private_mount(path):
            carried[path] = _step("writable", mounts.open_host_path, path, host_shm)
        else:
            _step("writable", mounts.make_writable, path)
    if b"/" in job.writable:  # all of it, but sysfs and the kernel's files stay as they were
        _step("mounts", mounts.keep_sys_read_only)
        _step("mounts", masks.keep_kernel_files_read_only)
    # The job's own /tmp and /dev/shm, unless it was given the host's whole.
    if b"/tmp" not in carried:
        _step("mounts", mounts.mount_private_tmp, job.tmp_size, shm=False)
    if b"/dev/shm" not in carried:
        _step("mounts", mounts.mount_private_tmp, job.tmp_size, shm=True)
    for path, fd in carried.items():
        # A path inside another carried one is already there, in the host's directory.
        if not any(mounts.inside(path, other) for other in carried):
            _step("writable", mounts.carry_writable, path, fd)
    for fd in [*carried.values(), *([] if host_shm is None else [host_shm])]:
        os.close(fd)
    # The command is the process the OOM killer should pick; init inherits
    # the score it passes on. Written with CAP_SYS_RESOURCE, it is also the
    # floor (the kernel's oom_score_adj_min): the job cannot lower it.
    # Without that capability (corrald's bounding set lacks it) the job
    # can: corrald warns at start and `info` says so.
    _step("oom_score_adj", _write, "/proc/self/oom_score_adj", COMMAND_OOM_SCORE_ADJ)
    if job.passwd or job.group:
        _step("account", mounts.install_account, {"passwd": job.passwd, "group": job.group})
    stdio = _stdio(config, job)  # as root: the terminal's slave is given to the run-as user
    _become_the_user(config, job, last_capability)
    _hand_over_input(config.input_fd, stdio)
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
    # Last: init and the command it spawns run under the filter.
    _step("seccomp", syscalls.load) if job.seccomp else syscalls.release()
    return job, stdio


def _become_the_user(config: InitConfig, job: ipc.JobConfig, last_capability: int) -> None:
    """The job's user, in its own user namespace (see corral.shim.userns),
    with the capabilities it may have; or root on the host, as it is."""
    if job.userns:
        _step("user", userns.become_host_user, job.uid, job.gid, job.groups)
        _step("user", _mapped_by_shim, config.input_fd)
        _step("user", userns.keep_capabilities, job.inside_uid, job.inside_gid, last_capability)
    else:
        _step("user", _drop_privileges, job)


def _open_network() -> None:
    """The job's network namespace is the host's user namespace's: the
    job's root has no rights over it. Let any job ping (a new namespace
    forbids unprivileged ping) and bind low ports in it, as Docker does."""
    with contextlib.suppress(OSError):
        _write("/proc/sys/net/ipv4/ping_group_range", b"0 2147483647")
    with contextlib.suppress(OSError):
        _write("/proc/sys/net/ipv4/ip_unprivileged_port_start", b"0")


def _mapped_by_shim(channel_fd: int) -> None:
    """Have the shim map the ids of init's new user namespace, and wait until it has."""
    channel = socket.socket(fileno=channel_fd)
    try:
        ipc_fds.send_message(channel, ipc.MapUser())
        received = ipc_fds.receive_message(channel, (ipc.UserMapped, ipc.Refusal))
    except ipc.IPCError as exc:
        raise _StepError("user", f"unreadable answer from the shim: {exc}") from None
    finally:
        channel.detach()  # the channel goes on: the input end is handed over on it
    if received is None:
        os._exit(EXIT_SETUP_FAILED)  # the shim is gone
    answer, fds = received
    ipc_fds.close_all(fds)
    if isinstance(answer, ipc.Refusal):
        raise _StepError("user", answer.message)


def _receive_job(fd: int) -> ipc.JobConfig:
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

    (size,) = ipc.JOB_HEADER.unpack(read_exactly(ipc.JOB_HEADER.size))
    try:
        return ipc.decode(read_exactly(size), (ipc.JobConfig,))
    except ipc.IPCError as exc:
        raise _StepError("job", f"unreadable job from the shim: {exc}") from None


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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


@dataclass(frozen=True, slots=True)
class _Stdio:
    """The command's stdin, stdout and stderr (posix_spawn file actions),
    whether it starts a session of its own, init's descriptors to close
    once it has spawned, and the job's input end for the shim (its kind
    and descriptor), if it takes input."""

    actions: tuple[tuple[Any, ...], ...]
    setsid: bool = False
    close: tuple[int, ...] = ()
    input_end: tuple[str, int] | None = None


def _stdio(config: InitConfig, job: ipc.JobConfig) -> _Stdio:
    """The command's stdio, as the job asks: a terminal of its own, a stdin
    pipe, or /dev/null and the shim's pipes. The shim gets the job's input
    end (the terminal's master, the pipe's write end) on the input channel
    before init says Started (`_hand_over_input`), so it is there when the
    shim hears that.

    A terminal job's command starts a session (posix_spawn's setsid comes
    before its file actions) and opens the slave without O_NOCTTY, which
    makes the terminal its controlling one: Ctrl+C is SIGINT to its
    foreground process group, a resize SIGWINCH. Its output goes through
    the terminal alone; init closes its ends of the stdout and stderr pipes
    after the spawn as always, so the shim sees their EOF.
    """
    output = (
        (os.POSIX_SPAWN_DUP2, config.stdout_fd, 1),
        (os.POSIX_SPAWN_DUP2, config.stderr_fd, 2),
    )
    if job.tty:
        master, slave = _step("terminal", terminal.open_terminal, job.tty_size, job.uid, job.gid)
        actions: tuple[tuple[Any, ...], ...] = (
            (os.POSIX_SPAWN_OPEN, 0, slave, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        )
        # Held until the command has the slave open: the last master's close takes the slave.
        return _Stdio(actions, setsid=True, close=(master,), input_end=(ipc_input.TTY, master))
    if job.stdin:
        read_end, write_end = _step("stdin", os.pipe2, os.O_CLOEXEC)
        # init keeps neither end: the job's EOF and EPIPE belong to the shim and the command.
        return _Stdio(
            ((os.POSIX_SPAWN_DUP2, read_end, 0), *output),
            close=(read_end, write_end),
            input_end=(ipc_input.PIPE, write_end),
        )
    return _Stdio(((os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0), *output))


def _hand_over_input(channel_fd: int, stdio: _Stdio) -> None:
    """Hand the shim the job's input end, if it has one, on the input channel, and close it."""
    with socket.socket(fileno=channel_fd) as channel:
        if stdio.input_end is not None:
            kind, end = stdio.input_end
            _step("stdin", ipc_fds.send_message, channel, ipc_input.InputEnd(kind=kind), [end])


def _spawn(job: ipc.JobConfig, stdio: _Stdio) -> int:
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
        env = dict(job.env)
        path = _resolve(job.argv[0], env)
        return os.posix_spawn(
            path,
            list(job.argv),
            env,
            file_actions=list(stdio.actions),
            setsid=stdio.setsid,
            # Python ignores SIGPIPE and SIGXFSZ and init blocks others:
            # the command starts with every signal at its default, unblocked.
            setsigdef=DEFAULT_SIGNALS,
            setsigmask=(),
        )
    except OSError as exc:
        raise _StepError("exec", exc) from None


def _drop_privileges(job: ipc.JobConfig) -> None:
    if job.uid == 0:
        return
    # Order matters: groups and gid while we still may, then uid. Leaving
    # root clears every capability (no SECBIT_KEEP_CAPS); clear them again
    # explicitly so the job's CapEff is 0 even if that ever changes.
    os.setgroups(list(job.groups))
    os.setgid(job.gid)
    os.setuid(job.uid)
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
