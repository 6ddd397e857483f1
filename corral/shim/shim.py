"""The shim: one per job, owning it from start to end, outliving corrald.

The spawner forks the shim into its own session. The shim

1. builds the sandbox (`sandbox`): init in a new PID namespace, in the
   job's cgroup, building its jail (`init`, `mounts`);
2. reads the job's spec, resolves the run-as user and writes the limits;
3. sends init the job, opens `output.log` (`output_log`) and listens on
   `shim.sock` in the job directory (`control`: stop, status, resize,
   attach);
4. learns from the exec channel whether the command started, and tells
   corrald on the report pipe (an `ipc.StartReport`); takes the job's
   input end from init (the input channel);
5. relays the command's stdout and stderr (or its terminal) into
   `output.log`, writes what attached connections send to its stdin
   (`input_relay`), resizes its terminal (`terminal`), and stops the job
   when asked or at its max runtime (`deadlines`);
6. when init exits: drains the pipes, reads the command's wait status,
   OOM kills and usage, removes the cgroup, writes `status.msgpack`
   atomically and exits.

Plain synchronous Python around one poll loop (`loop`): no threads
(impossible after `unshare(CLONE_NEWPID)`), no trio, no subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from corral import ipc, ipc_fds, ipc_input
from corral.errors import ErrorCode
from corral.job import SECCOMP_DEFAULT, ResolvedSpec, State, Status, Usage
from corral.records import STREAM_STDERR, STREAM_STDOUT
from corral.shim import ending, userns
from corral.shim.cgroup import CgroupError
from corral.shim.control import ControlSocket, Reply, Request
from corral.shim.credentials import Credentials, credentials
from corral.shim.deadlines import Deadlines, Due
from corral.shim.init import WAIT_STATUS
from corral.shim.input_relay import INPUT_LOST, NO_INPUT, InputRelay, receive_input_end
from corral.shim.loop import Loop
from corral.shim.output_log import READ_SIZE, OutputLog, now_ns
from corral.shim.sandbox import Sandbox, StartFailure, init_failure, init_word, read_all
from corral.shim.terminal import NO_TERMINAL, Terminal
from corral.store import FULL_ERRNOS, OUTPUT_FILE, Reserve, read_spec, write_status

# After init exits the kernel kills the rest of the namespace; its pipes
# close within milliseconds. Anything slower is stuck in the kernel.
DRAIN_TIMEOUT = 5.0
# From the fork of init to the command's exec. Building the jail takes
# milliseconds; a job stuck longer (a hung mount or NFS cwd) is failed,
# so `start` always gets an answer, before corrald stops waiting (60 s).
SETUP_TIMEOUT = 30.0
# How long start() waits for init to ask for its user namespace's maps
# (about a millisecond after the job came) before the poll loop takes over.
MAP_WAIT = 0.1


class Shim:
    """One job's life, from the filled-in sandbox to the final status."""

    def __init__(
        self, sandbox: Sandbox, job_dir: Path, request: ipc.Prepare | ipc.Start, report_fd: int
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
        self.deadlines = Deadlines()
        self.killed = False
        self.exec_r: int | None = None
        self.start_failure: StartFailure | None = None
        self.job_out = b""  # the JobConfig, until init has all of it
        self.loop = Loop()
        self.pipes: set[int] = set()  # the command's stdout and stderr, until EOF
        self.log: OutputLog | None = None
        self.reserve: Reserve | None = None
        self.control: ControlSocket | None = None
        # The job's input, if it takes any, and its terminal, if it has one.
        self.relay = InputRelay(self.loop, tty=self.spec.tty) if self.spec.stdin else None
        self.terminal: Terminal | None = None
        self.credentials: Credentials | None = None  # once start() knows them

    # -- setup -------------------------------------------------------------------

    def start(self) -> None:
        """Fill the sandbox in with the job; the poll loop sees it through.

        StartFailure says why it could not start. From here on the shim
        answers on its socket: a stop while init finishes is served.
        """
        if self.sandbox.failure is not None:
            raise init_failure(self.spec, self.sandbox.init_report) or self.sandbox.failure
        self.credentials = credentials(self.spec)
        assert self.cgroup is not None
        try:
            self.cgroup.apply(self.spec.limits, list(self.request.devices))
        except CgroupError as exc:
            raise StartFailure("cgroup", str(exc), ErrorCode.INTERNAL) from None
        self.deadlines.setup_began(time.monotonic(), SETUP_TIMEOUT)
        job = ipc.JobConfig(
            argv=self.spec.argv,
            env=tuple(self.spec.env.items()),
            cwd=self.spec.cwd,
            **self.credentials.fields(),
            seccomp=self.spec.seccomp == SECCOMP_DEFAULT,
            tmp_size=self.spec.tmp_size,
            writable=self.spec.writable,
            stdin=self.spec.stdin,
            tty=self.spec.tty,
            tty_size=self.spec.tty_size,
        )
        # init goes on with the job while the rest is set up here: output
        # is relayed only once the poll loop runs, after the log is open.
        self.job_out = job.frame()
        os.set_blocking(self.sandbox.job_w, False)
        self._send_job(self.sandbox.job_w)
        if self.job_out:
            self.loop.watch(self.sandbox.job_w, self._send_job, select.POLLOUT)
        self._open_log()
        if self.spec.tty:
            assert self.log is not None
            self.terminal = Terminal(self.spec.tty_size, self.log.mark)
        self.control = ControlSocket(self.job_dir, self.loop, self._answer, self._attach)
        self.pipes = {self.sandbox.out_r, self.sandbox.err_r}
        self.loop.watch(self.sandbox.out_r, lambda fd: self._relay(fd, STREAM_STDOUT))
        self.loop.watch(self.sandbox.err_r, lambda fd: self._relay(fd, STREAM_STDERR))
        if self.credentials.userns:  # init asks for its maps on the input channel
            self.loop.watch(self.sandbox.input_channel.fileno(), self._map_user)
        self.exec_r = self.sandbox.exec_r
        self.loop.watch(self.exec_r, self._exec_channel)
        assert self.pidfd is not None
        self.loop.watch(self.pidfd, self._init_exited)
        if self.credentials.userns:
            self._map_when_asked()
        # Who holds the job, on disk while init finishes: a corrald that
        # restarts now finds this shim rather than a job it thinks lost.
        self._record()

    def _map_when_asked(self) -> None:
        """Wait up to MAP_WAIT for init's MapUser and serve it, unless init
        exits first; later, the poll loop serves it.

        init asks about a millisecond after the job came, when this shim is
        about done with its own setup; served only from the poll loop, after
        the status write, init waited 1-2 ms more (measured). The wait is
        short: a shim blocked here answers no stop (init may hang on a
        mount), and the setup deadline is the loop's."""
        fd = self.sandbox.input_channel.fileno()
        assert self.pidfd is not None
        waiting = select.poll()
        waiting.register(fd, select.POLLIN)
        waiting.register(self.pidfd, select.POLLIN)
        ready = {ready_fd for ready_fd, _ in waiting.poll(MAP_WAIT * 1000)}
        if fd in ready and self.pidfd not in ready:
            self._map_user(fd)

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
            raise StartFailure("output", message, ErrorCode.RESOURCE_EXHAUSTED) from None

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
            self.loop.unwatch(fd)

    def _map_user(self, fd: int) -> None:
        """init is in the job's user namespace: write its maps, and say so
        (or why not: then init fails the start). EOF: init is gone, and its
        exit says why."""
        self.loop.unwatch(fd)
        assert self.credentials is not None
        assert self.init_pid is not None
        channel = self.sandbox.input_channel
        try:
            received = ipc_fds.receive_message(channel, (ipc.MapUser,))
        except (OSError, ipc.IPCError) as exc:
            print(f"shim: unreadable request from init: {exc}", file=sys.stderr)
            return
        if received is None:
            return
        ipc_fds.close_all(received[1])
        who = self.credentials
        reply: ipc.UserMapped | ipc.Refusal = ipc.UserMapped()
        try:
            userns.write_maps(
                self.init_pid,
                uid=userns.Mapping(who.inside_uid, who.uid),
                gid=userns.Mapping(who.inside_gid, who.gid),
            )
        except OSError as exc:
            reply = ipc.Refusal(message=f"cannot map the job's user namespace: {exc}")
        with contextlib.suppress(OSError):  # init is gone: its exit says why
            ipc_fds.send_message(channel, reply)

    def _started(self) -> None:
        """The command has exec'd: tell corrald first (it is waiting), then disk."""
        self.status = replace(
            self.status, state=State.RUNNING, started_at=now_ns(), reason="running"
        )
        self._report(ipc.StartReport.running(self.status))
        self._record()
        self.deadlines.running(time.monotonic(), self.spec.max_runtime)
        self._take_input_end()

    def _take_input_end(self) -> None:
        """The job's input end, from init (queued before its Started).

        A terminal's master is the job's output too (one stream, stdout,
        drained at the end like the pipes: its read is EIO once every slave
        is closed) and, duplicated, its input end: poll then watches reads
        and writes apart, one handler per descriptor. The terminal keeps a
        third copy for resizes.
        """
        channel = self.sandbox.input_channel
        if not (self.spec.tty or self.spec.stdin):
            channel.close()
            return
        end = receive_input_end(channel, ipc_input.TTY if self.spec.tty else ipc_input.PIPE)
        channel.close()
        if end is None:  # a bug, logged: the job runs without
            if self.relay is not None:
                self.relay.close_input(INPUT_LOST)
            return
        if self.terminal is not None:
            self.pipes.add(end)
            self.loop.watch(end, lambda fd: self._relay(fd, STREAM_STDOUT))
            self.terminal.connect(os.dup(end))
            if self.relay is not None:
                self.relay.connect(os.dup(end))
        elif self.relay is not None:
            self.relay.connect(end)

    def _exec_channel(self, fd: int) -> None:
        """init's one word: Started, or the step that failed (then init exits)."""
        data = os.read(fd, READ_SIZE)
        if data and init_word(data) is None:  # a long message, read mid-write
            data += read_all(fd)
        self.loop.unwatch(fd)
        os.close(fd)
        self.exec_r = None
        if isinstance(init_word(data), ipc.Started):
            self._started()
        else:
            self.start_failure = self.start_failure or init_failure(self.spec, data)
            # init exits after a failure; its exit ends the job.

    # -- the loop ------------------------------------------------------------------

    def run(self) -> NoReturn:
        """Serve the job until init exits (then the shim does, in _finish)."""
        while self.pidfd is not None:
            self.loop.run_once(self.deadlines.timeout_ms(time.monotonic()))
            for due in self.deadlines.due(time.monotonic()):
                if due is Due.SETUP_EXPIRED:
                    self.start_failure = StartFailure(
                        "setup",
                        f"the job did not start within {SETUP_TIMEOUT:g} s",
                        ErrorCode.UNAVAILABLE,
                    )
                    self._kill()
                elif due is Due.RUNTIME_EXPIRED:
                    runtime = self.spec.max_runtime or 0
                    self._stop(f"max runtime {runtime:g} s", self.spec.stop_grace)
                elif due is Due.KILL:
                    self._kill()
        raise AssertionError("unreachable")

    def _relay(self, fd: int, stream: int) -> None:
        assert self.log is not None
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:  # a terminal's master is non-blocking (its input end's flag)
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""  # a terminal whose every slave is closed: its EOF
        if data:
            self.log.append(stream, data)
        else:  # EOF (POLLHUP alone also lands here)
            self.loop.unwatch(fd)
            self.pipes.discard(fd)
            os.close(fd)

    # -- stop ------------------------------------------------------------------------

    def _stop(self, by: str, grace: float) -> None:
        action = self.deadlines.request_stop(by, grace, time.monotonic())
        if action is Due.KILL:
            self._kill()
        elif action is Due.TERM and self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)

    def _kill(self) -> None:
        """Every process of the job dies: SIGKILL to init takes its whole PID
        namespace with it (the kernel kills and reaps the rest before init's
        exit is reported). The cgroup is swept once more when it is removed."""
        self.killed = True
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    # -- control socket --------------------------------------------------------------

    def _answer(self, request: Request) -> Reply:
        """corrald's request, served: the status now, a stop under way, a resize."""
        if isinstance(request, ipc.StatusRequest):
            return ipc.StatusReply(status=self._live_status())
        if isinstance(request, ipc_input.Resize):
            if self.terminal is None:
                return ipc.Refusal(message=NO_TERMINAL)
            return self.terminal.resize(request.columns, request.rows)
        grace = self.spec.stop_grace if request.grace is None else request.grace
        if not grace >= 0:  # NaN too
            return ipc.Refusal(message="grace must be zero or more seconds")
        self._stop(request.by or "request", grace)
        return ipc.Stopping()

    def _attach(self, client: socket.socket) -> ipc.Refusal | None:
        """A control connection asks to write the job's input: the relay takes it, or a Refusal."""
        if self.relay is None:
            return ipc.Refusal(message=NO_INPUT)
        return self.relay.attach(client)

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
        self.loop.unwatch(fd)
        os.close(fd)
        self.pidfd = None
        if self.exec_r is not None:  # init's word may still be in the pipe
            self._exec_channel(self.exec_r)
        self._input_ended()
        if self.status.state is State.STARTING:
            self._drain()
            self._end_failed(
                self.start_failure or ending.setup_ended(init_status, self.deadlines.stop)
            )
        command_status = self._read_result()
        self._drain()
        self._finish(command_status, init_status)

    def _input_ended(self) -> None:
        """The job has ended: attached writers hear so, and its input end and
        terminal are let go of (a terminal's output is still drained)."""
        if self.relay is not None:
            self.relay.job_ended()
        if self.terminal is not None:
            self.terminal.close()

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
            self.loop.run_once(100, only=self.pipes)

    def _finish(self, command_status: int | None, init_status: int) -> NoReturn:
        assert self.cgroup is not None
        oom = False
        usage = Usage()
        with contextlib.suppress(CgroupError):
            oom = self.cgroup.oom_kills() > 0
            usage = self.cgroup.usage()
        exit_code, killed_by = ending.outcome(command_status, init_status)
        stop = self.deadlines.stop
        self.status = replace(
            self.status,
            state=State.STOPPED if stop else State.EXITED,
            exit_code=exit_code,
            signal=killed_by,
            oom_killed=oom,
            finished_at=now_ns(),
            usage=usage,
            reason=ending.reason(exit_code, killed_by, oom, stop, self.killed),
            stopped_by=stop.by if stop else None,
        )
        self._end()

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
            finished_at=now_ns(),
        )
        self._report(failure.report())
        self._end()

    def _end(self) -> NoReturn:
        """Clean up and record the end; the status is written last, so a
        status that says finished means the cgroup is gone and the log
        complete. On a full filesystem too (see Reserve): the status goes
        into the reserve's blocks first, which frees the rest of it for the
        log's marker, and is then renamed into place."""
        self._input_ended()
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
        if self.control is not None:
            self.control.remove()
        if self.reserve is None or not self.reserve.commit(self.job_dir):
            write_status(self.job_dir, self.status)
        if self.report_fd is not None:
            # The caller of start hears of a failure only after it is on disk.
            step = self.status.failed_step or "init"
            self._report(ipc.StartReport.failed(ErrorCode.INTERNAL, self.status.reason, step))
        os._exit(0)

    def _report(self, report: ipc.StartReport) -> None:
        """Tell corrald, once, how the start went; then the report pipe closes."""
        if self.report_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.report_fd, report.encode())
        os.close(self.report_fd)
        self.report_fd = None
