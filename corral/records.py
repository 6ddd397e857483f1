"""The records of a job's `output.log`: `[stream, time_ns, data]`, one
msgpack array each, appended by the shim and decoded by whoever reads.

The client imports this to decode a log stream, and nothing of the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

STREAM_MARKER, STREAM_STDOUT, STREAM_STDERR = 0, 1, 2
# A record holds at most one read of a pipe (64 KiB) and its envelope.
MAX_RECORD = 1 << 20
FEED_SIZE = 256 << 10


@dataclass(frozen=True, slots=True)
class Record:
    """One record of output.log: `data` is bytes for stdout (1) and stderr (2);
    for a marker (0), a map such as {"dropped_bytes": N}."""

    stream: int
    time_ns: int
    data: bytes | dict[str, Any]


class RecordDecoder:
    """Records out of output.log's bytes, fed in pieces of any size."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_RECORD)

    @property
    def consumed(self) -> int:
        """Bytes of the records returned so far: where the next record begins,
        counted from the first byte fed."""
        position: int = self._unpacker.tell()
        return position

    def feed(self, data: bytes) -> list[Record]:
        """The records `data` completes; ValueError if it is not output.log."""
        records = []
        view = memoryview(data)
        for start in range(0, len(view), FEED_SIZE):  # the buffer holds one record or so
            try:
                self._unpacker.feed(view[start : start + FEED_SIZE])
            except msgpack.BufferFull:
                raise ValueError(f"a record over {MAX_RECORD} bytes") from None
            for item in self._unpacker:
                match item:
                    case [int(stream), int(time_ns), bytes() | dict() as payload]:
                        records.append(Record(stream, time_ns, payload))
                    case _:
                        raise ValueError(f"not an output record: {item!r:.80}")
        return records
