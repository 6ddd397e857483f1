"""The messages of the corral wire protocol, as frozen dataclasses.

Every message travels as a msgpack map whose key "t" names its type. Request
ids are chosen by the client; every reply to a request (result, error, stream
data, stream end) echoes its id, so one connection carries many requests and
streams at once. Unknown keys are ignored so that a newer peer may add
fields; a missing or mistyped field is a RemoteProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from corral.protocol.errors import ErrorCode, RemoteProtocolError, shorten

PROTOCOL_VERSION = 1

# Ids are client-chosen unsigned integers that fit msgpack's uint64.
MAX_ID = 2**64 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """Client -> server, first message: the protocol version it speaks."""

    version: int
    agent: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome:
    """Server -> client, answer to Hello: who the server says the client is."""

    version: int
    server: str
    name: str
    role: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """Client -> server: run operation `op` with `args`."""

    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Result:
    """Server -> client: the request `id` succeeded with `value`. Final."""

    id: int
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """Either way: request `id` failed, or (id None) the connection did. Final."""

    id: int | None
    code: ErrorCode
    message: str
    # What a program may act on beside the code, e.g. {"job": ID} for a
    # start that failed after its job was recorded. Peers ignore keys they
    # do not know.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Data:
    """Bytes of stream `id`, starting at `offset` of its source: server ->
    client, output within the credit the client granted; client -> server,
    input within the credit the server granted (`offset` counts the input
    sent on the stream before it)."""

    id: int
    offset: int
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class End:
    """Server -> client: stream `id` ended normally with `value`. Final."""

    id: int
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Credit:
    """The receiver of stream `id`'s data lets its sender send `amount` more
    bytes: client -> server for output, server -> client for input."""

    id: int
    amount: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel:
    """Client -> server: abandon request or stream `id`."""

    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Eof:
    """The input of stream `id` has ended: client -> server, the client sends
    no more; server -> client, the server takes no more (the job's stdin is
    closed). Either way no Data from the client follows on that stream."""

    id: int


Message = Hello | Welcome | Request | Result | Error | Data | End | Credit | Cancel | Eof

_TAGS: dict[type[Any], str] = {
    Hello: "hello",
    Welcome: "welcome",
    Request: "req",
    Result: "res",
    Error: "err",
    Data: "data",
    End: "end",
    Credit: "credit",
    Cancel: "cancel",
    Eof: "eof",
}


def to_wire(message: Message) -> dict[str, Any]:
    """Return the map that represents `message` on the wire."""
    wire: dict[str, Any] = {"t": _TAGS[type(message)]}
    for name in message.__slots__:
        value = getattr(message, name)
        if name == "details" and not value:
            continue  # most errors have none: no empty map on the wire
        wire[name] = str(value) if isinstance(value, ErrorCode) else value
    return wire


_T = TypeVar("_T")


def _field(wire: dict[str, Any], name: str, kind: type[_T], tag: str) -> _T:
    try:
        value = wire[name]
    except KeyError:
        raise RemoteProtocolError(f"'{tag}' message lacks field '{name}'") from None
    # bool is an int subclass; a peer sending true for an id is wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(
            f"field '{name}' of '{tag}' must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _id(wire: dict[str, Any], tag: str, name: str = "id") -> int:
    value = _field(wire, name, int, tag)
    if not 0 <= value <= MAX_ID:
        raise RemoteProtocolError(f"field '{name}' of '{tag}' is out of range: {value}")
    return value


def _count(wire: dict[str, Any], name: str, tag: str) -> int:
    value = _field(wire, name, int, tag)
    if value < 0:
        raise RemoteProtocolError(f"field '{name}' of '{tag}' must not be negative")
    return value


def _map(wire: dict[str, Any], name: str, tag: str) -> dict[str, Any]:
    return _field(wire, name, dict, tag) if name in wire else {}


def from_wire(wire: dict[str, Any]) -> Message:
    """Build a message from a decoded map; RemoteProtocolError if it is not one."""
    tag = wire.get("t")
    if not isinstance(tag, str):
        raise RemoteProtocolError("message lacks a string type field 't'")
    match tag:
        case "hello":
            agent = _field(wire, "agent", str, tag) if "agent" in wire else ""
            return Hello(version=_count(wire, "version", tag), agent=agent)
        case "welcome":
            return Welcome(
                version=_count(wire, "version", tag),
                server=_field(wire, "server", str, tag),
                name=_field(wire, "name", str, tag),
                role=_field(wire, "role", str, tag),
            )
        case "req":
            return Request(
                id=_id(wire, tag), op=_field(wire, "op", str, tag), args=_map(wire, "args", tag)
            )
        case "res":
            return Result(id=_id(wire, tag), value=_map(wire, "value", tag))
        case "err":
            raw_id = wire.get("id")
            code_text = _field(wire, "code", str, tag)
            try:
                code = ErrorCode(code_text)
            except ValueError:
                # An unknown code from a newer peer still ends the request.
                code = ErrorCode.INTERNAL
                code_text = f"{code_text}: "
            else:
                code_text = ""
            return Error(
                id=None if raw_id is None else _id(wire, tag),
                code=code,
                message=code_text + _field(wire, "message", str, tag),
                details=_map(wire, "details", tag),
            )
        case "data":
            return Data(
                id=_id(wire, tag),
                offset=_count(wire, "offset", tag),
                data=_field(wire, "data", bytes, tag),
            )
        case "end":
            return End(id=_id(wire, tag), value=_map(wire, "value", tag))
        case "credit":
            return Credit(id=_id(wire, tag), amount=_count(wire, "amount", tag))
        case "cancel":
            return Cancel(id=_id(wire, tag))
        case "eof":
            return Eof(id=_id(wire, tag))
    raise RemoteProtocolError(f"unknown message type {shorten(tag)}")
