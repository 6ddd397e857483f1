"""What each `corral` command does from trio: a small async function
taking the connected client, the parsed arguments and an output, returning
the exit status. The shell runs every command here; the CLI runs here those
that `corral.client.oneshot` does not run without trio. What they print is
`corral.client.reports`'s. Errors are `CorralError`s (see
`corral.client.errors`); `corral.client.cli` turns them into one line on
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from corral import pki
from corral.client.asciicast import DEFAULT_SIZE, AsciicastWriter
from corral.client.client import Client, connect
from corral.client.errors import (
    EXIT_UNAVAILABLE,
    ConfigError,
    ConnectError,
    CorralError,
    ServerError,
)
from corral.client.follow import Follower
from corral.client.interactive import attached, detached_note
from corral.client.jobs import JobInfo
from corral.client.output import JobOutput, OutputClosed, is_connection_loss, note
from corral.client.reports import (
    audit_line,
    audit_since,
    exit_status,
    is_json,
    json_line,
    naming_its_job,
    print_json,
    show_info,
    show_ps,
    show_started,
    show_status,
    start_failure,
    start_options,
)
from corral.client.settings import connect_args
from corral.client.terminal import DEFAULT_DETACH_KEYS, parse_detach_keys, window_size


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the command `args` names in trio (connected, if it talks to
    corrald); its exit status."""
    return trio.run(_run_command, args, out)


async def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    try:
        if not getattr(args, "connects", True):
            return int(await args.run(args, out))
        async with connect(**connect_args(args)) as client:
            return int(await args.run(client, args, out))
    except* (CorralError, OutputClosed) as group:
        # A command's tasks (run's follow and its Ctrl+C watcher) fail as a
        # group; the person wants the one line of the first failure.
        raise _first(group) from None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


async def cmd_info(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return show_info(await client.info(), client.address, args, out)


async def _start(client: Client, args: argparse.Namespace) -> JobInfo:
    tty_size = _terminal_size() if args.tty else None
    try:
        return await client.start(**start_options(args), tty_size=tty_size)
    except ServerError as exc:
        named = naming_its_job(exc)
        if named is exc:
            raise
        raise named from None


def _terminal_size() -> tuple[int, int] | None:
    """Our terminal's size (stdin's, else stdout's), for a job's own; None without one."""
    return window_size(0) or window_size(1)


async def cmd_start(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return show_started(await _start(client, args), args, out)


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
        return start_failure(exc)
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
    return exit_status(session.job)


async def _run_job(
    client: Client, args: argparse.Namespace, out: TextIO, interrupts: AsyncIterator[object]
) -> int:
    output = JobOutput(args, out)
    try:
        job = await _start(client, args)
    except ServerError as exc:
        return start_failure(exc)
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
    return exit_status(follow.job, stopped_by_us=interrupted.is_set())


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
    return exit_status(session.job, stopped_by_us=interrupted.is_set())


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
    if is_json(args):
        shown = [job.to_json() | {"already_ended": job.already_ended} for job in stopped]
        if len(args.ids) == 1:
            if shown:
                print_json(shown[0], out)
        else:
            print_json(shown, out)
        return status
    for job in stopped:
        if job.already_ended:
            out.write(f"{job.short_id} had already ended: {job.reason}\n")
        else:
            out.write(f"{job.short_id} {job.state}: {job.reason}\n")
    return status


async def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return show_status(await client.status(args.id), args, out)


async def cmd_ps(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return show_ps(await client.list(everyone=args.all), args, out)


async def cmd_rm(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.finished:
        ids = [job.id for job in await client.list(everyone=args.all) if job.finished]
    else:
        ids = args.ids
    removed, status = await _each(ids, client.remove)
    if is_json(args):
        print_json({"id": removed[0]} if len(args.ids) == 1 and removed else removed, out)
    else:
        out.writelines(f"{job_id}\n" for job_id in removed)
    if args.finished:
        note(f"removed {len(removed)} finished job{'' if len(removed) == 1 else 's'}")
    return status


async def cmd_audit(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """The audit trail (admins): one line per entry, or with --json the
    entries as corrald wrote them, one JSON object a line."""
    since = audit_since(args.since) if args.since else None
    async with client.audit(since=since, user=args.user, follow=args.follow) as trail:
        async for entry in trail.entries():
            out.write(json_line(entry) if is_json(args) else audit_line(entry))
            out.flush()
    return 0


async def cmd_certs_renew(args: argparse.Namespace, out: TextIO) -> int:
    try:
        if args.server:
            path = pki.renew_server(args.pki)
            out.write(f"renewed corrald's certificate and key: {path}\n")
        else:
            path = pki.renew_client(args.pki, args.name)
            out.write(f"renewed identity {args.name} in {path}\n")
    except pki.PKIError as exc:
        raise ConfigError(str(exc)) from None
    note(
        f"valid {pki.LEAF_LIFETIME.days} days from now; send corrald SIGHUP to use a new server one"
    )
    return 0


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
