"""Framing and bounded msgpack decoding.

A frame is a 4-byte big-endian length followed by that many bytes of one
msgpack map. Decoding never trusts the peer: the frame size, every string,
binary, array and map length, and the nesting depth are bounded, ext types
are refused, and map keys must be strings. Every failure is a
RemoteProtocolError.
"""

from __future__ import annotations

import struct
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
    except (ValueError, msgpack.UnpackException) as exc:
        # ValueError covers msgpack's FormatError, StackError, ExtraData,
        # non-string map keys and invalid UTF-8.
        raise RemoteProtocolError(f"malformed msgpack frame: {exc}") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"a frame must hold a map, not {type(value).__name__}")
    _check_shape(value)
    return value


def _check_shape(root: dict[str, Any]) -> None:
    """Enforce MAX_DEPTH and string keys at every level, without recursion."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RemoteProtocolError(f"message nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise RemoteProtocolError("map keys must be strings")
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if isinstance(item, dict | list))


class FrameBuffer:
    """Accumulates received bytes and yields complete frame bodies."""

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_body(self) -> bytes | None:
        """Return the next complete frame body, or None if more bytes are needed."""
        if len(self._buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buffer)
        if size > self._max_frame_size:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the limit of {self._max_frame_size}",
                ErrorCode.RESOURCE_EXHAUSTED,
            )
        end = HEADER.size + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return body

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)
