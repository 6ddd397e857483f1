"""corrald's TLS setup as an outside scanner sees it: sslyze against Mozilla's "modern" profile.

Mozilla "modern" (v5.7, the version sslyze ships) asks for, and this file checks:
- TLS 1.3 and nothing older: test_only_tls_1_3_is_accepted.
- Only its AEAD suites, AES-GCM and ChaCha20-Poly1305: test_only_aead_cipher_suites_are_accepted.
- Groups X25519, P-256, P-384 and ECDH of at least 256 bits:
  test_key_exchange_uses_only_strong_groups (and, for the finite-field groups this scanner
  cannot offer, test_transport's test_key_exchange_is_limited_to_cheap_strong_groups).
- An ECDSA certificate on P-256/P-384, signed with ECDSA-SHA2, whose chain validates:
  test_server_chain_validates_against_the_dev_ca.
- sslyze's own checker runs everything above plus its checks for compression, Heartbleed,
  CCS injection, ROBOT, TLS_FALLBACK_SCSV, renegotiation and extended master secret:
  test_mozilla_modern_checker_passes.
- Mutual TLS, which modern does not ask for: the scanner, probing with no certificate, finds
  one required in the handshake (test_client_certificate_is_required).

Left out, and why (none is an exemption the checker needs):
- A chain trusted by a public root store. The checker accepts a chain that any store
  validates, the dev CA included; test_server_chain_validates_against_the_dev_ca checks that
  the dev CA alone does.
- OCSP stapling, HSTS and cipher order. A private CA has no OCSP responder, corral does not
  speak HTTP, and modern does not ask for a server cipher order. sslyze does not check any of
  them either.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import SignatureAlgorithmOID
from nassl.ephemeral_key_info import EcDhEphemeralKeyInfo
from sslyze import (
    AllScanCommandsAttempts,
    CertificateInfoExtraArgument,
    CertificateInfoScanResult,
    CipherSuitesScanResult,
    ClientAuthenticationCredentials,
    ClientAuthRequirementEnum,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
    SupportedEllipticCurvesScanResult,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.server_connectivity import check_connectivity_to_server

from corral import pki, pki_layout
from corral.address import TCPAddress
from corral.client.client import connect
from corral.supervisor.server import Server

from .conftest import identity

MODERN = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_MODERN)
# Mozilla's names for the certificate signatures it lists.
ECDSA_SHA2_SIGNATURES = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
}
# The scanner sends this name (SNI) and validates against it. Every dev server certificate
# carries it.
SERVER_NAME = "localhost"
# The name sslyze gives the trust store built from CertificateInfoExtraArgument.custom_ca_file.
DEV_CA_STORE = "Supplied CA file"

VERSIONS_BEFORE_TLS_1_3 = {
    ScanCommand.SSL_2_0_CIPHER_SUITES: "SSL 2.0",
    ScanCommand.SSL_3_0_CIPHER_SUITES: "SSL 3.0",
    ScanCommand.TLS_1_0_CIPHER_SUITES: "TLS 1.0",
    ScanCommand.TLS_1_1_CIPHER_SUITES: "TLS 1.1",
    ScanCommand.TLS_1_2_CIPHER_SUITES: "TLS 1.2",
}
ALL_VERSIONS = {*VERSIONS_BEFORE_TLS_1_3, ScanCommand.TLS_1_3_CIPHER_SUITES}

# sslyze parses its bundled public root stores, which hold an old root with a negative
# serial number. That root has nothing to do with corral.
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")


def tcp(server: Server) -> TCPAddress:
    return next(a for a in server.addresses if isinstance(a, TCPAddress))


def run_scan(address: TCPAddress, pki_dir: Path, commands: set[ScanCommand]) -> ServerScanResult:
    """Scan the server at `address` as client alice, trusting the dev CA in `pki_dir`.

    Blocks, so run it in a thread. Fails the test unless the scan and every one of
    `commands` completed: a check of an empty result proves nothing.
    """
    client = identity(pki_dir, "alice")
    extra = ScanCommandsExtraArguments()
    if ScanCommand.CERTIFICATE_INFO in commands:
        dev_ca = CertificateInfoExtraArgument(custom_ca_file=pki_dir / pki_layout.CA_CERT_FILE)
        extra = ScanCommandsExtraArguments(certificate_info=dev_ca)
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(SERVER_NAME, address.port, ip_address=address.host),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication=SERVER_NAME,
            tls_client_auth_credentials=ClientAuthenticationCredentials(
                certificate_chain_path=client / pki_layout.CLIENT_CERT_FILE,
                key_path=client / pki_layout.CLIENT_KEY_FILE,
            ),
        ),
        scan_commands=commands,
        scan_commands_extra_arguments=extra,
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = scanner.get_results()
    trace = result.connectivity_error_trace
    why = "".join(trace.format_exception_only()) if trace else result.scan_status
    assert result.scan_status is ServerScanStatusEnum.COMPLETED, why
    assert result.scan_result is not None
    for command in commands:
        attempt = getattr(result.scan_result, command.value)
        assert attempt.status is ScanCommandAttemptStatusEnum.COMPLETED, (
            f"{command.value}: {attempt.error_reason}"
        )
    return result


async def scan(server: Server, pki_dir: Path, commands: set[ScanCommand]) -> ServerScanResult:
    return await trio.to_thread.run_sync(run_scan, tcp(server), pki_dir, commands)


async def scan_attempts(
    server: Server, pki_dir: Path, commands: set[ScanCommand]
) -> AllScanCommandsAttempts:
    attempts = (await scan(server, pki_dir, commands)).scan_result
    assert attempts is not None
    return attempts


def cipher_suites(
    attempts: AllScanCommandsAttempts, command: ScanCommand
) -> CipherSuitesScanResult:
    result = getattr(attempts, command.value).result
    assert isinstance(result, CipherSuitesScanResult)
    return result


async def test_only_tls_1_3_is_accepted(server: Server, pki_dir: Path) -> None:
    attempts = await scan_attempts(server, pki_dir, ALL_VERSIONS)
    accepted: dict[str, list[str]] = {}
    for command, version in VERSIONS_BEFORE_TLS_1_3.items():
        result = cipher_suites(attempts, command)
        assert result.rejected_cipher_suites, f"the scanner offered no {version} suite"
        if result.is_tls_version_supported or result.accepted_cipher_suites:
            accepted[version] = [s.cipher_suite.name for s in result.accepted_cipher_suites]
    assert accepted == {}, "corrald accepts versions older than TLS 1.3"
    assert cipher_suites(attempts, ScanCommand.TLS_1_3_CIPHER_SUITES).is_tls_version_supported


async def test_only_aead_cipher_suites_are_accepted(server: Server, pki_dir: Path) -> None:
    attempts = await scan_attempts(server, pki_dir, ALL_VERSIONS)
    accepted = {
        s.cipher_suite.name
        for command in ALL_VERSIONS
        for s in cipher_suites(attempts, command).accepted_cipher_suites
    }
    # Modern's suites are AES-GCM and ChaCha20-Poly1305: AEADs with full 16-byte tags. Its list
    # leaves out TLS 1.3's CCM suites (CCM_8 has an 8-byte tag) and every pre-1.3 suite.
    assert accepted, "no cipher suite accepted at all"
    outside = accepted - MODERN.ciphersuites
    assert not outside, f"suites outside Mozilla modern accepted: {outside}"
    rejected = cipher_suites(attempts, ScanCommand.TLS_1_3_CIPHER_SUITES).rejected_cipher_suites
    assert "TLS_AES_128_CCM_8_SHA256" in {s.cipher_suite.name for s in rejected}


async def test_key_exchange_uses_only_strong_groups(server: Server, pki_dir: Path) -> None:
    # The scanner's OpenSSL (1.1.1, in nassl) cannot offer TLS 1.3's finite-field groups, so this
    # scan does not see them: test_transport checks those with OpenSSL 3's own client.
    attempts = await scan_attempts(
        server, pki_dir, {ScanCommand.ELLIPTIC_CURVES, ScanCommand.TLS_1_3_CIPHER_SUITES}
    )
    curves = attempts.elliptic_curves.result
    assert isinstance(curves, SupportedEllipticCurvesScanResult)
    accepted = {c.name for c in curves.supported_curves or []}
    outside = accepted - MODERN.tls_curves
    assert not outside, f"weak or unvetted groups accepted: {outside}"
    assert "X25519" in accepted
    assert curves.rejected_curves, "the scanner offered no other group"
    for suite in cipher_suites(attempts, ScanCommand.TLS_1_3_CIPHER_SUITES).accepted_cipher_suites:
        key = suite.ephemeral_key
        assert isinstance(key, EcDhEphemeralKeyInfo), (suite.cipher_suite.name, key)
        # OpenSSL reports X25519 as 253 bits; Mozilla's checker adds the same 3.
        size = key.size + 3 if key.curve_name == "X25519" else key.size
        assert size >= MODERN.ecdh_param_size, (suite.cipher_suite.name, key.curve_name)


async def test_client_certificate_is_required(server: Server) -> None:
    # The scanner tells "required" from "optional" only when it has no
    # certificate to give: it probes without one, and a server that lets it
    # through the handshake (CERT_OPTIONAL) is "optional".
    address = tcp(server)
    probe = functools.partial(
        check_connectivity_to_server,
        ServerNetworkLocation(SERVER_NAME, address.port, ip_address=address.host),
        ServerNetworkConfiguration(tls_server_name_indication=SERVER_NAME),
    )
    result = await trio.to_thread.run_sync(probe)
    assert result.client_auth_requirement is ClientAuthRequirementEnum.REQUIRED
    assert server.statistics()["opened"] == 0  # none of its probes reached a session
    assert server.refused().get("no_certificate", 0) >= 1


async def test_server_chain_validates_against_the_dev_ca(server: Server, pki_dir: Path) -> None:
    attempts = await scan_attempts(server, pki_dir, {ScanCommand.CERTIFICATE_INFO})
    info = attempts.certificate_info.result
    assert isinstance(info, CertificateInfoScanResult)
    assert info.certificate_deployments
    _, dev_ca = pki.load_ca(pki_dir)
    for deployment in info.certificate_deployments:
        # cryptography's path builder checks the signatures up to the dev CA, the validity
        # dates, the serverAuth usage and SERVER_NAME against the SANs.
        verdicts = {r.trust_store.name: r for r in deployment.path_validation_results}
        dev = verdicts.pop(DEV_CA_STORE)
        assert dev.was_validation_successful, dev.validation_error
        assert dev.verified_certificate_chain is not None
        assert dev.verified_certificate_chain[-1] == dev_ca
        public = [name for name, r in verdicts.items() if r.was_validation_successful]
        assert public == [], "a public root store trusts the dev server certificate"
        assert deployment.received_chain_has_valid_order

        leaf = deployment.received_certificate_chain[0]
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name in MODERN.certificate_curves
        signature = ECDSA_SHA2_SIGNATURES.get(leaf.signature_algorithm_oid)
        assert signature in MODERN.certificate_signatures, leaf.signature_algorithm_oid


async def test_mozilla_modern_checker_passes(server: Server, pki_dir: Path) -> None:
    result = await scan(server, pki_dir, set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER))
    # Modern as sslyze ships it: its 90-day leaf maximum included.
    assert MODERN.maximum_certificate_lifespan == pki.LEAF_LIFETIME.days
    check_server_against_tls_configuration(result, MODERN)
    # The scan sent hundreds of refused and malformed handshakes. A client still gets in.
    async with connect(tcp(server), identity(pki_dir, "alice")) as client:
        assert (await client.info()).identity.name == "alice"
