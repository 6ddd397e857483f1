"""The job's input: what attached connections send, written to the job's
stdin pipe or terminal (the `attached` channel of corral.ipc_input).

A control connection on shim.sock that asks AttachInput is handed over
here (`control.ControlSocket` stops serving it) and from then on carries
Input and InputClose datagrams; the shim answers only InputClosed, then
closes it, when the job takes no more input.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import socket
import sys

from corral import ipc, ipc_fds, ipc_input
from corral.shim.loop import Loop

# Writers of one job's input at once: a person's terminal or two, a script,
# corrald's reconnections. More is a leak or an attack, and each holds a
# descriptor and a socket buffer of the shim's.
MAX_ATTACHED = 64

# A Refusal of AttachInput says exactly one of these (corrald passes them on).
NO_INPUT = "the job takes no input: it was started without -i"
STDIN_CLOSED = "the job has closed its stdin"
JOB_ENDED = "the job has ended"
TOO_MANY = f"too many clients attached to the job ({MAX_ATTACHED})"
# The reason an InputClosed gives.
CLOSED_BY_JOB = "the job closed its stdin"
CLOSED_BY_CLIENT = "stdin closed"
TERMINAL_STAYS = "stdin closed; the job's terminal stays open"  # one connection's InputClose
INPUT_LOST = "the job's input was lost"  # init's hand-over failed (a bug; the shim's log says how)
# A write to the input end that fails with these: nobody reads it any more
# (EPIPE: a pipe's read end is closed; EIO: a terminal's slave is).
CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.EIO})


class State(enum.Enum):
    """Where the job's input is."""

    WAITING = "waiting"  # init has not handed over the input end yet (the job starts)
    OPEN = "open"
    CLOSED = "closed"  # by the job, or by an InputClose: no more input, ever
    ENDED = "ended"  # the job has ended


TRANSITIONS = {
    State.WAITING: {State.OPEN, State.CLOSED, State.ENDED},
    State.OPEN: {State.CLOSED, State.ENDED},
    State.CLOSED: {State.ENDED},
    State.ENDED: set[State](),
}


class InputError(Exception):
    """An illegal change of the input's state (a bug in the shim)."""


def receive_input_end(channel: socket.socket, kind: str) -> int | None:
    """The job's input end, which init sent on the input channel before it
    said Started (so it is there now, or never): the write end of its stdin
    pipe or its terminal's master, ours to close. None (and a line on
    stderr: the shim's log) if it is missing or not the `kind` expected.
    """
    channel.setblocking(False)
    try:
        received = ipc_fds.receive_message(channel, (ipc_input.InputEnd,))
    except BlockingIOError:
        received = None
    except (OSError, ipc.IPCError) as exc:
        print(f"shim: cannot receive the job's input end: {exc}", file=sys.stderr)
        return None
    if received is None:
        print("shim: init sent no input end", file=sys.stderr)
        return None
    message, fds = received
    if message.kind != kind or len(fds) != 1:
        ipc_fds.close_all(fds)
        print(f"shim: init sent a {message.kind!r} input end with {len(fds)} descriptors, "
              f"not a {kind!r} one", file=sys.stderr)  # fmt: skip
        return None
    return fds[0]


def _attached_message(data: bytes, flags: int) -> ipc_input.Input | ipc_input.InputClose | None:
    """The message of an attached connection's datagram; None if it is not
    one, or came cut short (over the largest message) or with descriptors."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return None
    try:
        message = ipc.decode_any(data, (ipc_input.Input, ipc_input.InputClose))
    except ipc.IPCError:
        return None
    assert isinstance(message, ipc_input.Input | ipc_input.InputClose)
    return message


class InputRelay:
    """The input of one job that takes input (started with stdin), served
    from the shim's poll loop: the input end, the attached connections,
    and at most one datagram's data not yet written.

    Theory of operation. Nothing here grows with what senders send. Writes
    to the input end are non-blocking; what it does not take stays pending
    (one Input's data at most), and while anything is pending no attached
    connection is read: the input end is watched for POLLOUT instead, and
    reading resumes once the pending data is written. So a job that does
    not read fills its pipe (or terminal), then each sender's socket
    buffer, and then the senders wait: that is the flow control. What one
    connection sends is written in its order; datagrams of several
    connections in the order they were read. An InputClose is read only
    when nothing is pending, so what came before it is written first.

    A job that closes its stdin is noticed at the next write (EPIPE, or
    EIO from a terminal), as any writer of a pipe notices it. The input
    end is not watched for a hang-up meanwhile: a job that ends closes its
    stdin too, a moment before init's exit says so, and its writers should
    hear that it ended.
    """

    def __init__(self, loop: Loop, *, tty: bool) -> None:
        self._loop = loop
        self._tty = tty  # the input end is a terminal's master: it has no end of input
        self.state = State.WAITING
        self._end: int | None = None
        self._clients: dict[int, socket.socket] = {}  # by descriptor, in the order attached
        self._pending = b""

    def statistics(self) -> dict[str, object]:
        """The relay's state, attached connections and bytes pending."""
        return {
            "state": self.state.value,
            "attached": len(self._clients),
            "pending": len(self._pending),
        }

    # -- what the shim tells it ---------------------------------------------------------

    def connect(self, end: int) -> None:
        """The input end has come from init (ours to close): serve it."""
        if self.state is not State.WAITING:  # the job ended before it came
            os.close(end)
            return
        os.set_blocking(end, False)
        self._end = end
        self._become(State.OPEN)
        self._resume()

    def attach(self, client: socket.socket) -> ipc.Refusal | None:
        """Take `client`, a control connection that asked AttachInput, over
        as a writer of the job's input, answering it InputAttached; or say
        why not (the connection is then left as it was)."""
        if self.state is State.ENDED:
            return ipc.Refusal(message=JOB_ENDED)
        if self.state is State.CLOSED:
            return ipc.Refusal(message=STDIN_CLOSED)
        if len(self._clients) >= MAX_ATTACHED:
            return ipc.Refusal(message=TOO_MANY)
        try:
            client.send(ipc_input.InputAttached().encode())
        except OSError:  # gone already, or not reading its answers
            client.close()
            return None
        self._clients[client.fileno()] = client
        if self._reading():
            self._loop.watch(client.fileno(), self._read)
        return None

    def close_input(self, reason: str) -> None:
        """The job takes no more input: drop what is pending, close the input
        end, and tell every attached connection `reason` before closing it."""
        if self.state in (State.CLOSED, State.ENDED):
            return
        self._become(State.CLOSED)
        self._shut(reason)

    def job_ended(self) -> None:
        """init has exited: no input will ever be read again."""
        if self.state is State.ENDED:
            return
        self._become(State.ENDED)
        self._shut(JOB_ENDED)

    # -- the loop's handlers -------------------------------------------------------------

    def _read(self, fd: int) -> None:
        """One datagram of an attached connection."""
        client = self._clients.get(fd)
        if client is None:
            self._loop.unwatch(fd)
            return
        try:
            data, _, flags, _ = client.recvmsg(ipc_input.MAX_INPUT_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data, flags = b"", 0
        if not data:  # corrald is gone, or the client detached: the job's input stays open
            self._drop(client)
            return
        message = _attached_message(data, flags)
        if message is None:
            # Its content may be someone's typing: say only that it happened.
            print("shim: dropped an input connection that sent a malformed message",
                  file=sys.stderr)  # fmt: skip
            self._drop(client)
            return
        if isinstance(message, ipc_input.Input):
            self._write(message.data)
        elif self._tty:  # a terminal has no end of input (Ctrl+D is a byte): only this ends
            self._dismiss(client, TERMINAL_STAYS)
        else:  # nothing is pending (or this would not have been read): EOF now
            self.close_input(CLOSED_BY_CLIENT)

    def _end_ready(self, fd: int) -> None:
        """The input end takes more (or its reader is gone: the write says so)."""
        data, self._pending = self._pending, b""
        self._write(data)
        if not self._pending and self.state is State.OPEN:
            self._resume()

    # -- inside -----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write what the input end takes of `data` now; keep the rest
        pending, and read no connection until it is written."""
        assert self._end is not None
        assert not self._pending
        try:
            written = os.write(self._end, data) if data else 0
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno not in CLOSED_ERRNOS:
                print(f"shim: cannot write the job's input: {exc}", file=sys.stderr)
            self.close_input(CLOSED_BY_JOB)
            return
        if written < len(data):
            self._pending = data[written:]
            self._pause()

    def _reading(self) -> bool:
        return self.state is State.OPEN and not self._pending

    def _pause(self) -> None:
        for fd in self._clients:
            self._loop.unwatch(fd)
        assert self._end is not None
        self._loop.watch(self._end, self._end_ready, select.POLLOUT)

    def _resume(self) -> None:
        assert self._end is not None
        self._loop.unwatch(self._end)
        for fd in self._clients:
            self._loop.watch(fd, self._read)

    def _shut(self, reason: str) -> None:
        self._pending = b""
        if self._end is not None:
            self._loop.unwatch(self._end)
            os.close(self._end)
            self._end = None
        for client in list(self._clients.values()):
            self._dismiss(client, reason)

    def _dismiss(self, client: socket.socket, reason: str) -> None:
        """Tell `client` it may send no more, and why; then close it. A
        client whose buffer is full (it does not read) gets only the EOF.

        Closing a unix socket with unread datagrams makes the peer's next
        receive fail with ECONNRESET, before the InputClosed queued for it:
        so the connection's reading half is shut first (the peer's sends
        fail with EPIPE from then on, nothing more arrives) and what it had
        sent is discarded, then it is closed.
        """
        with contextlib.suppress(OSError):
            client.send(ipc_input.InputClosed(reason=reason).encode())
            client.shutdown(socket.SHUT_RD)
            while client.recv(1):  # a datagram at a time, whatever its size
                pass
        self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._loop.unwatch(client.fileno())
        del self._clients[client.fileno()]
        client.close()

    def _become(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InputError(f"the job's input cannot go from {self.state.value} to {state.value}")
        self.state = state
