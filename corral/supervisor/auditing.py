"""The audit trail's two ends in the server: what sessions and refused
peers add to it (`AuditObserver`), and the `audit` operation that reads it.

What each entry holds is `corral.supervisor.audit`'s. Here: a start adds
its argv and the terms it got (or, refused, the terms it asked for); a
stream (`logs`, `attach`) adds its bytes each way, and `attach` and
`logs -f` have an entry when they begin too (`outcome` "started"). Pings
are not recorded: they touch nothing, and a shell sends one a minute.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from corral.errors import OperationError
from corral.protocol import End, Error, ErrorCode, Result
from corral.supervisor.audit import AuditLog, entry_matches, line, parse_time, text
from corral.supervisor.operations import arg
from corral.supervisor.policy import authorize
from corral.supervisor.session import Handler, RequestContext, Session, StreamEnd, Traffic
from corral.worker.output import CHUNK

# Not recorded: a keep-alive.
QUIET = frozenset({"ping"})
# What a start's entry keeps of the job it made.
TERMS = ("user", "uid", "limits", "max_runtime", "seccomp", "host_root", "writable")


class AuditObserver:
    """Turns what sessions report (corral.supervisor.session.Observer) into
    audit entries."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def said_hello(self, session: Session) -> None:
        self.audit.record("hello", "ok", **_who(session))

    def request_began(self, context: RequestContext) -> None:
        request = context.request
        if request.op == "attach" or (request.op == "logs" and request.args.get("follow")):
            job = request.args.get("id")
            self.audit.record(request.op, "started", **_who(context.session), **_job(job))

    def request_ended(
        self, context: RequestContext, reply: Result | End | Error, traffic: Traffic
    ) -> None:
        request = context.request
        if request.op in QUIET:
            return
        value: dict[str, Any] = {}
        if isinstance(reply, Error):
            outcome = str(reply.code)
            value = reply.details or {}
        else:
            outcome = "ok"
            value = reply.value if isinstance(reply.value, dict) else {}
        fields = {**_who(context.session), **_job(_job_id(request.args, value))}
        if request.op == "start":
            fields.update(_start(request.args, value))
        if request.op in {"logs", "attach", "audit"}:
            fields.update(bytes_out=traffic.sent, bytes_in=traffic.received)
        self.audit.record(request.op, outcome, **fields)

    def handshake_refused(self, address: str, reason: str, why: str) -> None:
        """A peer the TLS layer refused (or that never finished)."""
        self.audit.record("handshake", reason, peer=address, reason=why)

    def connection_refused(
        self, address: str, code: str, why: str, name: str | None = None, role: str | None = None
    ) -> None:
        """A peer refused after the handshake: no identity, or over a cap."""
        who = {"name": name, "role": role} if name is not None else {}
        self.audit.record("connect", code, **who, peer=address, reason=why)

    async def read(self, context: RequestContext) -> StreamEnd:
        """The `audit` operation (admins): the entries from `since` (RFC
        3339), of `user` if given, as JSON lines on the request's stream;
        with `follow`, then every new one until the client cancels."""
        authorize(context.identity, "audit")
        args = context.request.args
        since = arg(args, "since", str)
        name = arg(args, "user", str)
        start = None
        if since is not None:
            try:
                start = parse_time(since)
            except ValueError:
                raise OperationError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"since: {since!r} is not a time (RFC 3339, e.g. 2026-12-04T10:00:00Z)",
                ) from None
        follow = arg(args, "follow", bool, False)
        sent = 0
        with self.audit.follow() if follow else contextlib.nullcontext() as live:
            lines = await self.audit.entries(since=since, name=name)
            seen = set(lines[-FOLLOW_OVERLAP:])  # what the live channel may repeat
            sent = await _send_lines(context, lines, 0)
            if live is not None:
                count = len(lines)
                async for entry in live:
                    if not entry_matches(entry, start, name):
                        continue
                    written = line(entry)
                    if written in seen:
                        continue
                    sent = await _send_lines(context, [written], sent)
                    count += 1
                raise OperationError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"the audit trail went on faster than this follower read it ({count} "
                    "entries sent); follow again with --since to catch up",
                )
        return StreamEnd({"entries": len(lines)})

    def handlers(self) -> dict[str, Handler]:
        return {"audit": self.read}


# A follower reads the file, then what was recorded since it began to
# follow: the last lines of the file may be among those.
FOLLOW_OVERLAP = 4096


async def _send_lines(context: RequestContext, lines: list[bytes], offset: int) -> int:
    """Send `lines` within the client's credit, from `offset`; the offset reached."""
    pending = memoryview(b"".join(lines))
    while pending:
        credit = await context.wait_credit()
        piece = bytes(pending[: min(credit, CHUNK)])
        await context.send_data(offset, piece)
        offset += len(piece)
        pending = pending[len(piece) :]
        await trio.lowlevel.checkpoint()
    return offset


def _who(session: Session) -> dict[str, Any]:
    return {"name": session.identity.name, "role": session.identity.role, "peer": session.address}


def _job(job_id: object) -> dict[str, Any]:
    return {"job": job_id} if isinstance(job_id, str) and job_id else {}


def _job_id(args: dict[str, Any], value: dict[str, Any]) -> object:
    """The whole id of the job a request named or made: the reply's, else
    a failed start's (its error details), else the id (or prefix) asked."""
    record = value.get("job")
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        return record["id"]
    if isinstance(record, str):
        return record
    return value.get("id") or args.get("id")


def _start(args: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """What a start asked for, and the terms its job got (if it got a job)."""
    argv = args.get("argv")
    fields: dict[str, Any] = {
        "argv": [text(a) for a in argv if isinstance(a, bytes | str)]
        if isinstance(argv, list)
        else None
    }
    record = value.get("job")
    if isinstance(record, dict):
        fields.update({name: record.get(name) for name in TERMS})
        fields["writable"] = [text(path) for path in record.get("writable") or []]
    else:  # refused: what it asked
        asked = {name: args.get(name) for name in ("user", "limits", "max_runtime", "seccomp")}
        fields.update({name: value for name, value in asked.items() if value is not None})
    return fields


__all__ = ["FOLLOW_OVERLAP", "QUIET", "AuditObserver"]
