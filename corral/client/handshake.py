"""Reaching corrald: the transport, the TLS handshake, hello and welcome,
and every way they fail said in plain words (an identity from another CA,
a port that is not corrald, a certificate refused)."""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509

import corral
from corral.address import Address, TCPAddress
from corral.client.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    CorralError,
    ServerError,
    TLSError,
)
from corral.pki import CLIENT_CERT_FILE
from corral.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Role,
    Welcome,
)
from corral.tls import TLSConfigError, client_context

RECEIVE_SIZE = 64 * 1024


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


async def open_transport(address: Address, timeout: float) -> trio.SocketStream:  # noqa: ASYNC109
    try:
        with trio.fail_after(timeout):
            if isinstance(address, TCPAddress):
                return await trio.open_tcp_stream(address.host, address.port)
            return await trio.open_unix_socket(address.path)
    except trio.TooSlowError:
        raise ConnectError(f"cannot connect to {address}: timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {_os_reason(exc)}") from None


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
                cause = exc.__cause__
                raise _handshake_failure(address, cause) from None
            agent = f"corral/{corral.__version__}"
            try:
                await tls.send_all(conn.send(Hello(version=PROTOCOL_VERSION, agent=agent)))
            except trio.BrokenResourceError as exc:
                raise _refusal(address, exc.__cause__) from None
            while True:
                try:
                    event = conn.next_event()
                except ProtocolError as exc:
                    if exc.code is ErrorCode.FAILED_PRECONDITION:
                        raise TLSError(f"corrald at {address}: {exc}") from None
                    raise TLSError(f"corrald at {address} broke the protocol: {exc}") from None
                if event is NEED_DATA:
                    try:
                        data = await tls.receive_some(RECEIVE_SIZE)
                    except trio.BrokenResourceError as exc:
                        raise _refusal(address, exc.__cause__) from None
                    conn.receive_data(bytes(data))
                elif isinstance(event, Welcome):
                    return conn, event
                elif isinstance(event, Error):
                    raise _server_refusal(address, event)
                else:  # PEER_CLOSED
                    raise _refusal(address, None)
    except trio.TooSlowError:
        raise TLSError(
            f"{address} did not finish a TLS handshake in {timeout:g} s: is it corrald? "
            "(an overloaded corrald can be this slow too)"
        ) from None


# OpenSSL's verify codes for a chain that does not lead to a CA we trust.
_UNTRUSTED_CHAIN = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH = 62
_CERT_EXPIRED, _CERT_NOT_YET_VALID = 10, 9


def _handshake_failure(address: Address, cause: BaseException | None) -> CorralError:
    """Why our TLS handshake with `address` failed, in plain words."""
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


def _refusal(address: Address, cause: BaseException | None) -> CorralError:
    """A server that ends the connection before the welcome has refused us."""
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


def identity_context(directory: Path) -> ssl.SSLContext:
    """The TLS context for an identity directory, after checking our own certificate."""
    shown = os.fspath(directory)
    if (directory / "clients").is_dir() and not (directory / CLIENT_CERT_FILE).exists():
        example = f"{shown}/clients/admin"
        raise ConfigError(f"identity {shown} is a PKI directory; use a client's, e.g. {example}")
    try:
        context = client_context(directory)
    except TLSConfigError as exc:
        raise ConfigError(f"identity {shown}: {exc}") from None
    try:
        cert = x509.load_pem_x509_certificate((directory / CLIENT_CERT_FILE).read_bytes())
    except (OSError, ValueError):
        return context  # the TLS layer has loaded it; let the handshake judge
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"our certificate {shown}/{CLIENT_CERT_FILE} is not valid until "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; is this machine's clock right?"
        )
    if now > cert.not_valid_after_utc:
        raise ConfigError(
            f"our certificate {shown}/{CLIENT_CERT_FILE} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; issue a new one"
        )
    return context
