"""corrald's command line: every flag, its bounds and its help.

Parsing only; `corral.supervisor.main` acts on what it returns.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import corral
from corral.address import Address, AddressError, TCPAddress, parse_address
from corral.identity import ROLES
from corral.shim.cgroup import CgroupError, check_component
from corral.supervisor.audit import KEEP as AUDIT_KEEP
from corral.supervisor.audit import MAX_SIZE as AUDIT_MAX_SIZE
from corral.supervisor.audit import MIN_SIZE as AUDIT_MIN_SIZE
from corral.supervisor.operations import MAX_STREAMS_PER_USER
from corral.supervisor.policy import (
    USER_MEMORY_SHARE,
    USER_PIDS,
    USER_QUOTA_MEMORY_SHARE,
    USER_QUOTA_PIDS,
)
from corral.supervisor.server import (
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_USER,
    MAX_REQUESTS_PER_CONNECTION,
)
from corral.supervisor.session import IDLE_TIMEOUT, IO_TIMEOUT
from corral.units import parse_duration, parse_size, short_size
from corral.worker.admission import MAX_FINISHED_PER_OWNER, MAX_LOG_BYTES_PER_OWNER
from corral.worker.manager import MAX_JOBS, MAX_JOBS_PER_OWNER
from corral.worker.uid_pool import UidRange, UidRangeError

DEFAULT_STATE_DIR = Path("/var/lib/corral")
DEFAULT_TCP = "127.0.0.1:7443"
SOCKET_NAME = "corrald.sock"


EPILOG = f"""\
With no --listen, corrald listens on {DEFAULT_TCP} and on unix:STATE/{SOCKET_NAME}.

examples:
  corrald --state-dir var --init-pki
  corrald --state-dir /var/lib/corral --pki /etc/corral/pki \\
          --listen 0.0.0.0:7443 --listen unix:/run/corrald.sock
  corrald --state-dir var --default memory=512M --user-cap memory=2G \
          --user-cap cpu=1 --user-cap max_runtime=1h
"""


# Each warm sandbox is an idle shim and init (about 2 MiB) and a cgroup.
MAX_WARM = 64
# The bounds of the count flags: far beyond any host's reach, so that only
# a typo is refused. A connection is an fd (RLIMIT_NOFILE tops out near
# 2**20); requests in flight are tasks of one peer; a job is a shim and an
# init (~15 MiB): a hundred thousand is over a terabyte; a finished job is
# a directory, kept by the million.
MAX_CONNECTIONS_FLAG = 1 << 20
MAX_REQUESTS_FLAG = 100_000
MAX_JOBS_FLAG = 100_000
MAX_KEEP_FINISHED = 10_000_000
# The bounds of the timeout flags: a handshake is done in a second; a
# frame that takes a day is not coming; a week idle is long enough.
MAX_HANDSHAKE_TIMEOUT = 3600.0
MAX_IO_TIMEOUT = 86400.0
MAX_IDLE_TIMEOUT = 7 * 86400.0


def _uid_range(text: str) -> UidRange:
    try:
        return UidRange.parse(text)
    except UidRangeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {text!r}") from None


def _count(low: int, high: int) -> Callable[[str], int]:
    """A flag's whole number, refused outside [low, high] with a message
    that names the bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}: {text!r}")
        return value

    return parse


def _seconds(high: float) -> Callable[[str], float]:
    """A flag's number of seconds, more than 0 and at most `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not 0 < value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(
                f"must be more than 0 and at most {high:g} seconds: {text!r}"
            )
        return value

    return parse


def _cgroup_parent(text: str) -> str:
    try:
        check_component("parent", text)
    except CgroupError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parsed(parse: Callable[[str], float]) -> Callable[[str], float]:
    def checked(text: str) -> float:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


def _audit_size(text: str) -> int:
    size = int(_parsed(parse_size)(text))
    if size < AUDIT_MIN_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {short_size(AUDIT_MIN_SIZE)}")
    return size


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected LIMIT=VALUE (e.g. memory=2G), not {text!r}")
    return name, value


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tcp_address(text: str) -> TCPAddress:
    address = _address(text)
    if not isinstance(address, TCPAddress):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, not {text!r}")
    return address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corrald",
        description="The corral daemon: runs isolated, limited jobs for clients over mutual TLS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"corrald {corral.__version__}")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where jobs live (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--pki",
        type=Path,
        metavar="DIR",
        help="directory with ca.crt, server.crt and server.key (default STATE/pki)",
    )
    parser.add_argument(
        "--init-pki",
        action="store_true",
        help="create a development PKI in the --pki directory if it has none",
    )
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        dest="server_names",
        help="extra name for the server certificate --init-pki creates (repeatable)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=_address,
        metavar="ADDR",
        help="HOST:PORT, [IPV6]:PORT or unix:PATH to listen on (repeatable)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_seconds(MAX_HANDSHAKE_TIMEOUT),
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="drop peers that have not finished TLS and hello by then "
        f"(default {HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=_count(1, MAX_CONNECTIONS_FLAG),
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"connections served at once; more are refused (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-requests",
        type=_count(1, MAX_REQUESTS_FLAG),
        default=MAX_REQUESTS_PER_CONNECTION,
        metavar="N",
        help=f"requests in flight per connection (default {MAX_REQUESTS_PER_CONNECTION})",
    )
    parser.add_argument(
        "--max-connections-per-user",
        type=_count(1, MAX_CONNECTIONS_FLAG),
        default=MAX_CONNECTIONS_PER_USER,
        metavar="N",
        help=f"connections one identity may have at once (default {MAX_CONNECTIONS_PER_USER})",
    )
    parser.add_argument(
        "--max-streams-per-user",
        type=_count(1, MAX_REQUESTS_FLAG),
        default=MAX_STREAMS_PER_USER,
        metavar="N",
        help="output streams (logs -f, attach) a user may have open at once, on all their "
        f"connections; admins are not capped (default {MAX_STREAMS_PER_USER})",
    )
    parser.add_argument(
        "--io-timeout",
        type=_seconds(MAX_IO_TIMEOUT),
        default=IO_TIMEOUT,
        metavar="SECONDS",
        help="drop a peer that takes longer to send a whole frame, or to take a reply "
        f"(default {IO_TIMEOUT:g})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_seconds(MAX_IDLE_TIMEOUT),
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a session with no request in flight that sends nothing for this long "
        f"(default {IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-jobs",
        type=_count(1, MAX_JOBS_FLAG),
        default=MAX_JOBS,
        metavar="N",
        help=f"jobs starting or running at once; more starts are refused (default {MAX_JOBS})",
    )
    parser.add_argument(
        "--max-jobs-per-user",
        type=_count(1, MAX_JOBS_FLAG),
        default=MAX_JOBS_PER_OWNER,
        metavar="N",
        help=f"the same, for each user's own jobs (default {MAX_JOBS_PER_OWNER})",
    )
    parser.add_argument(
        "--max-finished-per-user",
        type=_count(1, MAX_KEEP_FINISHED),
        default=MAX_FINISHED_PER_OWNER,
        metavar="N",
        help="finished jobs one user may have kept; beyond it their starts are refused "
        f"until they remove some (default {MAX_FINISHED_PER_OWNER}; --keep-finished "
        "removes the oldest instead)",
    )
    parser.add_argument(
        "--max-log-size-per-user",
        type=_parsed(parse_size),
        metavar="SIZE",
        help="output.log bytes one user's finished jobs may keep together; beyond it "
        "their starts are refused until they remove some (default "
        f"{short_size(MAX_LOG_BYTES_PER_OWNER)}, or a quarter of the state directory's "
        "filesystem if less; --keep-log-size removes the oldest instead)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, the PKI and cgroup support, say what was checked "
        "and exit 0, or name what is wrong; serves nothing, changes nothing",
    )
    parser.add_argument(
        "--metrics",
        type=_tcp_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP: keep it "
        "on loopback, e.g. 127.0.0.1:9464; off by default)",
    )
    parser.add_argument(
        "--audit-max-size",
        type=_audit_size,
        default=AUDIT_MAX_SIZE,
        metavar="SIZE",
        help=f"rotate STATE/audit.log beyond this size, keeping {AUDIT_KEEP} older files "
        f"(default {short_size(AUDIT_MAX_SIZE)})",
    )
    parser.add_argument(
        "--uid-range",
        type=_uid_range,
        default=UidRange(),
        metavar="START:COUNT",
        help="the host uids (and gids) corrald gives jobs, one per running job "
        f"(default {UidRange()}: above every range hosts give users, subordinate ids "
        "and containers); corrald refuses one that holds a user or group of the host",
    )
    parser.add_argument(
        "--cgroup-parent",
        type=_cgroup_parent,
        metavar="NAME",
        help="cgroup under which jobs get theirs (default: the one the state directory "
        "recorded on an earlier run, else corral-HASH, HASH being 8 hex digits of a hash "
        "of the state directory's path); corrald claims it: two may not share one",
    )
    parser.add_argument(
        "--warm",
        type=_count(0, MAX_WARM),
        default=1,
        metavar="N",
        help="sandboxes kept built ahead of the next starts, for fast starts (default 1; "
        "0: every start builds its own)",
    )
    policy = parser.add_argument_group(
        "job policy",
        "Limits: cpu (cores), memory, io_read_bps, io_write_bps (bytes, K/M/G), "
        "io_read_iops, io_write_iops, pids, max_runtime (30s, 5m, 1h). "
        "These flags override --config.",
    )
    policy.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a TOML file with default_user, [defaults] and [caps.user] / [caps.admin] "
        "(see docs/DESIGN.md)",
    )
    policy.add_argument(
        "--default-user",
        metavar="USER",
        help="the user jobs run as unless an admin chooses: dynamic (the default), a uid "
        "of the job's own from --uid-range, or a host user's name",
    )
    policy.add_argument(
        "--default",
        action="append",
        type=_setting,
        default=[],
        metavar="LIMIT=VALUE",
        dest="defaults",
        help="a limit every job gets unless its start sets one (repeatable)",
    )
    for role in ROLES:
        policy.add_argument(
            f"--{role}-writable",
            action="append",
            default=[],
            metavar="PATH",
            dest=f"{role}_writable",
            help=f"a {role}'s jobs may be given writable paths at or under PATH (repeatable; "
            + ("default /)" if role == "admin" else "default none)"),
        )
        policy.add_argument(
            f"--{role}-cap",
            action="append",
            type=_setting,
            default=[],
            metavar="LIMIT=VALUE",
            dest=f"{role}_caps",
            help=f"the most a {role}'s job may ask for (repeatable)"
            + (
                f"; built in, until set: pids={USER_PIDS} and memory "
                f"1/{USER_MEMORY_SHARE} of the RAM"
                if role == "user"
                else ""
            ),
        )
        policy.add_argument(
            f"--{role}-quota",
            action="append",
            type=_setting,
            default=[],
            metavar="LIMIT=VALUE",
            dest=f"{role}_quotas",
            help=f"what all of one {role}'s jobs together may use: cpu, memory, pids "
            "(repeatable)"
            + (
                f"; built in, until set: pids={USER_QUOTA_PIDS} and memory "
                f"1/{USER_QUOTA_MEMORY_SHARE} of the RAM"
                if role == "user"
                else ""
            ),
        )
    retention = parser.add_argument_group(
        "retention",
        "Finished jobs (their status and output) are kept until removed, or beyond "
        "these bounds: the oldest finished jobs first, never a running one. The "
        "bounds apply to each owner's jobs apart (one user's jobs push out only that "
        "user's), but for the totals, where the oldest of anyone's go.",
    )
    retention.add_argument(
        "--keep-finished",
        type=_count(0, MAX_KEEP_FINISHED),
        metavar="N",
        help="keep at most N finished jobs of each owner",
    )
    retention.add_argument(
        "--keep-finished-total",
        type=_count(0, MAX_KEEP_FINISHED),
        metavar="N",
        help="keep at most N finished jobs of all owners together (a last resort: "
        "one user's jobs push out others')",
    )
    retention.add_argument(
        "--keep-for",
        type=_parsed(parse_duration),
        metavar="DURATION",
        help="remove finished jobs this long after they ended (e.g. 7d, 12h)",
    )
    retention.add_argument(
        "--keep-log-size",
        type=_parsed(parse_size),
        metavar="SIZE",
        help="keep each owner's finished jobs' output.log files to this much together (e.g. 10G)",
    )
    retention.add_argument(
        "--keep-log-size-total",
        type=_parsed(parse_size),
        metavar="SIZE",
        help="keep every finished job's output.log to this much together (a last resort)",
    )
    parser.add_argument(
        "--keep-jobs",
        action="store_true",
        help="on shutdown, leave running jobs running for the next corrald (an upgrade); "
        "by default they are stopped, each with its grace",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log to stderr (default info)",
    )
    return parser
