"""One client connection: the protocol driven over a TLS stream.

Theory of operation. A session has three kinds of task:

- the reader (the session's own task) receives bytes, feeds the sans-IO
  `Connection` and acts on each event. It never waits for the writer: what
  it must say itself (welcome, refusals) goes out with `send_nowait`, and if
  the outgoing queue is full the peer is not reading and is dropped.
- one task per request runs the operation and sends its reply; it may wait
  for room in the outgoing queue, which is how a peer that stops reading
  slows only its own requests. A stream (an operation that returns
  `StreamEnd`) sends data within the credit its client grants: it waits
  for credit before it reads what it will send, so a client that stops
  granting holds no server memory and slows no other stream.
- the writer drains the outgoing queue onto the stream.

A stream that takes input (attach) is the same the other way: the handler
grants credit (`grant_input`), the reader hands each Data it receives to
the request (`receive_input`, unbounded but never beyond the credit
granted, which the `Connection` enforces), and an Eof either way ends the
input.

When the reader ends (EOF, protocol error, shutdown) the request tasks are
cancelled, the queue is closed, the writer sends what is left (a goodbye
error, say) and the TLS stream is closed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from corral.errors import OperationError
from corral.identity import Identity
from corral.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    Connection,
    Credit,
    Data,
    End,
    Eof,
    Error,
    ErrorCode,
    Hello,
    Message,
    ProtocolError,
    Request,
    Result,
    Role,
    Signal,
    State,
    Welcome,
)
from corral.protocol.errors import shorten
from corral.streams import CLOSE_TIMEOUT

log = logging.getLogger(__name__)

# One TLS record's worth of plaintext: fewer wake-ups than small reads.
RECEIVE_SIZE = 64 * 1024
# Frames queued for the writer; small, so a peer that stops reading is
# noticed quickly and costs little memory.
OUTGOING_FRAMES = 32
# Of those, request replies may fill all but this many: the rest is the
# reader's, for refusals it must send without waiting. A peer is dropped as
# "not reading" only when even this reserve is full.
READER_RESERVE = 8
# The writer coalesces queued frames up to this many bytes per send.
WRITE_BATCH = 256 * 1024
# An error message too large for a frame is cut to this many characters.
MAX_ERROR_MESSAGE = 4096
# A frame begun must arrive whole, and a batch written must be taken by the
# peer, within this: a frame is at most 1 MiB, so a peer moving less than
# ~17 KiB/s is stalled, or stalling on purpose.
IO_TIMEOUT = 60.0
# A session with no request in flight that receives nothing for this long
# is closed (a client that wants to sit idle longer sends a ping).
IDLE_TIMEOUT = 600.0


class _PeerNotReading(Exception):
    """The outgoing queue is full while the reader needs to send."""


class _Timeout(Exception):
    """The peer let a deadline pass; `goodbye` tells it which."""

    def __init__(self, goodbye: Error) -> None:
        super().__init__(goodbye.message)
        self.goodbye = goodbye


@dataclass(eq=False, slots=True)
class _Input:
    """A request's input, received and not yet read: bounded by the credit
    its handler granted (the Connection refuses input beyond it)."""

    pieces: deque[bytes | None] = field(default_factory=deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """What a streaming handler returns: the value of the stream's end message."""

    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What an operation handler knows about the request it serves."""

    identity: Identity
    request: Request
    session: Session

    async def wait_credit(self) -> int:
        """The bytes of data this stream may send now, once there are some."""
        return await self.session.wait_credit(self.request.id)

    async def send_data(self, offset: int, data: bytes) -> None:
        """Send a piece of the stream (within the credit `wait_credit` gave)."""
        await self.session.send(Data(id=self.request.id, offset=offset, data=data))
        self.session.traffic(self.request.id).sent += len(data)

    async def receive_input(self) -> bytes | None:
        """The next piece of the client's input on this stream; None once the
        client has said it has no more (its Eof). Only within the credit
        granted with `grant_input`: without any, this waits for ever."""
        return await self.session.receive_input(self.request.id)

    def received_input(self) -> list[bytes | None]:
        """What the client sent on this stream and was not read yet, without
        waiting (None stands for its Eof): for a stream cancelled with the
        client's last input and Eof already here."""
        return self.session.received_input(self.request.id)

    async def grant_input(self, amount: int) -> None:
        """Let the client send `amount` more bytes of input."""
        if not self.session.input_closed(self.request.id):
            await self.session.send(Credit(id=self.request.id, amount=amount))

    async def close_input(self) -> None:
        """Tell the client this stream takes no more input (its Eof)."""
        if not self.session.input_closed(self.request.id):
            await self.session.send(Eof(id=self.request.id))

    @property
    def peer_cancelled(self) -> bool:
        """Whether the client cancelled this request (a detach), as opposed
        to leaving (its connection gone) or the server shutting down."""
        return self.request.id in self.session.peer_cancelled

    @property
    def peer_left(self) -> bool:
        """Whether the client's connection has gone (EOF, a broken protocol,
        a deadline): not a shutdown of ours, not a cancel of this request."""
        return self.session.peer_left


Handler = Callable[[RequestContext], Awaitable[dict[str, Any] | StreamEnd]]


class Observer(Protocol):
    """What the server learns of each session's requests: the audit trail
    and the metrics (`corral.supervisor.server`)."""

    def said_hello(self, session: Session) -> None:
        """The peer said hello and was welcomed."""

    def request_began(self, context: RequestContext) -> None:
        """A request's handler is about to run."""

    def request_ended(
        self, context: RequestContext, reply: Result | End | Error, traffic: Traffic
    ) -> None:
        """A request was answered (or refused before any handler ran)."""


class Observers:
    """Several observers as one: each is told everything, in turn."""

    def __init__(self, *observers: Observer) -> None:
        self._all = observers

    def said_hello(self, session: Session) -> None:
        for observer in self._all:
            observer.said_hello(session)

    def request_began(self, context: RequestContext) -> None:
        for observer in self._all:
            observer.request_began(context)

    def request_ended(
        self, context: RequestContext, reply: Result | End | Error, traffic: Traffic
    ) -> None:
        for observer in self._all:
            observer.request_ended(context, reply, traffic)


@dataclass(slots=True)
class Traffic:
    """The bytes of stream data a request sent and received (never the bytes)."""

    sent: int = 0
    received: int = 0


class Session:
    """Serves one authenticated client until it leaves or the server stops."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        identity: Identity,
        *,
        peer: str,
        server_name: str,
        operations: dict[str, Handler],
        max_requests: int,
        hello_timeout: float,
        io_timeout: float = IO_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        address: str = "",
        observer: Observer | None = None,
    ) -> None:
        self.identity = identity
        self.peer = peer
        self.address = address  # the peer's, as the audit trail shows it
        self._observer = observer
        self._traffic: dict[int, Traffic] = {}
        self._stream = stream
        self._server_name = server_name
        self._operations = operations
        self._max_requests = max_requests
        self._hello_timeout = hello_timeout
        self._io_timeout = io_timeout
        self._idle_timeout = idle_timeout
        # The receive in progress, whose deadline moves as the session goes
        # from a frame under way to requests in flight to idle.
        self._receiving: trio.CancelScope | None = None
        self._frame_began = 0.0  # when the frame under way began to arrive
        self._received_at = 0.0  # when the last bytes arrived
        self._idle_since = trio.current_time()
        self._conn = Connection(Role.SERVER)
        self._send_channel, self._receive_channel = trio.open_memory_channel[bytes](OUTGOING_FRAMES)
        self._room = trio.lowlevel.ParkingLot()
        self._in_flight: dict[int, trio.CancelScope] = {}
        self._credit: dict[int, trio.lowlevel.ParkingLot] = {}  # streams waiting for credit
        # Input received for each request that takes it, until it is read.
        self._inputs: dict[int, _Input] = {}
        self.peer_cancelled: set[int] = set()  # requests the client cancelled, in flight
        self.peer_left = False  # the client's side of the connection ended
        self._reader_scope = trio.CancelScope()

    def traffic(self, request_id: int) -> Traffic:
        """The stream bytes request `request_id` has sent and received so far."""
        return self._traffic.setdefault(request_id, Traffic())

    def statistics(self) -> dict[str, int]:
        return {
            "requests_in_flight": len(self._in_flight),
            "queued_frames": self._send_channel.statistics().current_buffer_used,
        }

    # -- sending -----------------------------------------------------------

    def _send_nowait(self, message: Message) -> None:
        """Queue `message` now; _PeerNotReading if the queue is full."""
        if self._send_channel.statistics().current_buffer_used >= OUTGOING_FRAMES:
            raise _PeerNotReading
        self._send_channel.send_nowait(self._conn.send(message))

    async def send(self, message: Message) -> None:
        """Queue `message`, waiting while the peer is not reading fast enough."""
        await trio.lowlevel.checkpoint_if_cancelled()
        room = OUTGOING_FRAMES - READER_RESERVE
        while self._send_channel.statistics().current_buffer_used >= room:
            await self._room.park()
        # No checkpoint between encoding and queueing: frames leave in the
        # order the protocol state machine saw them.
        self._send_channel.send_nowait(self._conn.send(message))

    async def wait_credit(self, request_id: int) -> int:
        while (credit := self._conn.credit(request_id)) <= 0:
            lot = self._credit.setdefault(request_id, trio.lowlevel.ParkingLot())
            try:
                await lot.park()
            finally:
                if not lot:
                    self._credit.pop(request_id, None)
        return credit

    def input_closed(self, request_id: int) -> bool:
        return self._conn.input_closed(request_id)

    async def receive_input(self, request_id: int) -> bytes | None:
        """The input of `request_id` received since the last call, in one
        piece (None after the client's Eof): what came in several frames
        while the request was busy is passed on at once."""
        queue = self._inputs.setdefault(request_id, _Input())
        while not queue.pieces:
            await queue.lot.park()
        first = queue.pieces.popleft()
        if first is None:
            return None
        parts = [first]
        while queue.pieces and (following := queue.pieces[0]) is not None:
            queue.pieces.popleft()
            parts.append(following)
        return first if len(parts) == 1 else b"".join(parts)

    def received_input(self, request_id: int) -> list[bytes | None]:
        """The input of `request_id` received and not yet read (None for the
        client's Eof), taken now without waiting."""
        queue = self._inputs.get(request_id)
        if queue is None:
            return []
        pieces = list(queue.pieces)
        queue.pieces.clear()
        return pieces

    def _input(self, request_id: int, piece: bytes | None) -> None:
        """Hand input to the request it is for, if it still takes input."""
        if request_id not in self._in_flight:
            return  # the request ended while the input was on its way
        queue = self._inputs.setdefault(request_id, _Input())
        queue.pieces.append(piece)
        queue.lot.unpark_all()

    async def _write_loop(self) -> None:
        async with self._receive_channel:
            async for first in self._receive_channel:
                batch = [first]
                size = len(first)
                while size < WRITE_BATCH:
                    try:
                        frame = self._receive_channel.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(frame)
                    size += len(frame)
                self._room.unpark_all()
                try:
                    with trio.move_on_after(self._io_timeout) as stalled:
                        await self._stream.send_all(b"".join(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.peer_left = True
                    self._reader_scope.cancel()
                    return
                if stalled.cancelled_caught:
                    self.peer_left = True
                    log.info("%s: dropped: took no replies for %g s", self.peer, self._io_timeout)
                    self._reader_scope.cancel()
                    return

    # -- the session -------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer leaves, breaks the protocol, or `shutdown()`."""
        async with trio.open_nursery() as outer:
            outer.start_soon(self._write_loop)
            try:
                with self._reader_scope:
                    async with trio.open_nursery() as requests:
                        await self._read_loop(requests)
                        requests.cancel_scope.cancel()
            except* _PeerNotReading:
                self.peer_left = True
                log.info("%s: dropped: not reading its replies", self.peer)
            except* _Timeout as timeouts:
                self.peer_left = True
                (timeout,) = timeouts.exceptions
                assert isinstance(timeout, _Timeout)
                log.info("%s: dropped: %s", self.peer, timeout)
                with contextlib.suppress(_PeerNotReading, ProtocolError, trio.ClosedResourceError):
                    self._send_nowait(timeout.goodbye)
            finally:
                self._send_channel.close()
                # The writer flushes what is queued (a goodbye), but a peer
                # that does not read must not keep the session alive.
                outer.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    async def _reply(self, reply: Result | End | Error) -> None:
        """Send a request's reply; one that cannot be encoded becomes `internal`."""
        try:
            await self.send(reply)
        except trio.ClosedResourceError:
            log.debug("%s: reply dropped: connection closing", self.peer)
        except ProtocolError as exc:
            if self._conn.state is not State.OPEN:
                log.debug("%s: reply dropped: %s", self.peer, exc)
                return
            if isinstance(reply, Error):
                # Too large to send: the same error, in fewer words, so the
                # request is still answered.
                message = f"{reply.message[:MAX_ERROR_MESSAGE]}... (cut short)"
                shortened = Error(id=reply.id, code=reply.code, message=message)
            else:
                log.exception("%s: cannot send the reply to request %d", self.peer, reply.id)
                message = f"the reply could not be sent: {exc}"
                shortened = Error(id=reply.id, code=ErrorCode.INTERNAL, message=message)
            with contextlib.suppress(ProtocolError, trio.ClosedResourceError):
                await self.send(shortened)

    def shutdown(self, message: str) -> None:
        """Say goodbye with `message` and end the session (without waiting)."""
        with contextlib.suppress(_PeerNotReading, ProtocolError, trio.ClosedResourceError):
            self._send_nowait(Error(id=None, code=ErrorCode.UNAVAILABLE, message=message))
        self._reader_scope.cancel()

    async def _receive(self) -> bytes:
        """The next bytes from the peer (b"" at EOF), within the deadline that applies."""
        self._receiving = scope = trio.CancelScope()
        with scope:
            self._set_deadline()
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_SIZE))
            except trio.BrokenResourceError:
                data = b""
            finally:
                self._receiving = None
            self._received_at = self._idle_since = trio.current_time()
            if not self._conn.buffered:
                self._frame_began = self._received_at  # these bytes begin a frame
            return data
        if self._conn.buffered:
            message = f"a frame took longer than {self._io_timeout:g} s to arrive; closing"
            raise _Timeout(Error(id=None, code=ErrorCode.FAILED_PRECONDITION, message=message))
        message = f"idle for {self._idle_timeout:g} s with no request in flight; closing"
        raise _Timeout(Error(id=None, code=ErrorCode.UNAVAILABLE, message=message))

    def _set_deadline(self) -> None:
        """A frame under way must finish; a session with nothing in flight must not idle."""
        if self._receiving is None:
            return
        if self._conn.buffered:
            self._receiving.deadline = self._frame_began + self._io_timeout
        elif self._in_flight:
            self._receiving.deadline = math.inf
        else:
            self._receiving.deadline = self._idle_since + self._idle_timeout

    async def _read_loop(self, requests: trio.Nursery) -> None:
        with trio.move_on_after(self._hello_timeout) as hello_scope:
            welcomed = await self._read_events(requests, until_welcome=True)
        if hello_scope.cancelled_caught:
            message = f"no hello within {self._hello_timeout:g} s; closing"
            log.info("%s: dropped: %s", self.peer, message)
            with contextlib.suppress(_PeerNotReading, ProtocolError):
                self._send_nowait(
                    Error(id=None, code=ErrorCode.FAILED_PRECONDITION, message=message)
                )
            return
        if welcomed:
            await self._read_events(requests, until_welcome=False)

    async def _read_events(self, requests: trio.Nursery, *, until_welcome: bool) -> bool:
        """Handle events until EOF or an error (False), or the welcome if asked (True)."""
        while True:
            try:
                event = self._conn.next_event()
            except ProtocolError as exc:
                log.info("%s: protocol error: %s", self.peer, exc)
                self.peer_left = True
                self._send_nowait(Error(id=None, code=exc.code, message=str(exc)))
                return False
            if event is NEED_DATA:
                self._conn.receive_data(await self._receive())
                continue
            # A frame ended in the last bytes received: what is left of
            # them begins the next one.
            self._frame_began = self._received_at
            if isinstance(event, Signal | Error):  # PEER_CLOSED, or the client's goodbye
                self.peer_left = True
                return False
            self._dispatch(event, requests)
            if until_welcome and isinstance(event, Hello):
                return True

    def _dispatch(self, event: Message, requests: trio.Nursery) -> None:
        match event:
            case Hello():
                self._send_nowait(
                    Welcome(
                        version=PROTOCOL_VERSION,
                        server=self._server_name,
                        name=self.identity.name,
                        role=self.identity.role,
                    )
                )
                if self._observer is not None:
                    self._observer.said_hello(self)
            case Request(id=request_id, op=op):
                handler = self._operations.get(op)
                context = RequestContext(identity=self.identity, request=event, session=self)
                refusal: Error | None = None
                if handler is None:
                    message = f"unknown operation {shorten(op)}"
                    refusal = Error(id=request_id, code=ErrorCode.UNIMPLEMENTED, message=message)
                elif len(self._in_flight) >= self._max_requests:
                    limit = self._max_requests
                    message = f"too many requests in flight on this connection (limit {limit})"
                    refusal = Error(
                        id=request_id, code=ErrorCode.RESOURCE_EXHAUSTED, message=message
                    )
                if refusal is not None:
                    self._send_nowait(refusal)
                    if self._observer is not None:
                        self._observer.request_ended(context, refusal, Traffic())
                elif handler is not None:
                    scope = trio.CancelScope()
                    self._in_flight[request_id] = scope
                    if self._observer is not None:
                        self._observer.request_began(context)
                    requests.start_soon(self._serve_request, handler, context, scope)
            case Cancel(id=request_id):
                if request_scope := self._in_flight.get(request_id):
                    self.peer_cancelled.add(request_id)
                    request_scope.cancel()
            case Data(id=request_id, data=data):
                self._input(request_id, data)
                if request_id in self._in_flight:
                    self.traffic(request_id).received += len(data)
            case Eof(id=request_id):
                self._input(request_id, None)
            case Credit(id=request_id):
                # The Connection keeps the count; a stream waiting for it wakes.
                if lot := self._credit.get(request_id):
                    lot.unpark_all()
            case _:
                raise AssertionError(f"unexpected event {event!r}")  # Connection forbids it

    async def _serve_request(
        self, handler: Handler, context: RequestContext, scope: trio.CancelScope
    ) -> None:
        request_id = context.request.id
        reply: Result | End | Error
        try:
            with scope:
                value = await handler(context)
            if scope.cancelled_caught:
                reply = Error(id=request_id, code=ErrorCode.CANCELLED, message="cancelled")
            elif isinstance(value, StreamEnd):
                reply = End(id=request_id, value=value.value)
            else:
                reply = Result(id=request_id, value=value)
        except OperationError as exc:
            reply = Error(id=request_id, code=exc.code, message=str(exc), details=exc.details)
        except Exception:
            log.exception("%s: request %d (%s) failed", self.peer, request_id, context.request.op)
            reply = Error(
                id=request_id,
                code=ErrorCode.INTERNAL,
                message=f"internal error in {shorten(context.request.op)}; see corrald's log",
            )
        except BaseException:
            if self._observer is not None:
                self._observer.request_ended(
                    context,
                    Error(id=request_id, code=ErrorCode.CANCELLED, message="cancelled"),
                    self._traffic.get(request_id) or Traffic(),
                )
            self._traffic.pop(request_id, None)
            del self._in_flight[request_id]
            self._inputs.pop(request_id, None)
            self.peer_cancelled.discard(request_id)
            raise
        if self._observer is not None:
            self._observer.request_ended(context, reply, self._traffic.get(request_id) or Traffic())
        # The request counts against the cap until its reply is queued, so
        # a peer that does not read cannot pile up finished requests.
        try:
            await self._reply(reply)
        finally:
            self._traffic.pop(request_id, None)
            del self._in_flight[request_id]
            self._inputs.pop(request_id, None)
            self.peer_cancelled.discard(request_id)
            if not self._in_flight:
                self._idle_since = trio.current_time()
                self._set_deadline()
