"""What keeps the one-shot `corral` commands fast, checked for what it is,
not timed (bench/cli.py times them): they import neither trio nor the
`cryptography` package, and the client reads its certificate's dates
without it, as `cryptography` reads them."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from corral import pki, pki_layout
from corral.cert_dates import serial_number, validity

from .conftest import Daemon, identity

# Runs one command line in this process, then says which of the heavy
# modules it imported.
PROBE = """
import sys
from corral.client import cli
status = cli.run(sys.argv[1:])
heavy = sorted(
    name for name in sys.modules
    if name.split(".")[0] in {"trio", "cryptography"} or name == "corral.pki"
)
sys.stderr.write(f"imported: {heavy}\\n")
sys.exit(status)
"""


def probe(corrald: Daemon, pki_dir: Path, *args: str) -> tuple[str, str]:
    """`corral ARGS` run by PROBE, which must succeed: its stdout, and
    which heavy modules it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_ADDR=corrald.tcp, CORRAL_IDENTITY=str(identity(pki_dir, "admin")))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr.splitlines()[-1]


@pytest.mark.jobs
@pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")
def test_one_shot_commands_import_neither_trio_nor_cryptography(
    corrald: Daemon, pki_dir: Path
) -> None:
    started, imported = probe(corrald, pki_dir, "start", "--", "true")
    assert "'trio'" in imported  # not a one-shot: it runs in trio
    for command in (["run", "--", "true"], ["status", started.strip()], ["info"], ["ps"]):
        assert probe(corrald, pki_dir, *command)[1] == "imported: []", command
    assert probe(corrald, pki_dir, "--json", "ps")[1] == "imported: []"


def _pem(not_before: datetime, not_after: datetime) -> bytes:
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_client_cert(
        ca_key, ca_cert, "bob", "user", not_before=not_before, not_after=not_after
    )
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (not_before, not_after)
    return cert.public_bytes(Encoding.PEM)


def _utc(year: int, month: int, day: int, *time: int) -> datetime:
    hour, minute, second = (*time, 0, 0, 0)[:3]
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        # UTCTime (two-digit years) up to 2049, GeneralizedTime from 2050 (RFC 5280).
        (_utc(2024, 2, 29, 1, 2, 3), _utc(2049, 12, 31, 23, 59, 59)),
        (_utc(1950, 1, 1), _utc(2050, 1, 1)),
        (_utc(1999, 12, 31, 23, 59, 59), _utc(9999, 12, 31, 23, 59, 59)),
    ],
)
def test_certificate_dates_read_as_cryptography_reads_them(
    not_before: datetime, not_after: datetime
) -> None:
    assert validity(_pem(not_before, not_after)) == (not_before, not_after)


def test_the_dates_are_the_first_certificates_of_a_file(pki_dir: Path) -> None:
    pem = (identity(pki_dir, "bob") / pki_layout.CLIENT_CERT_FILE).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    later = _pem(datetime(2030, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC))
    dates = (cert.not_valid_before_utc, cert.not_valid_after_utc)
    assert validity(b"a comment\n" + pem + later) == dates


def test_serial_numbers_read_as_cryptography_reads_them() -> None:
    # Random 159-bit serials: about half have their top bit set, which DER
    # writes with a leading zero byte to keep the number positive.
    for _ in range(16):
        pem = _pem(datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))
        assert serial_number(pem) == x509.load_pem_x509_certificate(pem).serial_number


BEGIN, END = b"-----BEGIN CERTIFICATE-----\n", b"\n-----END CERTIFICATE-----\n"


def _armoured(der: bytes) -> bytes:
    return BEGIN + base64.encodebytes(der) + END


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        BEGIN + b"@@@@" + END,
        _armoured(b"\x02\x01\x01"),  # an INTEGER, not a SEQUENCE
        _armoured(b"\x30\x03\x02\x01\x01"),  # a certificate without a tbsCertificate
        _armoured(b"\x30\x85\xff\xff\xff\xff\xff"),  # a length of more than 4 bytes
    ],
)
def test_what_is_not_a_certificate_is_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the only error promised
        validity(pem)


def test_a_truncated_certificate_is_a_value_error() -> None:
    pem = _pem(datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    for length in range(len(der)):
        with pytest.raises(ValueError):  # noqa: PT011 - the only error promised
            validity(_armoured(der[:length]))


@given(st.binary(max_size=512))
def test_any_der_is_read_or_refused_with_a_value_error(der: bytes) -> None:
    with contextlib.suppress(ValueError):
        validity(_armoured(der))
    with contextlib.suppress(ValueError):
        serial_number(_armoured(der))
