"""The messages of a job's input: how its input end reaches the shim, and
how corrald writes to it and resizes its terminal.

Part of `corral.ipc` (the same envelope, `decode` and version), kept apart
so each module stays one concern. The channels:

    input    init -> shim        InputEnd (+ the job's input end: the write
                                 end of its stdin pipe, or its pty's master)
    control  corrald -> shim     AttachInput -> InputAttached | Refusal
                                 Resize      -> Resized | Refusal
    attached corrald -> shim     Input | InputClose   (after InputAttached,
                                 on the same connection; no replies)
             shim -> corrald     InputClosed, then EOF: the job takes no
                                 more input (its stdin is closed, or it ended)

An attached connection is one writer of the job's input: any number may
be open at once, and the shim writes what each sends in the order it
reads it. Flow control is the socket's: the shim reads an attached
connection only while the job's input end has room, so a job that does
not read fills the socket's buffer and then the sender waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from corral.ipc import MessageBase
from corral.ipc_fields import IPC_VERSION, IPCError, count, get
from corral.ipc_fields import version as checked_version

# The most input one Input message carries: large pieces, because each
# costs corrald and the shim the same whatever its size (a pipe's 64 KiB
# read fits whole, with room to spare).
MAX_INPUT_DATA = 128 << 10
# A datagram on an attached connection: an Input and its envelope, read
# whole by the shim; well under a unix socket's send buffer (~208 KiB by
# default), which bounds a datagram.
MAX_INPUT_MESSAGE = MAX_INPUT_DATA + 1024
# What the job's input end is.
PIPE = "pipe"
TTY = "tty"


@dataclass(frozen=True, kw_only=True, slots=True)
class InputEnd(MessageBase):
    """init -> shim, with the job's input end: a pipe's write end (`pipe`)
    or the master of the job's terminal (`tty`)."""

    TAG: ClassVar[str] = "input_end"
    version: int = IPC_VERSION
    kind: str

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InputEnd:
        """The message `wire` stands for; IPCError if it is not one."""
        version = checked_version(wire, cls.TAG)
        kind = get(wire, "kind", str, cls.TAG)
        if kind not in (PIPE, TTY):
            raise IPCError(f"field 'kind' of '{cls.TAG}' must be 'pipe' or 'tty'")
        return cls(version=version, kind=kind)


@dataclass(frozen=True, kw_only=True, slots=True)
class AttachInput(MessageBase):
    """corrald -> shim on a control connection: make this connection a
    writer of the job's input (answered InputAttached, or a Refusal: the job
    takes no input, or has closed its stdin)."""

    TAG: ClassVar[str] = "attach_input"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> AttachInput:
        """The message `wire` stands for."""
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class InputAttached(MessageBase):
    """shim -> corrald: this connection now carries input (Input, InputClose)."""

    TAG: ClassVar[str] = "input_attached"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InputAttached:
        """The message `wire` stands for."""
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class Input(MessageBase):
    """corrald -> shim on an attached connection: bytes for the job's input."""

    TAG: ClassVar[str] = "input"
    data: bytes

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Input:
        """The message `wire` stands for; IPCError if it is not one."""
        data = get(wire, "data", bytes, cls.TAG)
        if len(data) > MAX_INPUT_DATA:
            raise IPCError(f"'{cls.TAG}' carries {len(data)} bytes, more than {MAX_INPUT_DATA}")
        return cls(data=data)


@dataclass(frozen=True, kw_only=True, slots=True)
class InputClose(MessageBase):
    """corrald -> shim on an attached connection: the job's stdin ends here
    (EOF once what came before is written). A terminal has no end: for a
    terminal job this only ends the connection."""

    TAG: ClassVar[str] = "input_close"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InputClose:
        """The message `wire` stands for."""
        return cls()


@dataclass(frozen=True, kw_only=True, slots=True)
class InputClosed(MessageBase):
    """shim -> corrald on an attached connection, then EOF: the job takes no
    more input, and why (its stdin was closed, by it or by an InputClose;
    or it has ended)."""

    TAG: ClassVar[str] = "input_closed"
    reason: str = ""

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InputClosed:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(reason=get(wire, "reason", str, cls.TAG) if "reason" in wire else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class Resize(MessageBase):
    """corrald -> shim: the job's terminal is now `columns` by `rows`
    (answered Resized, or a Refusal if the job has no terminal)."""

    TAG: ClassVar[str] = "resize"
    columns: int
    rows: int

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Resize:
        """The message `wire` stands for; IPCError if it is not one."""
        return cls(columns=count(wire, "columns", cls.TAG), rows=count(wire, "rows", cls.TAG))


@dataclass(frozen=True, kw_only=True, slots=True)
class Resized(MessageBase):
    """shim -> corrald: the terminal has its new size (and the job its SIGWINCH)."""

    TAG: ClassVar[str] = "resized"

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Resized:
        """The message `wire` stands for."""
        return cls()


MESSAGES: tuple[type[MessageBase], ...] = (
    InputEnd, AttachInput, InputAttached, Input, InputClose, InputClosed, Resize, Resized,
)  # fmt: skip
