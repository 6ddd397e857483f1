"""The sandbox: init in its own namespaces and in the job's cgroup, before
the job is known, and the failure of a start (init's word on it too)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from corral import ipc
from corral.errors import ErrorCode
from corral.job import SHORT_ID, ResolvedSpec
from corral.shim import libc
from corral.shim.cgroup import Cgroup, CgroupError, Flavour, open_cgroup
from corral.shim.init import INIT_SIGNALS, InitConfig, run_init

# One read of init's word on the exec channel (a failure's message is short).
EXEC_READ = 64 * 1024


class StartFailure(Exception):
    """The job could not start: which step, why, the error code for corrald,
    and the errno init reported (0 if none)."""

    def __init__(
        self,
        step: str,
        message: str,
        code: ErrorCode = ErrorCode.FAILED_PRECONDITION,
        errno: int = 0,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.code = code
        self.errno = errno

    def report(self) -> ipc.StartReport:
        """The start report that tells corrald of this failure."""
        return ipc.StartReport.failed(self.code, str(self), self.step, self.errno)


def init_word(data: bytes) -> ipc.InitWord | None:
    """init's word on the exec channel in `data`; None if `data` holds none (yet)."""
    try:
        return ipc.decode(data, (ipc.Started, ipc.InitFailure))
    except ipc.IPCError:
        return None


def init_failure(spec: ResolvedSpec, data: bytes) -> StartFailure | None:
    """The failure init reported in `data` (None: it reported none), as the
    caller of start of `spec` should read it."""
    if not data:
        return None
    failure = init_word(data)
    if not isinstance(failure, ipc.InitFailure):
        return StartFailure("init", "init reported an unreadable failure", ErrorCode.INTERNAL)
    step, message = failure.step, failure.message
    program = spec.argv[0].decode(errors="replace")
    if step == "exec":
        text = f"cannot run {program!r}: {message}"
    elif step == "cwd":
        text = f"cannot change to directory {spec.cwd.decode(errors='replace')!r}: {message}"
    elif step == "writable":
        text = f"cannot make a path writable: {message}"
    elif step == "user":
        text = f"cannot become user {spec.user!r}: {message}"
    else:
        text = f"cannot set up the job ({step}): {message}"
    missing = failure.errno in {errno.ENOENT, errno.ENOTDIR}
    # A writable path through a symbolic link: the caller should name its target.
    linked = step == "writable" and failure.errno == errno.ELOOP
    caller_error = (step in {"exec", "cwd", "writable"} and missing) or linked
    code = ErrorCode.INVALID_ARGUMENT if caller_error else ErrorCode.FAILED_PRECONDITION
    return StartFailure(step, text, code, failure.errno)


def read_all(fd: int) -> bytes:
    """Everything a pipe holds until EOF (its writer has exited or closed it)."""
    chunks = []
    while chunk := os.read(fd, EXEC_READ):
        chunks.append(chunk)
    return b"".join(chunks)


class Sandbox:
    """init in its own namespaces and in the job's cgroup, before the job is known.

    The spawner builds one ahead of the next start (a warm sandbox), so a
    start only fills the job in; a cold start builds one at once. init
    builds its jail while the cgroup is made and joined (on cgroup v1 a
    join can wait for an RCU grace period). Building never raises: a
    failure is kept, and becomes the job's.
    """

    def __init__(self, request: ipc.Prepare | ipc.Start, inherited: Iterable[int]) -> None:
        self.job_id = request.id
        self.cgroup: Cgroup | None = None
        self.init_pid: int | None = None
        self.pidfd: int | None = None
        self.failure: StartFailure | None = None
        self.init_report = b""  # what init said before it was abandoned
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(5)]
        (self.out_r, out_w), (self.err_r, err_w), (job_r, self.job_w) = pipes[:3]
        (self.exec_r, exec_w), (self.result_r, result_w) = pipes[3:]
        # Made here whatever the job turns out to be: a warm sandbox is built
        # before anyone knows whether its job takes input.
        self.input_channel, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        input_w = theirs.detach()
        config = InitConfig(
            hostname=self.job_id[:SHORT_ID],
            job_fd=job_r,
            exec_fd=exec_w,
            result_fd=result_w,
            stdout_fd=out_w,
            stderr_fd=err_w,
            input_fd=input_w,
        )
        ours = [self.out_r, self.err_r, self.job_w, self.exec_r, self.result_r]
        try:
            self._fork_init(config, ours=[*ours, self.input_channel.fileno(), *inherited])
            self.cgroup = _open_cgroup(request)
            try:
                self.cgroup.create()
                if request.slice_limits is not None:  # the owner's quota
                    self.cgroup.limit_slice(request.slice_limits)
                assert self.init_pid is not None
                self.cgroup.add(self.init_pid)
            except CgroupError as exc:
                raise StartFailure("cgroup", str(exc), ErrorCode.INTERNAL) from None
        except StartFailure as failure:
            self.failure = failure
            self._abandon()
        finally:
            for fd in (out_w, err_w, job_r, exec_w, result_w, input_w):
                os.close(fd)

    def _fork_init(self, config: InitConfig, ours: list[int]) -> None:
        """Fork init as PID 1 of a new PID namespace."""
        signal.pthread_sigmask(signal.SIG_BLOCK, INIT_SIGNALS)
        try:
            libc.unshare(libc.CLONE_NEWPID)
        except OSError as exc:
            message = f"unshare(CLONE_NEWPID): {exc.strerror}"
            raise StartFailure("namespaces", message, ErrorCode.INTERNAL) from None
        pid = os.fork()
        if pid == 0:
            # init holds only what InitConfig names: a report pipe or claim
            # socket held here would keep someone waiting for an EOF.
            for fd in ours:
                os.close(fd)
            run_init(config)
        self.init_pid = pid
        self.pidfd = os.pidfd_open(pid)

    def _abandon(self) -> None:
        """Kill init after a failed build, keeping what it said: if it failed
        first (and the join failed because of it), its report says more."""
        if self.pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.init_report = read_all(self.exec_r)

    def discard(self) -> NoReturn:
        """Nobody claimed this sandbox: take it down and exit."""
        self._abandon()
        if self.init_pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
        if self.cgroup is not None:
            with contextlib.suppress(CgroupError):
                self.cgroup.remove()
        os._exit(0)


def _open_cgroup(request: ipc.Prepare | ipc.Start) -> Cgroup:
    try:
        return open_cgroup(
            Flavour(request.flavour),
            request.id,
            root=Path(request.cgroup_root),
            parent=request.cgroup_parent,
            slice=request.slice,
        )
    except (CgroupError, ValueError) as exc:  # ValueError: a flavour we do not know
        raise StartFailure("cgroup", str(exc), ErrorCode.INTERNAL) from None
