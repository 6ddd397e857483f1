"""Reaching corrald from trio: the transport, the TLS handshake, hello and
welcome. What each failure says is `corral.client.connecting`'s, shared
with the blocking client of the one-shot commands."""

from __future__ import annotations

import trio

from corral.address import Address, TCPAddress
from corral.client.connecting import (
    RECEIVE_SIZE,
    connect_failure,
    connect_timeout,
    handshake_failure,
    handshake_timeout,
    hello,
    refusal,
    welcome,
)
from corral.protocol import Connection, Role, Welcome


async def open_transport(address: Address, timeout: float) -> trio.SocketStream:  # noqa: ASYNC109
    try:
        with trio.fail_after(timeout):
            if isinstance(address, TCPAddress):
                return await trio.open_tcp_stream(address.host, address.port)
            return await trio.open_unix_socket(address.path)
    except trio.TooSlowError:
        raise connect_timeout(address, timeout) from None
    except OSError as exc:
        raise connect_failure(address, exc) from None


async def handshake(
    tls: trio.SSLStream[trio.SocketStream],
    address: Address,
    timeout: float,  # noqa: ASYNC109 - said in the error that ends it
) -> tuple[Connection, Welcome]:
    """TLS handshake, hello, welcome: return the open protocol connection."""
    conn = Connection(Role.CLIENT)
    try:
        with trio.fail_after(timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                raise handshake_failure(address, exc.__cause__) from None
            try:
                await tls.send_all(hello(conn))
            except trio.BrokenResourceError as exc:
                raise refusal(address, exc.__cause__) from None
            while (welcomed := welcome(conn, address)) is None:
                try:
                    data = await tls.receive_some(RECEIVE_SIZE)
                except trio.BrokenResourceError as exc:
                    raise refusal(address, exc.__cause__) from None
                conn.receive_data(bytes(data))
            return conn, welcomed
    except trio.TooSlowError:
        raise handshake_timeout(address, timeout) from None
