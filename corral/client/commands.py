"""What each `corral` command does: a small async function taking the
connected client, the parsed arguments and an output, returning the exit
status. Errors are `CorralError`s (see `corral.client.errors`); `corral.client.cli`
turns them into one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from corral import pki
from corral.client.asciicast import DEFAULT_SIZE, AsciicastWriter
from corral.client.client import Client, ServerInfo
from corral.client.errors import EXIT_UNAVAILABLE, ConfigError, ConnectError, ServerError
from corral.client.follow import Follower, JobOutput, OutputClosed, is_connection_loss, note
from corral.client.interactive import attached, detached_note
from corral.client.jobs import JobInfo
from corral.client.terminal import DEFAULT_DETACH_KEYS, parse_detach_keys, window_size
from corral.units import format_age, format_size, rfc3339, short_duration, short_size

EXIT_PIPE = 128 + signal.SIGPIPE  # a reader that went away, as a shell reports it


def _print_json(value: Any, out: TextIO) -> None:
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


_OOM_NOT_PINNED = "1000, not a floor: corrald lacks CAP_SYS_RESOURCE, a job may lower its own"


async def cmd_info(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info: ServerInfo = await client.info()
    if _json(args):
        _print_json(info.raw, out)
        return 0
    rows = [
        ("server", f"corrald {info.version} at {client.address}"),
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
    _print_rows(rows, out)
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


async def _start(client: Client, args: argparse.Namespace) -> JobInfo:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv  # not empty: see parser
    limits = {
        name.removeprefix("limit_"): value
        for name, value in vars(args).items()
        if name.startswith("limit_") and value is not None
    }
    env = dict(args.env) if args.env else None
    if args.tty and "TERM" in os.environ and not (env and "TERM" in env):
        env = {**(env or {}), "TERM": os.environ["TERM"]}  # the job's terminal is like ours
    try:
        return await client.start(
            [os.fsencode(arg) for arg in argv],
            env=env,
            env_clear=args.env_clear,
            cwd=args.cwd,
            user=args.user,
            host_root=args.host_root,
            seccomp=args.seccomp,
            limits=limits,
            max_runtime=args.timeout,
            writable=[os.fsencode(path) for path in args.rw],
            stdin=args.stdin,
            tty=args.tty,
            tty_size=_terminal_size() if args.tty else None,
        )
    except ServerError as exc:
        failed = exc.details.get("job")
        if not isinstance(failed, str):
            raise
        # The job was recorded before it failed: its row is there; say which.
        message = f"{exc} (job {failed[:12]}, recorded as failed; `corral rm {failed[:12]}`)"
        raise ServerError(exc.code, message, exc.details) from None


def _terminal_size() -> tuple[int, int] | None:
    """Our terminal's size (stdin's, else stdout's), for a job's own; None without one."""
    return window_size(0) or window_size(1)


async def cmd_start(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = await _start(client, args)
    if _json(args):
        _print_json({"id": job.id}, out)
    else:
        out.write(f"{job.id}\n")
    return 0


async def cmd_logs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.asciicast:
        return await _asciicast(client, args, out)
    follow = Follower(client, args, JobOutput(args, out), args.id)
    await follow.run(follow=args.follow)
    return 0


async def _asciicast(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """The job's output as an asciicast v2 recording (its terminal's size
    comes from the log's first record for a terminal job)."""
    job = await client.status(args.id)
    recording = AsciicastWriter(
        out,
        size=job.tty_size or DEFAULT_SIZE,
        start_ns=job.started_at,
        command=job.command,
        term=os.environ.get("TERM"),
    )
    try:
        async with client.logs(job.id, follow=args.follow, offset=args.since_offset) as stream:
            async for record in stream:
                recording.feed([record])
        recording.close()
    except BrokenPipeError:
        raise OutputClosed from None
    return 0


async def cmd_run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Start, follow to the end, exit with the job's status. Interrupts (Ctrl+C,
    or what `args.interrupts` yields in the shell) stop the job; with -it,
    the keys are the job's."""
    if args.stdin and args.tty:
        return await _run_in_terminal(client, args, out)
    interrupts: AsyncIterator[object] | None = getattr(args, "interrupts", None)
    if interrupts is not None:
        return await _run_job(client, args, out, interrupts)
    # From here Ctrl+C is the job's: one pressed while it starts stops it
    # once it has (trio keeps the signal for the receiver).
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        return await _run_job(client, args, out, signals)


async def _run_in_terminal(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """`run -it`: start the job with a terminal and drive it from ours (raw)
    until it ends (its status) or we detach (0)."""
    try:
        job = await _start(client, args)
    except ServerError as exc:
        return _start_failure(exc)
    return await _attached(client, args, out, job, offset=0, eof_on_disconnect=False)


async def cmd_attach(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Attach to a running job: its output from now (or --since-offset),
    our input to it; the job's status once it ends, 0 after a detach."""
    job = await client.status(args.id)
    return await _attached(client, args, out, job, offset=args.since_offset)


async def _attached(
    client: Client,
    args: argparse.Namespace,
    out: TextIO,
    job: JobInfo,
    *,
    offset: int | None,
    eof_on_disconnect: bool = False,
) -> int:
    """Drive an attachment to `job` until it ends, we detach, or a signal;
    the exit status that says which. A terminal job from a terminal is
    driven raw, with the detach keys; otherwise Ctrl+C detaches."""
    terminal = job.tty and os.isatty(0)
    detach_keys = parse_detach_keys(getattr(args, "detach_keys", DEFAULT_DETACH_KEYS))
    attachment = client.attach(job.id, offset=offset, eof_on_disconnect=eof_on_disconnect)
    try:
        async with attachment:
            session = await attached(
                attachment,
                JobOutput(args, out),
                terminal=terminal,
                detach_keys=detach_keys,
                resizes=getattr(args, "resizes", None),
                # Signal handlers are the main thread's: the shell's trio runs in another.
                signals=threading.current_thread() is threading.main_thread(),
            )
    except (ConnectError, ServerError) as exc:
        if not is_connection_loss(exc):
            raise
        note(
            f"{exc}; job {job.short_id} keeps running (`corral attach {job.short_id}` "
            "returns to it)"
        )
        return EXIT_UNAVAILABLE
    if session.signal is not None:
        note(f"{signal.Signals(session.signal).name}: detached; job {job.short_id} runs on")
        return 128 + session.signal
    if session.job is None:  # detached
        detached_note(job.id)
        return 0
    return _exit_status(session.job)


async def _run_job(
    client: Client, args: argparse.Namespace, out: TextIO, interrupts: AsyncIterator[object]
) -> int:
    output = JobOutput(args, out)
    try:
        job = await _start(client, args)
    except ServerError as exc:
        return _start_failure(exc)
    if args.stdin:  # -i: our stdin is the job's, our going away its EOF
        return await _run_with_input(client, args, out, job, interrupts)
    follow = Follower(client, args, output, job.id)
    interrupted = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _stop_on_interrupt, lambda: follow.client, job.id, args.grace, interrupts, interrupted
        )
        try:
            await follow.run(follow=True)
        except OutputClosed:
            # Nobody reads the job's output any more: stop it, as Ctrl+C
            # would, then end quietly (see cli.run).
            with trio.CancelScope(shield=True):
                await _stop(follow.client, job.id, args.grace)
            raise
        nursery.cancel_scope.cancel()
    assert follow.job is not None
    return _exit_status(follow.job, stopped_by_us=interrupted.is_set())


async def _run_with_input(
    client: Client,
    args: argparse.Namespace,
    out: TextIO,
    job: JobInfo,
    interrupts: AsyncIterator[object],
) -> int:
    """`run -i`: our stdin to the job (EOF is its EOF; our connection lost
    too), its output to ours from the first byte, its status at the end.
    Ctrl+C stops it, as without -i."""
    interrupted = trio.Event()
    attachment = client.attach(job.id, offset=0, eof_on_disconnect=True)
    try:
        async with attachment, trio.open_nursery() as nursery:
            nursery.start_soon(
                _stop_on_interrupt, lambda: client, job.id, args.grace, interrupts, interrupted
            )
            try:
                session = await attached(
                    attachment, JobOutput(args, out), terminal=False, detach_keys=b"",
                    signals=False,
                )  # fmt: skip
            except OutputClosed:
                with trio.CancelScope(shield=True):
                    await _stop(client, job.id, args.grace)
                raise
            nursery.cancel_scope.cancel()
    except (ConnectError, ServerError) as exc:
        if not is_connection_loss(exc):
            raise
        note(f"{exc}; job {job.short_id} keeps running (`corral attach {job.short_id}`)")
        return EXIT_UNAVAILABLE
    assert session.job is not None
    return _exit_status(session.job, stopped_by_us=interrupted.is_set())


async def _stop_on_interrupt(
    connection: Callable[[], Client],
    job_id: str,
    grace: float | None,
    interrupts: AsyncIterator[object],
    interrupted: trio.Event,
) -> None:
    """Ctrl+C stops the job, like ssh's remote end: first with its grace, then at
    once (on the connection `connection()` gives now: a follow may reconnect)."""
    presses = 0
    async with trio.open_nursery() as nursery:
        async for _ in interrupts:
            presses += 1
            interrupted.set()
            if presses == 1:
                note(f"stopping job {job_id[:12]} (Ctrl+C again to kill it now)")
                nursery.start_soon(_stop, connection(), job_id, grace)
            else:
                note(f"killing job {job_id[:12]}")
                nursery.start_soon(_stop, connection(), job_id, 0.0)


async def _stop(client: Client, job_id: str, grace: float | None) -> None:
    # The job may have ended meanwhile, or the connection gone: the
    # stream's end (or its loss) tells the rest.
    with contextlib.suppress(ServerError, ConnectError):
        await client.stop(job_id, grace)


def _start_failure(exc: ServerError) -> int:
    """A job that could not start, in a shell's words: 127 not found, 126 not runnable."""
    note(f"error: {exc}")
    # corrald says which step of the start failed, and the errno (details).
    if exc.details.get("step") == "exec":
        return 127 if exc.details.get("errno") == errno.ENOENT else 126
    return int(exc.exit_status)


def _exit_status(job: JobInfo, *, stopped_by_us: bool = False) -> int:
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


async def _each(
    ids: Sequence[str], action: Callable[[str], Awaitable[JobInfo | str]]
) -> tuple[list[JobInfo | str], int]:
    """`action` on every id at once; the results in the order of the ids
    (each failure said on stderr as it happens) and the status of the last
    failure, or 0."""
    results: dict[int, JobInfo | str] = {}
    failures: dict[int, int] = {}

    async def one(index: int, job_id: str) -> None:
        try:
            results[index] = await action(job_id)
        except ServerError as exc:
            note(f"error: {exc}")
            failures[index] = int(exc.exit_status)

    async with trio.open_nursery() as nursery:
        for index, job_id in enumerate(ids):
            nursery.start_soon(one, index, job_id)
    status = failures[max(failures)] if failures else 0
    return [results[i] for i in sorted(results)], status


async def cmd_stop(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    jobs, status = await _each(args.ids, lambda job_id: client.stop(job_id, args.grace))
    stopped = [job for job in jobs if isinstance(job, JobInfo)]
    if _json(args):
        shown = [job.to_json() | {"already_ended": job.already_ended} for job in stopped]
        if len(args.ids) == 1:
            if shown:
                _print_json(shown[0], out)
        else:
            _print_json(shown, out)
        return status
    for job in stopped:
        if job.already_ended:
            out.write(f"{job.short_id} had already ended: {job.reason}\n")
        else:
            out.write(f"{job.short_id} {job.state}: {job.reason}\n")
    return status


async def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = await client.status(args.id)
    if _json(args):
        _print_json(job.to_json(), out)
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
    _print_rows(rows, out)
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


async def cmd_ps(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    jobs = _selected(await client.list(everyone=args.all), args)
    if args.quiet:
        out.writelines(f"{job.id if _json(args) else job.short_id}\n" for job in jobs)
        return 0
    if _json(args):
        _print_json([job.to_json() for job in jobs], out)
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


async def cmd_rm(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.finished:
        ids = [job.id for job in await client.list(everyone=args.all) if job.finished]
    else:
        ids = args.ids
    removed, status = await _each(ids, client.remove)
    if _json(args):
        _print_json({"id": removed[0]} if len(args.ids) == 1 and removed else removed, out)
    else:
        out.writelines(f"{job_id}\n" for job_id in removed)
    if args.finished:
        note(f"removed {len(removed)} finished job{'' if len(removed) == 1 else 's'}")
    return status


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _print_rows(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        out.write(f"{label + ':':<{width}} {value}\n")


async def cmd_certs_init(args: argparse.Namespace, out: TextIO) -> int:
    directory: Path = args.directory
    try:
        pki.init_pki(directory, args.server_names, force=args.force)
    except pki.PKIError as exc:
        raise ConfigError(str(exc)) from None
    out.write(f"wrote a CA, a server certificate and clients {_default_clients()} in {directory}\n")
    return 0


async def cmd_certs_issue(args: argparse.Namespace, out: TextIO) -> int:
    try:
        path = pki.issue_client(args.pki, args.name, args.role, force=args.force)
    except pki.PKIError as exc:
        raise ConfigError(str(exc)) from None
    out.write(f"wrote identity {args.name} ({args.role}) in {path}\n")
    return 0


def _default_clients() -> str:
    return ", ".join(name for name, _ in pki.DEFAULT_CLIENTS)
