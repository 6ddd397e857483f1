"""The messages between corral's own processes: corrald, the spawner, the
shims and init.

Every message is a frozen, keyword-only dataclass that travels as one
msgpack map; its key "t" names its type. "t" and "version" are the
envelope every version keeps, so a peer can always tell what it was sent
and by whom. The channels, and who speaks first:

    spawner  corrald -> spawner   Prepare | Start (+ the report pipe's write end) | Discard
             spawner -> corrald   Spawned (+ the shim's pidfd, for Start) | Refused
    claim    spawner -> warm shim Claim (+ the report pipe's write end)
    job      shim -> init         JobConfig (JOB_HEADER length, then the map)
    exec     init -> shim         Started | InitFailure
    input    init -> shim         MapUser (shim -> init: UserMapped | Refusal), then
                                  InputEnd (corral.ipc_input) + the job's input end
    report   shim -> corrald      StartReport
    control  corrald -> shim      Hello, then StatusRequest | StopRequest
             shim -> corrald      Hello, then StatusReply | Stopping | Refusal

The first message of each channel carries `version`. A receiver refuses a
version it does not know (VersionError) before it reads anything else, so
a message is never misread. Shims outlive corrald (`--keep-jobs`), so the
control channel opens with a Hello each way: a newer corrald learns which
version the shim speaks before it asks the shim to do anything.

Pure: bytes in, messages out (the descriptors that travel with some of
them: `corral.ipc_fds`). Imports no trio: the shim and init import it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, overload

import msgpack

from corral import ipc_fields as fields
from corral.errors import ErrorCode
from corral.job import Limits, SpecError, Status
from corral.store import pack

# The process name a shim takes (prctl PR_SET_NAME): a restarted corrald
# finds shims by it, so the shim and the manager must spell it alike.
SHIM_COMM = "corral-shim"

# The version this side speaks, and the errors of a message that cannot be
# read (corral.ipc_fields's, named here for the catalogue's users).
IPC_VERSION = fields.IPC_VERSION
IPCError = fields.IPCError
VersionError = fields.VersionError
# The versions of a shim's control channel this corrald can talk to. A
# shim started by an older corrald keeps running under a newer one: a
# version 1 shim answers status and stop as version 2 asks them (its jobs
# take no input, so nothing else is asked of it).
SHIM_VERSIONS = frozenset({1, IPC_VERSION})
# A shim from before versioned messages answers a Hello with an untagged map.
UNVERSIONED = 0

# The largest message on any channel: a JobConfig with a long argv and env
# (the spec caps them well below this), or a status with usage.
MAX_MESSAGE = 1 << 20
# Control-channel messages are small; a shim answers one per datagram.
MAX_CONTROL_MESSAGE = 1 << 16
# Each message passes at most this many descriptors (one, today).
MAX_FDS = 4
# The job channel is a pipe: the map is preceded by its length.
JOB_HEADER = struct.Struct("=I")


class _Message:
    """What every message has: its tag, and its map on the wire."""

    __slots__ = ()
    TAG: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The map that stands for this message on the wire."""
        wire: dict[str, Any] = {"t": self.TAG}
        name: str
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, Status | Limits):
                value = value.to_wire()
            elif isinstance(value, ErrorCode):
                value = str(value)
            elif isinstance(value, tuple):
                value = [list(item) if isinstance(item, tuple) else item for item in value]
            wire[name] = value
        return wire

    def encode(self) -> bytes:
        """The message as bytes, ready to send."""
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> _Message:
        """The message `wire` stands for; IPCError if it is not one."""
        raise NotImplementedError


# -- corrald <-> spawner ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepare(_Message):
    """corrald -> spawner: build a sandbox for job `id` ahead of its start."""

    TAG: ClassVar[str] = "prepare"
    version: int = IPC_VERSION
    id: str
    flavour: str  # the cgroup flavour's name (corral.shim.cgroup.Flavour)
    cgroup_root: str
    cgroup_parent: str
    devices: tuple[tuple[int, int], ...] = ()  # (major, minor) of the disks IO limits apply to
    # The job's owner's slice under the parent, and its limits (the owner's
    # quota: cpu, memory, pids; None: leave them as they are); "" puts the
    # job right under the parent.
    slice: str = ""
    slice_limits: Limits | None = None

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Prepare:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(**_sandbox_fields(wire, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Start(_Message):
    """corrald -> spawner, with the report pipe's write end: start job `id`,
    in its warm sandbox if one was prepared, else in a new one."""

    TAG: ClassVar[str] = "start"
    version: int = IPC_VERSION
    id: str
    flavour: str
    cgroup_root: str
    cgroup_parent: str
    devices: tuple[tuple[int, int], ...] = ()
    slice: str = ""
    slice_limits: Limits | None = None
    job_dir: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Start:
        """The message `wire` stands for; IPCError if it is not one."""
        sandbox = _sandbox_fields(wire, cls.TAG)
        return cls(**sandbox, job_dir=fields.get(wire, "job_dir", str, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Discard(_Message):
    """corrald -> spawner: take job `id`'s warm sandbox down, unused (it was
    built for another owner's slice than the next starts'). Answered with
    the warm shim's Spawned pid, or Refused if there is none."""

    TAG: ClassVar[str] = "discard"
    version: int = IPC_VERSION
    id: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Discard:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(version=fields.version(wire, cls.TAG), id=fields.get(wire, "id", str, cls.TAG))


def _sandbox_fields(wire: dict[str, Any], tag: str) -> dict[str, Any]:
    version = fields.version(wire, tag)
    devices = []
    for device in fields.get(wire, "devices", list, tag):
        if not (
            isinstance(device, list)
            and len(device) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in device)
        ):
            raise IPCError(f"field 'devices' of '{tag}' must be a list of [major, minor]")
        devices.append((device[0], device[1]))
    return {
        "version": version,
        "id": fields.get(wire, "id", str, tag),
        "flavour": fields.get(wire, "flavour", str, tag),
        "cgroup_root": fields.get(wire, "cgroup_root", str, tag),
        "cgroup_parent": fields.get(wire, "cgroup_parent", str, tag),
        "devices": tuple(devices),
        "slice": fields.get(wire, "slice", str, tag),
        "slice_limits": _limits(wire.get("slice_limits"), tag),
    }


def _limits(value: object, tag: str) -> Limits | None:
    if value is None:
        return None
    try:
        return Limits.from_wire(value)
    except SpecError as exc:
        raise IPCError(f"field 'slice_limits' of '{tag}': {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Spawned(_Message):
    """spawner -> corrald: the shim's pid (and, answering Start, its pidfd)."""

    TAG: ClassVar[str] = "spawned"
    pid: int

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Spawned:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(pid=fields.count(wire, "pid", cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Refused(_Message):
    """spawner -> corrald: no shim, and why."""

    TAG: ClassVar[str] = "refused"
    message: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Refused:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(message=fields.get(wire, "message", str, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim(_Message):
    """spawner -> warm shim, with the report pipe's write end: your job's directory."""

    TAG: ClassVar[str] = "claim"
    version: int = IPC_VERSION
    job_dir: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Claim:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(
            version=fields.version(wire, cls.TAG), job_dir=fields.get(wire, "job_dir", str, cls.TAG)
        )


# -- shim <-> init ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class JobConfig(_Message):
    """shim -> init: the job, once init is in the job's cgroup with its limits set."""

    TAG: ClassVar[str] = "job"
    version: int = IPC_VERSION
    argv: tuple[bytes, ...]
    env: tuple[tuple[bytes, bytes], ...]  # pairs: a map's keys would have to be str
    cwd: bytes
    uid: int
    gid: int
    groups: tuple[int, ...]
    tmp_size: int
    writable: tuple[bytes, ...] = ()
    # The job's input (see corral.job.JobSpec): a pipe for stdin, or a
    # terminal of `tty_size` (columns, rows); init sends the shim its end.
    stdin: bool = False
    tty: bool = False
    tty_size: tuple[int, int] = (80, 24)
    # A user namespace of the job's own (see corral.shim.userns): uid, gid
    # and groups are the host's, `inside_uid` and `inside_gid` what they
    # are mapped to, `passwd` and `group` the job's /etc files. Without
    # it the job is the host's uid (root on the host: host_root).
    userns: bool = False
    inside_uid: int = 0
    inside_gid: int = 0
    passwd: bytes = b""
    group: bytes = b""
    seccomp: bool = False  # load the syscall filter (corral.shim.seccomp)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> JobConfig:
        """The message `wire` stands for; IPCError if it is not one."""
        tag = cls.TAG
        version = fields.version(wire, tag)
        env = fields.get(wire, "env", list, tag)
        if not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, bytes) for x in pair)
            for pair in env
        ):
            raise IPCError(f"field 'env' of '{tag}' must be a list of [name, value] bytes")
        return cls(
            version=version,
            argv=fields.list_of(wire, "argv", bytes, tag),
            env=tuple((name, value) for name, value in env),
            cwd=fields.get(wire, "cwd", bytes, tag),
            uid=fields.count(wire, "uid", tag),
            gid=fields.count(wire, "gid", tag),
            groups=fields.list_of(wire, "groups", int, tag),
            tmp_size=fields.count(wire, "tmp_size", tag),
            writable=fields.list_of(wire, "writable", bytes, tag),
            stdin=fields.get(wire, "stdin", bool, tag),
            tty=fields.get(wire, "tty", bool, tag),
            tty_size=fields.size(wire, "tty_size", tag),
            userns=fields.get(wire, "userns", bool, tag),
            inside_uid=fields.count(wire, "inside_uid", tag),
            inside_gid=fields.count(wire, "inside_gid", tag),
            passwd=fields.get(wire, "passwd", bytes, tag),
            group=fields.get(wire, "group", bytes, tag),
            seccomp=fields.get(wire, "seccomp", bool, tag),
        )

    def frame(self) -> bytes:
        """The message as the job pipe carries it: its length, then the map."""
        body = self.encode()
        return JOB_HEADER.pack(len(body)) + body


@dataclass(frozen=True, kw_only=True, slots=True)
class MapUser(_Message):
    """init -> shim on the input channel: init is in the job's new user
    namespace; map its ids (the shim answers UserMapped, or a Refusal)."""

    TAG: ClassVar[str] = "map_user"
    version: int = IPC_VERSION

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> MapUser:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(version=fields.version(wire, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class UserMapped(_Message):
    """shim -> init on the input channel: the user namespace's maps are written."""

    TAG: ClassVar[str] = "user_mapped"
    version: int = IPC_VERSION

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> UserMapped:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(version=fields.version(wire, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Started(_Message):
    """init -> shim on the exec channel: the command has exec'd."""

    TAG: ClassVar[str] = "started"
    version: int = IPC_VERSION

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Started:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(version=fields.version(wire, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class InitFailure(_Message):
    """init -> shim on the exec channel: setup step `step` failed (then init exits)."""

    TAG: ClassVar[str] = "init_failure"
    version: int = IPC_VERSION
    step: str  # "namespaces", "mounts", "user", "cwd", "exec", "writable", ...
    errno: int  # 0 when the failure was no system call's
    message: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InitFailure:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(
            version=fields.version(wire, cls.TAG),
            step=fields.get(wire, "step", str, cls.TAG),
            errno=fields.count(wire, "errno", cls.TAG),
            message=fields.get(wire, "message", str, cls.TAG),
        )

    @classmethod
    def of(cls, step: str, error: OSError | str) -> InitFailure:
        """The failure of `step` because of `error` (an OSError keeps its errno)."""
        if isinstance(error, OSError):
            return cls(step=step, errno=error.errno or 0, message=error.strerror or str(error))
        return cls(step=step, errno=0, message=error)


# -- shim -> corrald: the start report -----------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class StartReport(_Message):
    """shim -> corrald on the report pipe, once: the command is running
    (`ok`, with its status), or why the job could not start (`code`,
    `message`, and the failing `step` and `errno` as init reported them)."""

    TAG: ClassVar[str] = "start_report"
    version: int = IPC_VERSION
    ok: bool
    status: Status | None = None
    code: ErrorCode | None = None
    message: str = ""
    step: str | None = None
    errno: int = 0

    @classmethod
    def running(cls, status: Status) -> StartReport:
        """The report of a job whose command is running with `status`."""
        return cls(ok=True, status=status)

    @classmethod
    def failed(
        cls, code: ErrorCode, message: str, step: str | None = None, errno: int = 0
    ) -> StartReport:
        """The report of a job that could not start."""
        return cls(ok=False, code=code, message=message, step=step, errno=errno)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> StartReport:
        """The message `wire` stands for; IPCError if it is not one."""
        tag = cls.TAG
        version = fields.version(wire, tag)
        ok = fields.get(wire, "ok", bool, tag)
        if ok:
            return cls(version=version, ok=True, status=fields.status(wire, tag))
        code = fields.code(wire, tag)
        if code is None:
            raise IPCError(f"a failed '{tag}' lacks field 'code'")
        return cls(
            version=version,
            ok=False,
            code=code,
            message=fields.get(wire, "message", str, tag),
            step=fields.optional(wire, "step", str, tag),
            errno=fields.count(wire, "errno", tag) if "errno" in wire else 0,
        )


# -- corrald <-> shim: the control socket --------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello(_Message):
    """Both ways, first on each control connection: the version the sender speaks.

    corrald sends its own; the shim answers with its own, whatever it was
    sent, so the newer side decides whether they can talk."""

    TAG: ClassVar[str] = "hello"
    version: int = IPC_VERSION

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Hello:
        """The message `wire` stands for (any version); IPCError if it is not one."""
        return cls(version=fields.count(wire, "version", cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusRequest(_Message):
    """corrald -> shim: the job's status, with live usage."""

    TAG: ClassVar[str] = "status"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> StatusRequest:
        """The message `wire` stands for."""
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class StopRequest(_Message):
    """corrald -> shim: SIGTERM the job, SIGKILL it after `grace` seconds
    (None: the job's own stop grace). `by` says who asked, for its reason."""

    TAG: ClassVar[str] = "stop"
    grace: float | None = None
    by: str = ""

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> StopRequest:
        """The message `wire` stands for; IPCError if it is not one."""
        grace = None if wire.get("grace") is None else fields.number(wire, "grace", cls.TAG)
        return cls(grace=grace, by=fields.get(wire, "by", str, cls.TAG) if "by" in wire else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusReply(_Message):
    """shim -> corrald: the job's status now."""

    TAG: ClassVar[str] = "status_reply"
    status: Status

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> StatusReply:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(status=fields.status(wire, cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Stopping(_Message):
    """shim -> corrald: the stop is under way (the job's end is on disk later)."""

    TAG: ClassVar[str] = "stopping"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Stopping:
        """The message `wire` stands for."""
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class Refusal(_Message):
    """shim -> corrald: the request was not done, and why."""

    TAG: ClassVar[str] = "refusal"
    message: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Refusal:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(message=fields.get(wire, "message", str, cls.TAG))


SpawnerRequest = Prepare | Start | Discard
SpawnerReply = Spawned | Refused
InitWord = Started | InitFailure
ControlRequest = StatusRequest | StopRequest
ControlReply = StatusReply | Stopping | Refusal
Message = (
    Prepare | Start | Discard | Spawned | Refused | Claim | JobConfig | MapUser | UserMapped
    | Started | InitFailure | StartReport | Hello | StatusRequest | StopRequest | StatusReply
    | Stopping | Refusal
)  # fmt: skip

MESSAGES: dict[str, type[Message]] = {
    cls.TAG: cls
    for cls in (
        Prepare, Start, Discard, Spawned, Refused, Claim, JobConfig, MapUser, UserMapped, Started,
        InitFailure, StartReport, Hello, StatusRequest, StopRequest, StatusReply, Stopping, Refusal,
    )
}  # fmt: skip

# The base every message class derives from, for other modules' type variables.
MessageBase = _Message

_A = TypeVar("_A", bound=_Message)
_B = TypeVar("_B", bound=_Message)
_C = TypeVar("_C", bound=_Message)


def _from_wire(wire: object, expected: tuple[type[_Message], ...]) -> _Message:
    """The message the decoded map `wire` stands for, which must be one of
    `expected`; IPCError (VersionError for a version we do not know) if not."""
    if not isinstance(wire, dict):
        raise IPCError(f"a message must be a map, not {type(wire).__name__}")
    tag = wire.get("t")
    if not isinstance(tag, str):
        raise IPCError("message lacks a string type field 't'")
    # By the expected types first: corral.ipc_input's are not in MESSAGES.
    cls: type[_Message] | None = next((kind for kind in expected if tag == kind.TAG), None)
    cls = cls or MESSAGES.get(tag)
    if cls is None:
        raise IPCError(f"unknown message type {tag[:40]!r}")
    if cls not in expected:
        wanted = " or ".join(repr(kind.TAG) for kind in expected)
        raise IPCError(f"expected a {wanted} message, not {tag!r}")
    return cls.from_wire(wire)


def _unpack(data: bytes) -> object:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IPCError(f"unreadable message: {exc}") from None


# One overload per number of expected types, so the caller gets their union.
@overload
def decode(data: bytes, expected: tuple[type[_A]]) -> _A: ...
@overload
def decode(data: bytes, expected: tuple[type[_A], type[_B]]) -> _A | _B: ...
@overload
def decode(data: bytes, expected: tuple[type[_A], type[_B], type[_C]]) -> _A | _B | _C: ...
def decode(data: bytes, expected: tuple[type[_Message], ...]) -> _Message:
    """The message in `data` (one msgpack map), one of `expected`; IPCError
    (VersionError for a version we do not know) if it is not one."""
    return _from_wire(_unpack(data), expected)


def decode_any(data: bytes, expected: tuple[type[MessageBase], ...]) -> MessageBase:
    """`decode` for callers that pass their own tuple of expected types."""
    return _from_wire(_unpack(data), expected)


def hello_version(data: bytes) -> int:
    """The version a shim answered corrald's Hello with; UNVERSIONED for a
    shim from before versions (it answers with an untagged map). IPCError
    if the answer is neither."""
    wire = _unpack(data)
    if isinstance(wire, dict) and "t" not in wire and "ok" in wire:
        return UNVERSIONED
    hello = _from_wire(wire, (Hello,))
    assert isinstance(hello, Hello)
    return hello.version
