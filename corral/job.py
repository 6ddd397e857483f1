"""What a job is: its spec, its limits, its status, its usage.

Shared by the shim (plain Python, no trio) and the worker (trio), so it
imports neither. Each record converts to and from a msgpack-ready map;
`corral.store` keeps them in the state directory, and `corral.records` is
the format of a job's output.

Validation lives here: a spec that passes `JobSpec.validate()` is one
the shim can run. Errors name the field (`SpecError.field`), so corrald can
answer `invalid_argument` saying exactly what is wrong.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from corral.errors import ErrorCode, OperationError
from corral.identity import ROLES, USER, Identity
from corral.units import describe, quote, short_duration, short_number, short_size

# Job ids: 128 random bits as 32 hex digits. The first 12 are the hostname
# inside the job and the short id people type.
ID_BYTES = 16
SHORT_ID = 12

# The run-as user a job gets unless an admin names another: a uid of its
# own from corrald's pool (see corral.worker.uid_pool). ROOT_USERS ask for
# uid 0, which is root inside the job's user namespace alone.
DYNAMIC_USER = "dynamic"
DEFAULT_USER = DYNAMIC_USER
ROOT_USERS = frozenset({"root", "0"})
# The job's syscall filter (corral.shim.seccomp): Docker's default list,
# or none (admins alone may ask).
SECCOMP_DEFAULT, SECCOMP_UNCONFINED = "default", "unconfined"
SECCOMP_MODES = (SECCOMP_DEFAULT, SECCOMP_UNCONFINED)
# The job's home: its private /tmp is the one directory it surely may write.
DEFAULT_HOME = b"/tmp"
DEFAULT_CWD = b"/"
DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Bounds that catch typos ("256" meaning MiB, a cap in bits) without
# getting in the way of any real host. The most CPU a job may ask for is
# the host's (host_cpus()): a quota beyond it would limit nothing.
MIN_CPU = 0.001  # cores; the cgroup's quota is never below 1 ms per 100 ms anyway
MIN_MEMORY = 8 << 20  # init and a shell need a few MiB; less would OOM at once
MAX_BYTES = 1 << 50  # 1 PiB: memory, bytes per second
MAX_IOPS = 10**9
MIN_PIDS = 2  # init counts (it is in the job's cgroup), and the command
MAX_PIDS = 4_194_304  # the kernel's pid_max ceiling
MAX_RUNTIME = 10 * 365 * 86400.0
MIN_RUNTIME = 0.001  # 1 ms: shorter is no runtime at all
DEFAULT_STOP_GRACE = 10.0  # seconds from SIGTERM to SIGKILL unless a stop says otherwise
MAX_STOP_GRACE = 3600.0  # seconds; an hour to shut down is already generous
# A job's record (argv and writable paths with the rest) goes whole in one
# wire frame of 1 MiB; a start request carries argv and env together.
MAX_ARGV_BYTES = 256 << 10
MAX_ENV_BYTES = 256 << 10
PATH_MAX = 4096
MIN_LOG_LIMIT = 4096
MIN_TMP_SIZE = 1 << 20  # the private /tmp: room for a few files, not a typo in bytes
DEFAULT_LOG_LIMIT = 1 << 30  # 1 GiB of output.log per job
DEFAULT_TMP_SIZE = 64 << 20  # the job's private /tmp
MAX_WRITABLE = 64  # paths a job may be given to write (each a bind mount)
# A terminal's size, columns by rows: what a job gets when its client has no
# terminal to measure, and the most either side may be (a winsize field is
# 16 bits; 4096 is beyond any screen and still catches a typo or garbage).
DEFAULT_TTY_SIZE = (80, 24)
MAX_TTY_SIDE = 4096


class SpecError(OperationError, ValueError):
    """A job spec or limit is invalid (`invalid_argument`); `field` names
    which part, in the message and in its details."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}", {"field": field})
        self.field = field


def host_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a cpuset or
    taskset narrows): the most CPU a job may be given."""
    return len(os.sched_getaffinity(0))


def host_memory() -> int:
    """The host's RAM in bytes: what a share of it, as a default limit, is of."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class State(enum.StrEnum):
    STARTING = "starting"  # the shim is setting the job up
    RUNNING = "running"
    EXITED = "exited"  # the command ended on its own
    STOPPED = "stopped"  # ended by a stop request or its max runtime
    FAILED = "failed"  # could not start
    LOST = "lost"  # its shim vanished without recording an end

    @property
    def finished(self) -> bool:
        return self not in {State.STARTING, State.RUNNING}


def new_job_id() -> str:
    return os.urandom(ID_BYTES).hex()


def is_job_id(text: str) -> bool:
    """A whole job id, as new_job_id makes them (safe as a file or cgroup name)."""
    return len(text) == 2 * ID_BYTES and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-job resource limits; None means no limit of that kind."""

    cpu: float | None = None  # cores: 0.5 is half of one core
    memory: int | None = None  # bytes; swap is disabled for the job
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    pids: int | None = None  # processes and threads, init included

    def validate(self, *, cpus: int | None = None) -> Limits:
        """Return self if every limit is sane; SpecError naming the limit otherwise.

        `cpu` may be at most `cpus` cores (default: host_cpus()).
        """
        if self.cpu is not None:
            _cores("limits.cpu", self.cpu, host_cpus() if cpus is None else cpus)
        _whole("limits.memory", self.memory, MIN_MEMORY, MAX_BYTES, " of bytes")
        for name in ("io_read_bps", "io_write_bps"):
            _whole(f"limits.{name}", getattr(self, name), 1, MAX_BYTES, " of bytes")
        for name in ("io_read_iops", "io_write_iops"):
            _whole(f"limits.{name}", getattr(self, name), 1, MAX_IOPS)
        _whole("limits.pids", self.pids, MIN_PIDS, MAX_PIDS)
        return self

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, value: Any) -> Limits:
        if not isinstance(value, Mapping):
            raise SpecError(
                "limits", f"must be a map of limit names to values, not {describe(value)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise SpecError(
                "limits", f"unknown limit {quote(unknown[0])}; known: {', '.join(sorted(known))}"
            )
        limits = cls(**{str(k): v for k, v in value.items() if v is not None})
        return limits.validate()

    def merged(self, overrides: Limits) -> Limits:
        """These limits with every limit `overrides` sets replacing ours."""
        return replace(self, **overrides.to_wire())


def _cores(name: str, value: object, cpus: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(name, f"must be a number of cores, not {describe(value)}")
    if value < MIN_CPU:
        raise SpecError(
            name, f"must be at least {short_number(MIN_CPU)} cores, not {short_number(value)}"
        )
    if value > cpus:
        cores = "core" if cpus == 1 else "cores"
        raise SpecError(
            name, f"must be at most {cpus} {cores}, this host's CPUs, not {short_number(value)}"
        )


def _seconds(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(name, f"must be a number of seconds, not {describe(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise SpecError(
            name,
            f"must be between {short_duration(low)} and {short_duration(high)}, "
            f"not {short_duration(value)}",
        )


def check_grace(value: object, name: str = "grace") -> float:
    """`value` as a stop grace (seconds between SIGTERM and SIGKILL), or
    SpecError: the one bound every grace (a spec's, a stop's) is held to."""
    _seconds(name, value, 0, MAX_STOP_GRACE)
    return float(value)  # type: ignore[arg-type] # checked above


def _whole(name: str, value: object, low: int, high: int, of_bytes: str = "") -> None:
    """SpecError unless `value` is None or a whole number from `low` to `high`;
    `of_bytes` (" of bytes") shows them as sizes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"must be a whole number{of_bytes}, not {describe(value)}")
    show = short_size if of_bytes else str
    if not low <= value <= high:
        raise SpecError(name, f"must be between {show(low)} and {show(high)}, not {show(value)}")


def _as_bytes(name: str, value: object) -> bytes:
    if isinstance(value, str):
        # os.fsencode's rule: undecodable bytes from the OS round-trip.
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise SpecError(name, f"must be a string, not {describe(value)}")
    if b"\0" in value:
        raise SpecError(name, f"must not contain a NUL byte: {quote(value)}")
    return value


def default_env() -> dict[bytes, bytes]:
    """A small clean environment: what a login would give, not corrald's."""
    return {b"PATH": DEFAULT_PATH, b"HOME": DEFAULT_HOME, b"LANG": b"C.UTF-8", b"TERM": b"dumb"}


def check_tty_size(value: object, name: str = "tty_size") -> tuple[int, int]:
    """A terminal size as [columns, rows], each 1..MAX_TTY_SIDE; SpecError if not."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str | bytes)
        or len(value) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in value)
    ):
        raise SpecError(name, f"must be [columns, rows], not {describe(value)}")
    columns, rows = value
    if not (1 <= columns <= MAX_TTY_SIDE and 1 <= rows <= MAX_TTY_SIDE):
        raise SpecError(
            name,
            f"must be between 1 and {MAX_TTY_SIDE} columns and rows, not {columns}x{rows}",
        )
    return columns, rows


def writable_paths(value: object) -> tuple[bytes, ...]:
    """Writable paths as a job is given them: absolute, normalized (no `..`,
    no `//`), each once; SpecError naming the one that is wrong. The one
    reading of them: the policy checks what this returns."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise SpecError("writable", f"must be a list of absolute paths, not {describe(value)}")
    if len(value) > MAX_WRITABLE:
        raise SpecError("writable", f"must name at most {MAX_WRITABLE} paths, not {len(value)}")
    paths: list[bytes] = []
    for i, item in enumerate(value):
        path = _as_bytes(f"writable[{i}]", item)
        if not path.startswith(b"/"):
            raise SpecError(f"writable[{i}]", f"must be an absolute path, not {quote(path)}")
        if len(path) > PATH_MAX:
            raise SpecError(
                f"writable[{i}]", f"must be at most {PATH_MAX} bytes long, not {len(path)}"
            )
        path = os.path.normpath(path)
        if path.startswith(b"//"):  # normpath keeps POSIX's implementation-defined //
            path = b"/" + path.lstrip(b"/")
        if path not in paths:
            paths.append(path)
    return tuple(paths)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What to run, as whom, where, and within which limits."""

    argv: Sequence[bytes | str]
    # Added to default_env(), replacing what it names; to an empty environment
    # with env_clear (as `env -i` does).
    env: Mapping[bytes | str, bytes | str] | None = None
    env_clear: bool = False
    cwd: bytes | str = DEFAULT_CWD
    user: str = DEFAULT_USER
    limits: Limits = field(default_factory=Limits)
    max_runtime: float | None = None  # seconds; then it is stopped
    # Whose job it is: a name and a role together (corral.identity).
    owner: str = ""
    owner_role: str = USER
    stop_grace: float = DEFAULT_STOP_GRACE  # between SIGTERM and SIGKILL at max runtime
    log_limit: int = DEFAULT_LOG_LIMIT  # bytes of output.log
    tmp_size: int = DEFAULT_TMP_SIZE  # bytes of the private /tmp
    # Host paths the job may write (file permissions still apply); the rest
    # of the host is read-only to it. b"/" makes all of it writable.
    writable: Sequence[bytes | str] = ()
    # Input: with `stdin`, the job's stdin is a pipe whose write end its shim
    # holds for input (else /dev/null); with `tty`, stdin, stdout and stderr
    # are a terminal of the job's own, `tty_size` columns by rows at first.
    stdin: bool = False
    tty: bool = False
    tty_size: Sequence[int] = DEFAULT_TTY_SIZE
    # Root on the host: uid 0 with every capability and no user namespace
    # (admins alone, when the policy allows). Without it, root is root in
    # the job's own user namespace, an unprivileged uid on the host.
    host_root: bool = False
    seccomp: str = SECCOMP_DEFAULT

    def validate(self) -> ResolvedSpec:
        """Check every field and return the spec in its on-disk form."""
        if isinstance(self.argv, str | bytes) or not isinstance(self.argv, Sequence):
            raise SpecError("argv", f"must be a list of arguments, not {describe(self.argv)}")
        if not self.argv:
            raise SpecError("argv", "must name a command")
        argv = tuple(_as_bytes(f"argv[{i}]", arg) for i, arg in enumerate(self.argv))
        if not argv[0]:
            raise SpecError("argv[0]", "must not be empty")
        _within("argv", sum(len(a) + 1 for a in argv), MAX_ARGV_BYTES)
        env = self._env()
        cwd = _as_bytes("cwd", self.cwd)
        if not cwd.startswith(b"/"):
            raise SpecError("cwd", f"must be an absolute path, not {quote(cwd)}")
        if not isinstance(self.user, str) or not self.user or "\0" in self.user:
            raise SpecError(
                "user", f"must be a user name or a numeric uid, not {describe(self.user)}"
            )
        if self.max_runtime is not None:
            _seconds("max_runtime", self.max_runtime, MIN_RUNTIME, MAX_RUNTIME)
        check_grace(self.stop_grace, "stop_grace")
        _whole("log_limit", self.log_limit, MIN_LOG_LIMIT, MAX_BYTES, " of bytes")
        _whole("tmp_size", self.tmp_size, MIN_TMP_SIZE, MAX_BYTES, " of bytes")
        if not isinstance(self.limits, Limits):
            raise SpecError("limits", f"must be a Limits record, not {describe(self.limits)}")
        writable = self._writable()
        if self.host_root is True and self.user not in ROOT_USERS | {DYNAMIC_USER}:
            raise SpecError("host_root", f"runs the job as root, not as user {self.user!r}")
        if self.owner_role not in ROLES:
            raise SpecError("owner_role", f"must be one of {', '.join(ROLES)}")
        if self.seccomp not in SECCOMP_MODES:
            modes = ", ".join(SECCOMP_MODES)
            raise SpecError("seccomp", f"must be one of {modes}, not {describe(self.seccomp)}")
        for name in ("stdin", "tty", "host_root"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(name, f"must be true or false, not {describe(getattr(self, name))}")
        return ResolvedSpec(
            argv=argv,
            env=env,
            cwd=cwd,
            user="root" if self.host_root is True else self.user,
            limits=self.limits.validate(),
            max_runtime=None if self.max_runtime is None else float(self.max_runtime),
            owner=self.owner,
            owner_role=self.owner_role,
            stop_grace=float(self.stop_grace),
            log_limit=self.log_limit,
            tmp_size=self.tmp_size,
            writable=writable,
            stdin=self.stdin,
            tty=self.tty,
            tty_size=check_tty_size(self.tty_size),
            host_root=self.host_root,
            seccomp=self.seccomp,
        )

    def _writable(self) -> tuple[bytes, ...]:
        return writable_paths(self.writable)

    def _env(self) -> dict[bytes, bytes]:
        """The command's environment: default_env() (or nothing, with
        env_clear) with `env` over it."""
        if not isinstance(self.env_clear, bool):
            raise SpecError("env_clear", f"must be true or false, not {describe(self.env_clear)}")
        env = {} if self.env_clear else default_env()
        if self.env is None:
            return env
        if not isinstance(self.env, Mapping):
            raise SpecError("env", f"must be a map of names to values, not {describe(self.env)}")
        for key, value in self.env.items():
            if not isinstance(key, str | bytes):
                raise SpecError("env", f"a variable name must be a string, not {describe(key)}")
            name = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
            wrong = _name_problem(name)
            if wrong:
                raise SpecError("env", f"invalid variable name {quote(name)}: it may not {wrong}")
            label = name.decode("utf-8", "backslashreplace")
            env[name] = _as_bytes(f"env[{label}]", value)
        _within("env", sum(len(k) + len(v) + 2 for k, v in env.items()), MAX_ENV_BYTES)
        return env


def _name_problem(name: bytes) -> str | None:
    """What makes `name` no environment variable name, or None."""
    if not name:
        return "be empty"
    if b"=" in name:
        return "contain '='"
    if b"\0" in name:
        return "contain a NUL byte"
    return None


def _within(name: str, size: int, most: int) -> None:
    if size > most:
        raise SpecError(name, f"must be at most {short_size(most)} in all, not {short_size(size)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedSpec:
    """A validated spec, as `spec.msgpack` holds it (plus id and creation time)."""

    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    cwd: bytes
    user: str
    limits: Limits
    max_runtime: float | None
    owner: str
    stop_grace: float
    log_limit: int
    tmp_size: int
    # The owner's role; records from before roles have none and read as
    # "user" (an admin reaches every job anyway).
    owner_role: str = USER
    writable: tuple[bytes, ...] = ()
    stdin: bool = False
    tty: bool = False
    tty_size: tuple[int, int] = DEFAULT_TTY_SIZE
    host_root: bool = False
    seccomp: str = SECCOMP_DEFAULT
    # The owner's slice, the cgroup above the job's (corral.shim.cgroup);
    # "" for jobs from before slices, whose cgroup is right under the parent.
    slice: str = ""
    # The host uid (and gid) from corrald's pool the job runs as, for a
    # dynamic or root user; None for a host user named by an admin, or host root.
    uid: int | None = None
    id: str = ""
    created_at: int = 0  # ns since the epoch

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["argv"] = list(self.argv)
        wire["writable"] = list(self.writable)
        wire["tty_size"] = list(self.tty_size)
        wire["limits"] = self.limits.to_wire()
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ResolvedSpec:
        values = dict(wire)
        values["argv"] = tuple(values["argv"])
        values["writable"] = tuple(values.get("writable", ()))
        values["tty_size"] = tuple(values.get("tty_size", DEFAULT_TTY_SIZE))
        values["limits"] = Limits(**values.get("limits", {}))
        return cls(**values)

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def owned_by(self) -> Identity:
        """The owner: a name and a role, the job belongs to exactly that pair."""
        return Identity(self.owner, self.owner_role)

    @property
    def pooled(self) -> bool:
        """Whether the job runs as a uid of corrald's pool (its own user, or
        root in its user namespace), not as a host user."""
        return not self.host_root and self.user in ROOT_USERS | {DYNAMIC_USER}


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """What happened to a job, as `status.msgpack` holds it."""

    state: State
    reason: str = ""
    exit_code: int | None = None
    signal: str | None = None  # "SIGKILL"
    oom_killed: bool = False
    pid: int | None = None  # init's pid on the host
    shim_pid: int | None = None
    started_at: int | None = None  # ns since the epoch
    finished_at: int | None = None
    failed_step: str | None = None  # for FAILED: "exec", "cgroup", "user", ...
    stopped_by: str | None = None
    dropped_bytes: int = 0  # output not written: the log was full
    usage: Usage = field(default_factory=Usage)

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["state"] = str(self.state)
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Status:
        values = dict(wire)
        values["state"] = State(values["state"])
        values["usage"] = Usage(**values.get("usage", {}))
        return cls(**values)
