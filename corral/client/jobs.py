"""A job as the client sees it, and its JSON form for scripts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corral.client.errors import TLSError
from corral.client.units import rfc3339

SHORT_ID = 12
_CONTROL_ESCAPES = {
    code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F) if chr(code) != " "
}


def _text(value: bytes | str) -> str:
    """argv bytes for people and JSON: UTF-8, undecodable bytes as \\xNN."""
    if isinstance(value, str):
        return value
    return value.decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job: what was asked, and what happened (as of the reply)."""

    id: str
    owner: str
    argv: list[bytes]
    state: str
    reason: str
    exit_code: int | None
    signal: str | None
    oom_killed: bool
    created_at: int | None  # ns since the epoch
    started_at: int | None
    finished_at: int | None
    limits: dict[str, Any]
    usage: dict[str, Any]
    raw: dict[str, Any] = field(compare=False, repr=False)

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def command(self) -> str:
        """The argv on one line: control characters (a newline in a script)
        shown escaped, so a table row stays one row."""
        line = " ".join(_text(arg) for arg in self.argv)
        return line.translate(_CONTROL_ESCAPES)

    @classmethod
    def from_wire(cls, record: Any) -> JobInfo:
        try:
            return cls(
                id=str(record["id"]),
                owner=str(record["owner"]),
                argv=[
                    bytes(a) if isinstance(a, bytes) else str(a).encode() for a in record["argv"]
                ],
                state=str(record["state"]),
                reason=str(record.get("reason", "")),
                exit_code=record.get("exit_code"),
                signal=record.get("signal"),
                oom_killed=bool(record.get("oom_killed", False)),
                created_at=record.get("created_at"),
                started_at=record.get("started_at"),
                finished_at=record.get("finished_at"),
                limits=dict(record.get("limits") or {}),
                usage=dict(record.get("usage") or {}),
                raw=record,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TLSError(f"corrald sent a job of the wrong shape: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        """The names scripts rely on (see the README)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "argv": [_text(arg) for arg in self.argv],
            "state": self.state,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom_killed": self.oom_killed,
            "reason": self.reason,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "limits": self.limits,
            "usage": {
                "cpu_seconds": self.usage.get("cpu_seconds", 0.0),
                "memory_peak_bytes": self.usage.get("memory_peak_bytes", 0),
                "io_read_bytes": self.usage.get("io_read_bytes", 0),
                "io_write_bytes": self.usage.get("io_write_bytes", 0),
            },
        }
