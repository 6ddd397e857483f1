"""corrald's (trio) end of the channels to a job's shim: the start report
on a pipe, and the control socket (shim.sock) for status and stop.

The messages are corral.ipc's. A shim outlives the corrald that started
it (`--keep-jobs`), so a newer corrald may find a shim speaking an older
version: every control exchange opens with a Hello, and a shim whose
version this corrald does not speak is left alone (ShimVersionError),
never misread and never stopped.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import trio

from corral import ipc, ipc_input
from corral.errors import OperationError
from corral.protocol.errors import ErrorCode
from corral.store import socket_path

# A peer gone before or while we talk: the shim has exited (its job ended).
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE})
# One read of the report pipe; a report is a status, well under this.
REPORT_READ = 4096
# What a shim may answer a control request with.
REPLIES: tuple[type[ipc.MessageBase], ...] = (
    ipc.StatusReply, ipc.Stopping, ipc.Refusal, ipc_input.Resized,
)  # fmt: skip


class ShimVersionError(OperationError):
    """The job's shim speaks a version of corral's messages this corrald
    does not (failed_precondition). Nothing was asked of it: the job is
    left running as it was."""

    def __init__(self, shim_version: int, request: ipc.MessageBase) -> None:
        what = "stop" if isinstance(request, ipc.StopRequest) else "ask about"
        super().__init__(
            ErrorCode.FAILED_PRECONDITION,
            f"the job's shim speaks version {shim_version} of corral's internal messages "
            f"and this corrald speaks version {ipc.IPC_VERSION}, so it cannot {what} the "
            "job; the job is left running (a corrald of the shim's version can manage it)",
            details={"shim_version": shim_version, "version": ipc.IPC_VERSION},
        )
        self.shim_version = shim_version


# The timeouts below are parameters, not the caller's cancel scope (ASYNC109):
# running out of time is an answer (a failed report, an error naming the
# wait), not a cancellation of the caller.
async def read_start_report(fd: int, timeout: float) -> ipc.StartReport:  # noqa: ASYNC109
    """The shim's one report on the pipe `fd` (closed on return): the
    command runs, or why the job could not start.

    Never raises for the shim's sake: EOF before a report (the shim died
    while starting), no report within `timeout` seconds, or a report that
    cannot be read are each a failed StartReport with code internal.
    """
    data = b""
    async with trio.lowlevel.FdStream(fd) as stream:
        with trio.move_on_after(timeout):
            while chunk := await stream.receive_some(REPORT_READ):
                data += chunk
                try:
                    return ipc.decode(data, (ipc.StartReport,))
                except ipc.IPCError:
                    if len(data) > ipc.MAX_CONTROL_MESSAGE:
                        break
                    # Most likely a report split across reads: read on (the
                    # shim closes the pipe right after its report).
            if not data:
                return ipc.StartReport.failed(
                    ErrorCode.INTERNAL, "the shim died while starting the job"
                )
            try:
                return ipc.decode(data, (ipc.StartReport,))
            except ipc.IPCError as exc:
                return ipc.StartReport.failed(
                    ErrorCode.INTERNAL, f"the shim sent an unreadable start report: {exc}"
                )
    return ipc.StartReport.failed(ErrorCode.INTERNAL, f"the shim did not report in {timeout:g} s")


async def connect_shim(job_dir: Path, request: ipc.MessageBase) -> trio.socket.SocketType | None:
    """A control connection to the shim of the job in `job_dir`, past the
    Hello exchange; None if the shim is gone (no socket, refused, hung up).

    Raises ShimVersionError if the shim speaks a version this corrald does
    not (nothing is sent after the Hello), OSError as the socket calls do.
    The caller bounds the time and closes the socket.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with socket_path(job_dir) as address:
            await sock.connect(address)
        await sock.send(ipc.Hello().encode())
        hello = await sock.recv(ipc.MAX_CONTROL_MESSAGE)
    except OSError as exc:
        sock.close()
        if exc.errno in GONE_ERRNOS:
            return None
        raise
    except BaseException:
        sock.close()
        raise
    if not hello:
        sock.close()
        return None
    try:
        version = _shim_version(hello)
        if version not in ipc.SHIM_VERSIONS:
            raise ShimVersionError(version, request)
    except OperationError:
        sock.close()
        raise
    return sock


async def ask_shim(
    job_dir: Path,
    request: ipc.ControlRequest | ipc_input.Resize,
    timeout: float,  # noqa: ASYNC109
) -> ipc.MessageBase | None:
    """One exchange with the shim of the job in `job_dir`: its reply
    (StatusReply, Stopping, Resized, or a Refusal saying why not); None if
    the shim is gone (no socket, refused, or hung up).

    Raises ShimVersionError (failed_precondition) if the shim speaks a
    version this corrald does not: then `request` was not sent. Raises
    OperationError (internal) if the shim cannot be reached for another
    reason, answers nonsense, or does not answer within `timeout` seconds.
    """
    with trio.move_on_after(timeout):
        try:
            sock = await connect_shim(job_dir, request)
            if sock is None:
                return None
            with sock:
                await sock.send(request.encode())
                data = await sock.recv(ipc.MAX_CONTROL_MESSAGE)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                return None
            raise OperationError(ErrorCode.INTERNAL, f"cannot reach the job's shim: {exc}") from exc
        if not data:
            return None
        try:
            return ipc.decode_any(data, REPLIES)
        except ipc.IPCError as exc:
            raise OperationError(
                ErrorCode.INTERNAL, f"the job's shim answered nonsense: {exc}"
            ) from None
    raise OperationError(ErrorCode.INTERNAL, f"the job's shim did not answer in {timeout:g} s")


def _shim_version(hello: bytes) -> int:
    """The version the shim's Hello names; OperationError if it is no Hello."""
    try:
        return ipc.hello_version(hello)
    except ipc.IPCError as exc:
        raise OperationError(
            ErrorCode.INTERNAL, f"the job's shim answered nonsense: {exc}"
        ) from None
