"""The spawner: a small single-threaded forkserver that makes shims.

corrald starts it (`python -m corral.shim.spawner FD`) before trio runs,
as a fresh interpreter that imports only what a shim needs, so every shim
forked from it is small and no shim is ever forked from a threaded trio
process. They talk over a SOCK_SEQPACKET socketpair, one message each way
(the `spawner` channel of corral.ipc):

    corrald -> spawner   ipc.Prepare
    spawner -> corrald   ipc.Spawned(pid)                  or  ipc.Refused(message)

    corrald -> spawner   ipc.Start + SCM_RIGHTS [report_fd]
    spawner -> corrald   ipc.Spawned(pid) + SCM_RIGHTS [pidfd]  or  ipc.Refused(message)

`prepare` forks a warm shim: it builds the sandbox for job id `id` (init
in its namespaces and cgroup, the jail up) and waits. A `start` for that id
hands the job directory and report descriptor to it; a `start` for any
other id forks a cold shim that builds the sandbox and starts at once.
Either way the shim is the same code, and the result the same.

Each shim is forked once, into its own session: it is never corrald's
child, and it survives corrald's death. The spawner reaps its shims on
SIGCHLD, holding the signal back from the fork until the shim's pidfd is
open, so the pid cannot be reused before it is pinned. (A double fork
would need no reaping, at the price of a second fork of this process on
every start.) EOF on the socket means corrald is gone: the spawner takes
its warm sandboxes down and exits; running shims live on.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from corral import ipc, ipc_fds
from corral.job import is_job_id
from corral.shim.launch import run_shim

# How long a closing spawner waits for its warm shims to take their sandboxes down.
CLOSE_TIMEOUT = 10.0


def _detach() -> None:
    """Make the shim nobody's: new session, stdio away from corrald's terminal
    (stderr stays corrald's until the shim has a job directory)."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


@dataclass
class Warm:
    pid: int
    pidfd: int
    claim: socket.socket  # our end; EOF tells the shim to take its sandbox down


class Spawner:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.warm: dict[str, Warm] = {}
        # Pidfds of discarded warm shims still taking their sandboxes down:
        # a closing spawner waits for them as for the warm ones.
        self.leaving: list[int] = []

    def prepare(self, request: ipc.Prepare) -> int:
        """Fork a warm shim for job `request.id`; return its pid."""
        job_id = _job_id(request)
        if job_id in self.warm:
            raise ValueError(f"job {job_id} already has a sandbox")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spawner_pid = os.getpid()
        try:
            pid, pidfd = self._fork(
                lambda: run_shim(request, None, theirs, spawner_pid), also_close=ours
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.warm[job_id] = Warm(pid, pidfd, ours)
        return pid

    def discard(self, request: ipc.Discard) -> int:
        """Take job `request.id`'s warm sandbox down (EOF on its claim
        socket); return its shim's pid. ValueError if there is none."""
        warm = self.warm.pop(_job_id(request), None)
        if warm is None:
            raise ValueError(f"job {request.id} has no warm sandbox")
        warm.claim.close()
        self.leaving = [fd for fd in self.leaving if not _exited(fd)]
        self.leaving.append(warm.pidfd)
        return warm.pid

    def start(self, request: ipc.Start, report_fd: int) -> tuple[int, int]:
        """Start job `request.id` in its warm sandbox, or a cold one; return
        the shim's pid and a pidfd for it."""
        job_id = _job_id(request)
        warm = self.warm.pop(job_id, None)
        if warm is not None:
            try:
                ipc_fds.send_message(warm.claim, ipc.Claim(job_dir=request.job_dir), [report_fd])
            except OSError:  # the warm shim is gone (killed): start cold
                os.close(warm.pidfd)
            else:
                return warm.pid, warm.pidfd
            finally:
                warm.claim.close()
        return self._fork(lambda: run_shim(request, report_fd, None))

    def _fork(
        self, body: Callable[[], object], also_close: socket.socket | None = None
    ) -> tuple[int, int]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            shim = os.fork()
            if shim == 0:
                try:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                    # Other sandboxes' claim sockets: held here, their EOF
                    # would never come.
                    self.control.close()
                    if also_close is not None:
                        also_close.close()
                    for warm in self.warm.values():
                        warm.claim.close()
                        os.close(warm.pidfd)
                    for fd in self.leaving:
                        os.close(fd)
                    _detach()
                    body()
                except BaseException:
                    traceback.print_exc()  # into jobs/<id>/shim.log, or corrald's stderr
                    sys.stderr.flush()
                finally:
                    os._exit(1)
            return shim, os.pidfd_open(shim)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def close(self) -> None:
        """Take the warm sandboxes down (EOF to each shim) and wait for them
        and for those discarded earlier: their cgroups are gone when this
        returns (unless CLOSE_TIMEOUT passed first)."""
        pidfds = [*self.leaving, *(warm.pidfd for warm in self.warm.values())]
        poller = select.poll()
        for warm in self.warm.values():
            warm.claim.close()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        waiting = len(pidfds)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting -= 1
        for fd in pidfds:
            os.close(fd)
        self.warm.clear()
        self.leaving.clear()


def _exited(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited (its pidfd is readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _job_id(request: ipc.Prepare | ipc.Start | ipc.Discard) -> str:
    if not is_job_id(request.id):
        raise ValueError(f"invalid job id {request.id!r}")
    return request.id


def _reap(signum: int, frame: object) -> None:
    """SIGCHLD: collect every shim that has ended (corrald watches their pidfds)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _load_user_database() -> None:
    """Look a user up once, so every shim inherits the loaded NSS modules
    instead of loading them again while a job waits."""
    with contextlib.suppress(KeyError, OSError):
        root = pwd.getpwuid(0)
        os.getgrouplist(root.pw_name, root.pw_gid)


def serve(control: socket.socket) -> NoReturn:
    spawner = Spawner(control)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died mid-request
        _serve_requests(control, spawner)
    # corrald is gone; the running shims live on.
    spawner.close()
    os._exit(0)


def _serve_requests(control: socket.socket, spawner: Spawner) -> None:
    """Answer corrald's requests until it hangs up."""
    while True:
        try:
            received = ipc_fds.receive_message(control, (ipc.Prepare, ipc.Start, ipc.Discard))
        except (OSError, ipc.IPCError) as exc:  # its descriptors are closed
            ipc_fds.send_message(control, ipc.Refused(message=f"bad request: {exc}"))
            continue
        if received is None:
            return
        request, fds = received
        try:
            _serve(control, spawner, request, fds)
        finally:
            ipc_fds.close_all(fds)


def _serve(
    control: socket.socket, spawner: Spawner, request: ipc.SpawnerRequest, fds: list[int]
) -> None:
    """Answer one request: a warm shim for a Prepare, a started one (and its
    pidfd) for a Start with the report pipe's end, or why not."""
    wanted = 1 if isinstance(request, ipc.Start) else 0
    if len(fds) != wanted:
        message = f"bad request {request.TAG!r} with {len(fds)} descriptors"
        ipc_fds.send_message(control, ipc.Refused(message=message))
        return
    try:
        if isinstance(request, ipc.Prepare):
            ipc_fds.send_message(control, ipc.Spawned(pid=spawner.prepare(request)))
            return
        if isinstance(request, ipc.Discard):
            ipc_fds.send_message(control, ipc.Spawned(pid=spawner.discard(request)))
            return
        pid, pidfd = spawner.start(request, fds[0])
    except (OSError, ValueError) as exc:
        ipc_fds.send_message(control, ipc.Refused(message=f"cannot start a shim: {exc}"))
        return
    try:
        ipc_fds.send_message(control, ipc.Spawned(pid=pid), [pidfd])
    finally:
        os.close(pidfd)


def main() -> NoReturn:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m corral.shim.spawner FD (started by corrald)")
    control = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(control.fileno(), False)
    from corral.shim import proctitle  # noqa: PLC0415 - after the usage check

    proctitle.set_title("corral-spawner")
    signal.signal(signal.SIGCHLD, _reap)
    _load_user_database()
    serve(control)


if __name__ == "__main__":
    main()
