"""How corral's own messages are read: the version this side speaks, the
errors a message that cannot be read raises, and a reader per kind of
field, each checking its type and bounds (IPCError otherwise).

The envelope of `corral.ipc` and `corral.ipc_input`: both read their
messages' fields through these, so a field means the same in every
message, and a peer's mistake is always an IPCError naming the field.
"""

from __future__ import annotations

from typing import Any, TypeVar

from corral.errors import ErrorCode
from corral.job import Status

# Bumped whenever a message changes shape or meaning. 1: the first
# versioned set (the unversioned dicts before it count as 0). 2: input
# (JobConfig's stdin and terminal, the input channel, attach and resize:
# corral.ipc_input).
IPC_VERSION = 2


class IPCError(Exception):
    """A message could not be read: malformed, of an unknown type, or not
    one the receiver expected there."""


class VersionError(IPCError):
    """The peer speaks a version of these messages we do not know."""

    def __init__(self, tag: str, version: int) -> None:
        super().__init__(f"'{tag}' message of version {version}; this side speaks {IPC_VERSION}")
        self.tag = tag
        self.version = version


_T = TypeVar("_T")


def get(wire: dict[str, Any], name: str, kind: type[_T], tag: str) -> _T:
    """Field `name` of `wire`, which must be a `kind`; IPCError otherwise."""
    try:
        value = wire[name]
    except KeyError:
        raise IPCError(f"'{tag}' message lacks field '{name}'") from None
    # bool is an int subclass: a peer sending true for a pid is wrong.
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise IPCError(
            f"field '{name}' of '{tag}' must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def optional(wire: dict[str, Any], name: str, kind: type[_T], tag: str) -> _T | None:
    return None if wire.get(name) is None else get(wire, name, kind, tag)


def number(wire: dict[str, Any], name: str, tag: str) -> float:
    value: object = wire.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise IPCError(f"field '{name}' of '{tag}' must be a number")
    return float(value)


def count(wire: dict[str, Any], name: str, tag: str) -> int:
    value = get(wire, name, int, tag)
    if value < 0:
        raise IPCError(f"field '{name}' of '{tag}' must not be negative")
    return value


def list_of(wire: dict[str, Any], name: str, kind: type[_T], tag: str) -> tuple[_T, ...]:
    items = get(wire, name, list, tag)
    if not all(isinstance(item, kind) and not isinstance(item, bool) for item in items):
        raise IPCError(f"field '{name}' of '{tag}' must be a list of {kind.__name__}")
    return tuple(items)


def size(wire: dict[str, Any], name: str, tag: str) -> tuple[int, int]:
    """A terminal size, [columns, rows], each at least 1."""
    value = list_of(wire, name, int, tag)
    if len(value) != 2 or min(value) < 1:
        raise IPCError(f"field '{name}' of '{tag}' must be [columns, rows]")
    return value[0], value[1]


def version(wire: dict[str, Any], tag: str) -> int:
    """The message's version, checked before any other field is read."""
    version = count(wire, "version", tag)
    if version != IPC_VERSION:
        raise VersionError(tag, version)
    return version


def code(wire: dict[str, Any], tag: str) -> ErrorCode | None:
    text = optional(wire, "code", str, tag)
    if text is None:
        return None
    try:
        return ErrorCode(text)
    except ValueError:
        raise IPCError(f"unknown error code {text[:40]!r} in '{tag}'") from None


def status(wire: dict[str, Any], tag: str) -> Status:
    value = get(wire, "status", dict, tag)
    try:
        return Status.from_wire(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise IPCError(f"'{tag}' message carries an unreadable status: {exc!r}") from None
