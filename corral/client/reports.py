"""What the commands print, and the statuses they exit with: `info`'s and
`status`'s rows, `ps`'s table, their JSON, a job's end as a shell reports
a command's. Shared by the async commands (`corral.client.commands`, the
shell's too) and the blocking one-shots (`corral.client.oneshot`), so both
print the same; nothing here does I/O but writing to `out` and stderr.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, TextIO

from corral.address import Address
from corral.client.errors import ServerError, UsageError
from corral.client.jobs import JobInfo
from corral.client.operations import ServerInfo
from corral.client.output import note
from corral.units import format_age, format_size, rfc3339, short_duration, short_size


def is_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_json(value: Any, out: TextIO) -> None:
    import json  # noqa: PLC0415 - only --json needs it: a one-shot command's milliseconds

    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def print_rows(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        out.write(f"{label + ':':<{width}} {value}\n")


_OOM_NOT_PINNED = "1000, not a floor: corrald lacks CAP_SYS_RESOURCE, a job may lower its own"


def show_info(info: ServerInfo, address: Address, args: argparse.Namespace, out: TextIO) -> int:
    if is_json(args):
        print_json(info.raw, out)
        return 0
    rows = [
        ("server", f"corrald {info.version} at {address}"),
        ("you", f"{info.identity.name} ({info.identity.role})"),
        ("cgroup", info.cgroup),
        ("connections", str(info.connections)),
        ("jobs", f"{info.jobs} ({info.running_jobs} running)"),
    ]
    most, per_user = info.raw.get("max_jobs"), info.raw.get("max_jobs_per_user")
    if most is not None or per_user is not None:
        rows.append(("max running", f"{most or 'any'} jobs, {per_user or 'any'} per user"))
    uids = info.raw.get("uids")
    if isinstance(uids, dict):
        start, count = uids.get("start"), uids.get("count")
        rows.append(("job uids", f"{uids.get('in_use')} of {count} in use ({start}:{count})"))
    pinned = info.raw.get("oom_score_pinned")
    if pinned is not None:
        rows.append(("job oom score", "1000, a floor" if pinned else _OOM_NOT_PINNED))
    lag = info.raw.get("loop_lag")
    if isinstance(lag, dict):
        rows.append(
            (
                "loop lag",
                f"{lag.get('last_ms', 0):g} ms now, {lag.get('max_recent_ms', 0):g} ms at most "
                f"in the last minute, {lag.get('max_ms', 0):g} ms ever "
                f"({lag.get('max_own_ms', 0):g} ms not waiting for a CPU)",
            )
        )
    policy = info.raw.get("policy")
    if isinstance(policy, dict):
        rows += [
            ("jobs run as", _runs_as_text(policy)),
            ("default limits", _limits_text(policy.get("defaults"))),
            ("your caps", _limits_text(policy.get("caps"))),
            ("your quota", _limits_text(policy.get("quota"))),
            ("writable", ", ".join(map(str, policy.get("writable") or [])) or "nowhere"),
        ]
    print_rows(rows, out)
    return 0


def _runs_as_text(policy: dict[str, Any]) -> str:
    user = str(policy.get("default_user", "?"))
    text = "a uid of their own (dynamic)" if user == "dynamic" else user
    if policy.get("host_root"):
        text += "; --host-root allowed"
    return text


SIZE_LIMITS = frozenset({"memory", "io_read_bps", "io_write_bps"})


def _limits_text(limits: object, max_runtime: float | None = None) -> str:
    """{"memory": 268435456, "cpu": 1} -> 'cpu 1, memory 256M' (sizes and
    durations as they are typed)."""
    shown = []
    for name, value in sorted(limits.items()) if isinstance(limits, dict) else ():
        if name in SIZE_LIMITS and isinstance(value, int):
            text = short_size(value) + ("/s" if name.startswith("io_") else "")
        elif name == "max_runtime" and isinstance(value, int | float):
            text = short_duration(value)
        else:
            text = str(value)
        shown.append(f"{name} {text}")
    if max_runtime is not None:
        shown.append(f"timeout {short_duration(max_runtime)}")
    return ", ".join(shown) or "none"


def start_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `Client.start` for `start`'s and `run`'s
    options, but for the terminal's size (the caller's, with -t)."""
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv  # not empty: see parser
    limits = {
        name.removeprefix("limit_"): value
        for name, value in vars(args).items()
        if name.startswith("limit_") and value is not None
    }
    env = dict(args.env) if args.env else None
    if args.tty and "TERM" in os.environ and not (env and "TERM" in env):
        env = {**(env or {}), "TERM": os.environ["TERM"]}  # the job's terminal is like ours
    return {
        "argv": [os.fsencode(arg) for arg in argv],
        "env": env,
        "env_clear": args.env_clear,
        "cwd": args.cwd,
        "user": args.user,
        "host_root": args.host_root,
        "seccomp": args.seccomp,
        "limits": limits,
        "max_runtime": args.timeout,
        "writable": [os.fsencode(path) for path in args.rw],
        "stdin": args.stdin,
        "tty": args.tty,
    }


def naming_its_job(exc: ServerError) -> ServerError:
    """A refused start's error; naming the job when it was recorded before
    it failed (its row is there: say which)."""
    failed = exc.details.get("job")
    if not isinstance(failed, str):
        return exc
    message = f"{exc} (job {failed[:12]}, recorded as failed; `corral rm {failed[:12]}`)"
    return ServerError(exc.code, message, exc.details)


def show_started(job: JobInfo, args: argparse.Namespace, out: TextIO) -> int:
    if is_json(args):
        print_json({"id": job.id}, out)
    else:
        out.write(f"{job.id}\n")
    return 0


def start_failure(exc: ServerError) -> int:
    """A job that could not start, in a shell's words: 127 not found, 126 not runnable."""
    note(f"error: {exc}")
    # corrald says which step of the start failed, and the errno (details).
    if exc.details.get("step") == "exec":
        return 127 if exc.details.get("errno") == errno.ENOENT else 126
    return int(exc.exit_status)


def exit_status(job: JobInfo, *, stopped_by_us: bool = False) -> int:
    """The job's end as a shell reports a command's: its code, or 128+N for
    signal N; on stderr, why, when the job did not end on its own."""
    if job.oom_killed:
        limit = job.limits.get("memory")
        within = f" (memory limit {short_size(limit)})" if isinstance(limit, int) else ""
        note(f"job {job.short_id} was killed: out of memory{within}")
    elif job.timed_out:
        timeout = short_duration(job.max_runtime) if job.max_runtime is not None else "?"
        note(f"job {job.short_id} was stopped: it reached its timeout ({timeout})")
    elif job.state == "stopped" and not stopped_by_us:
        note(f"job {job.short_id} was {job.reason}")
    elif job.state in {"lost", "failed"}:
        note(f"job {job.short_id} {job.state}: {job.reason}")
    if job.exit_code is not None:
        return job.exit_code
    if job.signal is not None:
        try:
            return 128 + signal.Signals[job.signal].value
        except KeyError:
            return 128 + int(job.signal.removeprefix("signal "))
    return 1


def show_status(job: JobInfo, args: argparse.Namespace, out: TextIO) -> int:
    if is_json(args):
        print_json(job.to_json(), out)
        return 0
    usage = job.usage
    rows = [
        ("id", job.id),
        ("owner", f"{job.owner} ({job.owner_role})"),
        ("user", job.runs_as),
        ("seccomp", job.seccomp),
        ("command", job.command),
        ("state", job.outcome if job.finished else job.state),
        ("reason", job.reason),
        ("created", rfc3339(job.created_at) or "-"),
        ("started", rfc3339(job.started_at) or "-"),
        ("finished", rfc3339(job.finished_at) or "-"),
        ("limits", _limits_text(job.limits)),
        ("timeout", short_duration(job.max_runtime) if job.max_runtime is not None else "none"),
        ("cpu", f"{usage.get('cpu_seconds', 0.0):.2f} s"),
        ("memory peak", format_size(int(usage.get("memory_peak_bytes", 0)))),
        ("io", f"{format_size(int(usage.get('io_read_bytes', 0)))} read, "
               f"{format_size(int(usage.get('io_write_bytes', 0)))} written"),
    ]  # fmt: skip
    print_rows(rows, out)
    return 0


def _selected(jobs: list[JobInfo], args: argparse.Namespace) -> list[JobInfo]:
    """`ps`'s jobs: newest first, in the states asked for, at most --last."""
    states = set(args.state or ())
    chosen = [
        job
        for job in reversed(jobs)  # corrald lists them oldest first
        if not states or job.state in states or ("finished" in states and job.finished)
    ]
    return chosen if args.last is None else chosen[: args.last]


def show_ps(jobs: list[JobInfo], args: argparse.Namespace, out: TextIO) -> int:
    jobs = _selected(jobs, args)
    if args.quiet:
        out.writelines(f"{job.id if is_json(args) else job.short_id}\n" for job in jobs)
        return 0
    if is_json(args):
        print_json([job.to_json() for job in jobs], out)
        return 0
    now = time.time_ns()
    table = [("ID", "OWNER", "STATE", "AGE", "COMMAND")]
    for job in jobs:
        age = format_age((now - (job.created_at or now)) / 1e9)
        table.append((job.short_id, job.owner, job.outcome, age, job.command))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[4]]).rstrip() + "\n")
    return 0


def audit_since(text: str) -> str:
    """`--since` as corrald takes it: an RFC 3339 time as given, or a
    duration (`10m`, `2h`, `1d`) meaning that long ago."""
    import datetime  # noqa: PLC0415 - audit alone needs it

    from corral.units import parse_duration  # noqa: PLC0415

    try:
        ago = parse_duration(text)
    except ValueError:
        try:
            datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--since: {text!r} is neither a time (2026-12-04T10:00:00Z) nor a "
                "duration (10m, 2h, 1d)"
            ) from None
        return text
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)
    return then.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(entry: dict[str, Any]) -> str:
    import json  # noqa: PLC0415

    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


def audit_line(entry: dict[str, Any]) -> str:
    """An audit entry on one line: time, who (and from where), what, which
    job, how it went, and what the operation adds."""
    who = f"{entry['name']} ({entry.get('role')})" if entry.get("name") else "-"
    job = str(entry.get("job") or "-")[:12]
    extra = []
    if isinstance(entry.get("argv"), list):
        extra.append(" ".join(map(str, entry["argv"])))
    for name in ("bytes_out", "bytes_in", "reason", "lost"):
        if entry.get(name) is not None:
            extra.append(f"{name}={entry[name]}")
    line = (
        f"{entry.get('time', '?')}  {who}  {entry.get('peer', '-')}  {entry.get('op', '?')}  "
        f"{job}  {entry.get('outcome', '?')}"
    )
    return (f"{line}  {' '.join(extra)}" if extra else line).translate(_CONTROLS) + "\n"


# Control characters in what a user typed (an argv) are shown escaped: a
# line stays one line.
_CONTROLS = {code: f"\\x{code:02x}" for code in range(32)}
