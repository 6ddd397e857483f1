"""Reaching corrald, whatever drives the socket: where to connect, our
identity's TLS context, the hello and the welcome, and every way they fail
said in plain words (an identity from another CA, a port that is not
corrald, a certificate refused).

Two drivers use it: `corral.client.handshake` (trio, for the `Client`) and
`corral.client.blocking` (plain sockets, for the one-shot commands), so
both say the same thing for the same failure. Nothing here imports trio.
"""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime
from pathlib import Path

import corral
from corral.address import Address, AddressError, TCPAddress, parse_address
from corral.cert_dates import validity
from corral.client.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CorralError,
    ServerError,
    TLSError,
)
from corral.pki_layout import CLIENT_CERT_FILE, CLIENTS_DIR
from corral.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Welcome,
)
from corral.tls import TLSConfigError, client_context

# Long enough for a loaded server on a slow link; short enough that a
# script pointed at the wrong port does not hang.
CONNECT_TIMEOUT = 10.0
# The name the dev server certificate always carries, used for unix sockets.
UNIX_SERVER_NAME = "localhost"
# A send that makes no progress this long means corrald has stopped reading.
SEND_TIMEOUT = 30.0
RECEIVE_SIZE = 64 * 1024


def resolve(
    address: str | Address,
    identity: str | os.PathLike[str] | ssl.SSLContext,
    server_name: str | None,
) -> tuple[Address, ssl.SSLContext, str]:
    """What `connect` needs before it touches the network: the address, the
    TLS context and the name to verify in the server's certificate (the
    host of a TCP address, "localhost" for a unix socket, unless given).
    Raises ConfigError."""
    if isinstance(address, str):
        try:
            address = parse_address(address)
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
    context = identity if isinstance(identity, ssl.SSLContext) else identity_context(Path(identity))
    if server_name is None:
        server_name = address.host if isinstance(address, TCPAddress) else UNIX_SERVER_NAME
    return address, context, server_name


def identity_context(directory: Path) -> ssl.SSLContext:
    """The TLS context for an identity directory, after checking our own certificate."""
    shown = os.fspath(directory)
    if (directory / CLIENTS_DIR).is_dir() and not (directory / CLIENT_CERT_FILE).exists():
        example = f"{shown}/clients/admin"
        raise ConfigError(f"identity {shown} is a PKI directory; use a client's, e.g. {example}")
    try:
        context = client_context(directory)
    except TLSConfigError as exc:
        raise ConfigError(f"identity {shown}: {exc}") from None
    try:
        not_before, not_after = validity((directory / CLIENT_CERT_FILE).read_bytes())
    except (OSError, ValueError):
        return context  # the TLS layer has loaded it; let the handshake judge
    now = datetime.now(UTC)
    if now < not_before:
        raise ConfigError(
            f"our certificate {shown}/{CLIENT_CERT_FILE} is not valid until "
            f"{not_before:%Y-%m-%d %H:%M:%S} UTC; is this machine's clock right?"
        )
    if now > not_after:
        raise ConfigError(
            f"our certificate {shown}/{CLIENT_CERT_FILE} expired on "
            f"{not_after:%Y-%m-%d %H:%M:%S} UTC; issue a new one"
        )
    return context


def hello(conn: Connection) -> bytes:
    """The bytes of our hello, the first message on a connection."""
    return conn.send(Hello(version=PROTOCOL_VERSION, agent=f"corral/{corral.__version__}"))


def welcome(conn: Connection, address: Address) -> Welcome | None:
    """The server's welcome, once `conn` has received it; None while it
    needs more data. Raises the error a refusal or a broken peer means."""
    try:
        event = conn.next_event()
    except ProtocolError as exc:
        if exc.code is ErrorCode.FAILED_PRECONDITION:
            raise TLSError(f"corrald at {address}: {exc}") from None
        raise TLSError(f"corrald at {address} broke the protocol: {exc}") from None
    if event is NEED_DATA:
        return None
    if isinstance(event, Welcome):
        return event
    if isinstance(event, Error):
        raise _server_refusal(address, event)
    raise refusal(address, None)  # PEER_CLOSED


def connect_failure(address: Address, exc: OSError) -> ConnectError:
    return ConnectError(f"cannot connect to {address}: {_os_reason(exc)}")


def connect_timeout(address: Address, timeout: float) -> ConnectError:
    return ConnectError(f"cannot connect to {address}: timed out after {timeout:g} s")


def handshake_timeout(address: Address, timeout: float) -> TLSError:
    return TLSError(
        f"{address} did not finish a TLS handshake in {timeout:g} s: is it corrald? "
        "(an overloaded corrald can be this slow too)"
    )


def _os_reason(exc: OSError) -> str:
    """The first human reason in an OSError, or in the group behind it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno or seen.strerror):
            # trio's strerror repeats the address; the errno says it plainly.
            # (Name lookup errors have negative errnos and their own text.)
            reason = os.strerror(seen.errno) if seen.errno and seen.errno > 0 else seen.strerror
            return str(reason)[0].lower() + str(reason)[1:]
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
        else:
            seen = seen.__cause__
    return str(exc)


def _alert_text(exc: ssl.SSLError) -> str:
    """'TLSV1_ALERT_UNKNOWN_CA' -> 'unknown ca'."""
    reason = (exc.reason or str(exc)).lower()
    for prefix in ("tlsv13_alert_", "tlsv1_alert_", "sslv3_alert_"):
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).replace("_", " ")
    return reason.replace("_", " ")


def _is_alert(exc: BaseException | None) -> bool:
    return isinstance(exc, ssl.SSLError) and "alert" in (exc.reason or "").lower()


# OpenSSL's verify codes for a chain that does not lead to a CA we trust.
_UNTRUSTED_CHAIN = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH = 62
_CERT_EXPIRED, _CERT_NOT_YET_VALID = 10, 9


def handshake_failure(address: Address, cause: BaseException | None) -> CorralError:
    """Why our TLS handshake with `address` failed (`cause`: what the TLS
    layer raised, None for a bare close), in plain words."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        code = cause.verify_code
        if code in _UNTRUSTED_CHAIN:
            return TLSError(
                f"cannot verify the server at {address}: its certificate is not signed by "
                "this identity's CA (its ca.crt); is the identity for this corrald?"
            )
        if code == _HOSTNAME_MISMATCH:
            return TLSError(
                f"cannot verify the server at {address}: {cause.verify_message.rstrip('.')}; "
                "pass --server-name with a name its certificate has"
            )
        if code in {_CERT_EXPIRED, _CERT_NOT_YET_VALID}:
            return TLSError(
                f"cannot verify the server at {address}: its certificate "
                f"{'has expired' if code == _CERT_EXPIRED else 'is not valid yet'}"
            )
        return TLSError(f"cannot verify the server at {address}: {cause.verify_message}")
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
        return TLSError(f"{address} does not speak TLS: is it corrald? ({cause.reason})")
    if _is_alert(cause):
        return TLSError(
            f"TLS handshake with {address} failed: the server sent '{_alert_text(cause)}'"  # type: ignore[arg-type]
        )
    if cause is None or isinstance(cause, ssl.SSLEOFError | ConnectionError):
        # Closed (or reset) before any TLS was spoken: corrald at its
        # connection limit does that; so does a server of another protocol.
        return ConnectError(
            f"{address} closed the connection during the TLS handshake: is it corrald? "
            "(a corrald at its connection limit does this too: try again)"
        )
    return TLSError(f"TLS handshake with {address} failed: {cause}")


# What OpenSSL says when the peer's first bytes are not a TLS record: an
# HTTP, SSH or SMTP server, say.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


def _server_refusal(address: Address, error: Error) -> CorralError:
    if error.code is ErrorCode.PERMISSION_DENIED:
        return AuthenticationError(f"corrald at {address} refused our certificate: {error.message}")
    if error.code is ErrorCode.FAILED_PRECONDITION:
        return TLSError(f"corrald at {address}: {error.message}")
    return ServerError(error.code, f"corrald at {address}: {error.message}")


# What the alert a server sends in its handshake says of our certificate.
_REJECTIONS = {
    "certificate required": "we sent none, and corrald requires one",
    "unknown ca": "it is not signed by a CA this corrald trusts",
    "certificate expired": "it has expired",
    "bad certificate": "it is not valid (not valid yet, or malformed)",
    "unsupported certificate": "it is not for client authentication (extendedKeyUsage)",
    "certificate revoked": "it has been revoked",
}


def refusal(address: Address, cause: BaseException | None) -> CorralError:
    """A server that ends the connection before the welcome has refused us
    (`cause`: what the TLS layer raised, None for a bare close)."""
    if isinstance(cause, ssl.SSLError) and _is_alert(cause):
        alert = _alert_text(cause)
        why = _REJECTIONS.get(alert, alert)
        return AuthenticationError(
            f"corrald at {address} rejected our client certificate: {why} (TLS alert '{alert}')"
        )
    return AuthenticationError(
        f"corrald at {address} closed the connection before accepting us; "
        "is our certificate signed by its CA, and still valid?"
    )
