"""The shim: one per job, owning it from start to end, outliving corrald.

The spawner forks the shim into its own session. The shim

1. reads the job's spec and resolves the run-as user;
2. creates the job's cgroup and writes its limits;
3. listens on `shim.sock` in the job directory (stop, status);
4. unshares a PID namespace and forks init, puts init in the cgroup, then
   releases it (init builds the jail and forks the command);
5. learns from the exec channel whether the command started, and tells
   corrald on the report pipe ({"ok": true, ...} or the failure);
6. relays the command's stdout and stderr into `output.log` as msgpack
   records `[stream, timestamp_ns, bytes]`, under the log size cap;
7. when init exits: drains the pipes, reads the command's wait status,
   OOM kills and usage, removes the cgroup, writes `status.msgpack`
   atomically and exits.

Plain synchronous Python around one poll loop: no threads (impossible after
`unshare(CLONE_NEWPID)`), no trio, no subprocess.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import pwd
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from corral.job import (
    FULL_ERRNOS,
    OUTPUT_FILE,
    SHORT_ID,
    SOCKET_FILE,
    STREAM_MARKER,
    STREAM_STDERR,
    STREAM_STDOUT,
    Reserve,
    ResolvedSpec,
    SpecError,
    State,
    Status,
    Usage,
    pack,
    read_spec,
    socket_path,
    unpack,
    write_status,
)
from corral.shim import libc
from corral.shim.cgroup import Cgroup, CgroupError, Flavour, open_cgroup
from corral.shim.init import (
    INIT_SIGNALS,
    STARTED,
    WAIT_STATUS,
    Credentials,
    InitConfig,
    JobConfig,
    run_init,
)

READ_SIZE = 64 * 1024
# Room kept below the log cap for the final "dropped" marker record, error and all.
MARKER_RESERVE = 128
# The log's blocks are allocated this far past its end: a call per two full
# reads of a pipe, and little room held aside by each running job.
ALLOCATE_AHEAD = 128 * 1024
# After init exits the kernel kills the rest of the namespace; its pipes
# close within milliseconds. Anything slower is stuck in the kernel.
DRAIN_TIMEOUT = 5.0
CONTROL_MESSAGE = 4096
MAX_CONTROL_CLIENTS = 32
MAX_POLL_MS = 3_600_000
# From the fork of init to the command's exec. Building the jail takes
# milliseconds; a job stuck longer (a hung mount or NFS cwd) is failed,
# so `start` always gets an answer, before corrald stops waiting (60 s).
SETUP_TIMEOUT = 30.0


class StartFailure(Exception):
    """The job could not start: which step, why, and the error code for corrald."""

    def __init__(self, step: str, message: str, code: str = "failed_precondition") -> None:
        super().__init__(message)
        self.step = step
        self.code = code


def resolve_user(user: str) -> Credentials:
    """The uid, gid and groups of a user name or numeric uid."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():  # a uid without a passwd entry is still a uid
            return Credentials(int(user), int(user), ())
        raise StartFailure("user", f"unknown user {user!r}", "invalid_argument") from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Credentials(entry.pw_uid, entry.pw_gid, groups)


def _read_all(fd: int) -> bytes:
    """Everything a pipe holds until EOF (its writer has exited or closed it)."""
    chunks = []
    while chunk := os.read(fd, READ_SIZE):
        chunks.append(chunk)
    return b"".join(chunks)


def unpack_or_none(data: bytes) -> Any:
    try:
        return unpack(data)
    except (ValueError, TypeError):
        return None


def _now() -> int:
    return time.time_ns()


def _allocate_past_end(fd: int, offset: int, length: int) -> None:
    """Allocate blocks for `length` bytes from `offset`, leaving the file's
    size (and so what readers see) as it is."""
    libc.fallocate(fd, libc.FALLOC_FL_KEEP_SIZE, offset, length)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class OutputLog:
    """output.log: append-only msgpack records, capped in size, never torn.

    Theory of operation. Readers follow the log by its size, so no record
    may be seen in part. Blocks for records are allocated past the end
    first (FALLOC_FL_KEEP_SIZE leaves the size alone), ALLOCATE_AHEAD at a
    time or, short of that, just what the next record needs; a write into
    them cannot run out of room. When even that fails the filesystem is
    full: that record and every later one are dropped and counted, so the
    log is a clean prefix of the output, and `close` appends a marker
    saying how much was dropped and why. Logging does not resume if room
    comes back during the job, so the log stays that prefix, as the job's
    reason says ("output from byte N on was dropped"); resuming would need
    a marker in the middle of the log, where the hole is. A filesystem that
    cannot allocate ahead gets plain writes, a short one taken back (a
    reader may then glimpse the torn record before it goes).
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.allocated = self.size  # blocks are allocated up to here
        self.can_allocate = True
        self.limit = limit
        self.relayed = 0  # bytes of output, kept or not
        self.dropped = 0
        self.error: str | None = None  # why logging stopped
        self.error_at = 0  # the byte of output it stopped at

    def append(self, stream: int, data: bytes) -> None:
        """Log one read of the job's output, or count it as dropped."""
        offset = self.relayed
        self.relayed += len(data)
        if self.error is None:
            record = pack([stream, _now(), data])
            # Over the cap, this record goes; a smaller one may still fit.
            if self.size + len(record) <= self.limit - MARKER_RESERVE:
                self.error = self._write(record)
                if self.error is None:
                    return
                self.error_at = offset
        self.dropped += len(data)

    def loss(self) -> str | None:
        """What output was dropped and why, in a few words; None if none was."""
        if self.error is not None:
            return f"output from byte {self.error_at} on was dropped: {self.error}"
        if self.dropped:
            return (
                f"{self.dropped} bytes of output were dropped: "
                f"the log reached its size cap of {self.limit} bytes"
            )
        return None

    def close(self) -> None:
        """Append a marker of what was dropped, if anything, and give back
        the blocks allocated ahead. The marker has its room under the cap;
        on a full filesystem, it needs the room the job's reserve gave back
        (another writer may take that first: then there is no marker, and
        the job's status alone counts what was dropped)."""
        if self.dropped:
            marker: dict[str, Any] = {"dropped_bytes": self.dropped}
            if self.error:
                marker["error"] = self.error
            record = pack([STREAM_MARKER, _now(), marker])
            if self.size + len(record) <= self.limit:
                self._write(record)
        if self.allocated > self.size:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # the same size, and no blocks past it
        os.close(self.fd)

    def _write(self, record: bytes) -> str | None:
        """Append a whole record; on failure, why (the log is left as it was)."""
        try:
            self._allocate(len(record))
            written = os.write(self.fd, record)
        except OSError as exc:
            return exc.strerror or str(exc)
        if written == len(record):
            self.size += written
            return None
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, self.size)
        self.allocated = self.size
        return "short write"

    def _allocate(self, length: int) -> None:
        """Blocks for `length` more bytes past the end; OSError if there are none."""
        end = self.size + length
        if not self.can_allocate or end <= self.allocated:
            return
        ahead = max(end, min(self.size + ALLOCATE_AHEAD, self.limit))
        try:
            _allocate_past_end(self.fd, self.size, ahead - self.size)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:  # EOPNOTSUPP and the like
                self.can_allocate = False  # plain writes, whose errors tell
                return
            if ahead == end:
                raise
            _allocate_past_end(self.fd, self.size, length)
            ahead = end
        self.allocated = ahead


class Sandbox:
    """init in its own namespaces and in the job's cgroup, before the job is known.

    The spawner builds one ahead of the next start (a warm sandbox), so a
    start only fills the job in; a cold start builds one at once. init
    builds its jail while the cgroup is made and joined (on cgroup v1 a
    join can wait for an RCU grace period). Building never raises: a
    failure is kept, and becomes the job's.
    """

    def __init__(self, job_id: str, request: dict[str, Any], inherited: Iterable[int]) -> None:
        self.job_id = job_id
        self.cgroup: Cgroup | None = None
        self.init_pid: int | None = None
        self.pidfd: int | None = None
        self.failure: StartFailure | None = None
        self.init_report = b""  # what init said before it was abandoned
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(5)]
        (self.out_r, out_w), (self.err_r, err_w), (job_r, self.job_w) = pipes[:3]
        (self.exec_r, exec_w), (self.result_r, result_w) = pipes[3:]
        config = InitConfig(
            hostname=job_id[:SHORT_ID],
            job_fd=job_r,
            exec_fd=exec_w,
            result_fd=result_w,
            stdout_fd=out_w,
            stderr_fd=err_w,
        )
        try:
            self._fork_init(
                config,
                ours=[self.out_r, self.err_r, self.job_w, self.exec_r, self.result_r, *inherited],
            )
            self.cgroup = _open_cgroup(request, job_id)
            try:
                self.cgroup.create()
                assert self.init_pid is not None
                self.cgroup.add(self.init_pid)
            except CgroupError as exc:
                raise StartFailure("cgroup", str(exc), "internal") from None
        except StartFailure as failure:
            self.failure = failure
            self._abandon()
        finally:
            for fd in (out_w, err_w, job_r, exec_w, result_w):
                os.close(fd)

    def _fork_init(self, config: InitConfig, ours: list[int]) -> None:
        """Fork init as PID 1 of a new PID namespace."""
        signal.pthread_sigmask(signal.SIG_BLOCK, INIT_SIGNALS)
        try:
            libc.unshare(libc.CLONE_NEWPID)
        except OSError as exc:
            message = f"unshare(CLONE_NEWPID): {exc.strerror}"
            raise StartFailure("namespaces", message, "internal") from None
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
        self.init_report = _read_all(self.exec_r)

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


def _open_cgroup(request: dict[str, Any], job_id: str) -> Cgroup:
    try:
        return open_cgroup(
            Flavour(request["flavour"]),
            job_id,
            root=Path(request["cgroup_root"]),
            parent=request["cgroup_parent"],
        )
    except CgroupError as exc:
        raise StartFailure("cgroup", str(exc), "internal") from None


class Shim:
    def __init__(
        self, sandbox: Sandbox, job_dir: Path, request: dict[str, Any], report_fd: int
    ) -> None:
        self.job_dir = job_dir
        self.request = request
        self.report_fd: int | None = report_fd
        self.spec: ResolvedSpec = read_spec(job_dir)
        if self.spec.id != sandbox.job_id:
            raise ValueError(
                f"the spec is for job {self.spec.id}, the sandbox for {sandbox.job_id}"
            )
        self.sandbox = sandbox
        self.cgroup = sandbox.cgroup
        self.init_pid = sandbox.init_pid
        self.pidfd = sandbox.pidfd
        self.result_r = sandbox.result_r
        self.status = Status(state=State.STARTING, shim_pid=os.getpid(), pid=self.init_pid)
        self.stop_requested: tuple[str, float] | None = None  # (by, grace)
        self.kill_at: float | None = None
        self.term_at = 0.0
        self.killed = False
        self.deadline: float | None = None
        self.setup_deadline: float | None = None
        self.exec_r: int | None = None
        self.start_failure: StartFailure | None = None
        self.job_out = b""  # the JobConfig, until init has all of it
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.pipes: set[int] = set()  # the command's stdout and stderr, until EOF
        self.log: OutputLog | None = None
        self.reserve: Reserve | None = None
        self.poll = select.poll()
        self.clients: set[socket.socket] = set()

    # -- setup -------------------------------------------------------------------

    def start(self) -> None:
        """Fill the sandbox in with the job; the poll loop sees it through.

        StartFailure says why it could not start. From here on the shim
        answers on its socket: a stop while init finishes is served.
        """
        if self.sandbox.failure is not None:
            raise self._exec_failure(self.sandbox.init_report) or self.sandbox.failure
        credentials = resolve_user(self.spec.user)
        assert self.cgroup is not None
        try:
            devices = [(int(major), int(minor)) for major, minor in self.request["devices"]]
            self.cgroup.apply(self.spec.limits, devices)
        except CgroupError as exc:
            raise StartFailure("cgroup", str(exc), "internal") from None
        self.setup_deadline = time.monotonic() + SETUP_TIMEOUT
        job = JobConfig(
            argv=self.spec.argv,
            env=self.spec.env,
            cwd=self.spec.cwd,
            credentials=credentials,
            tmp_size=self.spec.tmp_size,
            writable=self.spec.writable,
        )
        # init goes on with the job while the rest is set up here: output
        # is relayed only once the poll loop runs, after the log is open.
        self.job_out = job.encode()
        os.set_blocking(self.sandbox.job_w, False)
        self._send_job(self.sandbox.job_w)
        if self.job_out:
            self._watch(self.sandbox.job_w, self._send_job, select.POLLOUT)
        self._open_log()
        self.listener = self._listen()
        self.pipes = {self.sandbox.out_r, self.sandbox.err_r}
        self._watch(self.sandbox.out_r, lambda fd: self._relay(fd, STREAM_STDOUT))
        self._watch(self.sandbox.err_r, lambda fd: self._relay(fd, STREAM_STDERR))
        self.exec_r = self.sandbox.exec_r
        self._watch(self.exec_r, self._exec_channel)
        self._watch(self.listener.fileno(), self._accept)
        assert self.pidfd is not None
        self._watch(self.pidfd, self._init_exited)
        # Who holds the job, on disk while init finishes: a corrald that
        # restarts now finds this shim rather than a job it thinks lost.
        self._record()

    def _open_log(self) -> None:
        """output.log, and room for the job's end; StartFailure if the disk is full.

        A job whose output and end could not be kept is not worth starting."""
        try:
            self.log = OutputLog(self.job_dir / OUTPUT_FILE, self.spec.log_limit)
            self.reserve = Reserve(self.job_dir)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            message = f"no room for the job's output in corrald's state directory: {exc.strerror}"
            raise StartFailure("output", message, "resource_exhausted") from None

    def _record(self) -> None:
        """Write a status that is not the end. On a full filesystem it is
        skipped: corrald has the news from the report pipe, a restarted one
        finds the shim by its open files, and the end has its reserve."""
        try:
            write_status(self.job_dir, self.status)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise

    def _send_job(self, fd: int) -> None:
        """Write the job to init as the pipe takes it (argv and env may not fit at once).

        The shim keeps its end open afterwards: init checks for a hang-up
        to learn that the shim is still alive."""
        try:
            written = os.write(fd, self.job_out)
        except BlockingIOError:
            return
        except OSError:  # init is gone: its exit says why
            written = len(self.job_out)
        self.job_out = self.job_out[written:]
        if not self.job_out:
            self._unwatch(fd)

    def _started(self) -> None:
        """The command has exec'd: tell corrald first (it is waiting), then disk."""
        self.setup_deadline = None
        self.status = replace(self.status, state=State.RUNNING, started_at=_now(), reason="running")
        self._report({"ok": True, "status": self.status.to_wire()})
        self._record()
        if self.spec.max_runtime is not None:
            self.deadline = time.monotonic() + self.spec.max_runtime

    def _listen(self) -> socket.socket:
        path = self.job_dir / SOCKET_FILE
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with socket_path(self.job_dir) as address:
            listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(MAX_CONTROL_CLIENTS)
        listener.setblocking(False)
        return listener

    def _exec_channel(self, fd: int) -> None:
        """init's one word: STARTED, or the step that failed (then init exits)."""
        data = os.read(fd, READ_SIZE)
        if data and unpack_or_none(data) is None:  # a long message, read mid-write
            data += _read_all(fd)
        self._unwatch(fd)
        os.close(fd)
        self.exec_r = None
        if data and unpack_or_none(data) == STARTED:
            self._started()
        else:
            self.start_failure = self.start_failure or self._exec_failure(data)
            # init exits after a failure; its exit ends the job.

    def _exec_failure(self, data: bytes) -> StartFailure | None:
        """The failure init reported, as the caller of start should read it."""
        if not data:
            return None
        try:
            failure = unpack(data)
            step, number, message = failure["step"], failure["errno"], failure["message"]
        except (ValueError, TypeError, KeyError):
            return StartFailure("init", "init reported an unreadable failure", "internal")
        program = self.spec.argv[0].decode(errors="replace")
        if step == "exec":
            text = f"cannot run {program!r}: {message}"
        elif step == "cwd":
            text = (
                f"cannot change to directory {self.spec.cwd.decode(errors='replace')!r}: {message}"
            )
        elif step == "writable":
            text = f"cannot make a path writable: {message}"
        elif step == "user":
            text = f"cannot become user {self.spec.user!r}: {message}"
        else:
            text = f"cannot set up the job ({step}): {message}"
        missing = number in {errno.ENOENT, errno.ENOTDIR}
        # A writable path through a symbolic link: the caller should name its target.
        linked = step == "writable" and number == errno.ELOOP
        caller_error = (step in {"exec", "cwd", "writable"} and missing) or linked
        return StartFailure(
            step, text, "invalid_argument" if caller_error else "failed_precondition"
        )

    # -- the loop ------------------------------------------------------------------

    def _watch(self, fd: int, handler: Callable[[int], None], events: int = select.POLLIN) -> None:
        self.handlers[fd] = handler
        self.poll.register(fd, events)

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poll.unregister(fd)

    def run(self) -> NoReturn:
        while self.pidfd is not None:
            timeout = self._next_timeout()
            for fd, _ in self.poll.poll(timeout):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(fd)
            self._check_timers()
        raise AssertionError("unreachable")

    def _next_timeout(self) -> int | None:
        times = [t for t in (self.deadline, self.kill_at, self.setup_deadline) if t is not None]
        if not times:
            return None
        # poll() takes an int of ms: wake at least hourly for far deadlines.
        return min(MAX_POLL_MS, max(0, int((min(times) - time.monotonic()) * 1000) + 1))

    def _check_timers(self) -> None:
        now = time.monotonic()
        if self.setup_deadline is not None and now >= self.setup_deadline:
            self.setup_deadline = None
            self.start_failure = StartFailure(
                "setup", f"the job did not start within {SETUP_TIMEOUT:g} s", "unavailable"
            )
            self._kill()
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            runtime = self.spec.max_runtime or 0
            self._stop(f"max runtime {runtime:g} s", self.spec.stop_grace)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self._kill()

    def _relay(self, fd: int, stream: int) -> None:
        assert self.log is not None
        data = os.read(fd, READ_SIZE)
        if data:
            self.log.append(stream, data)
        else:  # EOF (POLLHUP alone also lands here)
            self._unwatch(fd)
            self.pipes.discard(fd)
            os.close(fd)

    # -- stop ------------------------------------------------------------------------

    def _stop(self, by: str, grace: float) -> None:
        now = time.monotonic()
        if self.stop_requested is not None:
            # Stopping twice is safe; a shorter grace brings the kill closer,
            # and the reason then tells the grace the job really had.
            if self.kill_at is not None and now + grace < self.kill_at:
                self.kill_at = now + grace
                first_by, _ = self.stop_requested
                self.stop_requested = (first_by, round(self.kill_at - self.term_at, 3))
            return
        self.stop_requested = (by, grace)
        if grace <= 0:
            self._kill()
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)  # type: ignore[arg-type]
        self.term_at = now
        self.kill_at = now + grace

    def _kill(self) -> None:
        """Every process of the job dies: SIGKILL to init takes its whole PID
        namespace with it (the kernel kills and reaps the rest before init's
        exit is reported). The cgroup is swept once more when it is removed."""
        self.killed = True
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    # -- control socket --------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.clients) >= MAX_CONTROL_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        self.clients.add(client)
        self._watch(client.fileno(), lambda _fd: self._serve(client))

    def _serve(self, client: socket.socket) -> None:
        try:
            message = client.recv(CONTROL_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:
            self._drop(client)
            return
        try:
            reply = self._answer(unpack(message))
        except (ValueError, TypeError, KeyError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        try:
            client.send(pack(reply))
        except OSError:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._unwatch(client.fileno())
        self.clients.discard(client)
        client.close()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": self._live_status().to_wire()}
        if op == "stop":
            grace = float(request.get("grace", self.spec.stop_grace))
            if not grace >= 0:
                return {"ok": False, "error": "grace must be zero or more seconds"}
            by = str(request.get("by", "")) or "request"
            self._stop(by, grace)
            return {"ok": True}
        return {"ok": False, "error": f"unknown operation {op!r}"}

    def _live_status(self) -> Status:
        usage = Usage()
        if self.cgroup is not None:
            with contextlib.suppress(CgroupError):
                usage = self.cgroup.usage()
        return replace(self._with_loss(self.status), usage=usage)

    def _with_loss(self, status: Status) -> Status:
        """`status` with the output dropped so far counted, and said why."""
        if self.log is None or (loss := self.log.loss()) is None:
            return status
        return replace(status, reason=f"{status.reason}; {loss}", dropped_bytes=self.log.dropped)

    # -- the end -----------------------------------------------------------------------

    def _init_exited(self, fd: int) -> None:
        assert self.init_pid is not None
        _, init_status = os.waitpid(self.init_pid, 0)
        self._unwatch(fd)
        os.close(fd)
        self.pidfd = None
        if self.exec_r is not None:  # init's word may still be in the pipe
            self._exec_channel(self.exec_r)
        if self.status.state is State.STARTING:
            self._drain()
            self._end_failed(self.start_failure or self._setup_ended(init_status))
        command_status = self._read_result()
        self._drain()
        self._finish(command_status, init_status)

    def _setup_ended(self, init_status: int) -> StartFailure:
        """init ended before the command started, without saying why."""
        if self.stop_requested is not None:
            message = f"stopped by {self.stop_requested[0]} before the command started"
            return StartFailure("setup", message, "failed_precondition")
        if os.WIFSIGNALED(init_status):
            how = f"killed by {_signal_name(os.WTERMSIG(init_status))}"
        else:
            how = f"exited with code {os.waitstatus_to_exitcode(init_status)}"
        return StartFailure("init", f"init {how} before the command started", "internal")

    def _read_result(self) -> int | None:
        with contextlib.suppress(OSError):
            data = os.read(self.result_r, WAIT_STATUS.size)
            if len(data) == WAIT_STATUS.size:
                return int(WAIT_STATUS.unpack(data)[0])
        return None

    def _drain(self) -> None:
        """Relay what the pipes still hold, until EOF or DRAIN_TIMEOUT."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.pipes and time.monotonic() < deadline:
            for fd, _ in self.poll.poll(100):
                if fd in self.pipes:
                    self.handlers[fd](fd)

    def _finish(self, command_status: int | None, init_status: int) -> NoReturn:
        assert self.cgroup is not None
        oom = False
        usage = Usage()
        with contextlib.suppress(CgroupError):
            oom = self.cgroup.oom_kills() > 0
            usage = self.cgroup.usage()
        exit_code: int | None = None
        signal_name: str | None = None
        status = command_status if command_status is not None else init_status
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            signal_name = _signal_name(os.WTERMSIG(status))
        if command_status is None and signal_name is None:
            # init ended without the command's status: it was killed (stop,
            # OOM); the command died with it.
            exit_code, signal_name = None, "SIGKILL"
        state = State.STOPPED if self.stop_requested else State.EXITED
        self.status = replace(
            self.status,
            state=state,
            exit_code=exit_code,
            signal=signal_name,
            oom_killed=oom,
            finished_at=_now(),
            usage=usage,
            reason=self._reason(exit_code, signal_name, oom),
            stopped_by=self.stop_requested[0] if self.stop_requested else None,
        )
        self._end()

    def _reason(self, exit_code: int | None, signal_name: str | None, oom: bool) -> str:
        if signal_name is not None:
            how = f"killed by {signal_name}"
            if oom:
                how += ": out of memory"
        else:
            how = f"exited with code {exit_code}"
        if self.stop_requested is None:
            return how
        by, grace = self.stop_requested
        stopped = f"stopped: {by} reached" if by.startswith("max runtime") else f"stopped by {by}"
        if self.killed:
            return f"{stopped}; {how} after {grace:g} s grace"
        return f"{stopped}; {how}"

    def _end_failed(self, failure: StartFailure) -> NoReturn:
        if self.pidfd is not None:  # init is still waiting for the job
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.init_pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
        self.status = replace(
            self.status,
            state=State.FAILED,
            reason=str(failure),
            failed_step=failure.step,
            finished_at=_now(),
        )
        self._report(
            {"ok": False, "step": failure.step, "code": failure.code, "message": str(failure)}
        )
        self._end()

    def _end(self) -> NoReturn:
        """Clean up and record the end; the status is written last, so a
        status that says finished means the cgroup is gone and the log
        complete. On a full filesystem too (see Reserve): the status goes
        into the reserve's blocks first, which frees the rest of it for the
        log's marker, and is then renamed into place."""
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except CgroupError as exc:
                self.status = replace(self.status, reason=f"{self.status.reason} (cgroup: {exc})")
        self.status = self._with_loss(self.status)
        if self.reserve is not None:
            self.reserve.hold(self.status)
        if self.log is not None:
            self.log.close()
        with contextlib.suppress(FileNotFoundError):
            (self.job_dir / SOCKET_FILE).unlink()
        if self.reserve is None or not self.reserve.commit(self.job_dir):
            write_status(self.job_dir, self.status)
        if self.report_fd is not None:
            # The caller of start hears of a failure only after it is on disk.
            self._report(
                {
                    "ok": False,
                    "step": self.status.failed_step or "init",
                    "code": "internal",
                    "message": self.status.reason,
                }
            )
        os._exit(0)

    def _report(self, message: dict[str, Any]) -> None:
        if self.report_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.report_fd, pack(message))
        os.close(self.report_fd)
        self.report_fd = None


def log_stderr_to(job_dir: Path) -> None:
    """A shim's own crash (a bug) leaves its traceback beside the job."""
    log = os.open(
        job_dir / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    os.dup2(log, 2)
    os.close(log)


def run_shim(
    request: dict[str, Any], report_fd: int | None, claim: socket.socket | None
) -> NoReturn:
    """Body of the shim process. Never returns.

    Cold (`report_fd`, no `claim`): build the sandbox and start the job in
    `request` at once. Warm (`claim`): build the sandbox for the job id in
    `request`, then wait for the spawner to hand over the job directory and
    report descriptor; EOF instead means nobody will, and the sandbox goes.
    A warm shim dies with the spawner until it is claimed.
    """
    libc.set_name("corral-shim")
    job_id = str(request["id"])
    inherited = [report_fd] if report_fd is not None else []
    if claim is not None:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != request["spawner_pid"]:
            os._exit(0)  # the spawner died before the death signal was set
        inherited.append(claim.fileno())
    sandbox = Sandbox(job_id, request, inherited)
    if claim is not None:
        job_dir, report_fd = _wait_for_claim(claim, sandbox)
        libc.prctl(libc.PR_SET_PDEATHSIG, 0)  # the job outlives the spawner
        log_stderr_to(job_dir)
    else:
        job_dir = Path(request["job_dir"])
    assert report_fd is not None
    try:
        shim = Shim(sandbox, job_dir, request, report_fd)
    except (OSError, ValueError, TypeError, KeyError, SpecError) as exc:
        with contextlib.suppress(OSError):
            os.write(
                report_fd,
                pack(
                    {
                        "ok": False,
                        "step": "spec",
                        "code": "internal",
                        "message": f"cannot read the job's spec: {exc}",
                    }
                ),
            )
        sandbox.discard()
    try:
        shim.start()
    except StartFailure as failure:
        shim._end_failed(failure)
    except Exception as exc:
        shim._end_failed(StartFailure("shim", f"{type(exc).__name__}: {exc}", "internal"))
    shim.run()


def _wait_for_claim(claim: socket.socket, sandbox: Sandbox) -> tuple[Path, int]:
    """The job directory and report descriptor the spawner hands over."""
    fds = array.array("i")
    try:
        message, ancillary, _, _ = claim.recvmsg(
            CONTROL_MESSAGE, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
    except OSError:
        message, ancillary = b"", []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    claim.close()
    if not message or len(fds) != 1:
        sandbox.discard()
    return Path(unpack(message)["job_dir"]), fds[0]
