"""A job as the client sees it, and its JSON form for scripts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corral.client.errors import TLSError
from corral.units import rfc3339

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
    owner_role: str = "user"  # the owner is this name with this role
    user: str = ""  # who the command runs as
    uid: int | None = None  # the host uid it runs as, from corrald's pool
    host_root: bool = False  # root on the host (no user namespace)
    seccomp: str = "default"  # its syscall filter: "default" or "unconfined"
    max_runtime: float | None = None  # seconds: its timeout, given or imposed by a cap
    stopped_by: str | None = None  # who or what stopped it ("max runtime 2 s", a name)
    already_ended: bool = False  # a stop's reply: the job had ended before it came
    stdin: bool = False  # it takes input (started with -i)
    tty: bool = False  # it has a terminal (started with -t)
    tty_size: tuple[int, int] | None = None  # its terminal's size at start, columns by rows

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def runs_as(self) -> str:
        """Who the command runs as, in a few words: 'dynamic (uid 1879048192)',
        'root (uid 0 inside, 1879048193 on the host)', 'root on the host'."""
        if self.host_root:
            return "root on the host"
        if self.uid is None:
            return self.user or "-"
        if self.user in {"root", "0"}:
            return f"root (uid 0 in its user namespace, {self.uid} on the host)"
        return f"{self.user} (uid {self.uid})"

    @property
    def command(self) -> str:
        """The argv on one line: control characters (a newline in a script)
        shown escaped, so a table row stays one row."""
        line = " ".join(_text(arg) for arg in self.argv)
        return line.translate(_CONTROL_ESCAPES)

    @property
    def finished(self) -> bool:
        return self.state not in {"starting", "running"}

    @property
    def timed_out(self) -> bool:
        """Stopped because it reached its max runtime (its timeout)."""
        return self.state == "stopped" and (self.stopped_by or "").startswith("max runtime")

    @property
    def outcome(self) -> str:
        """How it ended, in a word or two: 'exited (4)', 'killed (SIGKILL)',
        'stopped (SIGTERM)', 'oom', 'timeout'; its state while it runs, and
        for 'failed' and 'lost'."""
        if self.state in {"exited", "stopped"}:
            if self.oom_killed:
                return "oom"
            if self.timed_out:
                return "timeout"
            how = self.signal if self.signal is not None else str(self.exit_code)
            verb = "killed" if self.state == "exited" and self.signal is not None else self.state
            return f"{verb} ({how})"
        return self.state

    @classmethod
    def from_wire(cls, record: Any, *, already_ended: bool = False) -> JobInfo:
        try:
            return cls(
                id=str(record["id"]),
                owner=str(record["owner"]),
                owner_role=str(record.get("owner_role") or "user"),
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
                user=str(record.get("user") or ""),
                uid=_optional_int(record.get("uid")),
                host_root=bool(record.get("host_root", False)),
                seccomp=str(record.get("seccomp") or "default"),
                max_runtime=_seconds(record.get("max_runtime")),
                stopped_by=_optional_text(record.get("stopped_by")),
                already_ended=already_ended,
                stdin=bool(record.get("stdin", False)),
                tty=bool(record.get("tty", False)),
                tty_size=_size(record.get("tty_size")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TLSError(f"corrald sent a job of the wrong shape: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        """The names scripts rely on (see the README)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "owner_role": self.owner_role,
            "argv": [_text(arg) for arg in self.argv],
            "state": self.state,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom_killed": self.oom_killed,
            "reason": self.reason,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "limits": self.limits,
            "max_runtime": self.max_runtime,
            "stopped_by": self.stopped_by,
            "user": self.user,
            "uid": self.uid,
            "host_root": self.host_root,
            "seccomp": self.seccomp,
            "stdin": self.stdin,
            "tty": self.tty,
            "usage": {
                "cpu_seconds": self.usage.get("cpu_seconds", 0.0),
                "memory_peak_bytes": self.usage.get("memory_peak_bytes", 0),
                "io_read_bytes": self.usage.get("io_read_bytes", 0),
                "io_write_bytes": self.usage.get("io_write_bytes", 0),
            },
        }


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"max_runtime must be a number, not {type(value).__name__}")
    return float(value)


def _size(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise TypeError("tty_size must be [columns, rows]")
    return int(value[0]), int(value[1])


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"uid must be a whole number, not {type(value).__name__}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)
