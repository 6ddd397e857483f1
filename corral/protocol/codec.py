"""Framing and bounded msgpack decoding.

A frame is a 4-byte big-endian length followed by that many bytes of one
msgpack map. Decoding never trusts the peer: the frame size, every string,
binary, array and map length, and the nesting depth are bounded, ext types
are refused, and map keys must be strings. Every failure is a
RemoteProtocolError.
"""

from __future__ import annotations

import struct
from collections import deque
from itertools import islice
from typing import Any

import msgpack

from corral.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")

# Large enough for a 256 KiB log chunk plus its envelope, small enough that a
# hostile length prefix cannot make us buffer much.
MAX_FRAME_SIZE = 1024 * 1024

# Our messages nest a handful of levels (message -> args -> env -> value);
# 32 leaves room for growth without letting a peer build deep structures.
MAX_DEPTH = 32
TOO_DEEP = f"message nests deeper than {MAX_DEPTH} levels"
# What a frame's size buys (see _check_shape): a list or map per 32 bytes,
# a value per 2 bytes, beyond a few of each that any frame may have.
CONTAINER_BYTES = 32
VALUE_BYTES = 2
SLACK = 64


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


def encode_frame(message: dict[str, Any], max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Return `message` as one frame; LocalProtocolError if it cannot be sent."""
    try:
        body: bytes = msgpack.packb(message, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}", ErrorCode.INTERNAL) from exc
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            f"message of {len(body)} bytes exceeds the frame limit of {max_frame_size}",
            ErrorCode.INTERNAL,
        )
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a map with string keys, within the limits."""
    size = len(body)
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,
        )
    except RemoteProtocolError:
        raise
    except msgpack.StackError:  # nesting past msgpack's own limit; it says nothing
        raise RemoteProtocolError(TOO_DEEP) from None
    except (ValueError, msgpack.UnpackException) as exc:
        # ValueError covers msgpack's FormatError, ExtraData, non-string
        # map keys and invalid UTF-8.
        raise RemoteProtocolError(f"malformed msgpack frame: {exc}") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"a frame must hold a map, not {type(value).__name__}")
    _check_shape(value, size)
    return value


def _check_shape(root: dict[str, Any], size: int) -> None:
    """Enforce MAX_DEPTH and string keys at every level, without recursion,
    and bound what the decoded message holds against the frame's size.

    A message lives as long as its request: a frame of a million empty
    lists (a byte each on the wire, 64 as Python objects) would hold 64
    times its size. At most one container per CONTAINER_BYTES and one value
    per VALUE_BYTES of frame keep that to ~20 times, the worst being small
    integers outside Python's cache (2 bytes on the wire, 36 as objects).
    """
    max_containers = size // CONTAINER_BYTES + SLACK
    max_values = size // VALUE_BYTES + SLACK
    containers = values = 0
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RemoteProtocolError(TOO_DEEP)
        containers += 1
        values += len(value)
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise RemoteProtocolError("map keys must be strings")
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if isinstance(item, dict | list))
    if containers > max_containers or values > max_values:
        raise RemoteProtocolError(
            f"a frame of {size} bytes may hold at most {max_containers} lists and maps "
            f"and {max_values} values",
            ErrorCode.RESOURCE_EXHAUSTED,
        )


class FrameBuffer:
    """Accumulates received bytes and yields complete frame bodies.

    Received pieces are kept as they came and each body is copied out once:
    a bytearray that grows by small receives and shrinks from the front
    would copy a large frame many times over as it arrives.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._pieces: deque[bytes] = deque()
        self._offset = 0  # how much of the first piece is consumed
        self._size = 0  # bytes held, not yet consumed
        self._max_frame_size = max_frame_size

    def feed(self, data: bytes) -> None:
        if data:
            self._pieces.append(data)
            self._size += len(data)

    def next_body(self) -> bytes | None:
        """Return the next complete frame body, or None if more bytes are needed."""
        if self._size < HEADER.size:
            return None
        (size,) = HEADER.unpack(self._peek(HEADER.size))
        if size > self._max_frame_size:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the limit of {self._max_frame_size}",
                ErrorCode.RESOURCE_EXHAUSTED,
            )
        if self._size < HEADER.size + size:
            return None
        self._take(HEADER.size)
        return self._take(size)

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return self._size

    def _peek(self, count: int) -> bytes:
        first = self._pieces[0]
        if len(first) - self._offset >= count:
            return first[self._offset : self._offset + count]
        head = b"".join([memoryview(first)[self._offset :], *islice(self._pieces, 1, None)])
        return head[:count]  # only when a header straddles receives: a few bytes

    def _take(self, count: int) -> bytes:
        """Consume `count` bytes (held): one copy, however many pieces they span."""
        if count == 0:
            return b""
        first = self._pieces[0]
        end = self._offset + count
        if end <= len(first):
            taken = first[self._offset : end]
            self._advance(end, len(first))
        else:
            parts: list[bytes | memoryview] = [memoryview(first)[self._offset :]]
            remaining = end - len(first)
            self._pieces.popleft()
            while remaining > len(self._pieces[0]):
                remaining -= len(self._pieces[0])
                parts.append(self._pieces.popleft())
            parts.append(memoryview(self._pieces[0])[:remaining])
            taken = b"".join(parts)
            self._advance(remaining, len(self._pieces[0]))
        self._size -= count
        return taken

    def _advance(self, offset: int, length: int) -> None:
        if offset == length:
            self._pieces.popleft()
            self._offset = 0
        else:
            self._offset = offset
