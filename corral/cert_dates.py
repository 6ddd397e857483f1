"""A certificate's dates and serial number, read from its PEM file with the
standard library.

The client checks its own certificate's dates before it connects, to name
a wrong clock as such; corrald reads its own certificate's to warn before
it expires. The `cryptography` package would read them too, but importing
it costs a one-shot `corral` command more than everything else it does,
and corrald's start a fifth of its time; they sit at a fixed place in the
DER (RFC 5280, 4.1):

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    TBSCertificate ::= SEQUENCE { [0] version OPTIONAL,
        serialNumber INTEGER, signature, issuer, validity, ... }
    Validity ::= SEQUENCE { notBefore Time, notAfter Time }
    Time ::= CHOICE { UTCTime, GeneralizedTime }
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"
_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT, constructed
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_INTEGER = 0x02
# TBSCertificate's fields up to and including validity, after the version.
_VALIDITY_INDEX = 3
# Longer lengths than 4 bytes would describe a certificate of over 4 GiB.
_MAX_LENGTH_BYTES = 4


def validity(pem: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter), in UTC, of the first certificate in `pem`.

    Raises ValueError when there is no PEM certificate, or its DER is not
    laid out as an X.509 certificate's up to its dates.
    """
    certificate = _der(pem)
    tag, start, end = _tbs_fields(certificate)[_VALIDITY_INDEX]
    _expect(tag, _SEQUENCE, "validity")
    not_before = _element(certificate, start)
    not_after = _element(certificate, not_before[2])
    if not_after[2] != end:
        raise ValueError("the validity is not two times")
    return _time(certificate, *not_before), _time(certificate, *not_after)


def serial_number(pem: bytes) -> int:
    """The serial number of the first certificate in `pem`; ValueError as
    `validity` raises it."""
    certificate = _der(pem)
    tag, start, end = _tbs_fields(certificate)[0]
    _expect(tag, _INTEGER, "serial number")
    if start == end:
        raise ValueError("the certificate's serial number is empty")
    return int.from_bytes(certificate[start:end], "big", signed=True)


def _tbs_fields(certificate: bytes) -> list[tuple[int, int, int]]:
    """The tbsCertificate's fields up to its validity, the version left out,
    as (tag, start, end)."""
    tag, start, _ = _element(certificate, 0)
    _expect(tag, _SEQUENCE, "certificate")
    tag, start, end = _element(certificate, start)
    _expect(tag, _SEQUENCE, "tbsCertificate")
    fields: list[tuple[int, int, int]] = []
    while start < end and len(fields) <= _VALIDITY_INDEX + 1:
        field = _element(certificate, start)
        fields.append(field)
        start = field[2]
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    if len(fields) <= _VALIDITY_INDEX:
        raise ValueError("the certificate ends before its validity")
    return fields


def _der(pem: bytes) -> bytes:
    begin = pem.find(_BEGIN)
    end = pem.find(_END, begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate")
    try:
        return base64.b64decode(b"".join(pem[begin + len(_BEGIN) : end].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the PEM certificate is not base64: {exc}") from None


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at `at`: its content is der[start:end]."""
    if at + 2 > len(der):
        raise ValueError("the certificate is truncated")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= _MAX_LENGTH_BYTES or at + size > len(der):
            raise ValueError("the certificate has an invalid length")
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    if at + length > len(der):
        raise ValueError("the certificate is truncated")
    return tag, at, at + length


def _expect(tag: int, wanted: int, name: str) -> None:
    if tag != wanted:
        raise ValueError(f"the certificate's {name} has tag {tag:#04x}, not {wanted:#04x}")


def _time(der: bytes, tag: int, start: int, end: int) -> datetime:
    """A UTCTime (YYMMDDHHMMSSZ, 1950 to 2049) or GeneralizedTime
    (YYYYMMDDHHMMSSZ), as DER writes them: in UTC, to the second."""
    text = der[start:end].decode("ascii", errors="replace")
    if tag == _UTC_TIME and len(text) == 13:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME or len(text) != 15:
        raise ValueError(f"the certificate has an invalid time {text!r}")
    if not (text.endswith("Z") and text[:-1].isascii() and text[:-1].isdigit()):
        raise ValueError(f"the certificate has an invalid time {text!r}")
    numbers = [int(text[:4])] + [int(text[i : i + 2]) for i in range(4, 14, 2)]
    year, month, day, hour, minute, second = numbers
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
