"""The spawner: a small single-threaded forkserver that makes shims.

corrald starts it (`python -m corral.shim.spawner FD`) before trio runs,
as a fresh interpreter that imports only what a shim needs, so every shim
forked from it is small and no shim is ever forked from a threaded trio
process. They talk over a SOCK_SEQPACKET socketpair, one message each way
per shim:

    corrald -> spawner   {"job_dir": ..., "flavour": ..., ...} + SCM_RIGHTS [report_fd]
    spawner -> corrald   {"pid": shim_pid} + SCM_RIGHTS [pidfd]    or  {"error": "..."}

Each shim is forked once, into its own session: it is never corrald's
child, and it survives corrald's death. The spawner reaps its shims on
SIGCHLD, holding the signal back from the fork until the shim's pidfd is
open, so the pid cannot be reused before it is pinned. (A double fork
would need no reaping, at the price of a second fork of this process on
every start.) EOF on the socket means corrald is gone: the spawner exits,
the shims do not.
"""

from __future__ import annotations

import array
import contextlib
import os
import pwd
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from corral.job import pack, unpack
from corral.shim.shim import run_shim

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


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


def _detach(job_dir: Path) -> None:
    """Make the shim nobody's: new session, stdio away from corrald's terminal."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    # A shim's own crash (a bug) leaves its traceback beside the job.
    log = os.open(job_dir / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def spawn(request: dict[str, Any], report_fd: int, control: socket.socket) -> tuple[int, int]:
    """Fork a shim for `request`; return its pid and a pidfd for it."""
    job_dir = Path(request["job_dir"])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        shim = os.fork()
        if shim == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                control.close()
                _detach(job_dir)
                run_shim(job_dir, request, report_fd)
            except BaseException:
                traceback.print_exc()  # into jobs/<id>/shim.log
                sys.stderr.flush()
            finally:
                os._exit(1)
        return shim, os.pidfd_open(shim)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


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
    while True:
        try:
            request, fds = receive(control)
        except OSError as exc:
            control.send(pack({"error": str(exc)}))
            continue
        if request is None:
            os._exit(0)  # corrald is gone; the shims live on
        try:
            if len(fds) != 1:
                control.send(pack({"error": f"expected one report descriptor, got {len(fds)}"}))
                continue
            pid, pidfd = spawn(request, fds[0], control)
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
