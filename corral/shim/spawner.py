"""The spawner: a small single-threaded forkserver that makes shims.

corrald starts it (`python -m corral.shim.spawner FD`) before trio runs,
as a fresh interpreter that imports only what a shim needs, so every shim
forked from it is small and no shim is ever forked from a threaded trio
process. They talk over a SOCK_SEQPACKET socketpair, one message each way
per shim:

    corrald -> spawner   {"job_dir": ..., "flavour": ..., ...} + SCM_RIGHTS [report_fd]
    spawner -> corrald   {"pid": shim_pid} + SCM_RIGHTS [pidfd]    or  {"error": "..."}

The shim is double-forked into its own session, so it is nobody's child
in corrald and survives corrald's death. The spawner opens the shim's
pidfd while the intermediate child is still alive, so the pid cannot be
reused before it is pinned. EOF on the socket means corrald is gone: the
spawner exits, the shims do not.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from corral.job import pack, unpack
from corral.shim.shim import run_shim

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
PID = struct.Struct("=i")


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
    """Double-fork a shim for `request`; return its pid and a pidfd for it."""
    job_dir = Path(request["job_dir"])
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        try:
            os.close(pid_r)
            os.close(go_w)
            shim = os.fork()
            if shim == 0:
                os.close(pid_w)
                os.close(go_r)
                control.close()
                _detach(job_dir)
                try:
                    run_shim(job_dir, request, report_fd)
                except BaseException:
                    traceback.print_exc()  # into jobs/<id>/shim.log
                    sys.stderr.flush()
                    os._exit(1)
            os.write(pid_w, PID.pack(shim))
            os.read(go_r, 1)  # hold the shim as our child until its pidfd is open
        finally:
            os._exit(0)
    os.close(pid_w)
    os.close(go_r)
    try:
        data = os.read(pid_r, PID.size)
        if len(data) != PID.size:
            raise OSError("the shim could not be forked")
        (shim_pid,) = PID.unpack(data)
        pidfd = os.pidfd_open(shim_pid)
    finally:
        os.close(go_w)
        os.close(pid_r)
        os.waitpid(middle, 0)
    return shim_pid, pidfd


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
    serve(control)


if __name__ == "__main__":
    main()
