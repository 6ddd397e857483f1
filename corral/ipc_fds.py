"""Descriptors passed with corral's own messages (SCM_RIGHTS), on the
synchronous ends: the spawner, the shims, and corrald's spawner client.

Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC), a truncated
ancillary buffer is an error (MSG_CTRUNC: the kernel drops what did not
fit), and whatever did arrive with a bad message is closed.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence
from typing import TypeVar, overload

from corral.ipc import MAX_FDS, MAX_MESSAGE, IPCError, MessageBase, decode_any

_A = TypeVar("_A", bound=MessageBase)
_B = TypeVar("_B", bound=MessageBase)
_C = TypeVar("_C", bound=MessageBase)


def ancillary_fds(
    ancillary: Iterable[tuple[int, int, bytes]], flags: int, expected: int | None = None
) -> list[int]:
    """The descriptors in `ancillary` (what recvmsg returned), ours to close.

    IPCError (after closing what did arrive) if the kernel cut the
    ancillary data short (MSG_CTRUNC: it dropped descriptors silently) or
    the message itself (MSG_TRUNC), or if `expected` is given and a
    different number came."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    problem = None
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        problem = "a message or its descriptors were truncated"
    elif expected is not None and len(fds) != expected:
        problem = f"expected {expected} descriptors with the message, got {len(fds)}"
    if problem is not None:
        close_all(fds)
        raise IPCError(problem)
    return list(fds)


def close_all(fds: Iterable[int]) -> None:
    """Close every descriptor in `fds`, whatever fails."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def ancillary_space(count: int = MAX_FDS) -> int:
    """The ancillary buffer for `count` descriptors (CMSG_SPACE: its padding too)."""
    return socket.CMSG_SPACE(count * array.array("i").itemsize)


def send_message(sock: socket.socket, message: MessageBase, fds: Sequence[int] = ()) -> None:
    """Send `message` as one datagram, with `fds` passed along (SCM_RIGHTS).

    Raises OSError as sendmsg does (EPIPE, ECONNRESET: the peer is gone).
    Not socket.send_fds: it imports a module as it runs, and init calls
    this inside the jail, where nothing may be imported (GOTCHAS)."""
    if fds:
        rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array(fds))
        sock.sendmsg([message.encode()], [rights])
    else:
        sock.send(message.encode())


@overload
def receive_message(
    sock: socket.socket, expected: tuple[type[_A]], max_size: int = MAX_MESSAGE
) -> tuple[_A, list[int]] | None: ...
@overload
def receive_message(
    sock: socket.socket, expected: tuple[type[_A], type[_B]], max_size: int = MAX_MESSAGE
) -> tuple[_A | _B, list[int]] | None: ...
@overload
def receive_message(
    sock: socket.socket,
    expected: tuple[type[_A], type[_B], type[_C]],
    max_size: int = MAX_MESSAGE,
) -> tuple[_A | _B | _C, list[int]] | None: ...
def receive_message(
    sock: socket.socket, expected: tuple[type[MessageBase], ...], max_size: int = MAX_MESSAGE
) -> tuple[MessageBase, list[int]] | None:
    """The next message on `sock`, one of `expected`, and the descriptors
    that came with it (close-on-exec, ours to close); None at EOF.

    Raises IPCError for a malformed, unexpected or truncated message (its
    descriptors closed), OSError as recvmsg does. Not socket.recv_fds:
    in Python 3.11 it drops its flags, and MSG_CMSG_CLOEXEC matters in a
    process that forks (a passed descriptor must not leak into a shim).
    """
    data, ancillary, flags, _ = sock.recvmsg(max_size, ancillary_space(), socket.MSG_CMSG_CLOEXEC)
    fds = ancillary_fds(ancillary, flags)
    if not data:
        close_all(fds)
        return None
    try:
        return decode_any(data, expected), fds
    except IPCError:
        close_all(fds)
        raise


def fd_array(fds: Sequence[int]) -> array.array[int]:
    """`fds` as SCM_RIGHTS ancillary data wants them (for sendmsg's callers
    that cannot use send_message: corrald's trio sockets)."""
    return array.array("i", fds)
