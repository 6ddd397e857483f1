"""What a job is on disk: its spec, its limits, its status, its usage.

Shared by the shim (plain Python, no trio) and the worker (trio), so it
imports neither. Each record converts to and from a msgpack-ready map; the
state directory holds `spec.msgpack` (written once, before the shim starts)
and `status.msgpack` (replaced atomically by whoever knows more), and while
a shim runs its job, `reserve`: room for the job's end (see `Reserve`).

Validation lives here too: a spec that passes `JobSpec.validate()` is one
the shim can run. Errors name the field (`SpecError.field`), so corrald can
answer `invalid_argument` saying exactly what is wrong.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import msgpack

from corral.client.units import describe, quote, short_duration, short_number, short_size

# Job ids: 128 random bits as 32 hex digits. The first 12 are the hostname
# inside the job and the short id people type.
ID_BYTES = 16
SHORT_ID = 12

DEFAULT_USER = "nobody"
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
# A job's reserve (see Reserve): a block for its final status, the rest for
# the log's last record and a directory block, in blocks of 4 KiB or more.
RESERVE_SIZE = 32 << 10
RESERVE_BLOCKS = 8
RESERVE_MAX = 1 << 20  # a filesystem claiming huge blocks (NFS) gets no more
MAX_WRITABLE = 64  # paths a job may be given to write (each a bind mount)


class SpecError(ValueError):
    """A job spec or limit is invalid; `field` names which part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def host_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a cpuset or
    taskset narrows): the most CPU a job may be given."""
    return len(os.sched_getaffinity(0))


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
    return {b"PATH": DEFAULT_PATH, b"HOME": b"/", b"LANG": b"C.UTF-8", b"TERM": b"dumb"}


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
    owner: str = ""
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL at max runtime
    log_limit: int = DEFAULT_LOG_LIMIT  # bytes of output.log
    tmp_size: int = DEFAULT_TMP_SIZE  # bytes of the private /tmp
    # Host paths the job may write (file permissions still apply); the rest
    # of the host is read-only to it. b"/" makes all of it writable.
    writable: Sequence[bytes | str] = ()

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
        _seconds("stop_grace", self.stop_grace, 0, MAX_STOP_GRACE)
        _whole("log_limit", self.log_limit, MIN_LOG_LIMIT, MAX_BYTES, " of bytes")
        _whole("tmp_size", self.tmp_size, MIN_TMP_SIZE, MAX_BYTES, " of bytes")
        if not isinstance(self.limits, Limits):
            raise SpecError("limits", f"must be a Limits record, not {describe(self.limits)}")
        writable = self._writable()
        return ResolvedSpec(
            argv=argv,
            env=env,
            cwd=cwd,
            user=self.user,
            limits=self.limits.validate(),
            max_runtime=None if self.max_runtime is None else float(self.max_runtime),
            owner=self.owner,
            stop_grace=float(self.stop_grace),
            log_limit=self.log_limit,
            tmp_size=self.tmp_size,
            writable=writable,
        )

    def _writable(self) -> tuple[bytes, ...]:
        if isinstance(self.writable, str | bytes) or not isinstance(self.writable, Sequence):
            raise SpecError(
                "writable", f"must be a list of absolute paths, not {describe(self.writable)}"
            )
        if len(self.writable) > MAX_WRITABLE:
            raise SpecError(
                "writable", f"must name at most {MAX_WRITABLE} paths, not {len(self.writable)}"
            )
        paths: list[bytes] = []
        for i, value in enumerate(self.writable):
            path = _as_bytes(f"writable[{i}]", value)
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
    writable: tuple[bytes, ...] = ()
    id: str = ""
    created_at: int = 0  # ns since the epoch

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["argv"] = list(self.argv)
        wire["writable"] = list(self.writable)
        wire["limits"] = self.limits.to_wire()
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ResolvedSpec:
        values = dict(wire)
        values["argv"] = tuple(values["argv"])
        values["writable"] = tuple(values.get("writable", ()))
        values["limits"] = Limits(**values.get("limits", {}))
        return cls(**values)

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]


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


# -- files --------------------------------------------------------------------------

SPEC_FILE = "spec.msgpack"
STATUS_FILE = "status.msgpack"
OUTPUT_FILE = "output.log"
SOCKET_FILE = "shim.sock"
RESERVE_FILE = "reserve"

# A full filesystem, or the writer's quota used up: no new blocks to be had.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` (0600) so readers see the old or the new, never half.

    `durable` also flushes it to disk before the rename (a few ms on a real
    disk): for records that must survive a power cut, like a job's end. A
    lost intermediate record (starting, running) costs nothing: the shim
    that wrote it is gone after a power cut too.
    """
    # A name no other writer picks (O_EXCL makes sure): tempfile's would do,
    # but importing it costs every shim fork (see spawner.py).
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(value, dict):
        raise TypeError(f"expected a map, not {type(value).__name__}")
    return value


# sun_path holds 108 bytes; longer job paths are reached through /proc.
MAX_SOCKET_PATH = 100


@contextlib.contextmanager
def socket_path(job_dir: Path) -> Iterator[str]:
    """A path for the job's shim.sock that fits in a unix socket address.

    A deep state directory makes `job_dir/shim.sock` too long to bind or
    connect; then it is named through an O_PATH descriptor of the
    directory, /proc/self/fd/N/shim.sock, valid while the block runs.
    """
    path = job_dir / SOCKET_FILE
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(job_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_FILE}"
    finally:
        os.close(fd)


def read_status(job_dir: Path) -> Status | None:
    """The recorded status, or None if the job has none yet."""
    try:
        return Status.from_wire(unpack((job_dir / STATUS_FILE).read_bytes()))
    except FileNotFoundError:
        return None


def write_status(job_dir: Path, status: Status) -> None:
    """Record `status`; durably once the job has ended.

    An end is recorded on a full filesystem too, if the status file has the
    room: written over it in place (see `_overwrite`). Raises OSError when
    it cannot be recorded.
    """
    path, data, durable = job_dir / STATUS_FILE, pack(status.to_wire()), status.state.finished
    try:
        write_atomically(path, data, durable=durable)
    except OSError as exc:
        if not durable or exc.errno not in FULL_ERRNOS or not _overwrite(path, data):
            raise


def _overwrite(path: Path, data: bytes) -> bool:
    """Write `data` over the file at `path` in the blocks it has; False if
    they are too few (or there is no file), so no new block is needed.

    Not atomic: a reader at that moment may find a mix of the two. Only for
    an end that could not be recorded otherwise; whoever writes an end does
    so as the job's last act, and corrald reads it once the writer is gone.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if len(data) > os.fstat(fd).st_blocks * 512:
            return False
        _write_at(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _write_at(fd: int, data: bytes) -> None:
    """All of `data` at the start of the file."""
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], done)


class Reserve:
    """Room kept in a job directory, so the job's end is recorded however
    full its filesystem gets.

    Theory of operation. The shim makes the reserve, a file of a few blocks
    allocated up front, before the job runs; at the end it puts the final
    status in the reserve's own blocks (`hold`), which frees the rest for
    the log's last record, then renames the reserve over status.msgpack
    (`commit`). Neither step needs a new block: the end is recorded on a
    full filesystem even when other jobs take every block as soon as it is
    freed (those then take the room meant for the marker: the status still
    counts the dropped output). Guaranteed where blocks allocated to a file
    stay its own until it is truncated (tmpfs, ext4 and XFS, whose
    conversion of preallocated blocks draws on the filesystem's own
    reserve); not on copy-on-write filesystems (btrfs, ZFS), which need new
    blocks for every write. A status larger than the reserve (a very long
    reason) needs new blocks too; write_status is then the fallback.
    """

    def __init__(self, job_dir: Path) -> None:
        """Allocate the room; OSError if it cannot (errno in FULL_ERRNOS: no room)."""
        self.path = job_dir / RESERVE_FILE
        self.held = False
        self.fd: int | None = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            # Blocks of the filesystem's unit of allocation (a page on tmpfs).
            size = max(RESERVE_SIZE, RESERVE_BLOCKS * os.fstatvfs(self.fd).f_frsize)
            os.posix_fallocate(self.fd, 0, min(size, RESERVE_MAX))
        except BaseException:
            self.discard()
            raise

    def hold(self, status: Status) -> bool:
        """Write `status` into the reserve and free the rest of its room;
        False (and the reserve is gone) if that needed more room than it had."""
        if self.fd is None:
            return False
        data = pack(status.to_wire())
        try:
            _write_at(self.fd, data)
            os.ftruncate(self.fd, len(data))
        except OSError:
            self.discard()
            return False
        self.held = True
        return True

    def commit(self, job_dir: Path) -> bool:
        """Make the status held the job's status.msgpack, flushed to disk
        first (it is an end); False (and the reserve is gone) if nothing was
        held or that failed."""
        if self.fd is None or not self.held:
            self.discard()
            return False
        try:
            os.fsync(self.fd)
            os.replace(self.path, job_dir / STATUS_FILE)
        except OSError:
            self.discard()
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def discard(self) -> None:
        """Give the room back. Safe to call more than once."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def read_spec(job_dir: Path) -> ResolvedSpec:
    return ResolvedSpec.from_wire(unpack((job_dir / SPEC_FILE).read_bytes()))


# -- output.log records ------------------------------------------------------------

STREAM_MARKER, STREAM_STDOUT, STREAM_STDERR = 0, 1, 2
# A record holds at most one read of a pipe (64 KiB) and its envelope.
MAX_RECORD = 1 << 20
FEED_SIZE = 256 << 10


@dataclass(frozen=True, slots=True)
class Record:
    """One record of output.log: `data` is bytes for stdout (1) and stderr (2);
    for a marker (0), a map such as {"dropped_bytes": N}."""

    stream: int
    time_ns: int
    data: bytes | dict[str, Any]


class RecordDecoder:
    """Records out of output.log's bytes, fed in pieces of any size."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_RECORD)

    @property
    def consumed(self) -> int:
        """Bytes of the records returned so far: where the next record begins,
        counted from the first byte fed."""
        position: int = self._unpacker.tell()
        return position

    def feed(self, data: bytes) -> list[Record]:
        """The records `data` completes; ValueError if it is not output.log."""
        records = []
        view = memoryview(data)
        for start in range(0, len(view), FEED_SIZE):  # the buffer holds one record or so
            try:
                self._unpacker.feed(view[start : start + FEED_SIZE])
            except msgpack.BufferFull:
                raise ValueError(f"a record over {MAX_RECORD} bytes") from None
            for item in self._unpacker:
                match item:
                    case [int(stream), int(time_ns), bytes() | dict() as payload]:
                        records.append(Record(stream, time_ns, payload))
                    case _:
                        raise ValueError(f"not an output record: {item!r:.80}")
        return records
