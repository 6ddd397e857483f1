"""Tests for corral.pki: files, modes, certificate contents, and real TLS 1.3 handshakes."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from corral import pki, pki_layout

ExtT = TypeVar("ExtT", bound=x509.ExtensionType)

CLIENT_NAMES = [name for name, _ in pki.DEFAULT_CLIENTS]
EXTRA_SERVER_NAMES = ["corral.example", "10.1.2.3", "2001:db8::7", "LOCALHOST", "127.0.0.1"]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised PKI shared by the tests that only read it."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    pki.init_pki(directory, EXTRA_SERVER_NAMES)
    return directory


@pytest.fixture
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return pki.make_ca()


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``directory`` with its content (None for directories) and mode."""
    return {
        str(p.relative_to(directory)): (None if p.is_dir() else p.read_bytes(), mode(p))
        for p in sorted(directory.rglob("*"))
    }


def ext(cert: x509.Certificate, kind: type[ExtT]) -> x509.Extension[ExtT]:
    return cert.extensions.get_extension_for_class(kind)


def subject_values(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str | bytes]:
    return [attr.value for attr in cert.subject.get_attributes_for_oid(oid)]


# --- init_pki: files and modes ---------------------------------------------------------------


def test_init_writes_every_file_with_private_modes(pki_dir: Path) -> None:
    for name in ("ca.crt", "server.crt"):
        assert mode(pki_dir / name) == 0o644
    for name in ("ca.key", "server.key"):
        assert mode(pki_dir / name) == 0o600
    assert mode(pki_dir) == 0o700
    assert mode(pki_dir / "clients") == 0o700
    assert sorted(p.name for p in (pki_dir / "clients").iterdir()) == sorted(CLIENT_NAMES)
    for name in CLIENT_NAMES:
        identity = pki_dir / "clients" / name
        assert mode(identity) == 0o700
        assert sorted(p.name for p in identity.iterdir()) == ["ca.crt", "client.crt", "client.key"]
        assert mode(identity / "client.key") == 0o600
        assert (identity / "ca.crt").read_bytes() == (pki_dir / "ca.crt").read_bytes()
    # No temporary files may be left behind by the atomic writes.
    assert not [p for p in pki_dir.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        pki.init_pki(tmp_path / "pki")
        pki.issue_client(tmp_path / "pki", "carol", "user")
    finally:
        os.umask(old)
    modes = {path: m for path, (_, m) in snapshot(tmp_path / "pki").items()}
    for path, m in modes.items():
        expected = 0o600 if path.endswith(".key") else 0o644 if path.endswith(".crt") else 0o700
        assert m == expected, path
    assert mode(tmp_path / "pki") == 0o700


# --- certificate contents --------------------------------------------------------------------


def test_ca_certificate_extensions(pki_dir: Path) -> None:
    ca_cert = load_cert(pki_dir / "ca.crt")
    ca_cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.issuer == ca_cert.subject
    bc = ext(ca_cert, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=0)
    ku = ext(ca_cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    assert not ku.value.key_encipherment
    ski = ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key())
    with pytest.raises(x509.ExtensionNotFound):
        ext(ca_cert, x509.ExtendedKeyUsage)
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc == timedelta(days=3650)


def leaf_paths(pki_dir: Path) -> list[tuple[Path, Path]]:
    clients = pki_dir / "clients"
    return [(pki_dir / "server.crt", pki_dir / "server.key")] + [
        (clients / name / "client.crt", clients / name / "client.key") for name in CLIENT_NAMES
    ]


def test_leaf_certificates_chain_and_extensions(pki_dir: Path) -> None:
    ca_cert = load_cert(pki_dir / "ca.crt")
    ca_ski = ext(ca_cert, x509.SubjectKeyIdentifier).value
    for cert_path, _ in leaf_paths(pki_dir):
        cert = load_cert(cert_path)
        cert.verify_directly_issued_by(ca_cert)
        bc = ext(cert, x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca is False
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical
        assert ku.value == x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        expected_eku = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if cert_path.name == "server.crt"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        assert list(ext(cert, x509.ExtendedKeyUsage).value) == [expected_eku], cert_path
        ski = ext(cert, x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        aki = ext(cert, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90)


def test_keys_are_p256_and_signatures_sha256(pki_dir: Path) -> None:
    pairs = [(pki_dir / "ca.crt", pki_dir / "ca.key"), *leaf_paths(pki_dir)]
    for cert_path, key_path in pairs:
        cert = load_cert(cert_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == cert.public_key()
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256


def test_validity_starts_slightly_in_the_past(pki_dir: Path) -> None:
    now = datetime.now(UTC)
    for cert_path in [pki_dir / "ca.crt", *(c for c, _ in leaf_paths(pki_dir))]:
        start = load_cert(cert_path).not_valid_before_utc
        # The module fixture may have run a while ago, so only bound it loosely.
        assert start < now - timedelta(minutes=4)
        assert start > now - timedelta(hours=1)


def test_serial_numbers_are_distinct_and_large(pki_dir: Path) -> None:
    certs = [pki_dir / "ca.crt", *(c for c, _ in leaf_paths(pki_dir))]
    serials = [load_cert(path).serial_number for path in certs]
    assert len(set(serials)) == len(serials)
    assert all(s > 2**64 for s in serials)


def test_server_certificate_names(pki_dir: Path) -> None:
    cert = load_cert(pki_dir / "server.crt")
    assert subject_values(cert, NameOID.COMMON_NAME) == ["corrald"]
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "corral.example"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("2001:db8::7"),
    ]


def test_server_cert_without_extra_names_still_covers_loopback(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = pki.make_server_cert(*ca, [])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("bad", ["", "two words", "a/b", "bücher.example"])
def test_bad_server_name_is_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    with pytest.raises(pki.PKIError, match="invalid server name"):
        pki.init_pki(tmp_path / "pki", ["ok.example", bad])
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize(("name", "role"), pki.DEFAULT_CLIENTS)
def test_client_subjects(pki_dir: Path, name: str, role: str) -> None:
    cert = load_cert(pki_dir / "clients" / name / "client.crt")
    assert subject_values(cert, NameOID.COMMON_NAME) == [name]
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.SubjectAlternativeName)


# --- Python's ssl module ---------------------------------------------------------------------


def server_context(pki_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Python 3.13 turns strict checking on by default; the certificates must already pass it.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    ctx.load_verify_locations(pki_dir / "ca.crt")
    return ctx


def client_context(identity: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(identity / "client.crt", identity / "client.key")
    ctx.load_verify_locations(identity / "ca.crt")
    return ctx


def _pump(source: ssl.MemoryBIO, sink: ssl.MemoryBIO) -> bool:
    data = source.read()
    sink.write(data)
    return bool(data)


def _try_handshake(side: ssl.SSLObject) -> bool:
    try:
        side.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def tls_exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> ssl.SSLObject:
    """Run a handshake and a ping/pong over memory BIOs; return the server's SSLObject.

    Raises ssl.SSLError if either side rejects the other.
    """
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    client_done = server_done = False
    for _ in range(10):
        client_done = client_done or _try_handshake(client)
        server_done = server_done or _try_handshake(server)
        moved = _pump(c_out, s_in) | _pump(s_out, c_in)
        if client_done and server_done and not moved:
            break
    else:
        pytest.fail("TLS handshake did not converge")
    assert client.version() == "TLSv1.3"
    client.write(b"ping")
    _pump(c_out, s_in)
    assert server.read() == b"ping"
    server.write(b"pong")
    _pump(s_out, c_in)
    assert client.read() == b"pong"
    return server


def test_ssl_contexts_load_server_and_client_material(pki_dir: Path) -> None:
    server_context(pki_dir)
    for name in CLIENT_NAMES:
        client_context(pki_dir / "clients" / name)


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_mutual_tls13_handshake_succeeds(pki_dir: Path, name: str) -> None:
    server = tls_exchange(server_context(pki_dir), client_context(pki_dir / "clients" / name))
    peer = server.getpeercert()
    assert peer is not None
    assert (("commonName", name),) in peer["subject"]


def test_handshake_over_ip_address_names(pki_dir: Path) -> None:
    client_ctx = client_context(pki_dir / "clients" / "alice")
    for host in ("127.0.0.1", "::1", "10.1.2.3", "corral.example"):
        tls_exchange(server_context(pki_dir), client_ctx, hostname=host)


def test_handshake_fails_for_a_name_not_in_the_certificate(pki_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        tls_exchange(
            server_context(pki_dir),
            client_context(pki_dir / "clients" / "alice"),
            hostname="other.example",
        )


def test_handshake_fails_for_client_of_another_ca(pki_dir: Path, tmp_path: Path) -> None:
    other_key, other_ca = pki.make_ca("some other CA")
    key, cert = pki.make_client_cert(other_key, other_ca, "mallory", "admin")
    identity = tmp_path / "mallory"
    # The client trusts the real CA, so only the server's check of the client cert can fail.
    pki.write_identity(identity, load_cert(pki_dir / "ca.crt"), key, cert)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        tls_exchange(server_context(pki_dir), client_context(identity))


def test_handshake_fails_when_client_lacks_a_certificate(pki_dir: Path) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki_dir / "ca.crt")
    with pytest.raises(ssl.SSLError):
        tls_exchange(server_context(pki_dir), client_ctx)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("server-auth-eku", "unsuitable certificate purpose"),
        ("expired", "certificate has expired"),
        ("not-yet-valid", "certificate is not yet valid"),
    ],
)
def test_handshake_fails_for_unusable_client_certs(
    pki_dir: Path, tmp_path: Path, variant: str, reason: str
) -> None:
    ca_key, ca_cert = pki.load_ca(pki_dir)
    now = datetime.now(UTC)
    if variant == "server-auth-eku":
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
        key, cert = pki.make_client_cert(ca_key, ca_cert, "eve", "user", eku=eku)
    elif variant == "expired":
        end = now - timedelta(days=1)
        key, cert = pki.make_client_cert(ca_key, ca_cert, "eve", "user", not_after=end)
    else:
        start = now + timedelta(days=1)
        key, cert = pki.make_client_cert(ca_key, ca_cert, "eve", "user", not_before=start)
    pki.write_identity(tmp_path / "eve", ca_cert, key, cert)
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        tls_exchange(server_context(pki_dir), client_context(tmp_path / "eve"))


# --- refusing to overwrite -------------------------------------------------------------------


def test_second_init_refuses_and_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_pki(directory, ["a.example"])
    before = snapshot(directory)
    with pytest.raises(pki.PKIError, match=r"refusing to overwrite existing private key .*--force"):
        pki.init_pki(directory, ["b.example"])
    assert snapshot(directory) == before


@pytest.mark.parametrize("survivor", ["ca.key", "server.key", "clients/bob/client.key"])
def test_init_refuses_if_any_key_exists_and_writes_nothing(tmp_path: Path, survivor: str) -> None:
    directory = tmp_path / "pki"
    (directory / survivor).parent.mkdir(parents=True)
    (directory / survivor).write_bytes(b"precious")
    before = snapshot(directory)
    with pytest.raises(pki.PKIError, match=str(directory / survivor)):
        pki.init_pki(directory)
    assert snapshot(directory) == before


def test_init_with_force_replaces_everything(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_pki(directory)
    old_ca = load_cert(directory / "ca.crt")
    old_alice = load_cert(directory / "clients" / "alice" / "client.crt")
    pki.init_pki(directory, force=True)
    new_ca = load_cert(directory / "ca.crt")
    assert new_ca.public_key() != old_ca.public_key()
    for cert_path, _ in leaf_paths(directory):
        load_cert(cert_path).verify_directly_issued_by(new_ca)
    with pytest.raises(InvalidSignature):
        old_alice.verify_directly_issued_by(new_ca)
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "clients" / "alice" / "client.key") == 0o600
    assert not [p for p in directory.rglob("*") if p.name.startswith(".")]


def test_write_private_key_refuses_then_forces(tmp_path: Path) -> None:
    path = tmp_path / "x.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    with pytest.raises(pki.PKIError, match=f"refusing to overwrite existing private key {path}"):
        pki.write_private_key(path, pki.generate_key())
    assert path.read_bytes() == b"old"
    pki.write_private_key(path, pki.generate_key(), force=True)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(path) == 0o600  # a forced write replaces the file, so the old mode goes too


def test_write_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "x.key"
    with pytest.raises(pki.PKIError, match=f"cannot write {missing}"):
        pki.write_private_key(missing, pki.generate_key())
    _, cert = pki.make_ca()
    with pytest.raises(pki.PKIError, match=f"cannot write {missing.with_suffix('.crt')}"):
        pki.write_certificate(missing.with_suffix(".crt"), cert)


# --- issue_client ----------------------------------------------------------------------------


@pytest.fixture
def fresh_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_pki(directory)
    return directory


def test_issue_client_creates_a_verifiable_identity(fresh_pki: Path) -> None:
    identity = pki.issue_client(fresh_pki, "carol.smith@example.com", "admin")
    assert identity == fresh_pki / "clients" / "carol.smith@example.com"
    assert mode(identity) == 0o700
    assert mode(identity / "client.key") == 0o600
    ca_cert = load_cert(fresh_pki / "ca.crt")
    assert (identity / "ca.crt").read_bytes() == (fresh_pki / "ca.crt").read_bytes()
    cert = load_cert(identity / "client.crt")
    cert.verify_directly_issued_by(ca_cert)
    assert subject_values(cert, NameOID.COMMON_NAME) == ["carol.smith@example.com"]
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["admin"]
    tls_exchange(server_context(fresh_pki), client_context(identity))


@pytest.mark.parametrize("role", ["root", "", "Admin", "users"])
def test_issue_client_refuses_unknown_roles(fresh_pki: Path, role: str) -> None:
    with pytest.raises(pki.PKIError, match="admin, user"):
        pki.issue_client(fresh_pki, "carol", role)
    assert not (fresh_pki / "clients" / "carol").exists()


BAD_NAMES = ["../x", "", ".hidden", "a/b", "x" * 65, "-dash", "a b", "carol\n", "é", "..", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_issue_client_refuses_bad_names(fresh_pki: Path, name: str) -> None:
    before = snapshot(fresh_pki)
    with pytest.raises(pki.PKIError, match="invalid client name"):
        pki.issue_client(fresh_pki, name, "user")
    assert snapshot(fresh_pki) == before


@pytest.mark.parametrize("name", ["a", "x" * 64, "carol", "c.s@example.com", "A-1_b"])
def test_validate_client_name_accepts_good_names(name: str) -> None:
    assert pki.validate_client_name(name) == name


@given(st.text(max_size=70))
def test_valid_client_names_are_safe_single_path_components(name: str) -> None:
    try:
        pki.validate_client_name(name)
    except pki.PKIError:
        return
    assert 1 <= len(name) <= 64
    assert Path(name).name == name
    assert not name.startswith((".", "-"))
    assert name.isascii()
    assert name.isprintable()


def test_issue_client_refuses_existing_identity_unless_forced(fresh_pki: Path) -> None:
    identity = pki.issue_client(fresh_pki, "carol", "user")
    before = snapshot(identity)
    with pytest.raises(pki.PKIError, match=str(identity / "client.key")):
        pki.issue_client(fresh_pki, "carol", "admin")
    assert snapshot(identity) == before
    with pytest.raises(pki.PKIError, match="refusing to overwrite"):
        pki.issue_client(fresh_pki, "alice", "user")

    old_serial = load_cert(identity / "client.crt").serial_number
    assert pki.issue_client(fresh_pki, "carol", "admin", force=True) == identity
    cert = load_cert(identity / "client.crt")
    assert cert.serial_number != old_serial
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["admin"]
    assert (identity / "client.key").read_bytes() != before["client.key"][0]
    assert mode(identity / "client.key") == 0o600


def test_issue_client_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ca\.crt is missing \(run `corral certs init`\)"):
        pki.issue_client(tmp_path, "carol", "user")
    assert list(tmp_path.iterdir()) == []


def test_load_ca_reports_a_missing_key(fresh_pki: Path) -> None:
    (fresh_pki / "ca.key").unlink()
    with pytest.raises(pki.PKIError, match=r"ca\.key is missing"):
        pki.load_ca(fresh_pki)


def test_load_ca_rejects_garbage_and_mismatched_keys(fresh_pki: Path) -> None:
    (fresh_pki / "ca.crt").write_bytes(b"not a certificate")
    with pytest.raises(pki.PKIError, match=f"{fresh_pki / 'ca.crt'} is not a PEM certificate"):
        pki.load_ca(fresh_pki)
    _, other_ca = pki.make_ca()
    pki.write_certificate(fresh_pki / "ca.crt", other_ca)
    with pytest.raises(pki.PKIError, match="does not match"):
        pki.load_ca(fresh_pki)
    (fresh_pki / "ca.key").write_bytes(b"junk")
    with pytest.raises(pki.PKIError, match="is not an unencrypted PEM private key"):
        pki.load_ca(fresh_pki)


def test_load_ca_round_trips(fresh_pki: Path) -> None:
    key, cert = pki.load_ca(fresh_pki)
    assert cert == load_cert(fresh_pki / "ca.crt")
    assert key.public_key() == cert.public_key()


# --- make_client_cert variants ---------------------------------------------------------------


def test_client_cert_without_role_has_no_ou(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = pki.make_client_cert(*ca, "carol", None)
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    assert subject_values(cert, NameOID.COMMON_NAME) == ["carol"]


def test_client_cert_with_unknown_role_and_extra_ous(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = pki.make_client_cert(*ca, "carol", "root", extra_ous=["admin", "user"])
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["root", "admin", "user"]
    _, cert = pki.make_client_cert(*ca, "carol", None, extra_ous=["admin"])
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["admin"]


def test_client_cert_without_eku(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    _, cert = pki.make_client_cert(*ca, "carol", "user", eku=None)
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.ExtendedKeyUsage)
    cert.verify_directly_issued_by(ca[1])


def test_client_cert_with_server_auth_only(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    _, cert = pki.make_client_cert(*ca, "carol", "user", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_cert_validity_windows(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    now = datetime.now(UTC)
    past = now - timedelta(days=2)
    _, expired = pki.make_client_cert(*ca, "carol", "user", not_after=past)
    assert expired.not_valid_after_utc == past.replace(microsecond=0)
    assert expired.not_valid_before_utc < expired.not_valid_after_utc

    start, end = now - timedelta(days=10), now - timedelta(days=9)
    _, window = pki.make_client_cert(*ca, "carol", "user", not_before=start, not_after=end)
    assert window.not_valid_before_utc == start.replace(microsecond=0)
    assert window.not_valid_after_utc == end.replace(microsecond=0)

    future = now + timedelta(days=1)
    _, early = pki.make_client_cert(*ca, "carol", "user", not_before=future)
    assert early.not_valid_before_utc == future.replace(microsecond=0)
    assert early.not_valid_after_utc - early.not_valid_before_utc == timedelta(days=90)

    with pytest.raises(ValueError, match="after"):
        pki.make_client_cert(*ca, "carol", "user", not_before=now, not_after=past)


def test_make_ca_and_server_cert_accept_explicit_dates(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    start = datetime(2020, 1, 1, tzinfo=UTC)
    end = datetime(2021, 1, 1, tzinfo=UTC)
    _, ca_cert = pki.make_ca(not_before=start, not_after=end)
    assert (ca_cert.not_valid_before_utc, ca_cert.not_valid_after_utc) == (start, end)
    _, server = pki.make_server_cert(*ca, ["x.example"], not_before=start, not_after=end)
    assert (server.not_valid_before_utc, server.not_valid_after_utc) == (start, end)


def test_identity_writer_refuses_existing_key(
    tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, cert = pki.make_client_cert(*ca, "carol", "user")
    pki.write_identity(tmp_path / "carol", ca[1], key, cert)
    before = snapshot(tmp_path)
    with pytest.raises(pki.PKIError, match="refusing to overwrite"):
        pki.write_identity(tmp_path / "carol", ca[1], *pki.make_client_cert(*ca, "carol", "user"))
    assert snapshot(tmp_path) == before


def test_init_creates_missing_parent_directories(tmp_path: Path) -> None:
    directory = tmp_path / "var" / "corral" / "pki"
    pki.init_pki(directory)
    assert mode(directory) == 0o700
    pki.load_ca(directory)


def test_renew_gives_the_server_and_a_client_new_keys_for_the_same_names(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_pki(directory, ["corral.example.com"])
    server_before = x509.load_pem_x509_certificate(
        (directory / pki_layout.SERVER_CERT_FILE).read_bytes()
    )
    alice = directory / pki_layout.CLIENTS_DIR / "alice"
    alice_before = x509.load_pem_x509_certificate(
        (alice / pki_layout.CLIENT_CERT_FILE).read_bytes()
    )
    key_before = (directory / pki_layout.SERVER_KEY_FILE).read_bytes()

    pki.renew_server(directory)
    assert pki.renew_client(directory, "alice") == alice

    server = x509.load_pem_x509_certificate((directory / pki_layout.SERVER_CERT_FILE).read_bytes())
    san = x509.SubjectAlternativeName
    assert server.serial_number != server_before.serial_number
    assert (directory / pki_layout.SERVER_KEY_FILE).read_bytes() != key_before
    assert (
        server.extensions.get_extension_for_class(san).value
        == server_before.extensions.get_extension_for_class(san).value
    )
    assert server.not_valid_after_utc - server.not_valid_before_utc == pki.LEAF_LIFETIME
    renewed = x509.load_pem_x509_certificate((alice / pki_layout.CLIENT_CERT_FILE).read_bytes())
    assert renewed.subject == alice_before.subject  # CN alice, OU user
    assert renewed.serial_number != alice_before.serial_number
    assert stat.S_IMODE((alice / pki_layout.CLIENT_KEY_FILE).stat().st_mode) == 0o600
    with pytest.raises(pki.PKIError, match="no client carol"):
        pki.renew_client(directory, "carol")
