"""The sans-IO connection: bytes in, events out, messages in, bytes out.

One `Connection` holds one side of a conversation. The I/O layer feeds it
what arrived (`receive_data`), drains `next_event()` until it returns
`NEED_DATA`, and writes whatever `send()` returns. It checks the order of
the conversation:

    client                         server
    Hello        ------------->    (AWAIT_HELLO)
                 <-------------    Welcome, or Error(id=None) and close
    Request(id)  ------------->
    Credit(id)   ------------->    Data(id)* within the credit granted,
    Cancel(id)   ------------->    then one final Result | Error | End

and, on a stream that takes input (attach), the same the other way:

                 <-------------    Credit(id): input the client may send
    Data(id)*    ------------->    within it, offsets counting the input
    Eof(id)      <------------>    either side: no more input on the stream

and after any ProtocolError it stays broken, except that a side which saw a
remote error may still send one last connection-level Error (a goodbye).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from corral.protocol.codec import MAX_FRAME_SIZE, FrameBuffer, decode_body, encode_frame
from corral.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from corral.protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Credit,
    Data,
    End,
    Eof,
    Error,
    Hello,
    Message,
    Request,
    Result,
    Welcome,
    from_wire,
    to_wire,
)

# Credit beyond this is pointless (no stream is that long) and it keeps the
# counters small integers whatever a peer sends.
MAX_CREDIT = 2**62


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # server: before the client's Hello
    SEND_HELLO = "send_hello"  # client: before sending Hello
    AWAIT_WELCOME = "await_welcome"  # client: Hello sent
    OPEN = "open"  # requests and streams may flow
    BROKEN = "broken"  # a protocol error happened; only a goodbye may be sent
    CLOSED = "closed"  # a connection-level Error went either way, or EOF


class Signal(enum.Enum):
    """What `next_event` returns when it has no message."""

    NEED_DATA = "need_data"
    PEER_CLOSED = "peer_closed"


NEED_DATA = Signal.NEED_DATA
PEER_CLOSED = Signal.PEER_CLOSED


@dataclass(slots=True)
class _Flow:
    """What one side knows of an open request."""

    credit: int = 0  # output the server may send
    input_credit: int = 0  # input the client may send
    input_offset: int = 0  # input sent so far
    input_closed: bool = False  # an Eof went one way or the other
    client_eof: bool = False  # the client's Eof: no input may follow it


class Connection:
    """One side of a corral conversation, with no I/O of its own."""

    def __init__(self, role: Role, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.role = role
        self._state = State.SEND_HELLO if role is Role.CLIENT else State.AWAIT_HELLO
        self._frames = FrameBuffer(max_frame_size)
        self._max_frame_size = max_frame_size
        self._eof = False
        self._open: dict[int, _Flow] = {}
        self.peer_version: int | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def open_ids(self) -> frozenset[int]:
        """Ids of requests that have not had their final reply yet."""
        return frozenset(self._open)

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet a whole frame: a frame under way."""
        return self._frames.pending

    def credit(self, request_id: int) -> int:
        """Data bytes the server may still send on `request_id` (0 if not open)."""
        flow = self._open.get(request_id)
        return flow.credit if flow else 0

    def input_credit(self, request_id: int) -> int:
        """Input bytes the client may still send on `request_id` (0 if not
        open, or its input has ended)."""
        flow = self._open.get(request_id)
        return flow.input_credit if flow and not flow.input_closed else 0

    def input_offset(self, request_id: int) -> int:
        """Input bytes sent (or received) on `request_id` so far."""
        flow = self._open.get(request_id)
        return flow.input_offset if flow else 0

    def input_closed(self, request_id: int) -> bool:
        """Whether the input of `request_id` has ended (or it is not open)."""
        flow = self._open.get(request_id)
        return flow is None or flow.input_closed

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; b"" means the peer closed its side."""
        if self._eof:
            raise RemoteProtocolError("data received after end of stream")
        if data:
            self._frames.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Message | Signal:
        """Return the next complete message, NEED_DATA, or PEER_CLOSED.

        Raises RemoteProtocolError if the peer broke the protocol; the
        connection is BROKEN from then on.
        """
        if self._state is State.BROKEN:
            raise RemoteProtocolError("connection is broken by an earlier error")
        try:
            body = self._frames.next_body()
            if body is None:
                if not self._eof:
                    return NEED_DATA
                if self._frames.pending:
                    raise RemoteProtocolError("connection closed in the middle of a frame")
                self._state = State.CLOSED
                return PEER_CLOSED
            message = from_wire(decode_body(body))
            self._on_receive(message)
        except ProtocolError:
            self._state = State.BROKEN
            raise
        return message

    def _on_receive(self, message: Message) -> None:
        state, kind = self._state, type(message)
        if state is State.CLOSED:
            raise RemoteProtocolError(f"{kind.__name__} received after the connection closed")
        if isinstance(message, Error) and message.id is None:
            self._state = State.CLOSED
            return
        if self.role is Role.SERVER:
            self._server_receive(message)
        else:
            self._client_receive(message)

    def _server_receive(self, message: Message) -> None:
        if self._state is State.AWAIT_HELLO:
            if not isinstance(message, Hello):
                raise RemoteProtocolError(f"expected hello, got {type(message).__name__}")
            self.peer_version = message.version
            if message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version mismatch: client speaks version {message.version}, "
                    f"server speaks version {PROTOCOL_VERSION}",
                    ErrorCode.FAILED_PRECONDITION,
                )
            return
        match message:
            case Request(id=request_id):
                if self._state is not State.OPEN:
                    raise RemoteProtocolError("request before the welcome")
                if request_id in self._open:
                    raise RemoteProtocolError(f"request id {request_id} is already in flight")
                self._open[request_id] = _Flow()
            case Credit(id=request_id, amount=amount):
                # Credit or cancel for a request that just ended is a normal race.
                if flow := self._open.get(request_id):
                    flow.credit = min(MAX_CREDIT, flow.credit + amount)
            case Cancel():
                pass
            case Data(id=request_id, offset=offset, data=data):
                # Input for a request that just ended is a race too; for an
                # open one it must be within credit and in order.
                if (flow := self._open.get(request_id)) is None:
                    return
                if flow.client_eof:
                    raise RemoteProtocolError(f"input on stream {request_id} after its eof")
                if len(data) > flow.input_credit:
                    raise RemoteProtocolError(
                        f"client sent {len(data)} bytes of input on stream {request_id} "
                        f"with only {flow.input_credit} bytes of credit"
                    )
                if offset != flow.input_offset:
                    raise RemoteProtocolError(
                        f"input on stream {request_id} at offset {offset}, "
                        f"expected {flow.input_offset}"
                    )
                flow.input_credit -= len(data)
                flow.input_offset += len(data)
            case Eof(id=request_id):
                if flow := self._open.get(request_id):
                    flow.input_closed = flow.client_eof = True
            case _:
                raise RemoteProtocolError(f"a client may not send {type(message).__name__}")

    def _client_receive(self, message: Message) -> None:
        if self._state is State.SEND_HELLO:
            raise RemoteProtocolError(f"{type(message).__name__} received before hello was sent")
        if self._state is State.AWAIT_WELCOME:
            if not isinstance(message, Welcome):
                raise RemoteProtocolError(f"expected welcome, got {type(message).__name__}")
            self.peer_version = message.version
            if message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version mismatch: server speaks version {message.version}, "
                    f"client speaks version {PROTOCOL_VERSION}",
                    ErrorCode.FAILED_PRECONDITION,
                )
            self._state = State.OPEN
            return
        match message:
            case Data(id=request_id, data=data):
                flow = self._flow(request_id, message)
                if len(data) > flow.credit:
                    raise RemoteProtocolError(
                        f"server sent {len(data)} bytes on stream {request_id} "
                        f"with only {flow.credit} bytes of credit"
                    )
                flow.credit -= len(data)
            case Result(id=request_id) | Error(id=int(request_id)) | End(id=request_id):
                self._flow(request_id, message)
                del self._open[request_id]
            case Credit(id=request_id, amount=amount):
                flow = self._flow(request_id, message)
                flow.input_credit = min(MAX_CREDIT, flow.input_credit + amount)
            case Eof(id=request_id):
                self._flow(request_id, message).input_closed = True
            case _:
                raise RemoteProtocolError(f"a server may not send {type(message).__name__}")

    def _flow(self, request_id: int, message: Message) -> _Flow:
        flow = self._open.get(request_id)
        if flow is None:
            raise RemoteProtocolError(
                f"{type(message).__name__} for request id {request_id}, which is not open"
            )
        return flow

    # -- sending -----------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Return the bytes that carry `message`; LocalProtocolError if not allowed now."""
        state = self._state
        if state is State.BROKEN:
            if isinstance(message, Error) and message.id is None:
                self._state = State.CLOSED
                return encode_frame(to_wire(message), self._max_frame_size)
            raise LocalProtocolError("connection is broken; only a final error may be sent")
        if state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {type(message).__name__}: connection closed")
        frame = encode_frame(to_wire(message), self._max_frame_size)
        if isinstance(message, Error) and message.id is None:
            self._state = State.CLOSED
        elif self.role is Role.SERVER:
            self._server_send(message)
        else:
            self._client_send(message)
        return frame

    def _server_send(self, message: Message) -> None:
        if self._state is State.AWAIT_HELLO:
            if not isinstance(message, Welcome):
                raise LocalProtocolError(f"cannot send {type(message).__name__} before welcome")
            if self.peer_version is None:
                raise LocalProtocolError("cannot welcome before the client's hello")
            self._state = State.OPEN
            return
        match message:
            case Data(id=request_id, data=data):
                flow = self._local_flow(request_id, message)
                if len(data) > flow.credit:
                    raise LocalProtocolError(
                        f"{len(data)} bytes exceed the {flow.credit} bytes of credit "
                        f"on stream {request_id}"
                    )
                flow.credit -= len(data)
            case Result(id=request_id) | Error(id=int(request_id)) | End(id=request_id):
                self._local_flow(request_id, message)
                del self._open[request_id]
            case Credit(id=request_id, amount=amount):
                flow = self._local_flow(request_id, message)
                if not flow.input_closed:
                    flow.input_credit = min(MAX_CREDIT, flow.input_credit + amount)
            case Eof(id=request_id):
                self._local_flow(request_id, message).input_closed = True
            case _:
                raise LocalProtocolError(f"a server may not send {type(message).__name__}")

    def _client_send(self, message: Message) -> None:
        if self._state is State.SEND_HELLO:
            if not isinstance(message, Hello):
                raise LocalProtocolError(f"cannot send {type(message).__name__} before hello")
            self._state = State.AWAIT_WELCOME
            return
        if self._state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {type(message).__name__} before the welcome")
        match message:
            case Request(id=request_id):
                if request_id in self._open:
                    raise LocalProtocolError(f"request id {request_id} is already in flight")
                self._open[request_id] = _Flow()
            case Credit(id=request_id, amount=amount):
                flow = self._local_flow(request_id, message)
                flow.credit = min(MAX_CREDIT, flow.credit + amount)
            case Cancel(id=request_id):
                self._local_flow(request_id, message)
            case Data(id=request_id, offset=offset, data=data):
                flow = self._local_flow(request_id, message)
                if flow.input_closed:
                    raise LocalProtocolError(f"the input of stream {request_id} has ended")
                if len(data) > flow.input_credit:
                    raise LocalProtocolError(
                        f"{len(data)} bytes of input exceed the {flow.input_credit} bytes "
                        f"of credit on stream {request_id}"
                    )
                if offset != flow.input_offset:
                    raise LocalProtocolError(
                        f"input at offset {offset}; stream {request_id} is at {flow.input_offset}"
                    )
                flow.input_credit -= len(data)
                flow.input_offset += len(data)
            case Eof(id=request_id):
                self._local_flow(request_id, message).input_closed = True
            case _:
                raise LocalProtocolError(f"a client may not send {type(message).__name__}")

    def _local_flow(self, request_id: int, message: Message) -> _Flow:
        flow = self._open.get(request_id)
        if flow is None:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} for request id {request_id}: not open"
            )
        return flow
