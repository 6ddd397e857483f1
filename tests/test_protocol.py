"""The sans-IO protocol, driven through a client and a server joined by a fake link."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    PEER_CLOSED,
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
    LocalProtocolError,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Result,
    Role,
    Signal,
    State,
    Welcome,
)
from corral.protocol.codec import FrameBuffer


def deliver(data: bytes, receiver: Connection) -> list[Message | Signal]:
    """Feed `data` to `receiver` and return every event it yields."""
    receiver.receive_data(data)
    events: list[Message | Signal] = []
    while (event := receiver.next_event()) is not NEED_DATA:
        events.append(event)
        if event is PEER_CLOSED:
            break
    return events


def open_pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert deliver(client.send(Hello(version=PROTOCOL_VERSION, agent="t")), server) == [
        Hello(version=PROTOCOL_VERSION, agent="t")
    ]
    welcome = Welcome(version=PROTOCOL_VERSION, server="corrald", name="alice", role="user")
    assert deliver(server.send(welcome), client) == [welcome]
    assert client.state is State.OPEN
    assert server.state is State.OPEN
    return client, server


def frame(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_handshake_then_unary_request() -> None:
    client, server = open_pair()
    request = Request(id=7, op="info", args={"x": [1, b"\x00"]})
    assert deliver(client.send(request), server) == [request]
    assert server.open_ids == {7}
    assert deliver(server.send(Result(id=7, value={"ok": True})), client) == [
        Result(id=7, value={"ok": True})
    ]
    assert client.open_ids == server.open_ids == frozenset()


def test_many_requests_interleave_on_one_connection() -> None:
    client, server = open_pair()
    wire = b"".join(client.send(Request(id=i, op="info")) for i in range(5))
    assert [e.id for e in deliver(wire, server)] == list(range(5))  # type: ignore[union-attr]
    replies = b"".join(server.send(Result(id=i)) for i in (3, 1, 4, 0, 2))
    assert [e.id for e in deliver(replies, client)] == [3, 1, 4, 0, 2]  # type: ignore[union-attr]


def test_stream_respects_credit_both_ways() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="logs")), server)
    with pytest.raises(LocalProtocolError, match="credit"):
        server.send(Data(id=1, offset=0, data=b"x"))
    deliver(client.send(Credit(id=1, amount=5)), server)
    assert server.credit(1) == 5
    events = deliver(server.send(Data(id=1, offset=0, data=b"abcde")), client)
    assert events == [Data(id=1, offset=0, data=b"abcde")]
    assert server.credit(1) == client.credit(1) == 0
    assert deliver(server.send(End(id=1, value={"exit": 0})), client) == [
        End(id=1, value={"exit": 0})
    ]


def test_client_rejects_data_beyond_credit() -> None:
    client, _ = open_pair()
    client.send(Request(id=1, op="logs"))
    client.send(Credit(id=1, amount=2))
    raw = frame({"t": "data", "id": 1, "offset": 0, "data": b"abc"})
    with pytest.raises(RemoteProtocolError, match="credit"):
        deliver(raw, client)
    assert client.state is State.BROKEN
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_input_flows_within_the_servers_credit_and_in_order() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="attach")), server)
    with pytest.raises(LocalProtocolError, match="credit"):
        client.send(Data(id=1, offset=0, data=b"x"))  # no credit granted yet
    assert deliver(server.send(Credit(id=1, amount=4)), client) == [Credit(id=1, amount=4)]
    assert client.input_credit(1) == server.input_credit(1) == 4
    assert deliver(client.send(Data(id=1, offset=0, data=b"abc")), server) == [
        Data(id=1, offset=0, data=b"abc")
    ]
    assert client.input_offset(1) == server.input_offset(1) == 3
    with pytest.raises(LocalProtocolError, match="credit"):
        client.send(Data(id=1, offset=3, data=b"de"))
    with pytest.raises(LocalProtocolError, match="offset"):
        client.send(Data(id=1, offset=0, data=b"d"))
    # A peer that skips bytes, or sends beyond the credit, breaks the connection.
    with pytest.raises(RemoteProtocolError, match="offset 9"):
        deliver(frame({"t": "data", "id": 1, "offset": 9, "data": b"d"}), server)
    assert server.state is State.BROKEN


def test_input_beyond_credit_breaks_the_server_side() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="attach")), server)
    deliver(server.send(Credit(id=1, amount=2)), client)
    with pytest.raises(RemoteProtocolError, match="credit"):
        deliver(frame({"t": "data", "id": 1, "offset": 0, "data": b"abc"}), server)


def test_eof_ends_input_either_way() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="attach")), server)
    deliver(server.send(Credit(id=1, amount=10)), client)
    # The client's EOF: nothing may follow it.
    assert deliver(client.send(Eof(id=1)), server) == [Eof(id=1)]
    assert client.input_closed(1)
    assert server.input_closed(1)
    assert client.input_credit(1) == server.input_credit(1) == 0
    with pytest.raises(LocalProtocolError, match="ended"):
        client.send(Data(id=1, offset=0, data=b"x"))
    with pytest.raises(RemoteProtocolError, match="after its eof"):
        deliver(frame({"t": "data", "id": 1, "offset": 0, "data": b"x"}), server)


def test_servers_eof_tolerates_input_already_on_its_way() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="attach")), server)
    deliver(server.send(Credit(id=1, amount=10)), client)
    in_flight = client.send(Data(id=1, offset=0, data=b"abc"))
    # The job closed its stdin: the server says so while the client sends.
    assert deliver(server.send(Eof(id=1)), client) == [Eof(id=1)]
    assert deliver(in_flight, server) == [Data(id=1, offset=0, data=b"abc")]
    assert client.input_credit(1) == 0
    with pytest.raises(LocalProtocolError, match="ended"):
        client.send(Data(id=1, offset=3, data=b"d"))
    # Credit after the end grants nothing; the stream still ends normally.
    server.send(Credit(id=1, amount=5))
    assert server.input_credit(1) == 0
    assert deliver(server.send(End(id=1)), client) == [End(id=1)]


def test_client_refuses_input_messages_for_requests_not_open() -> None:
    client, _ = open_pair()
    with pytest.raises(RemoteProtocolError, match="not open"):
        deliver(frame({"t": "credit", "id": 5, "amount": 1}), client)


def test_cancel_and_late_credit_are_tolerated_by_the_server() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="logs")), server)
    wire = client.send(Cancel(id=1))
    deliver(server.send(Error(id=1, code=ErrorCode.CANCELLED, message="cancelled")), client)
    # The cancel crossed the final reply: the server ignores it.
    assert deliver(wire, server) == [Cancel(id=1)]
    assert deliver(frame({"t": "credit", "id": 1, "amount": 9}), server) == [Credit(id=1, amount=9)]
    assert server.credit(1) == 0


def test_version_mismatch_names_both_versions() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(frame({"t": "hello", "version": PROTOCOL_VERSION + 1}), server)
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    message = str(info.value)
    assert f"client speaks version {PROTOCOL_VERSION + 1}" in message
    assert f"server speaks version {PROTOCOL_VERSION}" in message
    # A goodbye may still be sent, then nothing else.
    goodbye = Error(id=None, code=info.value.code, message=message)
    client_view = Connection(Role.CLIENT)
    client_view.send(Hello(version=PROTOCOL_VERSION + 1))
    assert deliver(server.send(goodbye), client_view) == [goodbye]
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(goodbye)


def test_client_rejects_welcome_of_another_version() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(version=PROTOCOL_VERSION))
    raw = frame({"t": "welcome", "version": 99, "server": "s", "name": "n", "role": "user"})
    with pytest.raises(RemoteProtocolError, match="server speaks version 99"):
        deliver(raw, client)


def test_request_before_welcome_is_a_remote_error() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        deliver(frame({"t": "req", "id": 1, "op": "info"}), server)


def test_reused_request_id_is_refused_on_both_sides() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=1, op="info")), server)
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.send(Request(id=1, op="info"))
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        deliver(frame({"t": "req", "id": 1, "op": "info"}), server)


def test_reply_for_unknown_id_is_a_remote_error() -> None:
    client, _ = open_pair()
    with pytest.raises(RemoteProtocolError, match="not open"):
        deliver(frame({"t": "res", "id": 5, "value": {}}), client)


def test_oversized_length_prefix_is_refused_before_buffering() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit") as info:
        deliver(struct.pack(">I", MAX_FRAME_SIZE + 1), server)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED


def test_eof_in_the_middle_of_a_frame() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame({"t": "hello", "version": 1})[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def test_clean_eof_is_peer_closed() -> None:
    server = Connection(Role.SERVER)
    assert deliver(b"", server) == [PEER_CLOSED]
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2], "must hold a map"),
        ({"t": "req", "id": True, "op": "x"}, "must be int"),
        ({"t": "req", "id": -1, "op": "x"}, "out of range"),
        ({"t": "req", "id": 1}, "lacks field 'op'"),
        ({"t": "req", "id": 1, "op": "x", "args": [1]}, "must be dict"),
        ({"t": "nope"}, "unknown message type"),
        ({1: 2}, "malformed msgpack"),
        ({"t": "req", "id": 1, "op": "x", "args": {"a": {5: 1}}}, "malformed msgpack"),
        ({"t": "req", "id": 1, "op": b"\xff"}, "must be str"),
    ],
)
def test_wrong_shapes_are_protocol_errors(value: Any, match: str) -> None:
    _, server = open_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        deliver(frame(value), server)


def test_deep_nesting_is_refused() -> None:
    _, server = open_pair()
    nested: Any = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(RemoteProtocolError, match="deeper than"):
        deliver(frame({"t": "req", "id": 1, "op": "x", "args": {"a": nested}}), server)


def test_ext_types_and_invalid_utf8_are_refused() -> None:
    _, server = open_pair()
    ext = frame({"t": msgpack.ExtType(5, b"x")})
    with pytest.raises(RemoteProtocolError, match="ext"):
        deliver(ext, server)
    _, server = open_pair()
    bad = b"\x81\xa1t\xa2\xff\xfe"  # {"t": <invalid utf-8>}
    with pytest.raises(RemoteProtocolError, match="malformed"):
        deliver(struct.pack(">I", len(bad)) + bad, server)


def test_unknown_error_code_is_kept_in_the_message() -> None:
    client, server = open_pair()
    deliver(client.send(Request(id=3, op="x")), server)
    raw = frame({"t": "err", "id": 3, "code": "teapot", "message": "short and stout"})
    [event] = deliver(raw, client)
    assert event == Error(id=3, code=ErrorCode.INTERNAL, message="teapot: short and stout")


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
tags = st.sampled_from(["hello", "welcome", "req", "res", "err", "data", "end", "credit", "cancel"])
keys = st.sampled_from(
    [
        "t",
        "id",
        "op",
        "args",
        "value",
        "code",
        "message",
        "data",
        "offset",
        "amount",
        "version",
        "server",
        "name",
        "role",
        "agent",
    ]
)
messages_of_wrong_shape = st.dictionaries(keys, msgpack_values | tags, max_size=6)


def _drain(conn: Connection, data: bytes) -> None:
    try:
        deliver(data, conn)
    except ProtocolError:
        assert conn.state is State.BROKEN


@settings(max_examples=300)
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes, opened: bool) -> None:
    if opened:
        client, server = open_pair()
    else:
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
        client.send(Hello(version=PROTOCOL_VERSION))
    _drain(server, data)
    _drain(client, data)


@settings(max_examples=300)
@given(st.lists(messages_of_wrong_shape, max_size=4), st.booleans())
def test_wellformed_msgpack_of_any_shape_only_raises_protocol_errors(
    values: list[dict[str, Any]], opened: bool
) -> None:
    if opened:
        client, server = open_pair()
        client.send(Request(id=1, op="x"))
    else:
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
        client.send(Hello(version=PROTOCOL_VERSION))
    data = b"".join(frame(v) for v in values)
    _drain(server, data)
    _drain(client, data)


@settings(max_examples=300)
@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=20),
)
def test_frames_come_out_whole_however_the_bytes_are_split(
    bodies: list[bytes], cuts: list[int]
) -> None:
    frames = FrameBuffer()
    stream = b"".join(struct.pack(">I", len(body)) + body for body in bodies)
    received: list[bytes] = []
    position = 0
    for size in itertools.cycle(cuts):
        if position >= len(stream):
            break
        frames.feed(stream[position : position + size])
        position += size
        while (body := frames.next_body()) is not None:
            received.append(body)
    assert received == bodies
    assert frames.pending == 0
