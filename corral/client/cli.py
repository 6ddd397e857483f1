"""`corral`: the command-line client.

Every command is a small async function taking the parsed arguments and an
output; errors are `CorralError`s, turned into one line on stderr and the
exit status their class names (see `corral.client.errors` and the README).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

import corral
from corral import pki
from corral.client.client import CONNECT_TIMEOUT, Client, LogStream, ServerInfo, connect
from corral.client.errors import (
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ConfigError,
    ConnectError,
    CorralError,
    ServerError,
)
from corral.client.jobs import JobInfo
from corral.client.units import format_age, format_size, parse_duration, parse_size, rfc3339
from corral.job import STREAM_STDERR, STREAM_STDOUT, Record, RecordDecoder
from corral.protocol import ErrorCode

DEFAULT_ADDR = "127.0.0.1:7443"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# A follower exists to see the whole output: a corrald restarting (an
# upgrade with --keep-jobs, a crash) should not cut it. A minute covers a
# restart; longer is a flag away.
RECONNECT_FOR = 60.0
RECONNECT_BACKOFF = 2.0  # seconds between tries, at most

EPILOG = f"""\
environment:
  CORRAL_ADDR       address of corrald when --addr is not given (default {DEFAULT_ADDR})
  CORRAL_IDENTITY   identity directory when --identity is not given

exit statuses:
  0    success
  1    corrald answered with an error
  {EXIT_USAGE}    the command line is wrong
  {EXIT_UNAVAILABLE}   corrald cannot be reached, or the connection was lost
  76   TLS failed: the server could not be verified, or protocol versions differ
  {EXIT_NOPERM}   corrald refused our certificate, or the operation
  {EXIT_CONFIG}   a local setting is wrong: address, identity directory, PKI files
  130  interrupted
  `corral run` exits with the job's own status instead: its exit code, 128+N
  when signal N killed it, 127 command not found, 126 command not runnable

examples:
  export CORRAL_ADDR=127.0.0.1:7443 CORRAL_IDENTITY=var/pki/clients/admin
  corral info
  corral run -- sh -c 'echo hello; exit 3'
  corral logs -f 3f2a9c
  corral --addr unix:var/corrald.sock --json info
  corral certs init /etc/corral/pki --server-name corral.example.com
  corral certs issue --pki /etc/corral/pki carol --role user
"""


class UsageError(CorralError):
    """The command line is wrong in a way argparse cannot see."""

    exit_status = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors look like ours: `corral: error: ...`, status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"corral: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value


def _connection_options() -> _Parser:
    """Options every talking command accepts, before or after its name."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("connection")
    # SUPPRESS keeps a subcommand's unset option from hiding the global one.
    group.add_argument(
        "--addr",
        default=argparse.SUPPRESS,
        metavar="ADDR",
        help="corrald's address: HOST:PORT, [IPV6]:PORT or unix:PATH",
    )
    group.add_argument(
        "--identity",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="directory with ca.crt, client.crt and client.key",
    )
    group.add_argument(
        "--server-name",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="name to verify in corrald's certificate (default: the address's host)",
    )
    group.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"give up connecting after this long (default {CONNECT_TIMEOUT:g})",
    )
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return parent


def build_parser() -> argparse.ArgumentParser:
    connection = _connection_options()
    parser = _Parser(
        prog="corral",
        description="Run and watch isolated jobs on a corrald host, over mutual TLS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection],
    )
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        parents=[connection],
        help="show corrald's version, who you are to it, and its counts",
        description="Show corrald's version, your identity as it sees you, "
        "the cgroup flavour it runs jobs with, and its counts.",
        epilog="example:\n  corral --addr 127.0.0.1:7443 --identity var/pki/clients/admin info",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.set_defaults(run=cmd_info)

    _job_commands(commands, connection)

    certs = commands.add_parser(
        "certs",
        help="create a development PKI and client identities",
        description="Create a CA, corrald's certificate and client identities.",
        epilog="example:\n  corral certs init var/pki && "
        "corral certs issue --pki var/pki carol --role user",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    certs_commands = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = certs_commands.add_parser(
        "init",
        help="create a CA, a server certificate and the admin, alice and bob identities",
        description="Create DIR/ca.{crt,key}, DIR/server.{crt,key} and client identities "
        "DIR/clients/{admin,alice,bob}. The server certificate names localhost, "
        "127.0.0.1, ::1 and every --server-name.",
        epilog="example:\n  corral certs init /etc/corral/pki --server-name corral.example.com",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        dest="server_names",
        help="another DNS name or IP address for the server certificate (repeatable)",
    )
    init.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    init.set_defaults(run=cmd_certs_init, connects=False)

    issue = certs_commands.add_parser(
        "issue",
        help="issue another client identity",
        description="Issue a client identity DIR/clients/NAME signed by the CA in DIR.",
        epilog="example:\n  corral certs issue --pki /etc/corral/pki carol --role user",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    issue.add_argument("--pki", type=Path, required=True, metavar="DIR", help="the PKI directory")
    issue.add_argument("name", metavar="NAME", help="the client's name (its certificate's CN)")
    issue.add_argument("--role", required=True, choices=pki.ROLES, help="the client's role")
    issue.add_argument("--force", action="store_true", help="replace an existing identity")
    issue.set_defaults(run=cmd_certs_issue, connects=False)
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _cores(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of cores: {text!r}") from None


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


# (flag, wire name, parser, help)
LIMIT_FLAGS = [
    ("--cpu", "cpu", _cores, "CPU in cores, e.g. 0.5"),
    ("--memory", "memory", _size, "memory, e.g. 256M (swap is off for jobs)"),
    ("--io-read", "io_read_bps", _size, "disk reads per second, e.g. 10M"),
    ("--io-write", "io_write_bps", _size, "disk writes per second, e.g. 10M"),
    ("--io-read-iops", "io_read_iops", _count, "disk read operations per second"),
    ("--io-write-iops", "io_write_iops", _count, "disk write operations per second"),
    ("--pids", "pids", _count, "processes and threads at once (init counts)"),
]


def _subcommand(
    commands: Any, name: str, connection: argparse.ArgumentParser, summary: str, example: str
) -> argparse.ArgumentParser:
    return commands.add_parser(  # type: ignore[no-any-return]
        name,
        parents=[connection],
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _reconnect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reconnect-for",
        type=_duration,
        default=RECONNECT_FOR,
        metavar="DURATION",
        help="when following and the connection is lost (corrald restarting), keep "
        f"reconnecting this long and resume where the output stopped (default "
        f"{RECONNECT_FOR:g}s; 0: give up at once)",
    )


def _job_spec_options(parser: argparse.ArgumentParser) -> None:
    """The options of `start` and `run`: what to run, as whom, within what."""
    for flag, dest, kind, text in LIMIT_FLAGS:
        parser.add_argument(flag, dest=f"limit_{dest}", type=kind, metavar="N", help=text)
    parser.add_argument("--timeout", type=_duration, metavar="DURATION",
                        help="stop the job after this long, e.g. 30s, 5m")  # fmt: skip
    parser.add_argument("--user", help="run as this user (admins only; default nobody)")
    parser.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        metavar="NAME=VALUE",
        help="an environment variable (repeatable; default: a small clean set)",
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory (default /)")
    parser.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="PATH",
        help="a host path the job may write (repeatable; the rest is read-only but its "
        "own /tmp and /dev/shm; --rw / for all of it)",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")


def _job_commands(commands: Any, connection: argparse.ArgumentParser) -> None:
    start = _subcommand(
        commands, "start", connection, "start a job and print its id",
        "corral start --memory 256M --cpu 0.5 -- python3 -c 'print(42)'",
    )  # fmt: skip
    _job_spec_options(start)
    start.set_defaults(run=cmd_start)

    run = _subcommand(
        commands, "run", connection,
        "start a job, follow its output to the end and exit with its status",
        "corral run --memory 64M -- sh -c 'echo hello; exit 3'   # prints hello, exits 3",
    )  # fmt: skip
    run.epilog = (run.epilog or "") + (
        "\n\nThe exit status is the job's: its code, or 128+N when signal N killed it.\n"
        "127: the command was not found; 126: it could not be run.\n"
        "Ctrl+C stops the job (SIGTERM, then SIGKILL after the grace); a second\n"
        "Ctrl+C kills it at once."
    )
    _job_spec_options(run)
    run.add_argument("--grace", type=_duration, metavar="DURATION",
                     help="on Ctrl+C, time between SIGTERM and SIGKILL (default 10s)")  # fmt: skip
    _reconnect_option(run)
    run.set_defaults(run=cmd_run)

    logs = _subcommand(
        commands, "logs", connection,
        "write a job's output: stdout to stdout, stderr to stderr, byte for byte",
        "corral logs -f 3f2a9c",
    )  # fmt: skip
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep writing new output until the job ends")  # fmt: skip
    logs.add_argument("--since-offset", type=_count, default=0, metavar="N",
                      help="start at byte N of the job's log (an offset a stream "
                      "ended at, from --json or the client library)")  # fmt: skip
    logs.add_argument("--timestamps", action="store_true",
                      help="prefix each piece of output with its time (RFC 3339)")  # fmt: skip
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only the job's stdout")
    which.add_argument("--stderr", action="store_true", help="only the job's stderr")
    logs.add_argument("id", metavar="ID", help="a job id or unique prefix")
    _reconnect_option(logs)
    logs.set_defaults(run=cmd_logs)

    stop = _subcommand(
        commands, "stop", connection, "stop a job: SIGTERM, then SIGKILL after the grace",
        "corral stop --grace 5s 3f2a9c",
    )  # fmt: skip
    stop.add_argument("--grace", type=_duration, metavar="DURATION",
                      help="time between SIGTERM and SIGKILL (default 10s)")  # fmt: skip
    stop.add_argument("id", metavar="ID", help="a job id or unique prefix")
    stop.set_defaults(run=cmd_stop)

    status = _subcommand(
        commands, "status", connection, "show a job's state, exit status and usage",
        "corral status 3f2a9c",
    )  # fmt: skip
    status.add_argument("id", metavar="ID", help="a job id or unique prefix")
    status.set_defaults(run=cmd_status)

    ps = _subcommand(commands, "ps", connection, "list jobs", "corral ps --all")
    ps.add_argument("--all", action="store_true", help="every user's jobs (admins)")
    ps.set_defaults(run=cmd_ps)

    rm = _subcommand(
        commands, "rm", connection, "remove a finished job and its output", "corral rm 3f2a9c"
    )
    rm.add_argument("id", metavar="ID", help="a job id or unique prefix")
    rm.set_defaults(run=cmd_rm)

    shell = _subcommand(
        commands, "shell", connection,
        "an interactive shell: every command above on one connection, with history, "
        "completion and background follows",
        "corral shell   # then: run -- sh -c 'echo hi', ps, logs -f ID &, jobs, help, exit",
    )  # fmt: skip
    shell.set_defaults(run=None, interactive=True)


# -- connection settings -------------------------------------------------------


def _setting(args: argparse.Namespace, name: str, env: str) -> str | None:
    value: str | None = getattr(args, name, None)
    if value is None:
        value = os.environ.get(env) or None
    return value


def _connect_args(args: argparse.Namespace) -> dict[str, Any]:
    identity = _setting(args, "identity", "CORRAL_IDENTITY")
    if identity is None:
        raise ConfigError("no identity: pass --identity DIR or set CORRAL_IDENTITY")
    return {
        "address": _setting(args, "addr", "CORRAL_ADDR") or DEFAULT_ADDR,
        "identity": identity,
        "server_name": getattr(args, "server_name", None),
        "timeout": getattr(args, "connect_timeout", CONNECT_TIMEOUT),
    }


def _print_json(value: Any, out: TextIO) -> None:
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


# -- commands ------------------------------------------------------------------


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
            ("jobs run as", str(policy.get("default_user", "?"))),
            ("default limits", _limits_text(policy.get("defaults"))),
            ("your caps", _limits_text(policy.get("caps"))),
            ("writable", ", ".join(map(str, policy.get("writable") or [])) or "nowhere"),
        ]
    _print_rows(rows, out)
    return 0


def _limits_text(limits: object) -> str:
    """{"memory": 268435456, "cpu": 1} -> 'cpu 1, memory 256.0 MiB'."""
    if not isinstance(limits, dict) or not limits:
        return "none"
    shown = []
    for name, value in sorted(limits.items()):
        text = str(value)
        if name in {"memory", "io_read_bps", "io_write_bps"}:
            text = format_size(int(value)) + ("/s" if name.startswith("io_") else "")
        elif name == "max_runtime":
            text = f"{value:g} s"
        shown.append(f"{name} {text}")
    return ", ".join(shown)


async def _start(client: Client, args: argparse.Namespace, command: str) -> JobInfo:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError(
            f"{command} needs a command: corral {command} [OPTIONS] -- COMMAND [ARG...]"
        )
    limits = {
        dest: value
        for _, dest, _, _ in LIMIT_FLAGS
        if (value := getattr(args, f"limit_{dest}")) is not None
    }
    return await client.start(
        [os.fsencode(arg) for arg in argv],
        env=dict(args.env) if args.env else None,
        cwd=args.cwd,
        user=args.user,
        limits=limits,
        max_runtime=args.timeout,
        writable=[os.fsencode(path) for path in args.rw],
    )


async def cmd_start(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = await _start(client, args, "start")
    if _json(args):
        _print_json({"id": job.id}, out)
    else:
        out.write(f"{job.id}\n")
    return 0


class _Output:
    """Where a job's records go: stdout's bytes to our stdout, stderr's to
    our stderr, unchanged; markers as a note on stderr."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        out.flush()
        self.streams = {
            STREAM_STDOUT: getattr(out, "buffer", sys.stdout.buffer),
            STREAM_STDERR: sys.stderr.buffer,
        }
        if getattr(args, "stdout", False):
            del self.streams[STREAM_STDERR]
        if getattr(args, "stderr", False):
            del self.streams[STREAM_STDOUT]
        self.timestamps = bool(getattr(args, "timestamps", False))
        self.json = out if _json(args) else None

    def write(self, records: Sequence[Record], job_id: str) -> None:
        if self.json is not None:
            self._write_json(records)
            return
        touched = set()
        for record in records:
            if isinstance(record.data, dict):
                self.note(record.data, job_id)
                continue
            target = self.streams.get(record.stream)
            if target is None:
                continue
            if self.timestamps:
                target.write(f"{rfc3339(record.time_ns)} ".encode())
            target.write(record.data)
            touched.add(target)
        for target in touched:
            target.flush()

    def _write_json(self, records: Sequence[Record]) -> None:
        """One JSON object per record: its stream, time and data (text when
        it is UTF-8, else `data_base64`); corral's notes as `note`."""
        assert self.json is not None
        for record in records:
            line: dict[str, Any] = {"time": rfc3339(record.time_ns)}
            if isinstance(record.data, dict):
                line.update(stream="corral", note=record.data)
            elif record.stream in self.streams:
                line["stream"] = "stdout" if record.stream == STREAM_STDOUT else "stderr"
                try:
                    line["data"] = record.data.decode()
                except UnicodeDecodeError:
                    line["data_base64"] = base64.b64encode(record.data).decode()
            else:
                continue
            self.json.write(json.dumps(line, sort_keys=True) + "\n")
        self.json.flush()

    def end(self, stream: LogStream) -> None:
        """With --json, a last line: where the stream ended, and the job then."""
        if self.json is not None and stream.job is not None:
            end = {"offset": stream.offset, "job": stream.job.to_json()}
            self.json.write(json.dumps({"end": end}, sort_keys=True) + "\n")

    @staticmethod
    def note(marker: dict[str, Any], job_id: str) -> None:
        dropped = marker.get("dropped_bytes")
        if dropped:
            why = marker.get("error") or "the job's log reached its size cap"
            sys.stderr.write(
                f"corral: {dropped} bytes of job {job_id[:12]}'s output were not kept: {why}\n"
            )
            sys.stderr.flush()


class _Follow:
    """A job's output written out to its end (or its current end), across
    lost connections: with `args.reconnect_for` > 0, a connection lost or a
    corrald saying goodbye is followed by new connections, tried for that
    long, and the stream resumes at the byte it had reached. Offsets are
    exact, so nothing is lost or repeated, and one record decoder spans the
    pieces."""

    def __init__(
        self, client: Client, args: argparse.Namespace, output: _Output, job_id: str
    ) -> None:
        self.client = client  # the live connection: the one a stop must use
        self.args = args
        self.output = output
        self.job_id = job_id
        self.offset = int(getattr(args, "since_offset", 0) or 0)
        self.job: JobInfo | None = None

    async def run(self, *, follow: bool) -> None:
        decoder = RecordDecoder()
        reconnect_for = float(getattr(self.args, "reconnect_for", 0) or 0)
        async with contextlib.AsyncExitStack() as connections:
            while True:
                try:
                    await self._read(decoder, follow)
                    return
                except (ConnectError, ServerError) as exc:
                    if not (follow and reconnect_for > 0 and _is_connection_loss(exc)):
                        raise
                    self.client = await self._reconnect(connections, exc, reconnect_for)

    async def _read(self, decoder: RecordDecoder, follow: bool) -> None:
        async with self.client.logs(self.job_id, follow=follow, offset=self.offset) as stream:
            async for chunk in stream.chunks():
                try:
                    records = decoder.feed(chunk.data)
                except ValueError as exc:
                    message = f"the job's log is damaged: {exc}"
                    raise ServerError(ErrorCode.INTERNAL, message) from None
                self.output.write(records, self.job_id)
                self.offset = stream.offset
        self.offset, self.job = stream.offset, stream.job
        self.output.end(stream)

    async def _reconnect(
        self, connections: contextlib.AsyncExitStack, lost: CorralError, seconds: float
    ) -> Client:
        _note(f"{lost}; reconnecting (for up to {seconds:g} s)")
        deadline = trio.current_time() + seconds
        delay = 0.1
        while True:
            try:
                client = await connections.enter_async_context(connect(**_connect_args(self.args)))
            except (ConnectError, ServerError) as exc:
                if not _is_connection_loss(exc) or trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)  # a pause between tries, not a synchronisation
                delay = min(2 * delay, RECONNECT_BACKOFF)
                continue
            _note(f"reconnected; resuming job {self.job_id[:12]}'s output at byte {self.offset}")
            return client


def _is_connection_loss(exc: CorralError) -> bool:
    """A lost connection, or corrald going away: worth reconnecting for."""
    if isinstance(exc, ServerError):
        return exc.code is ErrorCode.UNAVAILABLE
    return isinstance(exc, ConnectError)


def _note(text: str) -> None:
    sys.stderr.write(f"corral: {text}\n")
    sys.stderr.flush()


async def cmd_logs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    follow = _Follow(client, args, _Output(args, out), args.id)
    await follow.run(follow=args.follow)
    return 0


async def cmd_run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Start, follow to the end, exit with the job's status. Interrupts (Ctrl+C,
    or what `args.interrupts` yields in the shell) stop the job."""
    interrupts: AsyncIterator[object] | None = getattr(args, "interrupts", None)
    if interrupts is not None:
        return await _run_job(client, args, out, interrupts)
    # From here Ctrl+C is the job's: one pressed while it starts stops it
    # once it has (trio keeps the signal for the receiver).
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        return await _run_job(client, args, out, signals)


async def _run_job(
    client: Client, args: argparse.Namespace, out: TextIO, interrupts: AsyncIterator[object]
) -> int:
    output = _Output(args, out)
    try:
        job = await _start(client, args, "run")
    except ServerError as exc:
        return _start_failure(exc)
    follow = _Follow(client, args, output, job.id)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_interrupt, follow, args.grace, interrupts)
        await follow.run(follow=True)
        nursery.cancel_scope.cancel()
    assert follow.job is not None
    return _exit_status(follow.job)


async def _stop_on_interrupt(
    follow: _Follow, grace: float | None, interrupts: AsyncIterator[object]
) -> None:
    """Ctrl+C stops the job, like ssh's remote end: first with its grace, then at
    once (on the connection the follow has now)."""
    job_id = follow.job_id
    presses = 0
    async with trio.open_nursery() as nursery:
        async for _ in interrupts:
            presses += 1
            if presses == 1:
                sys.stderr.write(
                    f"corral: stopping job {job_id[:12]} (Ctrl+C again to kill it now)\n"
                )
                nursery.start_soon(_stop, follow.client, job_id, grace)
            else:
                sys.stderr.write(f"corral: killing job {job_id[:12]}\n")
                nursery.start_soon(_stop, follow.client, job_id, 0.0)
            sys.stderr.flush()


async def _stop(client: Client, job_id: str, grace: float | None) -> None:
    # The job may have ended meanwhile: the stream's end tells the rest.
    with contextlib.suppress(ServerError):
        await client.stop(job_id, grace)


def _start_failure(exc: ServerError) -> int:
    """A job that could not start, in a shell's words: 127 not found, 126 not runnable."""
    sys.stderr.write(f"corral: error: {exc}\n")
    if str(exc).startswith("cannot run "):
        return 127 if exc.code is ErrorCode.INVALID_ARGUMENT else 126
    return int(exc.exit_status)


def _exit_status(job: JobInfo) -> int:
    """The job's end as a shell reports a command's: its code, or 128+N for signal N."""
    if job.oom_killed:
        limit = job.limits.get("memory")
        within = f" (memory limit {format_size(limit)})" if limit else ""
        sys.stderr.write(f"corral: job {job.short_id} was killed: out of memory{within}\n")
    elif job.state in {"lost", "failed"}:
        sys.stderr.write(f"corral: job {job.short_id} {job.state}: {job.reason}\n")
    if job.exit_code is not None:
        return job.exit_code
    if job.signal is not None:
        try:
            return 128 + signal.Signals[job.signal].value
        except KeyError:
            return 128 + int(job.signal.removeprefix("signal "))
    return 1


async def cmd_stop(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = await client.stop(args.id, args.grace)
    if _json(args):
        _print_json(job.to_json(), out)
    else:
        out.write(f"{job.short_id} {job.state}: {job.reason}\n")
    return 0


async def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = await client.status(args.id)
    if _json(args):
        _print_json(job.to_json(), out)
        return 0
    usage = job.usage
    rows = [
        ("id", job.id),
        ("owner", job.owner),
        ("command", job.command),
        ("state", job.state),
        ("reason", job.reason),
        ("created", rfc3339(job.created_at) or "-"),
        ("started", rfc3339(job.started_at) or "-"),
        ("finished", rfc3339(job.finished_at) or "-"),
        ("limits", ", ".join(f"{k}={v}" for k, v in sorted(job.limits.items())) or "none"),
        ("cpu", f"{usage.get('cpu_seconds', 0.0):.2f} s"),
        ("memory peak", format_size(int(usage.get("memory_peak_bytes", 0)))),
        ("io", f"{format_size(int(usage.get('io_read_bytes', 0)))} read, "
               f"{format_size(int(usage.get('io_write_bytes', 0)))} written"),
    ]  # fmt: skip
    _print_rows(rows, out)
    return 0


async def cmd_ps(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    jobs = await client.list(everyone=args.all)
    if _json(args):
        _print_json([job.to_json() for job in jobs], out)
        return 0
    now = time.time_ns()
    table = [("ID", "OWNER", "STATE", "AGE", "COMMAND")]
    for job in jobs:
        age = format_age((now - (job.created_at or now)) / 1e9)
        table.append((job.short_id, job.owner, job.state, age, job.command))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[4]]).rstrip() + "\n")
    return 0


async def cmd_rm(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    job_id = await client.remove(args.id)
    if _json(args):
        _print_json({"id": job_id}, out)
    else:
        out.write(f"{job_id}\n")
    return 0


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


# -- entry point ---------------------------------------------------------------


async def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    try:
        if not getattr(args, "connects", True):
            return int(await args.run(args, out))
        async with connect(**_connect_args(args)) as client:
            return int(await args.run(client, args, out))
    except* CorralError as group:
        # A command's tasks (run's follow and its Ctrl+C watcher) fail as a
        # group; the person wants the one line of the first failure.
        raise _first(group) from None


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command line; return the exit status. Errors go to stderr."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if getattr(args, "interactive", False):
            # The shell owns the terminal: readline in this thread, trio in another.
            from corral.client.shell import run_shell  # noqa: PLC0415

            return run_shell(args, _connect_args(args))
        status: int = trio.run(_run_command, args, out)
    except UsageError as exc:
        sys.stderr.write(f"corral: error: {exc}\n")
        return EXIT_USAGE
    except CorralError as exc:
        if _json(args):
            code = str(exc.code) if isinstance(exc, ServerError) else type(exc).__name__
            _print_json({"error": {"code": code, "message": str(exc)}}, out)
        else:
            sys.stderr.write(f"corral: error: {exc}\n")
        return int(exc.exit_status)
    except KeyboardInterrupt:
        sys.stderr.write("corral: interrupted\n")
        return EXIT_INTERRUPTED
    return status


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
