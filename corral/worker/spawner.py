"""corrald's end of the spawner: start it before trio, then ask it for shims."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import sys
from typing import Any

import trio

from corral.job import pack, unpack

MAX_REPLY = 4096


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class SpawnerError(Exception):
    """The spawner could not make a shim, or is gone."""


class Spawner:
    """A running spawner process and our end of its socket.

    `Spawner.start()` is synchronous and meant to run before `trio.run` (the
    spawner is a fresh interpreter, so it is safe later too, e.g. for the
    library used on its own).
    """

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self._sock = sock
        self._trio_sock: trio.socket.SocketType | None = None
        self._lock: trio.Lock | None = None

    @classmethod
    def start(cls) -> Spawner:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-m", "corral.shim.spawner", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # A terminal's Ctrl+C is for corrald; the spawner ends on EOF.
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            raise SpawnerError(f"cannot start the spawner: {exc}") from exc
        finally:
            theirs.close()
        return cls(process, ours)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def prepare(self, request: dict[str, Any]) -> int:
        """Have a sandbox built for job `request["id"]` ahead of its start;
        return the warm shim's pid."""
        message, _, _ = await self._exchange({**request, "op": "prepare"}, None)
        if not message:
            raise SpawnerError("the spawner is gone (it closed its socket)")
        reply = unpack(message)
        if "error" in reply:
            raise SpawnerError(str(reply["error"]))
        return int(reply["pid"])

    async def spawn(self, request: dict[str, Any], report_fd: int) -> tuple[int, int]:
        """Ask for a shim (in the job's warm sandbox if there is one); return
        its pid and a pidfd (ours to close)."""
        message, ancillary, flags = await self._exchange({**request, "op": "start"}, report_fd)
        received = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(data[: len(data) - (len(data) % received.itemsize)])
        if not message:
            raise SpawnerError("the spawner is gone (it closed its socket)")
        reply = unpack(message)
        if "error" in reply or len(received) != 1 or flags & socket.MSG_CTRUNC:
            for fd in received:
                os.close(fd)
            raise SpawnerError(str(reply.get("error", "the spawner sent no pidfd")))
        return int(reply["pid"]), received[0]

    async def _exchange(
        self, request: dict[str, Any], fd: int | None
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        if self._trio_sock is None:
            self._sock.setblocking(False)
            self._trio_sock = trio.socket.from_stdlib_socket(self._sock)
            self._lock = trio.Lock()
        assert self._lock is not None
        fds = array.array("i", [] if fd is None else [fd])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fd is not None else []
        # One request, one reply, never torn apart: a cancel between them
        # would leave this reply for the next caller, who would then watch
        # another job's shim. The spawner answers in milliseconds.
        async with self._lock:
            try:
                with trio.CancelScope(shield=True):
                    await self._trio_sock.sendmsg([pack(request)], ancillary)
                    message, received, flags, _ = await self._trio_sock.recvmsg(
                        MAX_REPLY,
                        socket.CMSG_SPACE(array.array("i").itemsize),
                        socket.MSG_CMSG_CLOEXEC,
                    )
            except OSError as exc:
                raise SpawnerError(f"the spawner is gone: {exc.strerror or exc}") from exc
            except trio.ClosedResourceError:  # it died, and its supervisor closed our end
                raise SpawnerError("the spawner is gone") from None
        return message, received, flags

    def close(self) -> None:
        """Close our end (the spawner exits at EOF) and reap it."""
        if self._trio_sock is not None and _in_trio():
            self._trio_sock.close()  # tells trio first, in case a task waits on it
        else:
            self._sock.close()  # corrald closes it after trio.run has returned
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)  # it waits up to 10 s for warm shims
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
