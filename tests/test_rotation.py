"""Certificates that rotate: corrald reloads its TLS files on SIGHUP, open
sessions go on, new handshakes get the new certificate; wrong files are
refused and the old ones kept; ca.crt may hold two CAs; the end of the
server's certificate is announced ahead."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from corral import pki, pki_layout
from corral.client.client import connect
from corral.supervisor.certificates import WARN_BEFORE, ServerCertificate
from corral.tls import client_context

from .conftest import Daemon, identity, running_corrald, until

pytestmark = [pytest.mark.jobs, pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")]

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def own_pki(pki_dir: Path, tmp_path: Path) -> Path:
    """A copy of the dev PKI this test may change."""
    return Path(shutil.copytree(pki_dir, tmp_path / "pki"))


@pytest.fixture
def daemon(own_pki: Path, short_dir: Path) -> Iterator[Daemon]:
    with running_corrald(own_pki, short_dir) as corrald:
        yield corrald


def served_serial(daemon: Daemon, identity_dir: Path) -> int:
    """The serial of the certificate corrald presents to a new handshake."""
    host, port = daemon.tcp.rsplit(":", 1)
    context = client_context(identity_dir)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def renew_server(pki_dir: Path, not_after: datetime.datetime | None = None) -> int:
    """A new server key and certificate from the CA in place; its serial."""
    ca_key, ca_cert = pki.load_ca(pki_dir)
    key, cert = pki.make_server_cert(ca_key, ca_cert, [], not_after=not_after)
    pki.write_private_key(pki_dir / pki_layout.SERVER_KEY_FILE, key, force=True)
    pki.write_certificate(pki_dir / pki_layout.SERVER_CERT_FILE, cert)
    return int(cert.serial_number)


async def hang_up(daemon: Daemon, says: str) -> None:
    """SIGHUP corrald and wait until its log says `says` once more."""
    before = daemon.log.read_text().count(says)
    os.kill(daemon.process.pid, signal.SIGHUP)
    await until(lambda: daemon.log.read_text().count(says) > before)


async def test_sighup_swaps_the_certificate_while_a_follower_streams_on(
    daemon: Daemon, own_pki: Path
) -> None:
    with trio.fail_after(90):  # where it hangs, if it does, is in the traceback
        await swap_while_streaming(daemon, own_pki)


async def swap_while_streaming(daemon: Daemon, own_pki: Path) -> None:
    admin = identity(own_pki, "admin")
    old = await trio.to_thread.run_sync(served_serial, daemon, admin)
    async with connect(daemon.tcp, admin) as starter, connect(daemon.tcp, admin) as watcher:
        job = await starter.start(["sh", "-c", "while read l; do echo $l; done"], stdin=True)
        async with (
            watcher.logs(job.id, follow=True) as stream,
            starter.attach(job.id) as attached,
        ):
            records = stream.__aiter__()

            async def next_line() -> bytes:
                with trio.fail_after(30):  # a line the follower never gets fails here
                    while True:
                        record = await anext(records)
                        if isinstance(record.data, bytes) and record.data:
                            return record.data

            await attached.send(b"one\n")
            assert await next_line() == b"one\n"
            new = renew_server(own_pki)
            await hang_up(daemon, "SIGHUP: new handshakes use")
            assert await trio.to_thread.run_sync(served_serial, daemon, admin) == new != old
            await attached.send(b"two\n")  # the sessions from before go on
            assert await next_line() == b"two\n"
            await attached.close()
        assert (await starter.wait(job.id)).exit_code == 0
    async with connect(daemon.tcp, admin) as again:  # the client trusts the new one
        assert (await again.info()).raw["server_certificate"]["serial"] == f"{new:x}"


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("garbage", "cannot load certificate"),
        ("expired", "expired at"),
        ("other key", "cannot load certificate"),
    ],
)
async def test_wrong_files_on_sighup_are_refused_and_the_old_kept(
    daemon: Daemon, own_pki: Path, damage: str, said: str
) -> None:
    admin = identity(own_pki, "admin")
    old = await trio.to_thread.run_sync(served_serial, daemon, admin)
    cert_file = own_pki / pki_layout.SERVER_CERT_FILE
    if damage == "garbage":
        cert_file.write_text("not a certificate\n")
    elif damage == "expired":
        renew_server(own_pki, not_after=NOW - datetime.timedelta(days=1))
    else:  # a certificate whose key is not server.key
        ca_key, ca_cert = pki.load_ca(own_pki)
        _, cert = pki.make_server_cert(ca_key, ca_cert, [])
        pki.write_certificate(cert_file, cert)
    await hang_up(daemon, "SIGHUP: kept the TLS files in use")
    (line,) = [x for x in daemon.log.read_text().splitlines() if "SIGHUP: kept" in x]
    assert said in line
    assert await trio.to_thread.run_sync(served_serial, daemon, admin) == old


async def test_a_ca_bundle_accepts_clients_of_either_ca(
    daemon: Daemon, own_pki: Path, tmp_path: Path
) -> None:
    new_key, new_ca = pki.make_ca()
    key, cert = pki.make_client_cert(new_key, new_ca, "carol", "user")
    _, old_ca = pki.load_ca(own_pki)
    carol = tmp_path / "carol"
    pki.write_identity(carol, old_ca, key, cert)  # she trusts the server's CA, the old one
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (old_ca, new_ca))
    (own_pki / pki_layout.CA_CERT_FILE).write_bytes(bundle)
    await hang_up(daemon, "SIGHUP: new handshakes use")
    async with connect(daemon.tcp, carol) as client:
        assert (await client.info()).identity.name == "carol"
    async with connect(daemon.tcp, identity(own_pki, "alice")) as client:
        assert (await client.info()).identity.name == "alice"


def test_the_end_of_the_certificate_is_announced_ahead() -> None:
    far = ServerCertificate(1, NOW + WARN_BEFORE + datetime.timedelta(days=1))
    near = ServerCertificate(2, NOW + datetime.timedelta(days=3, hours=1))
    gone = ServerCertificate(3, NOW - datetime.timedelta(hours=1))
    assert far.warning(NOW) is None
    assert "expires at" in (near.warning(NOW) or "")
    assert "in 3 days" in (near.warning(NOW) or "")
    assert "expired at" in (gone.warning(NOW) or "")


async def test_a_certificate_near_its_end_is_warned_of_at_start_and_in_info(
    own_pki: Path, short_dir: Path
) -> None:
    renew_server(own_pki, not_after=NOW + datetime.timedelta(days=5))
    with running_corrald(own_pki, short_dir) as daemon:
        assert "corrald's certificate expires at" in daemon.log.read_text()
        async with connect(daemon.tcp, identity(own_pki, "admin")) as admin:
            warning = (await admin.info()).raw["server_certificate"]["warning"]
    assert "renew it" in warning
