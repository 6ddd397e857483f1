"""corrald's end of the spawner: start it before trio, then ask it for shims."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

import trio

from corral import ipc, ipc_fds

# A reply is a pid or a sentence: small.
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

    async def prepare(self, request: ipc.Prepare) -> int:
        """Have a sandbox built for job `request.id` ahead of its start;
        return the warm shim's pid. SpawnerError if the spawner refused or is gone."""
        reply, fds = await self._exchange(request, None)
        ipc_fds.close_all(fds)  # a Prepare is answered with none
        return reply.pid

    async def discard(self, request: ipc.Discard) -> int:
        """Have job `request.id`'s warm sandbox taken down, unused; return
        the warm shim's pid. SpawnerError if there is none, or the spawner is gone."""
        reply, fds = await self._exchange(request, None)
        ipc_fds.close_all(fds)
        return reply.pid

    async def spawn(self, request: ipc.Start, report_fd: int) -> tuple[int, int]:
        """Ask for a shim (in the job's warm sandbox if there is one); return
        its pid and a pidfd (ours to close). SpawnerError if the spawner
        refused, sent no pidfd, or is gone."""
        reply, fds = await self._exchange(request, report_fd)
        if len(fds) != 1:
            ipc_fds.close_all(fds)
            raise SpawnerError("the spawner sent no pidfd")
        return reply.pid, fds[0]

    async def _exchange(
        self, request: ipc.SpawnerRequest, fd: int | None
    ) -> tuple[ipc.Spawned, list[int]]:
        """Send `request` (with `fd`), return the Spawned reply and the
        descriptors that came with it (ours to close)."""
        if self._trio_sock is None:
            self._sock.setblocking(False)
            self._trio_sock = trio.socket.from_stdlib_socket(self._sock)
            self._lock = trio.Lock()
        assert self._lock is not None
        fds = [] if fd is None else [fd]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ipc_fds.fd_array(fds))] if fds else []
        # One request, one reply, never torn apart: a cancel between them
        # would leave this reply for the next caller, who would then watch
        # another job's shim. The spawner answers in milliseconds.
        async with self._lock:
            try:
                with trio.CancelScope(shield=True):
                    await self._trio_sock.sendmsg([request.encode()], ancillary)
                    data, received, flags, _ = await self._trio_sock.recvmsg(
                        MAX_REPLY, ipc_fds.ancillary_space(1), socket.MSG_CMSG_CLOEXEC
                    )
            except OSError as exc:
                raise SpawnerError(f"the spawner is gone: {exc.strerror or exc}") from exc
            except trio.ClosedResourceError:  # it died, and its supervisor closed our end
                raise SpawnerError("the spawner is gone") from None
        try:
            got = ipc_fds.ancillary_fds(received, flags)
        except ipc.IPCError as exc:
            raise SpawnerError(f"the spawner's reply was cut short: {exc}") from None
        if not data:
            ipc_fds.close_all(got)
            raise SpawnerError("the spawner is gone (it closed its socket)")
        try:
            reply = ipc.decode(data, (ipc.Spawned, ipc.Refused))
        except ipc.IPCError as exc:
            ipc_fds.close_all(got)
            raise SpawnerError(f"the spawner answered nonsense: {exc}") from None
        if isinstance(reply, ipc.Refused):
            ipc_fds.close_all(got)
            raise SpawnerError(reply.message)
        return reply, got

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
