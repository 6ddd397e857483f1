"""Who may do what: the authorization table, and the policy jobs start under.

Theory of operation. A client's role comes from its certificate (OU) and
nothing else. Every operation corrald serves has a row in `TABLE`: for each
role, how far it reaches:

- `ANY`: every job (admins);
- `OWN`: the caller's own jobs only; another owner's job is answered
  exactly like a job that does not exist (`not_found`, through the same
  lookup), so a user learns nothing of other users' jobs;
- a missing row or role is refused (`permission_denied`): what is not
  listed is not allowed.

`authorize()` is asked on every request and every stream, before anything
else, by `corral.supervisor.operations`; `owner_filter()` turns the reach
into the filter job lookups use.

With no configuration at all a user's job is not unbounded: a user's
caps start from `builtin_user_caps()` (a process count that stops a fork
bomb, a share of the host's memory), which the config file and the flags
raise or lower; admins have no cap unless configured.

A start is checked once more against the `Policy`: which user the job
runs as (a user's jobs always run as the default: by default `dynamic`, a
uid of the job's own; an admin may name any host user, or root, which is
root inside the job's user namespace alone, and, where the policy allows,
ask for root on the host with `host_root`), and its limits: the defaults fill
what the request leaves unset, and each role's caps bound the result. A
limit over a cap is `permission_denied` naming the cap; a limit left unset
where a cap exists becomes the cap, so no job of a capped role runs
unbounded. A cpu cap over the host's CPUs is the host's count (the host
bounds a job already; left over it, it would be given to every job that
sets no cpu, and refused); a cpu default over them is refused at start.
"""

from __future__ import annotations

import enum
import math
import posixpath
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from corral.errors import OperationError
from corral.identity import ADMIN, ROLES, USER, Identity
from corral.job import (
    DEFAULT_USER,
    DYNAMIC_USER,
    MAX_RUNTIME,
    MIN_MEMORY,
    MIN_RUNTIME,
    SECCOMP_DEFAULT,
    SECCOMP_UNCONFINED,
    Limits,
    SpecError,
    host_cpus,
    host_memory,
    writable_paths,
)
from corral.protocol import ErrorCode
from corral.units import (
    describe,
    parse_duration,
    parse_size,
    quote,
    short_duration,
    short_number,
    short_size,
)

# The policy file's top-level settings.
SETTINGS = (
    "default_user",
    "allow_host_root",
    "allow_seccomp_unconfined",
    "defaults",
    "caps",
    "quota",
    "writable",
)


class Reach(enum.Enum):
    OWN = "own"  # the caller's own jobs
    ANY = "any"  # every job


# operation -> role -> reach. What is not here is refused.
TABLE: dict[str, dict[str, Reach]] = {
    "info": {ADMIN: Reach.ANY, USER: Reach.OWN},  # a user's counts are of their own jobs
    "ping": {ADMIN: Reach.ANY, USER: Reach.OWN},  # touches no job
    "start": {ADMIN: Reach.ANY, USER: Reach.OWN},  # run-as user and limits: Policy
    "list": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "status": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "wait": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "logs": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "stop": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "attach": {ADMIN: Reach.ANY, USER: Reach.OWN},  # the job's output, and input to it
    "resize": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "remove": {ADMIN: Reach.ANY, USER: Reach.OWN},
    "audit": {ADMIN: Reach.ANY},  # who did what: admins alone
}


def authorize(identity: Identity, operation: str) -> Reach:
    """How far `identity` reaches with `operation`; permission_denied if not at all."""
    reach = TABLE.get(operation, {}).get(identity.role)
    if reach is None:
        raise OperationError(
            ErrorCode.PERMISSION_DENIED,
            f"{identity.role} {identity.name} may not use {quote(operation)}",
        )
    return reach


def owner_filter(identity: Identity, operation: str) -> Identity | None:
    """The owner job lookups are limited to for this request (None: any
    owner): a name and a role, so a user named like an admin reaches none
    of the admin's jobs."""
    return None if authorize(identity, operation) is Reach.ANY else identity


# -- the policy jobs start under ------------------------------------------------

# What a user's job may use with no configuration at all: enough for real
# work, not enough to take the host from everyone else. [caps.user] or
# --user-cap changes each (a higher value lifts it).
USER_PIDS = 1024  # a fork bomb stops here; a parallel build (make -j64) fits well within
# A quarter of the host's RAM, the job's /tmp and /dev/shm included (tmpfs
# pages are charged to the job's cgroup as it writes them).
USER_MEMORY_SHARE = 4
# A user's jobs together (their slice, corral.shim.cgroup): four jobs' worth
# of processes and half the RAM, so a user running 250 jobs at once still
# leaves the host to the others. CPU has no quota by default: every
# owner's slice weighs the same, so under contention each owner gets an
# equal share, and an idle host is one user's to use. [quota.user] or
# --user-quota changes each.
USER_QUOTA_PIDS = 4 * USER_PIDS
USER_QUOTA_MEMORY_SHARE = 2
QUOTA_NAMES = ("cpu", "memory", "pids")

LIMIT_NAMES = tuple(f.name for f in fields(Limits))
BYTE_LIMITS = {"memory", "io_read_bps", "io_write_bps"}
WHOLE_LIMITS = {"pids", "io_read_iops", "io_write_iops"}
CAP_NAMES = (*LIMIT_NAMES, "max_runtime")


class PolicyError(Exception):
    """A policy setting (flag or config file) is wrong; the message names it."""


@dataclass(frozen=True, slots=True)
class Caps:
    """The most a role's job may ask for; None: no cap of that kind."""

    limits: Limits = field(default_factory=Limits)
    max_runtime: float | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = self.limits.to_wire()
        if self.max_runtime is not None:
            wire["max_runtime"] = self.max_runtime
        return wire


@dataclass(frozen=True, slots=True)
class StartTerms:
    """What a start request becomes under the policy."""

    user: str
    limits: Limits
    max_runtime: float | None
    host_root: bool = False
    seccomp: str = SECCOMP_DEFAULT


@dataclass(frozen=True, slots=True)
class Policy:
    default_user: str = DEFAULT_USER
    # Whether an admin may run a job as root on the host (`--host-root`);
    # users never may.
    allow_host_root: bool = True
    # Whether an admin may run a job without the syscall filter
    # (`--seccomp unconfined`); users never may.
    allow_seccomp_unconfined: bool = True
    defaults: Caps = field(default_factory=Caps)  # filled in where a start sets nothing
    caps: Mapping[str, Caps] = field(default_factory=dict)  # per role
    # Where each role's jobs may be given writable paths: at or under these.
    # Users' jobs share one run-as user, so a path writable by one user's
    # job is writable by every user's: none unless the operator says so.
    writable: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {ADMIN: ("/",), USER: ()}
    )
    # What all of an owner's jobs together may use, per role (their slice).
    quotas: Mapping[str, Limits] = field(default_factory=dict)

    def quota(self, role: str) -> Limits:
        """The limits on all the jobs of one owner of `role` together."""
        return self.quotas.get(role, Limits())

    def check(self) -> Policy:
        """Self if coherent; PolicyError if a default is over a role's cap."""
        for role, caps in self.caps.items():
            over = _over_cap(self.defaults.to_wire(), caps)
            if over is not None:
                name, value, cap = over
                raise PolicyError(
                    f"the default {name} ({_show(name, value)}) is over the {role} cap "
                    f"({_show(name, cap)}): every {role}'s job without its own would be refused"
                )
        return self

    def for_role(self, role: str) -> dict[str, Any]:
        """What `info` tells a client of the terms its jobs start under."""
        return {
            "default_user": self.default_user,
            "host_root": self.allow_host_root and role == ADMIN,
            # The syscall filter jobs get, and whether this role may go without.
            "seccomp": SECCOMP_DEFAULT,
            "seccomp_unconfined": self.allow_seccomp_unconfined and role == ADMIN,
            "defaults": self.defaults.to_wire(),
            "caps": self.caps.get(role, Caps()).to_wire(),
            "quota": self.quota(role).to_wire(),
            "writable": list(self.writable.get(role, ())),
        }

    def check_writable(self, identity: Identity, paths: object) -> None:
        """permission_denied for a writable path outside the role's places
        (invalid_argument, from the spec's own reading, for one that is no path)."""
        allowed = self.writable.get(identity.role, ())
        for value in writable_paths(paths):  # invalid_argument before permission
            path = value.decode("utf-8", "surrogateescape")
            if not any(_within(path, place) for place in allowed):
                places = ", ".join(allowed) if allowed else "none"
                raise OperationError(
                    ErrorCode.PERMISSION_DENIED,
                    f"writable: {quote(value)} is outside where a {identity.role}'s jobs may "
                    f"write (allowed: {places})",
                )

    def start_terms(
        self,
        identity: Identity,
        user: str | None,
        limits: Limits,
        max_runtime: float | None,
        *,
        host_root: bool = False,
        seccomp: str | None = None,
    ) -> StartTerms:
        """The run-as user, limits and max runtime of a start by `identity`,
        or permission_denied saying which rule or cap the request breaks."""
        if host_root and not identity.is_admin:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED, "only an admin may run a job as root on the host"
            )
        if host_root and not self.allow_host_root:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED,
                "this corrald's policy allows no job root on the host (allow_host_root = false); "
                "--user root is root in the job's own user namespace",
            )
        if seccomp == SECCOMP_UNCONFINED and not identity.is_admin:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED,
                "only an admin may run a job without the syscall filter (seccomp unconfined)",
            )
        if seccomp == SECCOMP_UNCONFINED and not self.allow_seccomp_unconfined:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED,
                "this corrald's policy runs every job under the syscall filter "
                "(allow_seccomp_unconfined = false)",
            )
        if user is not None and user != self.default_user and not identity.is_admin:
            raise OperationError(
                ErrorCode.PERMISSION_DENIED,
                "only an admin may choose the user a job runs as; yours run as "
                + (
                    "a uid of their own (dynamic)"
                    if self.default_user == DYNAMIC_USER
                    else self.default_user
                ),
            )
        values = self.defaults.to_wire() | Caps(limits, max_runtime).to_wire()
        caps = self.caps.get(identity.role, Caps())
        over = _over_cap(values, caps)
        if over is not None:
            name, value, cap = over
            raise OperationError(
                ErrorCode.PERMISSION_DENIED,
                f"{_field(name)}: {_show(name, value)} is over the {identity.role} cap of "
                f"{_show(name, cap)}",
            )
        for name, cap in caps.to_wire().items():
            values.setdefault(name, cap)  # unset where capped: the cap
        runtime = values.pop("max_runtime", None)
        return StartTerms(
            user=user or self.default_user,
            limits=Limits(**values),
            max_runtime=runtime,
            host_root=host_root,
            seccomp=seccomp or SECCOMP_DEFAULT,
        )


def builtin_user_quota(memory: int | None = None) -> dict[str, int]:
    """What a user's jobs together may use before any configuration:
    USER_QUOTA_PIDS processes and 1/USER_QUOTA_MEMORY_SHARE of `memory`
    (default: the host's RAM), in whole MiB."""
    share = (host_memory() if memory is None else memory) // USER_QUOTA_MEMORY_SHARE
    return {"pids": USER_QUOTA_PIDS, "memory": max(MIN_MEMORY, share >> 20 << 20)}


def builtin_user_caps(memory: int | None = None) -> dict[str, int]:
    """A user's caps before any configuration: USER_PIDS processes and
    1/USER_MEMORY_SHARE of `memory` (default: the host's RAM), in whole MiB."""
    share = (host_memory() if memory is None else memory) // USER_MEMORY_SHARE
    return {"pids": USER_PIDS, "memory": max(MIN_MEMORY, share >> 20 << 20)}


def _within(path: str, place: str) -> bool:
    return place in ("/", path) or path.startswith(place.rstrip("/") + "/")


def _over_cap(values: Mapping[str, Any], caps: Caps) -> tuple[str, Any, Any] | None:
    for name, cap in caps.to_wire().items():
        value = values.get(name)
        if value is not None and value > cap:
            return name, value, cap
    return None


def _field(name: str) -> str:
    return name if name == "max_runtime" else f"limits.{name}"


def _show(name: str, value: float) -> str:
    """A limit's value as it would be typed in a flag: 2G, 1h, 2.5 cores, 100."""
    if name in BYTE_LIMITS:
        return short_size(int(value))
    if name == "max_runtime":
        return short_duration(value)
    if name == "cpu":
        return f"{short_number(value)} {'core' if value == 1 else 'cores'}"
    return short_number(value)


# -- reading settings -------------------------------------------------------------

# What each kind of setting must be, in words, for messages.
_KINDS = {
    **dict.fromkeys(BYTE_LIMITS, "a size like 512M or 2G"),
    **dict.fromkeys(WHOLE_LIMITS, "a whole number"),
    "cpu": "a number of cores",
    "max_runtime": "a duration like 30m or 1h",
}


def parse_setting(name: str, value: object, where: str) -> int | float:
    """One limit or max_runtime from a flag's text or a TOML value: a size
    for byte limits, a duration for max_runtime, a number of cores for cpu,
    a whole number for the rest. PolicyError saying what it must be."""
    if name not in CAP_NAMES:
        raise PolicyError(f"{where}: unknown limit {quote(name)}; known: {', '.join(CAP_NAMES)}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise PolicyError(f"{where}: {name} must be {_KINDS[name]}, not {describe(value)}")
    if not isinstance(value, str):
        return value  # a TOML number: its range is checked with the others
    try:
        if name in BYTE_LIMITS:
            return parse_size(value)
        if name == "max_runtime":
            return parse_duration(value)
        return float(value) if name == "cpu" else int(value)
    except ValueError as exc:
        if name in BYTE_LIMITS or name == "max_runtime":  # their words are for people already
            raise PolicyError(f"{where}: {name}: {exc}") from None
        raise PolicyError(f"{where}: {name} must be {_KINDS[name]}, not {quote(value)}") from None


def caps_from(
    settings: Mapping[str, object], where: str, *, cpus: int | None = None, cap: bool = False
) -> Caps:
    """Caps (`cap`) or defaults from a map of limit names to values, validated;
    PolicyError naming what is wrong.

    A cpu over the host's `cpus` (default: host_cpus()) is an error in a
    default; a cap over it becomes the host's count.
    """
    values = {name: parse_setting(name, value, where) for name, value in settings.items()}
    runtime = values.pop("max_runtime", None)
    if runtime is not None and not (
        math.isfinite(runtime) and MIN_RUNTIME <= runtime <= MAX_RUNTIME
    ):
        raise PolicyError(
            f"{where}: max_runtime must be between {short_duration(MIN_RUNTIME)} and "
            f"{short_duration(MAX_RUNTIME)}, not {short_duration(runtime)}"
        )
    cpus = host_cpus() if cpus is None else cpus
    if cap and values.get("cpu", 0) > cpus:
        values["cpu"] = float(cpus)
    try:
        limits = Limits(**values).validate(cpus=cpus)  # type: ignore[arg-type]
    except SpecError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return Caps(limits, None if runtime is None else float(runtime))


def _boolean(document: Mapping[str, Any], name: str, where: str) -> bool:
    """A true-or-false setting of the policy file, true when it is not set."""
    value = document.get(name, True)
    if not isinstance(value, bool):
        raise PolicyError(f"{where}: {name} must be true or false, not {describe(value)}")
    return value


def load_policy(
    path: Path | None,
    *,
    default_user: str | None = None,
    defaults: Mapping[str, str] | None = None,
    caps: Mapping[str, Mapping[str, str]] | None = None,
    writable: Mapping[str, Sequence[str]] | None = None,
    quotas: Mapping[str, Mapping[str, str]] | None = None,
    cpus: int | None = None,
    memory: int | None = None,
) -> Policy:
    """The policy of a TOML file (if any), with flags' settings over it, over
    the built-in user caps (`builtin_user_caps`); PolicyError naming the
    setting that is wrong.

    `cpus` is the host's CPUs (default: host_cpus()): a cpu default over
    them is an error, a cpu cap over them becomes their count. `memory` is
    the host's RAM (default: host_memory()), of which a user's job may have
    a share unless configured.

    The file's shape:

        default_user = "dynamic"  # a uid of the job's own; or a host user's name
        allow_host_root = true    # whether admins may run jobs as root on the host
        allow_seccomp_unconfined = true  # whether admins may run jobs without the filter
        [defaults]            # limits a start gets when it sets none
        memory = "512M"
        [caps.user]           # the most a user's job may ask for
        memory = "2G"
        cpu = 2
        max_runtime = "1h"
        [caps.admin]
        memory = "16G"
        [quota.user]          # what all of one user's jobs together may use
        memory = "8G"
        pids = 4096
        cpu = 4
        [writable]            # where jobs may be given writable paths (admin: "/")
        user = ["/srv/scratch"]
    """
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from None
        unknown = sorted(set(document) - set(SETTINGS))
        if unknown:
            raise PolicyError(
                f"{path}: unknown setting {quote(unknown[0])}; known: {', '.join(SETTINGS)}"
            )
    where = str(path) if path else "policy"
    user = default_user or document.get("default_user", DEFAULT_USER)
    if not isinstance(user, str) or not user or "\0" in user:
        raise PolicyError(f"{where}: default_user must be a user name")
    allow_host_root = _boolean(document, "allow_host_root", where)
    allow_seccomp_unconfined = _boolean(document, "allow_seccomp_unconfined", where)
    default_settings = {**_table(document, "defaults", where), **(defaults or {})}
    cap_tables = _table(document, "caps", where)
    roles = sorted(set(cap_tables) | set(caps or {}) | {USER})
    unknown_roles = [role for role in roles if role not in ROLES]
    if unknown_roles:
        raise PolicyError(f"{where}: caps for unknown role {quote(unknown_roles[0])}")
    policy = Policy(
        default_user=user,
        allow_host_root=allow_host_root,
        allow_seccomp_unconfined=allow_seccomp_unconfined,
        defaults=caps_from(default_settings, f"{where}: defaults", cpus=cpus),
        caps={
            role: caps_from(
                {
                    **(builtin_user_caps(memory) if role == USER else {}),
                    **_table(cap_tables, role, f"{where}: caps"),
                    **(caps or {}).get(role, {}),
                },
                f"{where}: caps.{role}",
                cpus=cpus,
                cap=True,
            )
            for role in roles
        },
        writable=_writable(_table(document, "writable", where), writable or {}, where),
        quotas=_quotas(_table(document, "quota", where), quotas or {}, where, cpus, memory),
    )
    return policy.check()


def _quotas(
    table: Mapping[str, Any],
    flags: Mapping[str, Mapping[str, str]],
    where: str,
    cpus: int | None,
    memory: int | None,
) -> dict[str, Limits]:
    quotas: dict[str, Limits] = {}
    for role in sorted(set(table) | set(flags) | {USER}):
        if role not in ROLES:
            raise PolicyError(f"{where}: quota for unknown role {quote(role)}")
        settings = {
            **(builtin_user_quota(memory) if role == USER else {}),
            **_table(table, role, f"{where}: quota"),
            **flags.get(role, {}),
        }
        unknown = sorted(set(settings) - set(QUOTA_NAMES))
        if unknown:
            raise PolicyError(
                f"{where}: quota.{role}: {quote(unknown[0])} is no quota; "
                f"known: {', '.join(QUOTA_NAMES)}"
            )
        quotas[role] = caps_from(settings, f"{where}: quota.{role}", cpus=cpus, cap=True).limits
    return quotas


def _writable(
    table: Mapping[str, Any], flags: Mapping[str, Sequence[str]], where: str
) -> dict[str, tuple[str, ...]]:
    places: dict[str, tuple[str, ...]] = {ADMIN: ("/",), USER: ()}
    for role in sorted(set(table) | set(flags)):
        if role not in ROLES:
            raise PolicyError(f"{where}: writable for unknown role {quote(role)}")
        listed = table.get(role, [])
        if not isinstance(listed, list):
            raise PolicyError(
                f"{where}: writable.{role} must be a list of absolute paths, not {describe(listed)}"
            )
        paths = [*listed, *flags.get(role, [])]
        for p in paths:
            if not (isinstance(p, str) and p.startswith("/") and "\0" not in p):
                raise PolicyError(
                    f"{where}: writable.{role} must be a list of absolute paths, "
                    f"not one with {describe(p)}"
                )
        places[role] = tuple(posixpath.normpath(p) for p in paths)
    return places


def _table(document: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: {name} must be a table, not {describe(table)}")
    return table
