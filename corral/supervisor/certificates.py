"""corrald's own TLS files: loaded at start, reloaded on SIGHUP, watched
for expiry.

A reload builds a whole new server context from PKI_DIR (ca.crt,
server.crt, server.key) and swaps it in only if every file loads and the
certificate is in its validity period: handshakes from then on use it,
sessions already open keep the one they were made with. A file that is
wrong is refused with one line in the log, and the old context stays.
ca.crt may hold several CAs (a bundle): clients of the old CA and of the
new one are both accepted while they move over.

From `WARN_BEFORE` ahead of its certificate's end, corrald warns in its
log (at start, at each reload, and once a day) and in `info`.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from corral.cert_dates import serial_number, validity
from corral.pki_layout import SERVER_CERT_FILE
from corral.tls import TLSConfigError, server_context

log = logging.getLogger(__name__)

# Mozilla's and the CA/Browser Forum's lead time for renewals.
WARN_BEFORE = datetime.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """What `info` and the log say of the certificate in use."""

    serial: int
    not_after: datetime.datetime

    def left(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return self.not_after - (now or datetime.datetime.now(datetime.UTC))

    def warning(self, now: datetime.datetime | None = None) -> str | None:
        """A sentence for the operator once the end is within WARN_BEFORE."""
        left = self.left(now)
        if left > WARN_BEFORE:
            return None
        when = self.not_after.strftime("%Y-%m-%d %H:%M UTC")
        if left <= datetime.timedelta(0):
            return f"corrald's certificate expired at {when}: clients refuse it; renew it"
        days = left.days
        return (
            f"corrald's certificate expires at {when}, in {days} day{'s' if days != 1 else ''}: "
            "renew it (corral certs renew) and send corrald SIGHUP"
        )

    def to_wire(self) -> dict[str, object]:
        return {
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat().replace("+00:00", "Z"),
            "warning": self.warning(),
        }


def load(pki_dir: Path) -> tuple[ssl.SSLContext, ServerCertificate]:
    """A server context from PKI_DIR and what its certificate says;
    TLSConfigError naming what is wrong."""
    context = server_context(pki_dir)
    path = pki_dir / SERVER_CERT_FILE
    try:
        pem = path.read_bytes()
        not_before, not_after = validity(pem)
        serial = serial_number(pem)
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"cannot read the certificate {path}: {exc}") from None
    now = datetime.datetime.now(datetime.UTC)
    if not_before > now:
        raise TLSConfigError(f"{path} is not valid until {not_before:%Y-%m-%d %H:%M} UTC")
    if not_after <= now:
        raise TLSConfigError(f"{path} expired at {not_after:%Y-%m-%d %H:%M} UTC")
    return context, ServerCertificate(serial, not_after)


def say_if_expiring(certificate: ServerCertificate) -> None:
    warning = certificate.warning()
    if warning is not None:
        log.warning("%s", warning)


__all__ = ["WARN_BEFORE", "ServerCertificate", "load", "say_if_expiring"]
