"""corrald over real sockets and real TLS: who gets in, who is refused, and why."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral import pki, pki_layout
from corral.address import Address, TCPAddress, UnixAddress
from corral.client.client import connect
from corral.client.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ServerError,
    TLSError,
)
from corral.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Error,
    ErrorCode,
    Hello,
    Message,
    Request,
    Role,
    Welcome,
)
from corral.protocol.codec import HEADER, decode_body
from corral.protocol.messages import from_wire, to_wire
from corral.supervisor.heartbeat import live_tasks
from corral.supervisor.server import Server
from corral.tls import client_context

from .conftest import identity, make_server, open_fds, until


def tcp(server: Server) -> TCPAddress:
    return next(a for a in server.addresses if isinstance(a, TCPAddress))


def unix(server: Server) -> UnixAddress:
    return next(a for a in server.addresses if isinstance(a, UnixAddress))


async def assert_serves(server: Server, pki_dir: Path, name: str = "alice") -> None:
    """A good client still gets `info` from the server."""
    async with connect(tcp(server), identity(pki_dir, name)) as client:
        info = await client.info()
    assert info.identity.name == name


# -- who gets in -----------------------------------------------------------------


@pytest.mark.parametrize("transport", [tcp, unix])
@pytest.mark.parametrize(("name", "role"), [("admin", "admin"), ("alice", "user")])
async def test_info_over_tcp_and_unix(
    server: Server,
    pki_dir: Path,
    transport: Callable[[Server], Address],
    name: str,
    role: str,
) -> None:
    async with connect(transport(server), identity(pki_dir, name)) as client:
        assert (client.identity.name, client.identity.role) == (name, role)
        info = await client.info()
    assert info.identity.name == name
    assert info.identity.role == role
    assert info.version
    assert info.cgroup in {"v1", "v2"}
    assert info.connections == 1
    assert info.jobs == 0


async def test_many_requests_on_one_connection(server: Server, pki_dir: Path) -> None:
    async with connect(tcp(server), identity(pki_dir, "bob")) as client:
        results: list[str] = []

        async def ask() -> None:
            results.append((await client.info()).identity.name)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask)
    assert results == ["bob"] * 50


async def test_unknown_operation_is_unimplemented(server: Server, pki_dir: Path) -> None:
    async with connect(tcp(server), identity(pki_dir, "alice")) as client:
        with pytest.raises(ServerError, match="frobnicate") as caught:
            await client.call("frobnicate")
        assert caught.value.code is ErrorCode.UNIMPLEMENTED
        assert (await client.info()).identity.name == "alice"


# -- who is refused, and the server goes on serving -------------------------------

NOW = datetime.now(UTC)


def other_ca() -> tuple[object, object]:
    return pki.make_ca()


def write_client(
    directory: Path,
    pki_dir: Path,
    *,
    name: str = "mallory",
    role: str | None = "admin",
    extra_ous: tuple[str, ...] = (),
    eku: tuple[object, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    foreign_ca: bool = False,
) -> Path:
    """An identity directory holding a certificate with the given flaws."""
    ca_key, ca_cert = pki.make_ca() if foreign_ca else pki.load_ca(pki_dir)
    key, cert = pki.make_client_cert(
        ca_key,
        ca_cert,
        name,
        role,
        extra_ous=extra_ous,
        eku=eku,  # type: ignore[arg-type]
        not_before=not_before,
        not_after=not_after,
    )
    # The client trusts the real CA, so only the server's verdict is tested.
    real_ca = pki.load_ca(pki_dir)[1]
    pki.write_identity(directory, real_ca, key, cert)
    return directory


# Refused by the TLS layer: the server's alert reaches the client, which says
# what it means; the server logs why and counts the reason.
TLS_REFUSALS = {
    "other CA claiming admin": (
        {"foreign_ca": True},
        "it is not signed by a CA this corrald trusts (TLS alert 'unknown ca')",
        "untrusted_certificate",
    ),
    "expired": (
        {"not_after": NOW - timedelta(days=1)},
        "it has expired (TLS alert 'certificate expired')",
        "expired_certificate",
    ),
    "not yet valid": (
        {"not_before": NOW + timedelta(days=1), "not_after": NOW + timedelta(days=30)},
        "it is not valid (not valid yet, or malformed) (TLS alert 'bad certificate')",
        "invalid_certificate",
    ),
    "serverAuth only": (
        {"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)},
        "it is not for client authentication (extendedKeyUsage) "
        "(TLS alert 'unsupported certificate')",
        "invalid_certificate",
    ),
}

# Verified, but no acceptable identity: corrald's own permission_denied.
IDENTITY_REFUSALS = {
    "no role": ({"role": None}, "no role"),
    "unknown role": ({"role": "root"}, "role 'root' is unknown"),
    "several roles": ({"role": "user", "extra_ous": ("admin",)}, "several roles"),
    "no extended key usage": ({"eku": None}, "lacks the clientAuth"),
}


@pytest.mark.parametrize(("flaws", "why", "reason"), TLS_REFUSALS.values(), ids=TLS_REFUSALS.keys())
async def test_tls_layer_refuses_bad_certificates(  # noqa: PLR0917 - fixtures
    server: Server,
    pki_dir: Path,
    tmp_path: Path,
    flaws: dict[str, object],
    why: str,
    reason: str,
    server_log: pytest.LogCaptureFixture,
) -> None:
    bad = write_client(tmp_path / "bad", pki_dir, **flaws)  # type: ignore[arg-type]
    # A context, not the directory: connect() would refuse an out-of-date
    # certificate itself, and this is about what the server does.
    with pytest.raises(AuthenticationError) as caught:
        async with connect(tcp(server), client_context(bad)) as client:
            await client.info()
    assert str(caught.value).endswith(f"rejected our client certificate: {why}")
    assert "\n" not in str(caught.value)
    assert_refused_in_handshake(server, reason, server_log)
    await assert_serves(server, pki_dir)


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What the server logs at INFO, where it says whom it refused and why."""
    caplog.set_level(logging.INFO, logger="corral.supervisor.server")
    return caplog


def assert_refused_in_handshake(
    server: Server, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refused one handshake for `reason`, logged it in one line
    naming the peer, and opened no session."""
    assert server.refused() == {reason: 1}
    assert server.statistics()["opened"] == 0
    said = [record.getMessage() for record in caplog.records]
    lines = [line for line in said if "refused in the TLS handshake" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("127.0.0.1:"), lines


@pytest.mark.parametrize(
    ("flaws", "why"),
    [
        ({"not_after": NOW - timedelta(days=1)}, "expired on"),
        (
            {"not_before": NOW + timedelta(days=1), "not_after": NOW + timedelta(days=3)},
            "not valid until",
        ),
    ],
)
async def test_client_checks_its_own_certificate_dates_first(
    server: Server, pki_dir: Path, tmp_path: Path, flaws: dict[str, object], why: str
) -> None:
    bad = write_client(tmp_path / "bad", pki_dir, **flaws)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=why):
        async with connect(tcp(server), bad):
            pass
    assert server.statistics()["accepted"] == 0  # it did not even connect


@pytest.mark.parametrize(("flaws", "why"), IDENTITY_REFUSALS.values(), ids=IDENTITY_REFUSALS.keys())
@pytest.mark.parametrize("transport", [tcp, unix])
async def test_certificates_without_an_identity_are_refused(  # noqa: PLR0917 - fixtures
    server: Server,
    pki_dir: Path,
    tmp_path: Path,
    flaws: dict[str, object],
    why: str,
    transport: Callable[[Server], Address],
) -> None:
    bad = write_client(tmp_path / "bad", pki_dir, **flaws)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="refused our certificate") as caught:
        async with connect(transport(server), bad) as client:
            await client.info()
    assert why in str(caught.value)
    assert caught.value.exit_status == 77
    await assert_serves(server, pki_dir)


async def test_no_client_certificate_is_refused_in_the_handshake(
    server: Server, pki_dir: Path, server_log: pytest.LogCaptureFixture
) -> None:
    context = ssl.create_default_context(cafile=pki_dir / pki_layout.CA_CERT_FILE)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(AuthenticationError) as caught:
        async with connect(tcp(server), context) as client:
            await client.info()
    assert str(caught.value).endswith(
        "rejected our client certificate: we sent none, and corrald requires one "
        "(TLS alert 'certificate required')"
    )
    assert_refused_in_handshake(server, "no_certificate", server_log)
    await assert_serves(server, pki_dir)


async def test_tls12_is_refused(
    server: Server, pki_dir: Path, server_log: pytest.LogCaptureFixture
) -> None:
    context = client_context(identity(pki_dir, "admin"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(TLSError, match="protocol version"):
        async with connect(tcp(server), context) as client:
            await client.info()
    assert_refused_in_handshake(server, "protocol", server_log)
    await assert_serves(server, pki_dir)


# -- the client checks the server ---------------------------------------------------


@pytest.mark.parametrize(
    ("group", "accepted"),
    [("X25519", True), ("P-256", True), ("P-384", True), ("P-521", False),
     ("X448", False), ("ffdhe2048", False), ("ffdhe8192", False)],
)  # fmt: skip
async def test_key_exchange_is_limited_to_cheap_strong_groups(
    server: Server, pki_dir: Path, group: str, accepted: bool
) -> None:
    """OpenSSL's own client offering one group: corrald takes only Mozilla
    modern's (ffdhe8192 would cost it ~65 X25519 handshakes of CPU)."""
    alice = identity(pki_dir, "alice")
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{tcp(server).port}", "-tls1_3",
        "-groups", group, "-CAfile", str(alice / "ca.crt"), "-cert", str(alice / "client.crt"),
        "-key", str(alice / "client.key"), "-verify_return_error", "-brief",
    ]  # fmt: skip
    result = await trio.run_process(
        command, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
    )
    output = result.stderr.decode()
    if accepted:
        assert result.returncode == 0, output
        assert "Protocol version: TLSv1.3" in output
    else:
        assert result.returncode != 0, output
        assert "handshake failure" in output, output


async def test_client_refuses_a_server_from_another_ca(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other-pki")
    pki.init_pki(other)
    impostor = make_server(other, short_dir)
    await nursery.start(impostor.serve)
    with pytest.raises(TLSError, match=r"cannot verify the server at .*certificate"):
        async with connect(tcp(impostor), identity(pki_dir, "admin")):
            pass
    impostor.shutdown()


async def test_client_refuses_a_server_with_another_name(server: Server, pki_dir: Path) -> None:
    with pytest.raises(TLSError, match=r"cannot verify the server .*[Hh]ostname mismatch"):
        async with connect(tcp(server), identity(pki_dir, "admin"), server_name="corral.example"):
            pass


async def test_connection_refused_is_one_clear_line(pki_dir: Path) -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectError) as caught:
        async with connect(f"127.0.0.1:{port}", identity(pki_dir, "admin")):
            pass
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert caught.value.exit_status == 69


# -- slow and silent peers ---------------------------------------------------------


async def test_silent_peer_is_dropped_at_the_handshake_timeout(
    server: Server, pki_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    timeout = server.config.handshake_timeout
    silent = await trio.open_tcp_stream("127.0.0.1", tcp(server).port)
    async with silent:
        while server.statistics()["connecting"] == 0:
            await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(timeout - 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics()["connecting"] == 1, "dropped before the timeout"
        mock_clock.jump(0.2)
        assert await silent.receive_some(1024) == b""
    await server.wait_idle()
    assert server.statistics()["connecting"] == 0


async def test_peer_that_never_says_hello_is_dropped(
    server: Server, pki_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    context = client_context(identity(pki_dir, "alice"))
    stream = await trio.open_tcp_stream("127.0.0.1", tcp(server).port)
    tls = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
    async with tls:
        await tls.do_handshake()
        while server.statistics()["sessions"] == 0:
            await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(server.config.handshake_timeout + 0.1)
        received = b""
        while chunk := await tls.receive_some(1024):
            received += chunk
    assert b"hello" in received  # the goodbye says what was missing
    await server.wait_idle()


async def test_connections_over_the_cap_are_refused_with_resource_exhausted(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    capped = make_server(pki_dir, short_dir, max_connections=2)
    await nursery.start(capped.serve)
    async with (
        connect(tcp(capped), identity(pki_dir, "alice")) as first,
        connect(tcp(capped), identity(pki_dir, "bob")) as second,
    ):
        # A user's: the cap on all sessions does not keep an admin out.
        with pytest.raises(ServerError, match="maximum of 2 connections") as caught:
            async with connect(tcp(capped), identity(pki_dir, "alice")):
                pass
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert (await first.info()).connections == 2
        assert (await second.info()).identity.name == "bob"
    await capped.wait_idle()
    await assert_serves(capped, pki_dir)
    capped.shutdown()


async def test_one_user_cannot_take_every_connection(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    capped = make_server(pki_dir, short_dir, max_connections=10, max_connections_per_user=2)
    await nursery.start(capped.serve)
    async with (
        connect(tcp(capped), identity(pki_dir, "alice")),
        connect(tcp(capped), identity(pki_dir, "alice")),
    ):
        with pytest.raises(ServerError) as caught:
            async with connect(tcp(capped), identity(pki_dir, "alice")):
                pass
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert str(caught.value).endswith(
            ": alice has 2 connections open, the most one user may have; close one and try again"
        )
        await assert_serves(capped, pki_dir, "bob")
    await capped.wait_idle()
    await assert_serves(capped, pki_dir, "alice")
    capped.shutdown()


async def test_a_peer_dribbling_a_frame_is_dropped_and_delays_nobody(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    io_timeout = 0.5
    served = make_server(pki_dir, short_dir, io_timeout=io_timeout)
    await nursery.start(served.serve)
    stream = await trio.open_tcp_stream("127.0.0.1", tcp(served).port)
    context = client_context(identity(pki_dir, "alice"))
    tls = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
    conn = Connection(Role.CLIENT)
    received = b""
    async with tls:
        await tls.send_all(conn.send(Hello(version=PROTOCOL_VERSION, agent="slow")))
        frame = packed(to_wire(Request(id=1, op="info", args={})))
        began = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):
            for byte in frame[:-1]:  # a byte each 50 ms, never the last
                await tls.send_all(bytes([byte]))
                with trio.move_on_after(0.05):
                    await assert_serves(served, pki_dir, "bob")  # others go on at once
                # Stop before the deadline: a byte sent after corrald has
                # closed draws a reset, which can discard its goodbye unread.
                if trio.current_time() - began > io_timeout * 0.8:
                    break
        with trio.fail_after(5):
            while chunk := await tls.receive_some(65536):
                received += chunk
    welcome, goodbye = decode_frames(received)
    assert isinstance(welcome, Welcome)
    assert goodbye == Error(
        id=None,
        code=ErrorCode.FAILED_PRECONDITION,
        message=f"a frame took longer than {io_timeout:g} s to arrive; closing",
    )
    await served.wait_idle()
    served.shutdown()


async def test_an_idle_connection_is_closed_unless_the_client_keeps_it_alive(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    idle_timeout = 0.3
    served = make_server(pki_dir, short_dir, idle_timeout=idle_timeout)
    await nursery.start(served.serve)
    async with (
        connect(tcp(served), identity(pki_dir, "alice")) as idle,
        connect(tcp(served), identity(pki_dir, "bob"), keepalive=idle_timeout / 3) as kept,
    ):
        await until(lambda: idle.closed is not None)
        assert isinstance(idle.closed, ServerError)
        assert idle.closed.code is ErrorCode.UNAVAILABLE
        assert "idle for 0.3 s with no request in flight" in str(idle.closed)
        with trio.move_on_after(idle_timeout * 3):
            await until(lambda: kept.closed is not None)
        assert kept.closed is None
        assert (await kept.info()).connections == 1
    served.shutdown()


async def test_peers_without_certificates_do_not_use_up_the_session_cap(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    capped = make_server(pki_dir, short_dir, max_connections=2, max_handshakes=1, max_waiting=2)
    await nursery.start(capped.serve)
    silent = [await trio.open_tcp_stream("127.0.0.1", tcp(capped).port) for _ in range(2)]
    await until(lambda: capped.statistics()["connecting"] >= 2)
    # Silent peers wait without a handshake slot: the one slot serves others.
    await assert_serves(capped, pki_dir)
    # A third fills the waiting room: a fourth is closed at accept.
    silent.append(await trio.open_tcp_stream("127.0.0.1", tcp(capped).port))
    await until(lambda: capped.statistics()["connecting"] >= 3)
    with pytest.raises(ConnectError, match="at its connection limit") as caught:
        async with connect(tcp(capped), identity(pki_dir, "admin")):
            pass
    assert caught.value.exit_status == 69
    for stream in silent:
        await stream.aclose()
    await capped.wait_idle()
    await assert_serves(capped, pki_dir)
    capped.shutdown()


async def test_handshakes_beyond_the_cap_wait_their_turn(
    nursery: trio.Nursery, pki_dir: Path, short_dir: Path
) -> None:
    """Many clients at once with one handshake slot: each waits, none is refused."""
    capped = make_server(pki_dir, short_dir, max_handshakes=1)
    await nursery.start(capped.serve)
    names: list[str] = []

    async def client() -> None:
        async with connect(tcp(capped), identity(pki_dir, "alice")) as alice:
            names.append((await alice.info()).identity.name)

    async with trio.open_nursery() as clients:
        for _ in range(20):
            clients.start_soon(client)
    assert names == ["alice"] * 20
    capped.shutdown()


async def test_an_error_in_the_callers_block_comes_out_as_itself(
    server: Server, pki_dir: Path
) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with connect(tcp(server), identity(pki_dir, "alice")):
            raise KeyError("mine")


async def test_shutdown_says_goodbye_to_sessions(server: Server, pki_dir: Path) -> None:
    async with connect(tcp(server), identity(pki_dir, "alice")) as client:
        await client.info()
        server.shutdown()
        await server.wait_idle()
        with pytest.raises(ServerError, match=r"^corrald is shutting down$") as caught:
            await client.info()
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert caught.value.exit_status == 69
    await server.wait_idle()
    with pytest.raises(ConnectError):
        async with connect(tcp(server), identity(pki_dir, "alice")):
            pass
    # The socket goes as serve() ends, after its last audit entries are written.
    await until(lambda: not os.path.exists(unix(server).path))


# -- load ---------------------------------------------------------------------------


async def test_200_concurrent_clients_and_back_to_baseline(server: Server, pki_dir: Path) -> None:
    await assert_serves(server, pki_dir)
    await server.wait_idle()
    await trio.testing.wait_all_tasks_blocked()
    fds, tasks = open_fds(), live_tasks()

    names: list[str] = []
    everyone_connected = trio.Event()

    async def client(name: str) -> None:
        async with connect(tcp(server), identity(pki_dir, name)) as client:
            names.append((await client.info()).identity.name)
            if len(names) == 200:
                everyone_connected.set()
            await everyone_connected.wait()  # all 200 sessions open at once

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(client, ("admin", "alice", "bob")[i % 3])
        await everyone_connected.wait()
        assert server.statistics()["sessions"] == 200
    assert len(names) == 200

    await server.wait_idle()
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics()["sessions"] == 0
    assert open_fds() == fds
    assert live_tasks() == tasks


# -- garbage ------------------------------------------------------------------------


def decode_frames(data: bytes) -> list[Message]:
    """The messages in `data`, which must be whole frames."""
    messages = []
    while data:
        (size,) = HEADER.unpack_from(data)
        messages.append(from_wire(decode_body(data[HEADER.size : HEADER.size + size])))
        data = data[HEADER.size + size :]
    return messages


async def send_garbage(
    pki_dir: Path, directory: Path, garbage: bytes, over_tls: bool, hello_first: bool
) -> bytes:
    """Send `garbage` to a fresh server while good clients work; return its answer.

    The server's hello timeout is short, so a garbage prefix that promises
    more bytes ends with a timeout goodbye instead of a wait. After a hello
    the server may rightly wait for more: we stop listening after a quiet
    quarter second (TLS cannot half-close to tell it we are done).
    """
    server = make_server(pki_dir, directory, handshake_timeout=0.25)
    if hello_first:
        garbage = Connection(Role.CLIENT).send(Hello(version=PROTOCOL_VERSION, agent="t")) + garbage
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", tcp(server).port)
        if over_tls:
            context = client_context(identity(pki_dir, "bob"))
            stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        received = b""
        with trio.fail_after(10):
            async with stream, trio.open_nursery() as inner:
                inner.start_soon(assert_serves, server, pki_dir)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(garbage)
                    while True:
                        with trio.move_on_after(0.25):
                            chunk = await stream.receive_some(65536)
                            if not chunk:
                                break
                            received += chunk
                            continue
                        break
            await assert_serves(server, pki_dir)
        server.shutdown()
    return received


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def packed(value: object) -> bytes:
    return framed(msgpack.packb(value, use_bin_type=True))


texts = st.text(max_size=8) | st.text(min_size=200, max_size=3000)
wrong_shapes = st.dictionaries(
    st.sampled_from(["t", "id", "op", "args", "version", "agent", "code", "amount"]),
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | texts | st.binary(max_size=8),
    max_size=5,
).map(packed)
requests = st.builds(
    lambda request_id, op: packed({"t": "req", "id": request_id, "op": op, "args": {}}),
    st.integers(0, 2**64 - 1),
    texts,
)
unknown_tags = texts.map(lambda tag: packed({"t": tag}))
garbage = st.one_of(
    st.binary(min_size=1, max_size=256),
    st.binary(max_size=256).map(framed),
    wrong_shapes,
    requests,
    unknown_tags,
    st.lists(wrong_shapes | requests, min_size=2, max_size=4).map(b"".join),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=garbage, over_tls=st.booleans(), hello_first=st.booleans())
def test_server_answers_garbage_with_an_error_or_a_close(
    pki_dir: Path, garbage: bytes, over_tls: bool, hello_first: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-") as directory:
        received = trio.run(send_garbage, pki_dir, Path(directory), garbage, over_tls, hello_first)
    if over_tls:
        # Whole, valid frames only; at most one goodbye, and nothing after it.
        messages = decode_frames(received)
        goodbyes = [m for m in messages if isinstance(m, Error) and m.id is None]
        assert len(goodbyes) <= 1
        if goodbyes:
            assert messages[-1] is goodbyes[0]
        if not hello_first:
            assert not any(isinstance(m, Welcome) for m in messages)
