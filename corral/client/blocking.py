"""A blocking corral client: one mutual-TLS connection on a plain socket,
no trio. The CLI's one-shot commands use it (`corral.client.oneshot`):
importing trio costs such a command several times the work it does.

    with connect("127.0.0.1:7443", "var/pki/clients/admin") as client:
        print(client.info().identity.name)

Theory of operation. The protocol is `Connection`'s, sans-IO, as for the
async `Client`; so are the requests and their replies
(`corral.client.operations`) and every failure's words
(`corral.client.connecting`). What differs is who reads: here the caller,
in place. `call` sends a request and reads until its reply; `LogStream`
reads a job's output as it comes, and `next_event` can also return when
another descriptor becomes readable (a Ctrl+C's wakeup), so a follow can
act on it (send a stop) while the output goes on. A reply nobody waits for
(that stop's) is dropped. Reads wait in select() with no bound, as the
async client waits; a send that makes no progress for SEND_TIMEOUT ends the
connection.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, Self

from corral.address import Address, TCPAddress
from corral.client.connecting import (
    CONNECT_TIMEOUT,
    RECEIVE_SIZE,
    SEND_TIMEOUT,
    connect_failure,
    connect_timeout,
    handshake_failure,
    handshake_timeout,
    hello,
    refusal,
    resolve,
    welcome,
)
from corral.client.errors import ConnectError, CorralError, ServerError, TLSError
from corral.client.jobs import JobInfo
from corral.client.operations import (
    LOG_WINDOW,
    ServerInfo,
    list_page,
    start_args,
    stop_args,
    stopped_job,
)
from corral.identity import Identity
from corral.protocol import (
    NEED_DATA,
    Connection,
    Credit,
    Data,
    End,
    Error,
    Message,
    ProtocolError,
    Request,
    Result,
    Role,
    Signal,
)


def connect(
    address: str | Address,
    identity: str | os.PathLike[str] | ssl.SSLContext,
    *,
    server_name: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> BlockingClient:
    """Connect and authenticate to corrald, as `corral.client.client.connect`
    does (the same arguments, the same errors: ConfigError, ConnectError,
    TLSError or AuthenticationError); use the client with `with`."""
    address, context, server_name = resolve(address, identity, server_name)
    sock = _open_transport(address, timeout)
    try:
        tls = context.wrap_socket(
            sock, server_hostname=_ascii(server_name), do_handshake_on_connect=False
        )
    except BaseException:
        sock.close()
        raise
    try:
        return _handshake(tls, address, timeout)
    except BaseException:
        tls.close()
        raise


def _ascii(name: str) -> str | bytes:
    """An ASCII host name as bytes, the same name to socket and ssl: they run
    a str through the idna codec, whose import costs a one-shot command
    milliseconds."""
    return name.encode() if name.isascii() else name


def _open_transport(address: Address, timeout: float) -> socket.socket:
    """A connected socket; the addresses a name has are tried in turn, all
    within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        if not isinstance(address, TCPAddress):
            return _connected(socket.AF_UNIX, socket.SOCK_STREAM, 0, address.path, deadline)
        found = socket.getaddrinfo(_ascii(address.host), address.port, type=socket.SOCK_STREAM)
        failure = OSError(f"{address.host} has no address")
        for family, kind, protocol, _, sockaddr in found:
            try:
                sock = _connected(family, kind, protocol, sockaddr, deadline)
            except TimeoutError:
                raise
            except OSError as exc:
                failure = exc
                continue
            # As trio's streams do: a small write (a request) goes at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise failure
    except TimeoutError:
        raise connect_timeout(address, timeout) from None
    except OSError as exc:
        raise connect_failure(address, exc) from None


def _connected(family: int, kind: int, protocol: int, where: Any, deadline: float) -> socket.socket:
    sock = socket.socket(family, kind, protocol)
    try:
        _bound(sock, deadline)
        sock.connect(where)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound(sock: socket.socket, deadline: float) -> None:
    """Give the socket's next operation what is left until `deadline`."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)


def _handshake(tls: ssl.SSLSocket, address: Address, timeout: float) -> BlockingClient:
    """TLS handshake, hello, welcome, all within `timeout`: return the open client."""
    deadline = time.monotonic() + timeout
    conn = Connection(Role.CLIENT)
    try:
        _bound(tls, deadline)
        try:
            tls.do_handshake()
        except TimeoutError:
            raise
        except OSError as exc:  # ssl.SSLError is one
            raise handshake_failure(address, exc) from None
        try:
            _bound(tls, deadline)
            tls.sendall(hello(conn))
            while (welcomed := welcome(conn, address)) is None:
                _bound(tls, deadline)
                conn.receive_data(tls.recv(RECEIVE_SIZE))
        except TimeoutError:
            raise
        except OSError as exc:
            raise refusal(address, exc) from None
    except TimeoutError:
        raise handshake_timeout(address, timeout) from None
    tls.settimeout(SEND_TIMEOUT)
    return BlockingClient(tls, conn, address, Identity(name=welcomed.name, role=welcomed.role))


class BlockingClient:
    """A live, authenticated connection to corrald. Use `connect()` to get one."""

    def __init__(
        self, sock: ssl.SSLSocket, conn: Connection, address: Address, identity: Identity
    ) -> None:
        self.address = address
        self.identity = identity
        self._sock = sock
        self._conn = conn
        self._next_id = 1
        self._closed: CorralError | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Say goodbye (TLS close_notify, not waiting for corrald's) and close."""
        with contextlib.suppress(OSError):  # ssl.SSLWantReadError too: not waiting
            self._sock.setblocking(False)
            self._sock.unwrap()
        self._sock.close()

    # -- operations (see corral.client.client.Client) --------------------------

    def info(self) -> ServerInfo:
        return ServerInfo.from_value(self.call("info"))

    def status(self, job_id: str) -> JobInfo:
        return JobInfo.from_wire(self.call("status", {"id": job_id})["job"])

    def list(self, *, everyone: bool = False) -> list[JobInfo]:
        """Our jobs, oldest first; with `everyone` (admins only) every job."""
        jobs: list[JobInfo] = []
        args: dict[str, Any] | None = {"all": everyone}
        while args is not None:  # a page at a time
            page, args = list_page(args, self.call("list", args))
            jobs += page
        return jobs

    def start(self, argv: Sequence[str | bytes], **options: Any) -> JobInfo:
        """Start a job (the options of `Client.start`); return once its
        command runs (ServerError if it cannot)."""
        return JobInfo.from_wire(self.call("start", start_args(argv, **options))["job"])

    def stop(self, job_id: str, grace: float | None = None) -> JobInfo:
        """Stop a job (SIGTERM, then SIGKILL after `grace` s); return its final state."""
        return stopped_job(self.call("stop", stop_args(job_id, grace)))

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one request and return its result value: ServerError if
        corrald answers with an error, ConnectError if the connection is lost."""
        request_id = self.request(op, args or {})
        while True:
            event = self.next_event()
            if getattr(event, "id", None) != request_id:
                continue  # the answer to a request nobody waits for
            if isinstance(event, Error):
                raise ServerError(event.code, event.message, event.details)
            if isinstance(event, Result):
                return event.value
            raise TLSError(f"unexpected reply to {op!r}: {type(event).__name__}")

    # -- plumbing ----------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any], *, window: int = 0) -> int:
        """Send a request without waiting for its answer; its id. With
        `window`, a stream's first credit goes in the same write."""
        request_id = self._next_id
        self._next_id += 1
        request = Request(id=request_id, op=op, args=args)
        self.send(request, *([Credit(id=request_id, amount=window)] if window else []))
        return request_id

    def send(self, *messages: Message, unless_ended: bool = False) -> None:
        """Send messages, in one write; with `unless_ended`, nothing for a
        request that has had its final reply (credit racing the end of a
        stream)."""
        if self._closed is not None:
            raise self._closed
        if unless_ended:
            messages = tuple(m for m in messages if getattr(m, "id", None) in self._conn.open_ids)
        if not messages:
            return
        try:
            frames = b"".join(self._conn.send(message) for message in messages)
        except ProtocolError as exc:
            raise TLSError(f"cannot send to {self.address}: {exc}") from exc
        try:
            self._sock.sendall(frames)
        except TimeoutError:
            text = f"corrald at {self.address} stopped reading for {SEND_TIMEOUT:g} s"
            raise self._close(ConnectError(text)) from None
        except OSError:
            raise self._close(ConnectError(f"connection to {self.address} lost")) from None

    def next_event(self, wakeup: int | None = None) -> Message | None:
        """The next message from corrald, read as it comes; None if `wakeup`
        (a descriptor) becomes readable first. Raises why the connection
        has gone: ConnectError, or ServerError for corrald's goodbye."""
        if self._closed is not None:
            raise self._closed
        while True:
            try:
                event = self._conn.next_event()
            except ProtocolError as exc:
                text = f"corrald at {self.address} broke the protocol: {exc}"
                raise self._close(TLSError(text)) from None
            if event is NEED_DATA:
                # TLS may hold bytes the kernel no longer does: no wait then.
                if not self._sock.pending() and not self._readable(wakeup):
                    return None
                self._conn.receive_data(self._receive())
                continue
            if isinstance(event, Signal):  # PEER_CLOSED
                text = f"corrald at {self.address} closed the connection"
                raise self._close(ConnectError(text))
            if isinstance(event, Error) and event.id is None:
                raise self._close(ServerError(event.code, event.message))
            return event

    def _readable(self, wakeup: int | None) -> bool:
        """Wait until the socket is readable (True) or `wakeup` is (False)."""
        poll = select.poll()
        poll.register(self._sock, select.POLLIN)
        if wakeup is not None:
            poll.register(wakeup, select.POLLIN)
        return any(fd == self._sock.fileno() for fd, _ in poll.poll())

    def _receive(self) -> bytes:
        try:
            return self._sock.recv(RECEIVE_SIZE)
        except OSError:  # reset, a TLS error, a record cut off for SEND_TIMEOUT
            return b""  # the connection's end: PEER_CLOSED

    def _close(self, reason: CorralError) -> CorralError:
        """Later calls raise `reason` too."""
        if self._closed is None:
            self._closed = reason
        return self._closed


class LogStream:
    """A job's output from `offset` to the job's end, as corrald streams it
    (`logs` with follow), read in place: `corral.client.job_streams.LogStream`'s
    blocking twin, within the same credit. `receive` returns each piece;
    at the end, b"", and `job` and `offset` say how the job ended and where
    the stream did."""

    def __init__(
        self, client: BlockingClient, job_id: str, offset: int, window: int = LOG_WINDOW
    ) -> None:
        self.offset = offset
        self.job: JobInfo | None = None
        self._client = client
        self._window = window
        self._consumed = 0
        args = {"id": job_id, "follow": True, "offset": offset}
        self._id = client.request("logs", args, window=window)

    def receive(self, wakeup: int | None = None) -> bytes | None:
        """The next piece of output (b"" at the end); None if `wakeup`
        becomes readable first. ServerError if corrald ends the stream
        with an error."""
        while True:
            event = self._client.next_event(wakeup)
            if event is None:
                return None
            if getattr(event, "id", None) != self._id:
                continue  # another request's answer (a stop's): the stream tells the rest
            if isinstance(event, Data):
                if event.offset != self.offset:
                    raise TLSError(
                        f"corrald sent output at offset {event.offset}, expected {self.offset}"
                    )
                self.offset += len(event.data)
                self._consumed += len(event.data)
                if self._consumed >= self._window // 2:  # top the window up, not byte by byte
                    self._client.send(Credit(id=self._id, amount=self._consumed), unless_ended=True)
                    self._consumed = 0
                if event.data:
                    return event.data
                continue
            if isinstance(event, Error):
                raise ServerError(event.code, event.message, event.details)
            if isinstance(event, End):
                self.offset = int(event.value.get("offset", self.offset))
                self.job = JobInfo.from_wire(event.value["job"])
                return b""
            raise TLSError(f"unexpected message in a stream: {type(event).__name__}")
