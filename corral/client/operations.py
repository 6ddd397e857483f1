"""What the client's operations send and how their replies read, whoever
carries them: the async `Client` (`corral.client.client`) and the blocking
one of the one-shot commands (`corral.client.blocking`) build the same
requests and read the same replies from here. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.client.errors import TLSError
from corral.client.jobs import JobInfo
from corral.identity import Identity

# Credit granted to an output stream: corrald holds at most this much for us.
LOG_WINDOW = 4 << 20


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What `info` reports: the server, who we are to it, and its counts."""

    version: str
    identity: Identity
    cgroup: str
    connections: int
    jobs: int
    followed_jobs: int  # jobs whose output someone is reading now
    running_jobs: int  # jobs starting or running
    raw: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> ServerInfo:
        try:
            identity = value["identity"]
            return cls(
                version=str(value["version"]),
                identity=Identity(name=str(identity["name"]), role=str(identity["role"])),
                cgroup=str(value["cgroup"]),
                connections=int(value["connections"]),
                jobs=int(value["jobs"]),
                followed_jobs=int(value.get("followed_jobs", 0)),
                running_jobs=int(value.get("running_jobs", 0)),
                raw=value,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TLSError(f"corrald sent an info reply of the wrong shape: {exc!r}") from None


def start_args(
    argv: Sequence[str | bytes],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    limits: Mapping[str, int | float] | None = None,
    max_runtime: float | None = None,
    writable: Sequence[str | bytes] = (),
    env_clear: bool = False,
    stdin: bool = False,
    tty: bool = False,
    tty_size: tuple[int, int] | None = None,
    host_root: bool = False,
    seccomp: str | None = None,
) -> dict[str, Any]:
    """The arguments of a `start` request (see `Client.start`): what is
    left at its default is left out."""
    args: dict[str, Any] = {"argv": list(argv), "limits": dict(limits or {})}
    if writable:
        args["writable"] = list(writable)
    if env is not None:
        args["env"] = dict(env)
    if env_clear:
        args["env_clear"] = True
    if cwd is not None:
        args["cwd"] = cwd
    if user is not None:
        args["user"] = user
    if max_runtime is not None:
        args["max_runtime"] = max_runtime
    if stdin:
        args["stdin"] = True
    if tty:
        args["tty"] = True
    if tty_size is not None:
        args["tty_size"] = list(tty_size)
    if host_root:
        args["host_root"] = True
    if seccomp is not None:
        args["seccomp"] = seccomp
    return args


def stop_args(job_id: str, grace: float | None) -> dict[str, Any]:
    args: dict[str, Any] = {"id": job_id}
    if grace is not None:
        args["grace"] = grace
    return args


def stopped_job(reply: dict[str, Any]) -> JobInfo:
    """A stop's reply: the job's final state. A job that had ended before
    the stop came is stopped already: `already_ended` says so (and its state
    says how it ended)."""
    return JobInfo.from_wire(reply["job"], already_ended=bool(reply.get("already_ended")))


def list_page(
    args: dict[str, Any], reply: dict[str, Any]
) -> tuple[list[JobInfo], dict[str, Any] | None]:
    """The jobs in a reply to `list` with `args`, and the arguments of the
    request for the next page (None after the last): a reply holds what
    fits in a frame."""
    records = reply.get("jobs", [])
    jobs = [JobInfo.from_wire(record) for record in records]
    if not reply.get("more") or not records:
        return jobs, None
    return jobs, {**args, "after": [records[-1]["created_at"], records[-1]["id"]]}
