"""The operations on a running job's input: attach and resize.

`attach` is a stream both ways: the job's output from where the client
asks (the moment of attaching, by default), exactly as `logs -f` sends it,
and the client's input to the job, in pieces within the credit corrald
grants. Input goes to a connection of this request's own to the job's
shim (`corral.worker.job_input`), which writes it to the job's stdin pipe
or terminal in the order it arrives, from every attached client. Who may
attach is decided as for `stop`: the owner or an admin, and another user's
job answers like a missing one.

How an attach ends says what becomes of the job's stdin:
- the client's Eof ends it (the job reads EOF; a terminal has no end);
- a cancel (a detach) leaves it open, for the next attach;
- a client whose connection is lost leaves it open too, unless it asked
  for `eof_on_disconnect` (what `corral run -i` asks: its stdin is the
  job's, and a client that dies has no more to give);
- a corrald that shuts down leaves it open: the shim holds it, and a new
  corrald serves the next attach.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import trio

from corral.errors import OperationError
from corral.job import check_tty_size
from corral.protocol import ErrorCode
from corral.store import OUTPUT_FILE
from corral.supervisor.operations import (
    JobOperations,
    arg,
    check_offset,
    job_record,
    send_output,
)
from corral.supervisor.session import Handler, RequestContext, StreamEnd
from corral.worker.index import Job
from corral.worker.job_input import CLOSE_TIMEOUT, InputClosed, ShimInput

# Input credit granted to one attached client: the most corrald holds of
# its input at once (the shim holds one datagram, the socket ~200 KiB).
INPUT_WINDOW = 256 << 10


class AttachOperations:
    """attach and resize, served with the jobs `operations` serves."""

    def __init__(self, operations: JobOperations) -> None:
        self.operations = operations
        self.manager = operations.manager

    def handlers(self) -> dict[str, Handler]:
        return {"attach": self.attach, "resize": self.resize}

    async def attach(self, context: RequestContext) -> StreamEnd:
        """Stream the job's output from `offset` (default: its end now) until
        the job ends, and with `input` (default true) take the client's
        input to it. failed_precondition for a job that has ended, or
        takes no input when input is asked for."""
        args = context.request.args
        job = self.operations.visible(context)
        want_input = arg(args, "input", bool, True)
        eof_on_disconnect = arg(args, "eof_on_disconnect", bool, False)
        offset = arg(args, "offset", int)
        if job.done.is_set():
            raise OperationError(
                ErrorCode.FAILED_PRECONDITION,
                f"job {job.short_id} has ended ({job.status.reason}); "
                f"`corral logs {job.short_id}` shows its output",
            )
        if offset is None:
            offset = _log_size(job)  # the moment of attaching: a record boundary
        elif offset < 0:
            raise OperationError(ErrorCode.INVALID_ARGUMENT, "offset: must be zero or more")
        elif offset:
            await check_offset(job, offset)
        with self.operations.stream_slot(context.identity):
            return await self._attached(context, job, offset, want_input, eof_on_disconnect)

    async def _attached(
        self,
        context: RequestContext,
        job: Job,
        offset: int,
        want_input: bool,
        eof_on_disconnect: bool,
    ) -> StreamEnd:
        writer: ShimInput | None = None
        try:
            writer = await self.manager.open_input(job.id) if want_input else None
            async with trio.open_nursery() as nursery:
                if writer is not None:
                    nursery.start_soon(writer.watch)
                    nursery.start_soon(_relay_input, context, writer)
                end = await send_output(context, self.manager, job, offset, follow=True)
                nursery.cancel_scope.cancel()
        finally:
            # A client that sent its last input and its Eof, then detached
            # at once (before this had even reached the shim, perhaps),
            # gets them delivered: they came before the cancel, which only
            # stops what follows.
            pending = context.received_input() if want_input else []
            if None in pending:
                writer = await self._deliver_shielded(job, writer, pending[: pending.index(None)])
            elif writer is not None and eof_on_disconnect and context.peer_left:
                await _close_shielded(writer)
            if writer is not None:
                writer.aclose()
        status = await self.operations.live_status(job)
        return StreamEnd({"offset": end, "job": job_record(job, status)})

    async def _deliver_shielded(
        self, job: Job, writer: ShimInput | None, pieces: list[bytes | None]
    ) -> ShimInput | None:
        """Send `pieces` then end the job's stdin, on `writer` or one opened
        now, even as the request is being cancelled; within CLOSE_TIMEOUT.
        Returns the writer, to be closed."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CLOSE_TIMEOUT),
            contextlib.suppress(InputClosed, OSError, OperationError),
        ):
            if writer is None:
                writer = await self.manager.open_input(job.id)
            if writer.closed is None:
                for piece in pieces:
                    if piece is not None:
                        await writer.send(piece)
                await writer.close()
        return writer

    async def resize(self, context: RequestContext) -> dict[str, Any]:
        """Give the job's terminal a new size, `size` = [columns, rows]."""
        job = self.operations.visible(context)
        columns, rows = check_tty_size(context.request.args.get("size"), "size")
        await self.manager.resize(job.id, columns, rows)
        return {}


async def _relay_input(context: RequestContext, writer: ShimInput) -> None:
    """The client's input to the job, within the credit granted, until the
    client's Eof or the job takes no more (then the client hears an Eof)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_end_with_job_input, context, writer, nursery.cancel_scope)
        await context.grant_input(INPUT_WINDOW)
        taken = 0
        while True:
            data = await context.receive_input()
            try:
                if data is None:  # the client's Eof: the job's stdin ends
                    await _close_shielded(writer)  # even if a detach follows at once
                    return
                await writer.send(data)
            except InputClosed:
                return  # said to the client by _end_with_job_input
            taken += len(data)
            if taken >= INPUT_WINDOW // 2:  # top the window up, not piece by piece
                await context.grant_input(taken)
                taken = 0


async def _end_with_job_input(
    context: RequestContext, writer: ShimInput, relay: trio.CancelScope
) -> None:
    """Once the job takes no more input, tell the client (quietly, as a
    closed pipe ends `yes | head`) and stop relaying."""
    await writer.wait_closed()
    await context.close_input()
    relay.cancel()


async def _close_shielded(writer: ShimInput) -> None:
    """End the job's stdin for a client that has gone, even as the request
    is being cancelled; a shim that does not take it in time is left be."""
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(CLOSE_TIMEOUT),
        contextlib.suppress(InputClosed, OSError),
    ):
        await writer.close()


def _log_size(job: Job) -> int:
    """Where the job's output.log ends now (0 before it exists)."""
    try:
        return os.stat(job.directory / OUTPUT_FILE).st_size
    except FileNotFoundError:
        return 0
