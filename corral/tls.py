"""Mutual TLS for corral: the contexts both ends use and the identity in a certificate.

TLS 1.3 only, on both sides. The server requires a client certificate
signed by the corral CA in the handshake itself (CERT_REQUIRED): a peer
with none, another CA's or an expired one never gets past it, let alone to
the session code and the msgpack decoder. Identity comes from the verified
certificate alone: name = CN, role = OU; what the handshake cannot check
(a known role, a valid name) the server checks after it. Key exchange:
X25519, P-256 or P-384 only (see GROUPS).
"""

from __future__ import annotations

import _ssl
import ssl
from pathlib import Path

from corral.identity import ROLES, Identity
from corral.pki_layout import (
    CA_CERT_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)


class TLSConfigError(Exception):
    """A certificate, key or CA file could not be loaded."""


class IdentityError(Exception):
    """A verified certificate does not name an acceptable corral identity."""


def _tls13_only(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


# Key exchange groups, Mozilla's "modern" set. OpenSSL 3 also accepts the
# finite-field groups (ffdhe2048 to ffdhe8192) by default: none is weak, but
# a peer that picks ffdhe8192 costs the server ~65 times an X25519
# handshake's CPU (124 ms against 1.8 ms, measured), on corrald's event
# loop, before any certificate is checked.
GROUPS = "X25519:P-256:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92  # <openssl/ssl.h>


def _limit_groups(context: ssl.SSLContext) -> None:
    """Offer and accept only GROUPS for the key exchange.

    Python's ssl module cannot choose TLS 1.3 groups before 3.15
    (`set_ecdh_curve` leaves one curve), so this asks OpenSSL directly:
    SSL_CTX_ctrl(SSL_CTRL_SET_GROUPS_LIST) on the context's SSL_CTX, the
    first field of CPython's SSLContext object, through the libssl the
    `_ssl` module itself is linked with. The pointer is checked against
    the options the module reports before it is used to set anything.
    """
    set_groups = getattr(context, "set_groups", None)
    if set_groups is not None:  # Python 3.15+
        set_groups(GROUPS)
        return
    import ctypes  # noqa: PLC0415 - corrald's alone

    libssl = ctypes.CDLL(_ssl.__file__)
    get_options = libssl.SSL_CTX_get_options
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    ctrl = libssl.SSL_CTX_ctrl
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ssl_ctx or get_options(ssl_ctx) != context.options:
        raise TLSConfigError("cannot limit the TLS key exchange groups: unexpected ssl module")
    if ctrl(ssl_ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS.encode()) != 1:
        raise TLSConfigError(f"OpenSSL refused the key exchange groups {GROUPS}")


def _load(context: ssl.SSLContext, ca: Path, cert: Path, key: Path) -> None:
    for path in (ca, cert, key):
        if not path.is_file():
            raise TLSConfigError(f"missing TLS file {path}")
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA certificate {ca}: {exc}") from exc
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {cert} with key {key}: {exc}") from exc


def server_context(pki_dir: Path) -> ssl.SSLContext:
    """The server's context from PKI_DIR/{ca.crt,server.crt,server.key}."""
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # The server's choice is what counts: a client offering more groups
    # still gets one of these. (The client leaves OpenSSL's list, which
    # starts with X25519, and so does not load libssl through ctypes.)
    _limit_groups(context)
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, pki_dir / CA_CERT_FILE, pki_dir / SERVER_CERT_FILE, pki_dir / SERVER_KEY_FILE)
    return context


def client_context(identity_dir: Path) -> ssl.SSLContext:
    """A client's context from IDENTITY_DIR/{ca.crt,client.crt,client.key}.

    It verifies the server's certificate against that CA and checks the
    host name (PROTOCOL_TLS_CLIENT's defaults).
    """
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    _load(
        context,
        identity_dir / CA_CERT_FILE,
        identity_dir / CLIENT_CERT_FILE,
        identity_dir / CLIENT_KEY_FILE,
    )
    return context


# OpenSSL's verify codes (X509_V_ERR_*) the server meets in client
# certificates, grouped by what the refusal should say.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})  # no chain to our CA, self-signed
_EXPIRED = 10
_NOT_YET_VALID = 9


def handshake_refusal(exc: BaseException | None) -> tuple[str, str]:
    """Why a server-side handshake failed: (reason, what to log).

    The reason is one of a few fixed words, for counting; the text names
    it for a person reading corrald's log.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _UNTRUSTED:
            return "untrusted_certificate", (
                f"client certificate not signed by our CA ({exc.verify_message})"
            )
        if code == _EXPIRED:
            return "expired_certificate", "client certificate expired"
        if code == _NOT_YET_VALID:
            return "invalid_certificate", "client certificate not valid yet"
        return "invalid_certificate", f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", "no client certificate"
        if exc.reason in {"UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"}:
            return "protocol", "the client does not speak TLS 1.3"
        if exc.reason in {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"}:
            return "protocol", f"not TLS ({exc.reason.lower().replace('_', ' ')})"
        if isinstance(exc, ssl.SSLEOFError) or exc.reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed", "the client closed the connection"
        return "other", str(exc.reason or exc).lower().replace("_", " ")
    if exc is None or isinstance(exc, ConnectionError):
        return "closed", "the client closed the connection"
    return "other", str(exc)


def identity_from_certificate(der: bytes | None) -> Identity:
    """Return the identity in a peer certificate the TLS layer has verified.

    Raises IdentityError, with a sentence for the peer, when there is no
    certificate, it lacks the clientAuth usage, or it does not hold exactly
    one CN with a valid name and exactly one OU naming a known role.
    """
    # Only corrald reads certificates: imported here, `cryptography` and the
    # PKI cost a client nothing (a one-shot `corral` command paid ~60 ms).
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    from corral.pki import PKIError, validate_client_name  # noqa: PLC0415

    if der is None:
        raise IdentityError("a client certificate is required")
    cert = x509.load_der_x509_certificate(der)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise IdentityError("client certificate lacks the clientAuth extended key usage")
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1:
        raise IdentityError(f"client certificate must have exactly one CN, not {len(names)}")
    try:
        name = validate_client_name(names[0])
    except PKIError as exc:
        raise IdentityError(f"client certificate CN is not a valid name: {exc}") from None
    roles = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    known = ", ".join(ROLES)
    if not roles:
        raise IdentityError(f"client certificate has no role (OU); expected one of {known}")
    if len(roles) > 1:
        raise IdentityError(
            f"client certificate names several roles ({', '.join(roles)}); expected one of {known}"
        )
    if roles[0] not in ROLES:
        raise IdentityError(f"client certificate role {roles[0]!r} is unknown; expected {known}")
    return Identity(name=name, role=roles[0])
