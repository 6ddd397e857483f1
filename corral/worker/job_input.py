"""corrald's (trio) end of a job's input: a connection to its shim that
writes to the job's stdin or terminal, and the terminal's resize.

The shim owns the job's input end (the write end of its stdin pipe, or
its pty's master), so corrald holds nothing a restart would close: each
writer (a `run -i`, an `attach`) opens a connection of its own to shim.sock
and turns it into an input connection (corral.ipc_input). Flow control
is the socket's: the shim reads a connection only while the job's input
end has room, so `send` waits (the socket's buffer is full) while the job
does not read, and the client waits for credit behind it. Nothing here
buffers more than the piece being sent.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from types import TracebackType

import trio

from corral import ipc, ipc_input
from corral.errors import ErrorCode, OperationError
from corral.worker import shim_link

# A shim answers an attach at once; it is busy only if stuck.
ATTACH_TIMEOUT = 5.0
# The write of an InputClose after a client left: a shim that takes
# nothing for this long is not reading, and the job keeps its stdin.
CLOSE_TIMEOUT = 5.0
# Sending to a shim that has gone, or closed our connection.
CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


def ended(job_id: str) -> OperationError:
    """The error of asking for input or a resize of a job that has ended."""
    return OperationError(ErrorCode.FAILED_PRECONDITION, f"job {job_id[:12]} has ended")


class InputClosed(Exception):
    """The job takes no more input on this connection; `str()` says why."""


class ShimInput:
    """One writer of a job's input. Use it through `open_input`.

        async with await open_input(job) as writer:
            await writer.send(data)        # waits while the job does not read
            await writer.close()           # the job's stdin ends (a pipe's EOF)

    `send` raises InputClosed once the job takes no more input (it closed
    its stdin, or ended); `wait_closed()` returns then, with the reason.
    The shim says so on the connection: `watch()` reads it, and must run
    (a task of the user's) while the writer is in use.
    """

    def __init__(self, sock: trio.socket.SocketType, job_id: str) -> None:
        self._sock = sock
        self.job_id = job_id
        self.closed: str | None = None  # why the job takes no more input
        self._closed_event = trio.Event()

    async def __aenter__(self) -> ShimInput:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.aclose()

    def aclose(self) -> None:
        """Leave: the job's input stays open (a detach)."""
        self._sock.close()
        self._set_closed("detached")

    async def send(self, data: bytes) -> None:
        """Write `data` to the job's input, in pieces a datagram carries;
        InputClosed if it takes no more."""
        for start in range(0, len(data), ipc_input.MAX_INPUT_DATA):
            piece = data[start : start + ipc_input.MAX_INPUT_DATA]
            await self._send(ipc_input.Input(data=piece))

    async def close(self) -> None:
        """End the job's stdin once what was sent before is written (for a
        terminal, only this connection ends); InputClosed if it is already."""
        await self._send(ipc_input.InputClose())

    async def wait_closed(self) -> str:
        """Return, with the reason, once the job takes no more input here:
        the shim said so (its stdin closed, the job ended) or has gone."""
        await self._closed_event.wait()
        assert self.closed is not None
        return self.closed

    async def watch(self) -> None:
        """Read the shim's word on this connection (InputClosed, then EOF),
        and return once the connection has ended."""
        reason = None
        while True:
            try:
                data = await self._sock.recv(ipc.MAX_CONTROL_MESSAGE)
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(ipc.IPCError):
                reason = ipc.decode(data, (ipc_input.InputClosed,)).reason or reason
        self._set_closed(reason or "the job has ended")

    async def _send(self, message: ipc.MessageBase) -> None:
        if self.closed is not None:
            raise InputClosed(self.closed)
        try:
            await self._sock.send(message.encode())
        except OSError as exc:
            if exc.errno not in CLOSED_ERRNOS:
                raise
            # The shim closed the connection: its InputClosed, which `watch`
            # reads, says why.
            with trio.move_on_after(ATTACH_TIMEOUT):
                await self.wait_closed()
            self._set_closed(self.closed or "the job has ended")
            raise InputClosed(self.closed) from None

    def _set_closed(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._closed_event.set()


async def open_input(job_dir: Path, job_id: str) -> ShimInput:
    """A new writer of the input of the job in `job_dir`.

    Raises OperationError: failed_precondition when the job takes no input
    (started without stdin), has closed its stdin or has ended (the
    shim's words); internal when its shim cannot be reached or answers
    nonsense in time; ShimVersionError for a shim of another version.
    """
    request = ipc_input.AttachInput()
    with trio.move_on_after(ATTACH_TIMEOUT):
        try:
            sock = await shim_link.connect_shim(job_dir, request)
            if sock is None:
                raise ended(job_id)
            try:
                await sock.send(request.encode())
                data = await sock.recv(ipc.MAX_CONTROL_MESSAGE)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            if exc.errno in shim_link.GONE_ERRNOS:
                raise ended(job_id) from None
            raise OperationError(ErrorCode.INTERNAL, f"cannot reach the job's shim: {exc}") from exc
        try:
            reply = ipc.decode(data, (ipc_input.InputAttached, ipc.Refusal))
        except ipc.IPCError as exc:
            sock.close()
            if not data:
                raise ended(job_id) from None
            raise OperationError(
                ErrorCode.INTERNAL, f"the job's shim answered nonsense: {exc}"
            ) from None
        if isinstance(reply, ipc.Refusal):
            sock.close()
            raise OperationError(
                ErrorCode.FAILED_PRECONDITION, f"job {job_id[:12]}: {reply.message}"
            )
        return ShimInput(sock, job_id)
    message = f"the job's shim did not answer in {ATTACH_TIMEOUT:g} s"
    raise OperationError(ErrorCode.INTERNAL, message)


async def resize(job_dir: Path, job_id: str, columns: int, rows: int) -> None:
    """Give the job's terminal a new size (the job gets SIGWINCH).

    Raises OperationError: failed_precondition when the job has no
    terminal or has ended; internal as `shim_link.ask_shim` does.
    """
    request = ipc_input.Resize(columns=columns, rows=rows)
    reply = await shim_link.ask_shim(job_dir, request, ATTACH_TIMEOUT)
    if reply is None:
        raise ended(job_id)
    if isinstance(reply, ipc.Refusal):
        raise OperationError(ErrorCode.FAILED_PRECONDITION, f"job {job_id[:12]}: {reply.message}")
    if not isinstance(reply, ipc_input.Resized):
        raise OperationError(
            ErrorCode.INTERNAL, f"the job's shim answered a resize with {type(reply).__name__}"
        )
