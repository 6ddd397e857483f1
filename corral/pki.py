"""Development PKI for corral: one CA, one server certificate, client identities.

Everything is built with the ``cryptography`` package.  Private keys are created
0600 and are never replaced unless the caller passes ``force``; certificates and
forced key replacements are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.directories import make_directories
from corral.identity import ROLES
from corral.pki_layout import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    CLIENTS_DIR,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)

DEFAULT_CLIENTS: tuple[tuple[str, str], ...] = (
    ("admin", "admin"),
    ("alice", "user"),
    ("bob", "user"),
)

# Always present so a fresh dev setup works on loopback over IPv4, IPv6 and by name.
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
# The daemon's name; clients check SANs, so the CN is only for people reading certs.
SERVER_COMMON_NAME = "corrald"
# Shared organisation so a corral cert is recognisable at a glance.
ORGANIZATION = "corral"
# Tolerates hosts whose clocks run a little behind the one that issued the cert.
CLOCK_SKEW = timedelta(minutes=5)
# A dev CA should outlive many rounds of leaf re-issuing.
CA_LIFETIME = timedelta(days=3650)
# Mozilla's "modern" maximum for leaves: renewed with `corral certs renew`
# (corrald warns from 14 days before its own ends).
LEAF_LIFETIME = timedelta(days=90)
# Names become directory names and job owners: no separators, no hidden files; 64 is the CN limit.
CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


# Keys, and the directories holding them, are the owner's alone; certificates are public.
_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


class PKIError(Exception):
    """A failure the user can cause and fix: existing files, missing CA, bad input."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def validate_client_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid client name; raise PKIError otherwise."""
    if not CLIENT_NAME_RE.fullmatch(name):
        raise PKIError(
            f"invalid client name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    return name


def _validity(
    not_before: datetime | None, not_after: datetime | None, lifetime: timedelta
) -> tuple[datetime, datetime]:
    if not_before is None:
        not_before = datetime.now(UTC) - CLOCK_SKEW
        # An explicit end in the past (an expired test cert) still needs a start before it.
        if not_after is not None and not_after <= not_before:
            not_before = not_after - lifetime
    if not_after is None:
        not_after = not_before + lifetime
    return not_before, not_after


def _subject(common_name: str, ous: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    subject: x509.Name,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    validity: tuple[datetime, datetime],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Make a key and a certificate for it, signed by ``issuer`` or, if None, self-signed."""
    key = generate_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    signer = key
    if issuer is None:
        builder = builder.issuer_name(subject)
    else:
        signer, ca_cert = issuer
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:  # a CA made by another tool may lack an SKI
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
        # OpenSSL's strict mode (on by default since Python 3.13) rejects leaves without an AKI.
        builder = builder.issuer_name(ca_cert.subject).add_extension(aki, critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return key, builder.sign(signer, hashes.SHA256())


def _leaf_extensions(
    *extra: tuple[x509.ExtensionType, bool],
) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(digital_signature=True), True),
        *extra,
    ]


def make_ca(
    common_name: str = "corral dev CA",
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new self-signed CA key and certificate that may sign leaves but not other CAs.

    Raises ValueError if ``not_after`` is earlier than ``not_before``.
    """
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(cert_sign=True), True),
    ]
    validity = _validity(not_before, not_after, CA_LIFETIME)
    return _sign(_subject(common_name), extensions, None, validity)


def _server_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() or c == "/" for c in name):
        raise PKIError(f"invalid server name {name!r}: expected a DNS name or an IP address")
    try:
        return x509.DNSName(name)
    except ValueError:
        raise PKIError(
            f"invalid server name {name!r}: give non-ASCII names in punycode (xn--) form"
        ) from None


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a serverAuth key and certificate for ``names`` plus localhost, 127.0.0.1 and ::1.

    Names that parse as IP addresses become IPAddress SANs, the rest DNSName SANs; duplicates
    (case-insensitive for DNS) are dropped.  Raises PKIError for a name that is neither.
    """
    sans: list[x509.GeneralName] = []
    seen: set[tuple[str, str]] = set()
    for name in (*DEFAULT_SERVER_NAMES, *names):
        san = _server_name(name)
        key = (type(san).__name__, str(san.value).lower())
        if key not in seen:
            seen.add(key)
            sans.append(san)
    extensions = _leaf_extensions(
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(sans), False),
    )
    validity = _validity(not_before, not_after, LEAF_LIFETIME)
    return _sign(_subject(SERVER_COMMON_NAME), extensions, (ca_key, ca_cert), validity)


def make_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    role: str | None,
    *,
    extra_ous: Sequence[str] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a client key and certificate with subject CN=name, OU=role, then OU=extra_ous.

    Deliberately does not validate ``name`` or ``role`` (tests need malformed certificates):
    ``role=None`` gives no role OU, ``eku=None`` omits the extendedKeyUsage extension.
    Raises ValueError if cryptography rejects an attribute or the validity window.
    """
    ous = ([] if role is None else [role]) + list(extra_ous)
    extensions = _leaf_extensions()
    if eku is not None:
        extensions.append((x509.ExtendedKeyUsage(list(eku)), False))
    validity = _validity(not_before, not_after, LEAF_LIFETIME)
    return _sign(_subject(name, ous), extensions, (ca_key, ca_cert), validity)


def _mkdir(path: Path) -> None:
    try:
        make_directories(path, _DIR_MODE)
    except OSError as e:
        raise PKIError(f"cannot create directory {path}: {e.strerror}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes, mode: int | None = None) -> None:
    with os.fdopen(fd, "wb") as f:
        if mode is not None:
            os.fchmod(fd, mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically put ``data`` at ``path`` with ``mode``, set before any byte is written."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PKIError(f"cannot write {path}: {e.strerror}") from e
    try:
        # mkstemp creates 0600; fchmod ignores the umask, so a cert really ends up 0644.
        _write_fd(fd, data, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PKIError(f"cannot write {path}: {e.strerror}") from e


def _refuse_existing_keys(paths: Sequence[Path]) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise PKIError(f"refusing to overwrite existing private key {path} (use --force)")


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, force: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, mode 0600 from creation, synced to disk.

    Raises PKIError if ``path`` exists and ``force`` is false (with force it is replaced
    atomically), or if the file cannot be written.
    """
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if force:
        _replace(path, data, _KEY_MODE)
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _KEY_MODE)
    except FileExistsError:
        raise PKIError(f"refusing to overwrite existing private key {path} (use --force)") from None
    except OSError as e:
        raise PKIError(f"cannot write {path}: {e.strerror}") from e
    try:
        _write_fd(fd, data)
        _fsync_dir(path.parent)
    except OSError as e:
        # A truncated key would block every later run without --force; remove it.
        with contextlib.suppress(OSError):
            path.unlink()
        raise PKIError(f"cannot write {path}: {e.strerror}") from e


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Atomically write ``cert`` as PEM with mode 0644; raise PKIError if that fails."""
    _replace(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def write_identity(
    directory: Path,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    *,
    force: bool = False,
) -> None:
    """Write ``directory``/{ca.crt,client.crt,client.key}, creating the directory 0700.

    Raises PKIError, before writing anything, if client.key exists and ``force`` is false.
    """
    key_path = directory / CLIENT_KEY_FILE
    if not force:
        _refuse_existing_keys([key_path])
    _mkdir(directory)
    write_private_key(key_path, key, force=force)
    write_certificate(directory / CLIENT_CERT_FILE, cert)
    write_certificate(directory / CA_CERT_FILE, ca_cert)


def init_pki(directory: Path, server_names: Sequence[str] = (), *, force: bool = False) -> None:
    """Create a CA, a server certificate and the DEFAULT_CLIENTS identities under ``directory``.

    Raises PKIError for a bad server name, or, before anything is written, if any private key
    it would write already exists and ``force`` is false; also if a file cannot be written.
    """
    clients_dir = directory / CLIENTS_DIR
    if not force:
        _refuse_existing_keys(
            [directory / CA_KEY_FILE, directory / SERVER_KEY_FILE]
            + [clients_dir / name / CLIENT_KEY_FILE for name, _ in DEFAULT_CLIENTS]
        )
    # Build everything first so a bad server name fails before the disk is touched.
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, server_names)
    clients = [
        (name, *make_client_cert(ca_key, ca_cert, name, role)) for name, role in DEFAULT_CLIENTS
    ]

    _mkdir(directory)
    write_private_key(directory / CA_KEY_FILE, ca_key, force=force)
    write_certificate(directory / CA_CERT_FILE, ca_cert)
    write_private_key(directory / SERVER_KEY_FILE, server_key, force=force)
    write_certificate(directory / SERVER_CERT_FILE, server_cert)
    _mkdir(clients_dir)
    for name, key, cert in clients:
        write_identity(clients_dir / name, ca_cert, key, cert, force=force)


def _read_ca_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"no CA found: {path} is missing (run `corral certs init`)") from None
    except OSError as e:
        raise PKIError(f"cannot read {path}: {e.strerror}") from e


def load_ca(pki_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return the CA key and certificate stored in ``pki_dir``.

    Raises PKIError if either file is missing, unreadable, malformed, not an EC key, or if the
    key does not belong to the certificate.
    """
    cert_path, key_path = pki_dir / CA_CERT_FILE, pki_dir / CA_KEY_FILE
    cert_pem, key_pem = _read_ca_file(cert_path), _read_ca_file(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path} is not an ECDSA private key")
    if key.public_key() != cert.public_key():
        raise PKIError(f"CA key {key_path} does not match certificate {cert_path}")
    return key, cert


def issue_client(pki_dir: Path, name: str, role: str, *, force: bool = False) -> Path:
    """Issue a client identity signed by the CA in ``pki_dir`` and return its directory.

    Raises PKIError for a bad name or role, a missing or broken CA, or, before writing
    anything, an existing identity when ``force`` is false.
    """
    validate_client_name(name)
    if role not in ROLES:
        raise PKIError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    ca_key, ca_cert = load_ca(pki_dir)
    clients_dir = pki_dir / CLIENTS_DIR
    identity = clients_dir / name
    if not force:
        _refuse_existing_keys([identity / CLIENT_KEY_FILE])
    key, cert = make_client_cert(ca_key, ca_cert, name, role)
    _mkdir(clients_dir)
    write_identity(identity, ca_cert, key, cert, force=force)
    return identity


def _read_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"no {what}: {path} is missing") from None
    except OSError as e:
        raise PKIError(f"cannot read {path}: {e.strerror}") from e
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def renew_server(pki_dir: Path) -> Path:
    """Re-issue corrald's key and certificate in ``pki_dir`` from its CA, for
    the names the old one has, valid LEAF_LIFETIME from now; each file is
    replaced atomically. Returns the certificate's path. PKIError if the CA
    or the old certificate cannot be read."""
    ca_key, ca_cert = load_ca(pki_dir)
    path = pki_dir / SERVER_CERT_FILE
    old = _read_certificate(path, "server certificate")
    try:
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError(f"{path} names no host (no subjectAltName): issue a new one") from None
    names = [*sans.get_values_for_type(x509.DNSName)]
    names += [str(address) for address in sans.get_values_for_type(x509.IPAddress)]
    key, cert = make_server_cert(ca_key, ca_cert, names)
    write_private_key(pki_dir / SERVER_KEY_FILE, key, force=True)
    write_certificate(path, cert)
    return path


def renew_client(pki_dir: Path, name: str) -> Path:
    """Re-issue client ``name``'s key and certificate (same name and role)
    from the CA in ``pki_dir``, valid LEAF_LIFETIME from now; returns its
    identity directory. PKIError if there is no such client."""
    validate_client_name(name)
    ca_key, ca_cert = load_ca(pki_dir)
    identity = pki_dir / CLIENTS_DIR / name
    old = _read_certificate(identity / CLIENT_CERT_FILE, f"client {name}")
    roles = [
        str(a.value) for a in old.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    if len(roles) != 1 or roles[0] not in ROLES:
        raise PKIError(f"{identity / CLIENT_CERT_FILE} has no single known role: issue a new one")
    key, cert = make_client_cert(ca_key, ca_cert, name, roles[0])
    write_identity(identity, ca_cert, key, cert, force=True)
    return identity
