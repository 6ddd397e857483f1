"""The client's streams of a job: its output (`LogStream`, from `logs`) and
an attachment to it (`Attachment`, from `attach`): the same output, and
input to the job beside it.

Both are flow-controlled both ways. corrald sends output within the
credit we grant (`window` bytes, topped up as we consume), so a consumer
that stops reading holds at most that much in corrald; we send input
within the credit corrald grants, so a job that does not read makes
`send` wait, and nothing grows anywhere between.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, Self

import trio

from corral.client.errors import CorralError, InputClosed, ServerError, TLSError
from corral.client.jobs import JobInfo
from corral.client.operations import LOG_WINDOW
from corral.protocol import Data, End, Error, Message
from corral.records import Record, RecordDecoder


class StreamHost(Protocol):
    """What a stream needs of its connection (the Client)."""

    async def _open_stream(
        self, op: str, args: dict[str, Any], window: int
    ) -> tuple[int, trio.MemoryReceiveChannel[Message | CorralError]]: ...

    async def _cancel(self, request_id: int) -> None: ...

    async def _grant(self, request_id: int, amount: int) -> None: ...

    async def _send_input(self, request_id: int, data: bytes) -> None: ...

    async def _end_input(self, request_id: int) -> None: ...

    def _input_closed(self, request_id: int) -> bool: ...

    async def resize(self, job_id: str, columns: int, rows: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a job's output.log as it lies in the file, at `offset`."""

    offset: int
    data: bytes


class LogStream:
    """A job's output as corrald streams it. Use it through `Client.logs()`:

        async with client.logs(job_id, follow=True) as stream:
            async for record in stream:            # decoded: Record(stream, time_ns, data)
                ...
        print(stream.job.state, stream.offset)     # the job at the end; where it ended

    or `stream.chunks()` for the raw bytes of output.log with their offsets.
    corrald sends no more than the credit we grant: `window` bytes at first,
    topped up as we consume, so a consumer that stops reading holds at most
    that much in corrald, and nothing of the job waits for it.
    """

    OP = "logs"

    def __init__(
        self, host: StreamHost, args: dict[str, Any], *, offset: int | None, window: int
    ) -> None:
        # Where the next byte is in output.log. Without `offset`, the first
        # data says (an attachment starts where the log ends as it attaches).
        self.offset = offset or 0
        self._offset_known = offset is not None
        self.job: JobInfo | None = None  # set at the end of the stream
        self._host = host
        self._args = args
        self._window = window
        self._request_id: int | None = None
        self._receive: trio.MemoryReceiveChannel[Message | CorralError] | None = None
        self._ended = False

    async def __aenter__(self) -> Self:
        self._request_id, self._receive = await self._host._open_stream(
            self.OP, self._args, self._window
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream (corrald frees it at once) unless it has ended."""
        if not self._ended and self._request_id is not None:
            self._ended = True
            await self._host._cancel(self._request_id)
        if self._receive is not None:
            self._receive.close()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The raw bytes, in order, as they arrive; ends when the stream does."""
        if self._receive is None or self._request_id is None:
            raise RuntimeError(f"use the stream inside `async with client.{self.OP}(...)`")
        consumed = 0
        while not self._ended:
            event = await self._receive.receive()
            if isinstance(event, CorralError):
                self._ended = True
                raise event
            if isinstance(event, Data):
                if not self._offset_known:
                    self.offset, self._offset_known = event.offset, True
                if event.offset != self.offset:
                    raise TLSError(
                        f"corrald sent output at offset {event.offset}, expected {self.offset}"
                    )
                self.offset += len(event.data)
                yield Chunk(event.offset, event.data)
                consumed += len(event.data)
                if consumed >= self._window // 2:  # top the window up, not byte by byte
                    await self._host._grant(self._request_id, consumed)
                    consumed = 0
                continue
            self._ended = True
            if isinstance(event, Error):
                raise ServerError(event.code, event.message, event.details)
            if isinstance(event, End):
                self._end(event.value)
                return
            raise TLSError(f"unexpected message in a stream: {type(event).__name__}")

    def _end(self, value: dict[str, Any]) -> None:
        """The stream's end says where the log ended, and the job then."""
        self.offset = int(value.get("offset", self.offset))
        self.job = JobInfo.from_wire(value["job"])

    async def __aiter__(self) -> AsyncIterator[Record]:
        decoder = RecordDecoder()
        async for chunk in self.chunks():
            try:
                records = decoder.feed(chunk.data)
            except ValueError as exc:
                raise TLSError(f"the job's output is not in corral's format: {exc}") from None
            for record in records:
                yield record


class AuditStream(LogStream):
    """The audit trail as corrald streams it (admins alone). Use it through
    `Client.audit()`:

        async with client.audit(since="2026-12-04T00:00:00Z") as trail:
            async for entry in trail.entries():    # one dict per line
                print(entry["time"], entry["op"], entry["outcome"])

    With `follow`, new entries come as they are recorded, until the block
    is left."""

    OP = "audit"

    def __init__(self, host: StreamHost, args: dict[str, Any], window: int) -> None:
        super().__init__(host, args, offset=0, window=window)
        self.count: int | None = None  # entries sent, once the stream has ended

    def _end(self, value: dict[str, Any]) -> None:
        self.count = int(value.get("entries", 0))

    async def entries(self) -> AsyncIterator[dict[str, Any]]:
        """The entries, in order, each a JSON line decoded."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk.data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    raise TLSError(
                        f"corrald sent an audit line that is not JSON: {line[:80]!r}"
                    ) from None
                if isinstance(entry, dict):
                    yield entry


class Attachment(LogStream):
    """A running job, attached: its output as a `LogStream` has it (from the
    moment of attaching, or `offset`), and input to it. Use it through
    `Client.attach()`:

        async with client.attach(job_id) as job:
            await job.send(b"print(6 * 7)\\n")   # waits while the job does not read
            await job.close()                  # the job's stdin ends (EOF)
            async for record in job: ...       # until the job ends
        print(job.job.exit_code)

    Leaving the block early detaches: the job runs on and its stdin stays
    open for the next attach. `send` raises InputClosed once the job takes
    no more input (it closed its stdin, or ended): a writer stops quietly
    then, as `yes` does when `head` has had enough.
    """

    OP = "attach"

    def __init__(self, host: StreamHost, job_id: str, args: dict[str, Any], window: int) -> None:
        super().__init__(host, args, offset=args.get("offset"), window=window)
        self.job_id = job_id
        self.input = bool(args.get("input", True))

    @property
    def input_closed(self) -> bool:
        """Whether the job takes no more input from us (or we sent our EOF)."""
        return self._request_id is None or self._host._input_closed(self._request_id)

    async def send(self, data: bytes) -> None:
        """Send `data` to the job's input, in order, as corrald's credit
        allows; InputClosed if the job takes no more."""
        if not self.input:
            raise InputClosed("this attachment was opened without input")
        if self._request_id is None:
            raise RuntimeError("use the attachment inside `async with client.attach(...)`")
        await self._host._send_input(self._request_id, data)

    async def close(self) -> None:
        """End the job's stdin once what was sent is written (the job reads
        EOF). A terminal has no end of input: Ctrl+D is a byte to send."""
        if self._request_id is not None and self.input:
            await self._host._end_input(self._request_id)

    async def resize(self, columns: int, rows: int) -> None:
        """Give the job's terminal a new size (the job gets SIGWINCH)."""
        await self._host.resize(self.job_id, columns, rows)

    async def detach(self) -> None:
        """Leave the job running, its stdin open for the next attach."""
        await self.aclose()


__all__ = ["LOG_WINDOW", "Attachment", "Chunk", "LogStream", "Record"]
