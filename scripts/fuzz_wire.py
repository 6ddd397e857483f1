"""Fuzz corral's wire with atheris: the frame buffer, the decoder and a server `Connection`.

atheris is not a dependency of corral; install it beside msgpack in a
virtualenv of its own (it ships wheels for CPython on x86-64 Linux):

    python3 -m venv .fuzz-venv
    .fuzz-venv/bin/pip install atheris msgpack

Run it from anywhere (corral is imported from this checkout); every argument
goes to libFuzzer:

    .fuzz-venv/bin/python scripts/fuzz_wire.py -max_total_time=120
    .fuzz-venv/bin/python scripts/fuzz_wire.py corpus/ -max_total_time=3600 -jobs=2
    .fuzz-venv/bin/python scripts/fuzz_wire.py crash-1a2b3c...    # replay one input

The only exception the wire may raise on a peer's bytes is the protocol's
own RemoteProtocolError; anything else, or a broken invariant (an
AssertionError below), is a finding: libFuzzer prints the traceback and
saves the input as crash-<sha1>.

msgpack's C extension, which corrald runs, is not instrumented, so coverage
guides the search through corral's code only. MSGPACK_PUREPYTHON=1 makes
msgpack use its pure-Python fallback, instrumented too: deeper coverage, but
check any finding against the C extension before reporting it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    import msgpack

    from corral.protocol import (
        NEED_DATA,
        PEER_CLOSED,
        PROTOCOL_VERSION,
        Connection,
        Error,
        ErrorCode,
        Hello,
        Message,
        ProtocolError,
        RemoteProtocolError,
        Role,
        State,
        Welcome,
    )
    from corral.protocol.codec import HEADER, MAX_FRAME_SIZE, FrameBuffer, decode_body, encode_frame
    from corral.protocol.messages import from_wire, to_wire

# Codes a peer's bytes may earn; `internal` would be corrald's own fault.
PEER_FAULT_CODES = frozenset(
    {ErrorCode.INVALID_ARGUMENT, ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.FAILED_PRECONDITION}
)
# A refusal's message goes back in a goodbye; it must not echo the peer at length.
MAX_MESSAGE = 1024

Outcome = tuple[list[bytes], tuple[ErrorCode, str] | None]


def check_refusal(exc: ProtocolError, code: ErrorCode | None = None) -> None:
    assert isinstance(exc, RemoteProtocolError), f"a local error from remote bytes: {exc!r}"
    assert exc.code in PEER_FAULT_CODES, f"code {exc.code} for the peer's bytes: {exc}"
    assert code is None or exc.code is code, f"code {exc.code}, not {code}: {exc}"
    assert 0 < len(str(exc)) <= MAX_MESSAGE, f"message of {len(str(exc))} characters"


def canonical(message: Message) -> bytes:
    """The message's own encoding: bytes compare where a NaN would not."""
    return encode_frame(to_wire(message))


def fuzz_body(body: bytes) -> None:
    """One frame body through the decoder: refused, or a message that round-trips."""
    try:
        message = from_wire(decode_body(body))
    except ProtocolError as exc:
        check_refusal(exc)
        return
    again = from_wire(decode_body(canonical(message)[HEADER.size :]))
    assert canonical(again) == canonical(message), f"{message!r} changed in a round trip"


def fuzz_frames(data: bytes, cut: int) -> None:
    """Bytes through the frame buffer in pieces of `cut`, each body decoded."""
    frames = FrameBuffer()
    try:
        for start in range(0, len(data), cut):
            frames.feed(data[start : start + cut])
            while (body := frames.next_body()) is not None:
                fuzz_body(body)
    except ProtocolError as exc:  # an oversized length prefix
        check_refusal(exc, ErrorCode.RESOURCE_EXHAUSTED)


def state_of(conn: Connection) -> State:
    return conn.state


def server_outcome(pieces: list[bytes], *, opened: bool) -> Outcome:
    """What a server Connection makes of `pieces`, then EOF."""
    conn = Connection(Role.SERVER)
    if opened:
        conn.receive_data(Connection(Role.CLIENT).send(Hello(version=PROTOCOL_VERSION)))
        assert isinstance(conn.next_event(), Hello)
        conn.send(Welcome(version=PROTOCOL_VERSION, server="s", name="n", role="user"))
    seen: list[bytes] = []
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not NEED_DATA:
                if event is PEER_CLOSED:
                    return seen, None
                assert isinstance(event, Message), event
                seen.append(canonical(event))
    except ProtocolError as exc:
        check_refusal(exc)
        assert state_of(conn) is State.BROKEN
        try:
            conn.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("a broken connection gave another event")
        goodbye = conn.send(Error(id=None, code=exc.code, message=str(exc)))
        assert len(goodbye) <= HEADER.size + MAX_FRAME_SIZE
        assert state_of(conn) is State.CLOSED
        return seen, (exc.code, str(exc))
    raise AssertionError("EOF was never reported")


def fuzz_connection(data: bytes, cut: int, *, opened: bool) -> None:
    """A server Connection answers alike whether bytes come at once or in pieces."""
    pieces = [data[start : start + cut] for start in range(0, len(data), cut)]
    whole = server_outcome([data], opened=opened)
    assert server_outcome(pieces, opened=opened) == whole, "the answer depends on the pieces"


TAGS = ["hello", "welcome", "req", "res", "err", "data", "end", "credit", "cancel"]
FIELDS = ["id", "op", "args", "value", "code", "message", "data", "offset", "amount"]
FIELDS += ["version", "agent", "server", "name", "role"]
WORDS = ["info", "list", "logs", "cancelled", "internal", "user", "t", *TAGS, *FIELDS]


# Containers nest this deep at most; the decoder's own limit is tested elsewhere.
MAX_NEST = 4


def fuzzed_value(provider: Any, depth: int = 0) -> object:
    """Any msgpack value, likelier to be one the wire expects somewhere."""
    kind: int = provider.ConsumeIntInRange(0, 11 if depth < MAX_NEST else 9)
    match kind:
        case 0:
            return None
        case 1:
            return provider.ConsumeBool()
        case 2:
            return provider.ConsumeIntInRange(0, 8)
        case 3:
            return provider.ConsumeIntInRange(-(2**63), 2**64 - 1)
        case 4:
            return provider.ConsumeFloat()
        case 5:
            return provider.PickValueInList(WORDS)
        case 6:
            return provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 16))
        case 7:
            return provider.ConsumeBytes(provider.ConsumeIntInRange(0, 16))
        case 8:
            return msgpack.ExtType(provider.ConsumeIntInRange(0, 127), provider.ConsumeBytes(4))
        case 9:
            return provider.PickValueInList([-1, 2**32, 2**62, 2**64 - 1])
        case 10:
            count: int = provider.ConsumeIntInRange(0, 3)
            return [fuzzed_value(provider, depth + 1) for _ in range(count)]
        case _:
            return fuzzed_map(provider, depth + 1)


def fuzzed_map(provider: Any, depth: int) -> dict[object, object]:
    result: dict[object, object] = {}
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        scalar = fuzzed_value(provider, MAX_NEST)
        key = provider.PickValueInList(FIELDS) if provider.ConsumeBool() else scalar
        result[key] = fuzzed_value(provider, depth)
    return result


def fuzzed_messages(provider: Any) -> bytes:
    """Up to four framed maps, each a message type with fuzzed fields."""
    wire = b""
    for _ in range(provider.ConsumeIntInRange(1, 4)):
        message = fuzzed_map(provider, 1)
        if provider.ConsumeIntInRange(0, 7):
            message["t"] = provider.PickValueInList(TAGS)
        body: bytes = msgpack.packb(message, use_bin_type=True)
        wire += HEADER.pack(len(body)) + body
    return wire


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    mode: int = provider.ConsumeIntInRange(0, 4)
    cut: int = provider.ConsumeIntInRange(1, 64)
    opened: bool = provider.ConsumeBool()
    if mode == 4:
        # Structured: valid msgpack with likely tags and fields, so inputs get
        # past the decoder to the message checks and the state machine.
        try:
            wire = fuzzed_messages(provider)
        except (ValueError, OverflowError, TypeError):
            return  # msgpack cannot pack it (a key it refuses, say)
        fuzz_connection(wire, cut, opened=opened)
        return
    payload: bytes = provider.ConsumeBytes(provider.remaining_bytes())
    if mode == 0:
        fuzz_body(payload)
    elif mode == 1:
        fuzz_frames(payload, cut)
    else:
        # Mode 3 frames the payload itself, so most inputs reach the decoder
        # rather than stop at a random length prefix.
        wire = HEADER.pack(len(payload)) + payload if mode == 3 else payload
        fuzz_connection(wire, cut, opened=opened)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
