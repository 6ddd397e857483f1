"""The spawner: a small single-threaded forkserver that makes shims.

corrald starts it (`python -m corral.shim.spawner FD`) before trio runs,
as a fresh interpreter that imports only what a shim needs, so every shim
forked from it is small and no shim is ever forked from a threaded trio
process. They talk over a SOCK_SEQPACKET socketpair, one message each way:

    corrald -> spawner   {"op": "prepare", "id": ..., "flavour": ..., ...}
    spawner -> corrald   {"pid": shim_pid}                or  {"error": "..."}

    corrald -> spawner   {"op": "start", "id": ..., "job_dir": ..., ...} + SCM_RIGHTS [report_fd]
    spawner -> corrald   {"pid": shim_pid} + SCM_RIGHTS [pidfd]    or  {"error": "..."}

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

import array
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
from typing import Any, NoReturn

from corral.job import is_job_id, pack, unpack
from corral.shim.shim import run_shim

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
# How long a closing spawner waits for its warm shims to take their sandboxes down.
CLOSE_TIMEOUT = 10.0


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds that came with it; (None, []) at EOF."""
    fds = array.array("i")
    message, ancillary, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("spawner message or its descriptors were truncated")
    if not message:
        return None, list(fds)
    return unpack(message), list(fds)


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

    def prepare(self, request: dict[str, Any]) -> int:
        """Fork a warm shim for job `request["id"]`; return its pid."""
        job_id = _job_id(request)
        if job_id in self.warm:
            raise ValueError(f"job {job_id} already has a sandbox")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = {**request, "spawner_pid": os.getpid()}
        try:
            pid, pidfd = self._fork(lambda: run_shim(request, None, theirs), also_close=ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.warm[job_id] = Warm(pid, pidfd, ours)
        return pid

    def start(self, request: dict[str, Any], report_fd: int) -> tuple[int, int]:
        """Start job `request["id"]` in its warm sandbox, or a cold one; return
        the shim's pid and a pidfd for it."""
        job_id = _job_id(request)
        warm = self.warm.pop(job_id, None)
        if warm is not None:
            claim = {"job_dir": str(request["job_dir"])}
            try:
                warm.claim.sendmsg(
                    [pack(claim)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [report_fd]))],
                )
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
        """Take the warm sandboxes down (EOF to each shim) and wait for them:
        their cgroups are gone when this returns."""
        poller = select.poll()
        for warm in self.warm.values():
            warm.claim.close()
            poller.register(warm.pidfd, select.POLLIN)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        waiting = len(self.warm)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting -= 1
        for warm in self.warm.values():
            os.close(warm.pidfd)
        self.warm.clear()


def _job_id(request: dict[str, Any]) -> str:
    job_id = request["id"]
    if not (isinstance(job_id, str) and is_job_id(job_id)):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


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
            request, fds = receive(control)
        except OSError as exc:
            control.send(pack({"error": str(exc)}))
            continue
        if request is None:
            return
        try:
            op = request.get("op")
            if op == "prepare" and not fds:
                control.send(pack({"pid": spawner.prepare(request)}))
                continue
            if op != "start" or len(fds) != 1:
                control.send(pack({"error": f"bad request {op!r} with {len(fds)} descriptors"}))
                continue
            pid, pidfd = spawner.start(request, fds[0])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            control.send(pack({"error": f"cannot start a shim: {exc}"}))
        else:
            control.sendmsg(
                [pack({"pid": pid})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))],
            )
            os.close(pidfd)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def main() -> NoReturn:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m corral.shim.spawner FD (started by corrald)")
    control = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(control.fileno(), False)
    from corral.shim import libc  # noqa: PLC0415 - after the usage check

    libc.set_name("corral-spawner")
    signal.signal(signal.SIGCHLD, _reap)
    _load_user_database()
    serve(control)


if __name__ == "__main__":
    main()
