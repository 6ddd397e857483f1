"""`corral`: the command-line client.

Every command is a small async function taking the parsed arguments and an
output; errors are `CorralError`s, turned into one line on stderr and the
exit status their class names (see `corral.client.errors` and the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

import corral
from corral import pki
from corral.client.client import CONNECT_TIMEOUT, ServerInfo, connect
from corral.client.errors import (
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ConfigError,
    CorralError,
    ServerError,
)
from corral.client.units import format_age, format_size, parse_duration, parse_size, rfc3339

DEFAULT_ADDR = "127.0.0.1:7443"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

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

examples:
  export CORRAL_ADDR=127.0.0.1:7443 CORRAL_IDENTITY=var/pki/clients/admin
  corral info
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
    init.set_defaults(run=cmd_certs_init)

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
    issue.set_defaults(run=cmd_certs_issue)
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


def _job_commands(commands: Any, connection: argparse.ArgumentParser) -> None:
    start = _subcommand(
        commands, "start", connection, "start a job and print its id",
        "corral start --memory 256M --cpu 0.5 -- python3 -c 'print(42)'",
    )  # fmt: skip
    for flag, dest, kind, text in LIMIT_FLAGS:
        start.add_argument(flag, dest=f"limit_{dest}", type=kind, metavar="N", help=text)
    start.add_argument("--timeout", type=_duration, metavar="DURATION",
                       help="stop the job after this long, e.g. 30s, 5m")  # fmt: skip
    start.add_argument("--user", help="run as this user (admins only; default nobody)")
    start.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        metavar="NAME=VALUE",
        help="an environment variable (repeatable; default: a small clean set)",
    )
    start.add_argument("--cwd", metavar="DIR", help="working directory (default /)")
    start.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    start.set_defaults(run=cmd_start)

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


async def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(**_connect_args(args)) as client:
        info: ServerInfo = await client.info()
    if _json(args):
        _print_json(info.raw, out)
        return 0
    rows = [
        ("server", f"corrald {info.version} at {client.address}"),
        ("you", f"{info.identity.name} ({info.identity.role})"),
        ("cgroup", info.cgroup),
        ("connections", str(info.connections)),
        ("jobs", str(info.jobs)),
    ]
    _print_rows(rows, out)
    return 0


async def cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("start needs a command: corral start [OPTIONS] -- COMMAND [ARG...]")
    limits = {
        dest: value
        for _, dest, _, _ in LIMIT_FLAGS
        if (value := getattr(args, f"limit_{dest}")) is not None
    }
    async with connect(**_connect_args(args)) as client:
        job = await client.start(
            [os.fsencode(arg) for arg in argv],
            env=dict(args.env) if args.env else None,
            cwd=args.cwd,
            user=args.user,
            limits=limits,
            max_runtime=args.timeout,
        )
    if _json(args):
        _print_json({"id": job.id}, out)
    else:
        out.write(f"{job.id}\n")
    return 0


async def cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(**_connect_args(args)) as client:
        job = await client.stop(args.id, args.grace)
    if _json(args):
        _print_json(job.to_json(), out)
    else:
        out.write(f"{job.short_id} {job.state}: {job.reason}\n")
    return 0


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(**_connect_args(args)) as client:
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


async def cmd_ps(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(**_connect_args(args)) as client:
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


async def cmd_rm(args: argparse.Namespace, out: TextIO) -> int:
    async with connect(**_connect_args(args)) as client:
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


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command line; return the exit status. Errors go to stderr."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        status: int = trio.run(args.run, args, out)
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
