"""The `corral` command line: every command's options, help and examples.

Parsing only: each command's `run` default is its function in
`corral.client.commands`, imported when it first runs (a one-shot command
the CLI runs without trio never imports it: see `corral.client.oneshot`).
The shell parses its lines with the same parser.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import corral
from corral.client.argparsing import Commands, Parser
from corral.client.connecting import CONNECT_TIMEOUT
from corral.client.detach_keys import DEFAULT_DETACH_KEYS, parse_detach_keys
from corral.client.errors import (
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_PROTOCOL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from corral.client.output import RECONNECT_FOR
from corral.client.settings import DEFAULT_ADDR
from corral.identity import ROLES
from corral.units import parse_duration, parse_size

EPILOG = f"""\
environment:
  CORRAL_ADDR       address of corrald when --addr is not given (default {DEFAULT_ADDR})
  CORRAL_IDENTITY   identity directory when --identity is not given

exit statuses:
  0    success
  1    corrald answered with an error
  {EXIT_USAGE}    the command line is wrong
  {EXIT_UNAVAILABLE}   corrald cannot be reached, or the connection was lost
  {EXIT_PROTOCOL}   TLS failed: the server could not be verified, or protocol versions differ
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


def _lazy_command(name: str) -> Callable[..., Awaitable[int]]:
    """The command function `name` of `corral.client.commands`, imported
    when it first runs: that module brings trio, which costs a one-shot
    command more than the rest of its work."""

    async def run(*args: Any) -> int:
        from corral.client import commands  # noqa: PLC0415

        command: Callable[..., Awaitable[int]] = getattr(commands, name)
        return int(await command(*args))

    run.__name__ = run.__qualname__ = name
    return run


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with a parsed command line beyond argparse's rules, or None."""
    command = getattr(args, "command", None)
    if command in {"start", "run"}:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            return f"{command} needs a command: corral {command} [OPTIONS] -- COMMAND [ARG...]"
        if command == "run" and args.tty and args.stdin and not os.isatty(0):
            return (
                "run -it needs a terminal on stdin, and stdin is not one; "
                "use -i alone to feed the job a pipe or a file"
            )
    if command == "logs" and args.asciicast and (getattr(args, "json", False) or args.timestamps):
        return "logs --asciicast writes a recording: not with --json or --timestamps"
    if command == "rm":
        if args.finished == bool(args.ids):
            return "rm takes job ids, or --finished for every finished job, not both"
        if args.all and not args.finished:
            return "rm --all goes with --finished"
    return None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value


def _connection_options(parser: argparse.ArgumentParser) -> None:
    """Options every talking command accepts, before or after its name."""
    group = parser.add_argument_group("connection")
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        check=_check,
        prog="corral",
        description="Run and watch isolated jobs on a corrald host, over mutual TLS.",
        epilog=EPILOG,
    )
    _connection_options(parser)
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    commands = parser.add_commands(dest="command", metavar="COMMAND", required=True)
    commands.add_command(
        "info",
        help="show corrald's version, who you are to it, and its counts",
        description="Show corrald's version, your identity as it sees you, "
        "the cgroup flavour it runs jobs with, and its counts.",
        epilog="example:\n  corral --addr 127.0.0.1:7443 --identity var/pki/clients/admin info",
        options=_info_options,
    )
    _job_commands(commands)
    commands.add_command(
        "certs",
        help="create a development PKI and client identities",
        description="Create a CA, corrald's certificate and client identities.",
        epilog="example:\n  corral certs init var/pki && "
        "corral certs issue --pki var/pki carol --role user",
        options=_certs_commands,
    )
    return parser


def _info_options(parser: Parser) -> None:
    _connection_options(parser)
    parser.set_defaults(run=_lazy_command("cmd_info"))


def _certs_commands(certs: Parser) -> None:
    certs.set_defaults(connects=False)
    actions = certs.add_commands(dest="certs_command", metavar="ACTION", required=True)

    def init(parser: Parser) -> None:
        parser.add_argument("directory", type=Path, metavar="DIR")
        parser.add_argument(
            "--server-name",
            action="append",
            default=[],
            metavar="NAME",
            dest="server_names",
            help="another DNS name or IP address for the server certificate (repeatable)",
        )
        parser.add_argument(
            "--force", action="store_true", help="replace existing keys and certificates"
        )
        parser.set_defaults(run=_lazy_command("cmd_certs_init"))

    actions.add_command(
        "init",
        help="create a CA, a server certificate and the admin, alice and bob identities",
        description="Create DIR/ca.{crt,key}, DIR/server.{crt,key} and client identities "
        "DIR/clients/{admin,alice,bob}. The server certificate names localhost, "
        "127.0.0.1, ::1 and every --server-name.",
        epilog="example:\n  corral certs init /etc/corral/pki --server-name corral.example.com",
        options=init,
    )

    def issue(parser: Parser) -> None:
        parser.add_argument(
            "--pki", type=Path, required=True, metavar="DIR", help="the PKI directory"
        )
        parser.add_argument("name", metavar="NAME", help="the client's name (its certificate's CN)")
        parser.add_argument("--role", required=True, choices=ROLES, help="the client's role")
        parser.add_argument("--force", action="store_true", help="replace an existing identity")
        parser.set_defaults(run=_lazy_command("cmd_certs_issue"))

    actions.add_command(
        "issue",
        help="issue another client identity",
        description="Issue a client identity DIR/clients/NAME signed by the CA in DIR.",
        epilog="example:\n  corral certs issue --pki /etc/corral/pki carol --role user",
        options=issue,
    )

    def renew(parser: Parser) -> None:
        parser.add_argument(
            "--pki", type=Path, required=True, metavar="DIR", help="the PKI directory"
        )
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--server", action="store_true", help="corrald's own certificate")
        which.add_argument("name", nargs="?", metavar="NAME", help="a client's name")
        parser.set_defaults(run=_lazy_command("cmd_certs_renew"))

    actions.add_command(
        "renew",
        help="re-issue corrald's certificate or a client's, for the same names",
        description="Re-issue a certificate and key from the CA in DIR, for the same names "
        "(corrald's host names; a client's name and role), valid 90 days from now.",
        epilog="example:\n  corral certs renew --pki /etc/corral/pki --server && "
        "systemctl reload corrald\n  corral certs renew --pki /etc/corral/pki carol",
        options=renew,
    )


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


STATES = ["starting", "running", "exited", "stopped", "failed", "lost", "finished"]

# (flag, wire name, parser, help)
LIMIT_FLAGS = [
    ("--cpu", "cpu", _cores, "CPU in cores, e.g. 0.5 (at most this host's CPUs)"),
    ("--memory", "memory", _size, "memory, e.g. 256M (swap is off for jobs)"),
    ("--io-read", "io_read_bps", _size, "disk reads per second, e.g. 10M"),
    ("--io-write", "io_write_bps", _size, "disk writes per second, e.g. 10M"),
    ("--io-read-iops", "io_read_iops", _count, "disk read operations per second"),
    ("--io-write-iops", "io_write_iops", _count, "disk write operations per second"),
    ("--pids", "pids", _count, "processes and threads at once (init counts)"),
]


def _subcommand(
    commands: Commands,
    name: str,
    summary: str,
    example: str,
    *,
    options: Callable[[Parser], None],
    more: str = "",
) -> None:
    """A talking command: its connection options and `options(parser)`."""

    def all_options(parser: Parser) -> None:
        _connection_options(parser)
        options(parser)

    commands.add_command(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}{more}",
        options=all_options,
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
    parser.add_argument(
        "--user",
        help="run as this host user, or root: root in the job's own user namespace "
        "(admins only; default: a uid of the job's own)",
    )
    parser.add_argument(
        "--host-root",
        action="store_true",
        help="run as root on the host, with every capability and no user namespace "
        "(admins only, where the policy allows)",
    )
    parser.add_argument(
        "--seccomp",
        choices=("default", "unconfined"),
        help="the job's syscall filter: default (Docker's list: keyctl, bpf, mount, "
        "unshare of namespaces, ... refused) or unconfined (admins only)",
    )
    parser.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        metavar="NAME=VALUE",
        help="set an environment variable (repeatable); added to the default set "
        "(PATH, HOME=/tmp, LANG=C.UTF-8, TERM=dumb), replacing a name it has",
    )
    parser.add_argument(
        "--env-clear",
        action="store_true",
        help="start from an empty environment, as env -i does: the job gets only the "
        "--env variables",
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory (default /)")
    parser.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="PATH",
        help="a host path the job may write (repeatable). The rest of the host is read-only, "
        "but for the job's own /tmp and /dev/shm: a path under them is the host's, seen at "
        "the same place; --rw /tmp gives the job the host's whole /tmp; --rw / all of the "
        "host (its /tmp and /dev/shm stay its own)",
    )
    parser.add_argument(
        "-i",
        "--interactive",
        dest="stdin",
        action="store_true",
        help="keep the job's stdin open for input: `run -i` sends it ours (EOF ends it); "
        "`start -i` holds it for `corral attach`. Without it the job's stdin is /dev/null",
    )
    parser.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the job a terminal of its own (our window size and TERM); with -i, "
        "`run` puts ours in raw mode, so every key (Ctrl+C too) goes to the job",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")


def _detach_keys_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--detach-keys",
        type=_detach_keys,
        default=DEFAULT_DETACH_KEYS,
        metavar="KEYS",
        help=f"with a terminal, the keys that detach and leave the job running "
        f"(default {DEFAULT_DETACH_KEYS}; a character or ctrl-<letter>, comma-separated; "
        "'' for none)",
    )


def _detach_keys(text: str) -> str:
    try:
        parse_detach_keys(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _job_commands(commands: Commands) -> None:
    _subcommand(
        commands,
        "start",
        "start a job and print its id",
        "corral start --memory 256M --cpu 0.5 -- python3 -c 'print(42)'",
        options=_start_options,
    )
    _subcommand(
        commands,
        "run",
        "start a job, follow its output to the end and exit with its status",
        "corral run --memory 64M -- sh -c 'echo hello; exit 3'   # prints hello, exits 3",
        options=_run_options,
        more="\n\nThe exit status is the job's: its code, or 128+N when signal N killed it.\n"
        "127: the command was not found; 126: it could not be run.\n"
        "Ctrl+C stops the job (SIGTERM, then SIGKILL after the grace); a second\n"
        "Ctrl+C kills it at once. With -it, Ctrl+C is the job's (its terminal's);\n"
        "Ctrl+P Ctrl+Q detaches and leaves it running (`corral attach ID` returns).\n\n"
        "more examples:\n"
        "  printf 'a\\nb\\n' | corral run -i -- wc -l            # prints 2\n"
        "  tar c src | corral run -i -- sh -c 'tar x -C /tmp && ls /tmp/src'\n"
        "  corral run -it -- bash",
    )
    _subcommand(
        commands,
        "logs",
        "write a job's output: stdout to stdout, stderr to stderr, byte for byte",
        "corral logs -f 3f2a9c",
        options=_logs_options,
    )
    _subcommand(
        commands,
        "attach",
        "attach to a running job started with -i: its output from now, and your input to it",
        "corral start -it -- bash; corral attach 3f2a9c   # Ctrl+P Ctrl+Q detaches",
        options=_attach_options,
        more="\n\nWith a terminal job and a terminal here, yours is raw while attached and\n"
        "Ctrl+P Ctrl+Q (--detach-keys) detaches, leaving the job running; without\n"
        "one, Ctrl+C detaches and EOF on stdin ends the job's stdin. Any number of\n"
        "clients may attach at once. The exit status is the job's once it ends,\n"
        "0 after a detach.",
    )
    _subcommand(
        commands,
        "stop",
        "stop jobs: SIGTERM, then SIGKILL after the grace (one that has ended: a note)",
        "corral stop --grace 5s 3f2a9c 7b1e04",
        options=_stop_options,
    )
    _subcommand(
        commands,
        "status",
        "show a job's state, exit status and usage",
        "corral status 3f2a9c",
        options=_status_options,
    )
    _subcommand(
        commands,
        "ps",
        "list jobs, newest first, with how each ended",
        "corral ps --all --state running -n 10",
        options=_ps_options,
    )
    _subcommand(
        commands,
        "rm",
        "remove finished jobs and their output",
        "corral rm 3f2a9c 7b1e04; corral rm --finished",
        options=_rm_options,
    )
    _subcommand(
        commands,
        "audit",
        "who did what: corrald's audit trail (admins)",
        "corral audit --since 1h --user alice; corral audit -f",
        options=_audit_options,
    )
    _subcommand(
        commands,
        "shell",
        "an interactive shell: every command above on one connection, with history, "
        "completion and background follows",
        "corral shell   # then: run -- sh -c 'echo hi', ps, logs -f ID &, jobs, help, exit",
        options=_shell_options,
    )


def _start_options(parser: Parser) -> None:
    _job_spec_options(parser)
    parser.set_defaults(run=_lazy_command("cmd_start"))


def _run_options(parser: Parser) -> None:
    _job_spec_options(parser)
    _detach_keys_option(parser)
    parser.add_argument(
        "--grace",
        type=_duration,
        metavar="DURATION",
        help="on Ctrl+C, time between SIGTERM and SIGKILL (default 10s)",
    )
    _reconnect_option(parser)
    parser.set_defaults(run=_lazy_command("cmd_run"))


def _logs_options(parser: Parser) -> None:
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep writing new output until the job ends")  # fmt: skip
    parser.add_argument("--since-offset", type=_count, default=0, metavar="N",
                        help="start at byte N of the job's log, where a record begins: an "
                        "offset a stream ended at (--json's `end`, the client library); "
                        "another is refused, naming the nearest that work")  # fmt: skip
    parser.add_argument("-t", "--timestamps", action="store_true",
                        help="begin each line with the time it was written (RFC 3339)")  # fmt: skip
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only the job's stdout")
    which.add_argument("--stderr", action="store_true", help="only the job's stderr")
    which.add_argument("--asciicast", action="store_true",
                       help="the output as an asciicast v2 recording (a terminal job's "
                       "session, with its resizes): `asciinema play FILE` replays it")  # fmt: skip
    parser.add_argument("id", metavar="ID", help="a job id or unique prefix")
    _reconnect_option(parser)
    parser.set_defaults(run=_lazy_command("cmd_logs"))


def _attach_options(parser: Parser) -> None:
    parser.add_argument("--since-offset", type=_count, default=None, metavar="N",
                        help="replay the job's output from byte N of its log (where a "
                        "record begins; 0: from the start) before the live output")  # fmt: skip
    _detach_keys_option(parser)
    parser.add_argument("id", metavar="ID", help="a job id or unique prefix")
    parser.set_defaults(run=_lazy_command("cmd_attach"))


def _stop_options(parser: Parser) -> None:
    parser.add_argument("--grace", type=_duration, metavar="DURATION",
                        help="time between SIGTERM and SIGKILL (default 10s)")  # fmt: skip
    parser.add_argument("ids", nargs="+", metavar="ID", help="job ids or unique prefixes")
    parser.set_defaults(run=_lazy_command("cmd_stop"))


def _status_options(parser: Parser) -> None:
    parser.add_argument("id", metavar="ID", help="a job id or unique prefix")
    parser.set_defaults(run=_lazy_command("cmd_status"))


def _ps_options(parser: Parser) -> None:
    parser.add_argument("--all", action="store_true", help="every user's jobs (admins)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the ids, one a line")
    parser.add_argument("--state", action="append", choices=STATES, metavar="STATE",
                        help=f"only jobs in this state (repeatable): {', '.join(STATES)}; "
                        "`finished` is every state but starting and running")  # fmt: skip
    parser.add_argument("-n", "--last", type=_count, metavar="N", help="only the N newest")
    parser.set_defaults(run=_lazy_command("cmd_ps"))


def _rm_options(parser: Parser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="job ids or unique prefixes")
    parser.add_argument(
        "--finished",
        action="store_true",
        help="every finished job of yours (with --all, of everyone: admins)",
    )
    parser.add_argument("--all", action="store_true", help="with --finished: every user's")
    parser.set_defaults(run=_lazy_command("cmd_rm"))


def _audit_options(parser: Parser) -> None:
    parser.add_argument("--since", metavar="TIME",
                        help="from this time (RFC 3339, e.g. 2026-12-04T10:00:00Z) or this "
                        "long ago (10m, 2h, 1d)")  # fmt: skip
    parser.add_argument("--user", metavar="NAME", help="only what NAME did")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="then every new entry as it comes, until Ctrl+C")  # fmt: skip
    parser.set_defaults(run=_lazy_command("cmd_audit"))


def _shell_options(parser: Parser) -> None:
    parser.set_defaults(run=None, interactive=True)
