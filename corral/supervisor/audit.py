"""The audit trail: who did what, when, from where, and how it went.

Every request a session serves, refused ones included, and every peer
refused before it has a session (in the TLS handshake, or for its
certificate's identity), becomes one JSON line in `STATE/audit.log`
(0600): `time` (RFC 3339, UTC, milliseconds), `name` and `role` (the
certificate's, when there is one), `peer` (its address), `op`, `job` (the
job's whole id, when the request names or makes one), `outcome` (`ok`, or
the error code), and what the operation adds: a start's argv and the
terms it got (user, uid, limits, max runtime, seccomp, host root), a
stream's bytes each way (never the bytes themselves), a refusal's reason.

Theory of operation. `record()` never blocks and never fails: it stamps
the entry, hands it to followers (`corral audit -f`) and puts it on a
bounded queue; a full queue drops it and counts it (`dropped`). One task
(`run`) takes what is queued in batches and appends them in a worker
thread, off the event loop. The file is rotated by size: beyond
`max_size`, audit.log becomes audit.log.1 (and .1 .2, up to `keep`, the
oldest going). A write that fails (a full disk) loses its batch, counts
it (`lost`) and says so once in corrald's log; corrald keeps serving; the
first write that succeeds again is preceded by an entry saying how many
were lost (`op` "audit", `outcome` "lost").

Reading (`entries`) goes through the rotated files oldest first, in a
thread, filtered by time and name.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
# Rotated at this size, `KEEP` old files kept: 5 x 64 MiB is months of a
# busy host's requests (a line is ~200 bytes).
MAX_SIZE = 64 << 20
MIN_SIZE = 64 << 10
KEEP = 4
# Entries waiting for the writer; beyond, entries are dropped and counted.
QUEUE = 8192
# Entries a follower may have unread before it is cut off.
FOLLOWER_QUEUE = 1024
# Entries written in one go.
BATCH = 512


def now_text() -> str:
    """The time now, as audit lines give it."""
    return (
        datetime.datetime.now(datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_time(text: str) -> datetime.datetime:
    """An entry's time; ValueError if it is not one."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


class FollowerBehind(Exception):
    """A follower read too slowly: entries it had not read were dropped."""


class AuditLog:
    """STATE/audit.log: one JSON line per request, written off the event loop."""

    def __init__(
        self, directory: Path, *, max_size: int = MAX_SIZE, keep: int = KEEP, queue: int = QUEUE
    ) -> None:
        self.path = directory / AUDIT_FILE
        self.max_size = max_size
        self.keep = keep
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](queue)
        self._followers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.dropped = 0  # queue full
        self.lost = 0  # the write failed (a full disk)
        self.written = 0
        self._unreported = 0  # lost since the last write that worked
        self._failing: str | None = None

    def record(self, op: str, outcome: str, **fields: Any) -> None:
        """Append an entry (later, from the writer): never blocks, never fails."""
        entry = {"time": now_text(), **fields, "op": op, "outcome": outcome}
        for follower in list(self._followers):
            try:
                follower.send_nowait(entry)
            except trio.WouldBlock:
                self._followers.discard(follower)
                follower.close()  # its reader learns it fell behind
            except trio.BrokenResourceError:
                self._followers.discard(follower)
        try:
            self._send.send_nowait(entry)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1

    @contextlib.contextmanager
    def follow(self) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """The entries recorded from now on, while the `with` lasts. The
        channel closes if its reader falls FOLLOWER_QUEUE entries behind."""
        send, receive = trio.open_memory_channel[dict[str, Any]](FOLLOWER_QUEUE)
        self._followers.add(send)
        try:
            yield receive
        finally:
            self._followers.discard(send)
            send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write what is recorded until cancelled; what is queued then is
        written before this returns (shielded, it is a few batches)."""
        task_status.started()
        try:
            async for entry in self._receive:
                await self._write_batch(entry)
        finally:
            with trio.CancelScope(shield=True):
                self._send.close()
                pending = []
                while True:
                    try:
                        pending.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if pending:
                    await trio.to_thread.run_sync(self._write, pending)

    async def _write_batch(self, first: dict[str, Any]) -> None:
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        await trio.to_thread.run_sync(self._write, batch)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        """Append `batch` (in a worker thread), rotating first if it would
        pass max_size; count it lost if the write fails."""
        if self._unreported:
            gap = {"time": now_text(), "op": "audit", "outcome": "lost"}
            batch = [{**gap, "lost": self._unreported}, *batch]
        data = b"".join(line(entry) for entry in batch)
        try:
            self._rotate_for(len(data))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            lost = len(batch) - (1 if self._unreported else 0)
            self.lost += lost
            self._unreported += lost
            if self._failing is None:
                self._failing = exc.strerror or str(exc)
                log.warning(
                    "cannot write the audit trail %s: %s; counting the entries lost",
                    self.path,
                    self._failing,
                )
            return
        if self._failing is not None:
            log.warning(
                "the audit trail %s is written again; %d entries were lost",
                self.path,
                self._unreported,
            )
            self._failing = None
        self._unreported = 0
        self.written += len(batch)

    def _rotate_for(self, size: int) -> None:
        """Rotate unless `size` more bytes fit within max_size."""
        try:
            current = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if current == 0 or current + size <= self.max_size:
            return
        for index in range(self.keep, 0, -1):  # the oldest is replaced
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._rotated(index - 1), self._rotated(index))

    def _rotated(self, index: int) -> Path:
        return self.path if index == 0 else self.path.with_name(f"{AUDIT_FILE}.{index}")

    def files(self) -> list[Path]:
        """The audit files there are, oldest first."""
        return [
            path for index in range(self.keep, -1, -1) if (path := self._rotated(index)).exists()
        ]

    async def entries(self, *, since: str | None = None, name: str | None = None) -> list[bytes]:
        """The lines written, oldest first, from `since` (an entry's time or
        later) and of `name` alone, if given (in a worker thread)."""
        return await trio.to_thread.run_sync(self._read, since, name)

    def _read(self, since: str | None, name: str | None) -> list[bytes]:
        start = parse_time(since) if since is not None else None
        found: list[bytes] = []
        for path in self.files():
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as lines:
                for line in lines:
                    if matches(line, start, name):
                        found.append(line if line.endswith(b"\n") else line + b"\n")
        return found

    def statistics(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "lost": self.lost}


def matches(line: bytes, start: datetime.datetime | None, name: str | None) -> bool:
    """Whether an audit line is from `start` on and of `name` (None: any)."""
    if start is None and name is None:
        return True
    try:
        return entry_matches(json.loads(line), start, name)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False  # a line cut short by a crash: not an entry


def entry_matches(entry: dict[str, Any], start: datetime.datetime | None, name: str | None) -> bool:
    """Whether an entry is from `start` on and of `name` (None: any)."""
    if name is not None and entry.get("name") != name:
        return False
    return start is None or parse_time(entry["time"]) >= start


def line(entry: dict[str, Any]) -> bytes:
    """An entry as its line in the file."""
    return (
        json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"
    )


def text(value: bytes | str) -> str:
    """Bytes as audit lines show them: UTF-8, anything else escaped."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


__all__ = [
    "AUDIT_FILE",
    "KEEP",
    "MAX_SIZE",
    "MIN_SIZE",
    "AuditLog",
    "FollowerBehind",
    "entry_matches",
    "line",
    "now_text",
    "parse_time",
    "text",
]
