"""SEV-SNP verification against a real report and AMD's real Milan certificate chain.

The vector comes from the PyPI package `omne-attest` (Apache-2.0), which ships
a 1184-byte ATTESTATION_REPORT from a rented Milan confidential VM together
with the VCEK for that chip and TCB and AMD's Milan ASK and ARK, all as
published by AMD's KDS. The ARK's key is pinned below by the SHA-256 of its
SubjectPublicKeyInfo, the same value that an unrelated package (secretvm-verify)
pins for ARK-Milan. The guest ran with the debug policy bit set.

Negative cases that need a report no real chip would sign (another chip, another
TCB, a VLEK) are made with a throw-away chain built here and trusted explicitly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from dataclasses import dataclass
from importlib import resources

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from teeflow.attestation.configfs_tsm import join_snp_evidence
from teeflow.attestation.evidence import Claims, Evidence
from teeflow.attestation.policy import AppraisalPolicy, appraise
from teeflow.attestation.sevsnp import (
    GUID_ARK,
    GUID_ASK,
    GUID_VCEK,
    REPORT_LEN,
    SIGNED_LEN,
    SevSnpVerifier,
    parse_cert_table,
    parse_report,
)
from teeflow.core.errors import (
    ConfigError,
    EvidenceFormatError,
    InputError,
    PolicyRefused,
    VerificationError,
)

pytest.importorskip(
    "omne_attest", reason="SEV-SNP vectors come from the PyPI package omne-attest (dev extra)")

ARK_MILAN_SPKI_SHA256 = "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9"
MEASUREMENT = (
    "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
    "6bdf8a9ece31a5a608eb0cf2e4872b01"
)
REPORT_DATA = bytes([1, 2, 3, 4, 5]) + bytes(59)
AT = 1790000000  # 2026-09-21; the VCEK is valid from 2026-08-28T16:41:28Z for 7 years


@dataclass(frozen=True)
class Milan:
    report: bytes
    vcek: bytes
    ask: bytes
    ark: bytes


@pytest.fixture(scope="module")
def milan() -> Milan:
    d = resources.files("omne_attest") / "vectors"
    m = Milan(
        report=(d / "attestation.bin").read_bytes(),
        vcek=(d / "kds_vcek.der").read_bytes(),
        ask=(d / "milan_ask.der").read_bytes(),
        ark=(d / "milan_ark.der").read_bytes(),
    )
    spki = x509.load_der_x509_certificate(m.ark).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).hexdigest() == ARK_MILAN_SPKI_SHA256
    return m


def cert_table(**certs: bytes) -> bytes:
    guids = {"vcek": GUID_VCEK, "ask": GUID_ASK, "ark": GUID_ARK}
    at = (len(certs) + 1) * 24
    head, body = b"", b""
    for name, der in certs.items():
        head += struct.pack("<16sII", guids[name].bytes, at + len(body), len(der))
        body += der
    return head + bytes(24) + body


def test_real_report_verifies(milan: Milan) -> None:
    quote = join_snp_evidence(milan.report, cert_table(vcek=milan.vcek, ask=milan.ask))
    claims = SevSnpVerifier(milan.ark).verify(quote, AT)
    assert claims.tee == "sev-snp"
    assert claims.measurements == {"measurement": MEASUREMENT}
    assert claims.debug is True  # guest policy 0xb0000: bit 19 set
    assert claims.report_data == REPORT_DATA
    assert claims.tcb_status == "UpToDate" and not claims.simulated
    assert claims.extra["product"] == "Milan" and claims.extra["ark"] == "ARK-Milan"
    assert claims.extra["policy"] == "0xb0000"
    assert claims.extra["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}


def test_certificates_from_the_verifier_instead_of_the_host(milan: Milan) -> None:
    pem = x509.load_der_x509_certificate(milan.ark).public_bytes(serialization.Encoding.PEM)
    verifier = SevSnpVerifier([pem], certs=[milan.ask, milan.vcek])
    assert verifier.verify(join_snp_evidence(milan.report), AT).report_data == REPORT_DATA
    # ASK from the host, VCEK from the verifier
    verifier = SevSnpVerifier(milan.ark, certs=[milan.vcek])
    quote = join_snp_evidence(milan.report, cert_table(ask=milan.ask))
    assert verifier.verify(quote, AT).measurements["measurement"] == MEASUREMENT


def test_an_ark_in_the_evidence_is_not_trusted(milan: Milan) -> None:
    other = Chain("Milan")
    quote = join_snp_evidence(
        milan.report, cert_table(vcek=milan.vcek, ask=milan.ask, ark=milan.ark))
    with pytest.raises(VerificationError, match="does not chain to an accepted ARK"):
        SevSnpVerifier(other.ark_der).verify(quote, AT)


def test_policy_refuses_the_debug_guest(milan: Milan) -> None:
    quote = join_snp_evidence(milan.report, cert_table(vcek=milan.vcek, ask=milan.ask))
    verifiers = {"sev-snp": SevSnpVerifier(milan.ark)}
    policy = AppraisalPolicy(tee_types=("sev-snp",),
                             measurements={"sev-snp": {"measurement": (MEASUREMENT,)}})
    evidence = Evidence("sev-snp", quote)
    with pytest.raises(PolicyRefused) as refused:
        appraise(evidence, policy, verifiers, expected_report_data=REPORT_DATA, at=AT)
    assert refused.value.check == "debug"
    allowing = AppraisalPolicy(tee_types=policy.tee_types, measurements=policy.measurements,
                               allow_debug=True)
    claims = appraise(evidence, allowing, verifiers, expected_report_data=REPORT_DATA, at=AT)
    assert claims.measurements == {"measurement": MEASUREMENT}


@pytest.mark.parametrize("offset", [0x50, 0x90, 0x08, 0x1A0, SIGNED_LEN - 1])
def test_tampered_report_fails(milan: Milan, offset: int) -> None:
    report = bytearray(milan.report)
    report[offset] ^= 0x01
    quote = join_snp_evidence(bytes(report), cert_table(vcek=milan.vcek, ask=milan.ask))
    with pytest.raises(VerificationError):
        SevSnpVerifier(milan.ark).verify(quote, AT)


@pytest.mark.parametrize("offset", [SIGNED_LEN, SIGNED_LEN + 71, SIGNED_LEN + 72])
def test_tampered_signature_fails(milan: Milan, offset: int) -> None:
    report = bytearray(milan.report)
    report[offset] ^= 0x80
    quote = join_snp_evidence(bytes(report), cert_table(vcek=milan.vcek, ask=milan.ask))
    with pytest.raises(VerificationError, match="signature does not verify"):
        SevSnpVerifier(milan.ark).verify(quote, AT)


def test_certificate_validity_at_the_verification_time(milan: Milan) -> None:
    quote = join_snp_evidence(milan.report, cert_table(vcek=milan.vcek, ask=milan.ask))
    with pytest.raises(VerificationError, match="VCEK certificate is not valid at 2026-08-17"):
        SevSnpVerifier(milan.ark).verify(quote, 1787000000)
    with pytest.raises(VerificationError, match="not valid at 2046"):
        SevSnpVerifier(milan.ark).verify(quote, 2400000000)
    for bad in (-1, 1.5, True, "1790000000"):
        with pytest.raises(InputError):
            SevSnpVerifier(milan.ark).verify(quote, bad)  # type: ignore[arg-type]


def test_missing_or_wrong_certificates(milan: Milan) -> None:
    verifier = SevSnpVerifier(milan.ark)
    with pytest.raises(VerificationError, match="does not chain to an accepted ARK"):
        verifier.verify(join_snp_evidence(milan.report, cert_table(vcek=milan.vcek)), AT)
    with pytest.raises(VerificationError, match="no VCEK certificate"):
        verifier.verify(join_snp_evidence(milan.report, cert_table(ask=milan.ask)), AT)
    with pytest.raises(VerificationError, match="no VCEK certificate is signed by the ASK"):
        verifier.verify(join_snp_evidence(milan.report, cert_table(vcek=milan.ask,
                                                                   ask=milan.ask)), AT)
    with pytest.raises(EvidenceFormatError, match="bad certificate"):
        verifier.verify(join_snp_evidence(milan.report, cert_table(vcek=b"junk",
                                                                   ask=milan.ask)), AT)


def test_malformed_evidence(milan: Milan) -> None:
    verifier = SevSnpVerifier(milan.ark)
    with pytest.raises(EvidenceFormatError, match="no TFSNPEV1 header"):
        verifier.verify(milan.report, AT)
    with pytest.raises(EvidenceFormatError, match=f"must be {REPORT_LEN} bytes, got 1183"):
        verifier.verify(join_snp_evidence(milan.report[:-1]), AT)
    table = cert_table(vcek=milan.vcek)
    with pytest.raises(EvidenceFormatError, match="no terminating entry"):
        verifier.verify(join_snp_evidence(milan.report, bytes(20)), AT)
    broken = table[:20] + struct.pack("<I", 10**6) + table[24:]
    with pytest.raises(EvidenceFormatError, match="points outside the table"):
        verifier.verify(join_snp_evidence(milan.report, broken), AT)
    report = bytearray(milan.report)
    report[0] = 1  # version 1
    with pytest.raises(EvidenceFormatError, match="version 1 is not supported"):
        verifier.verify(join_snp_evidence(bytes(report)), AT)
    report = bytearray(milan.report)
    report[0x34] = 2  # signature algorithm
    with pytest.raises(EvidenceFormatError, match="signature algorithm 2"):
        verifier.verify(join_snp_evidence(bytes(report)), AT)


def test_cert_table_parsing(milan: Milan) -> None:
    table = cert_table(vcek=milan.vcek, ask=milan.ask)
    assert parse_cert_table(table) == {"vcek": milan.vcek, "ask": milan.ask}
    assert parse_cert_table(b"") == {}
    twice = struct.pack("<16sII", GUID_ASK.bytes, 72, 3) * 2 + bytes(24) + b"abc"
    with pytest.raises(EvidenceFormatError, match="lists ask twice"):
        parse_cert_table(twice)


def test_verifier_configuration(milan: Milan) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        SevSnpVerifier([])
    with pytest.raises(ConfigError, match=r"ark\[0\] is not an X.509 certificate"):
        SevSnpVerifier(b"not a certificate")
    with pytest.raises(ConfigError, match="'SEV-Milan' is not a self-signed root"):
        SevSnpVerifier(milan.ask)
    with pytest.raises(ConfigError, match=r"certs\[1\] is not"):
        SevSnpVerifier(milan.ark, certs=[milan.vcek, b"junk"])


# ---------------------------------------------------------------- a throw-away chain


class Chain:
    """An ARK -> ASK -> VCEK chain of our own, to sign reports no real chip would."""

    def __init__(self, product: str, *, vcek_days: tuple[int, int] = (-1, 3650)) -> None:
        now = dt.datetime.fromtimestamp(AT, dt.UTC)
        self.ark_key = ec.generate_private_key(ec.SECP384R1())
        self.ask_key = ec.generate_private_key(ec.SECP384R1())
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())
        ark_name = _name(f"ARK-{product}")
        ask_name = _name(f"SEV-{product}")
        self.ark = _cert(ark_name, ark_name, self.ark_key, self.ark_key, now, (-1, 9000))
        self.ask = _cert(ask_name, ark_name, self.ask_key, self.ark_key, now, (-1, 9000))
        self.product = product
        self.now = now
        self.vcek_days = vcek_days
        self.ark_der = self.ark.public_bytes(serialization.Encoding.DER)
        self.ask_der = self.ask.public_bytes(serialization.Encoding.DER)

    def vcek(self, chip_id: bytes, spl: dict[str, int]) -> bytes:
        oids = {"bootloader": 1, "tee": 2, "snp": 3, "microcode": 8, "fmc": 9}
        exts = [x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"),
                                           chip_id)]
        for name, value in spl.items():
            exts.append(x509.UnrecognizedExtension(
                x509.ObjectIdentifier(f"1.3.6.1.4.1.3704.1.3.{oids[name]}"),
                bytes([0x02, 0x01, value])))
        cert = _cert(_name("SEV-VCEK"), self.ask.subject, self.vcek_key, self.ask_key,
                     self.now, self.vcek_days, exts)
        return cert.public_bytes(serialization.Encoding.DER)

    def sign(self, report: bytes) -> bytes:
        der = self.vcek_key.sign(report[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
        r, s = utils.decode_dss_signature(der)
        sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
        return report[:SIGNED_LEN] + sig + bytes(REPORT_LEN - SIGNED_LEN - len(sig))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teeflow tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey, now: dt.datetime, days: tuple[int, int],
    exts: list[x509.UnrecognizedExtension] | None = None,
) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0]))
               .not_valid_after(now + dt.timedelta(days=days[1])))
    for ext in exts or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384())


def _report(base: bytes, *, policy: int = 0x30000, tcb: bytes = bytes([3, 0, 0, 0, 0, 0, 8, 115]),
            chip: bytes = b"\xc1" * 64, flags: int = 0) -> bytes:
    r = bytearray(base)
    struct.pack_into("<Q", r, 0x08, policy)
    struct.pack_into("<I", r, 0x48, flags)
    r[0x180:0x188] = tcb
    r[0x1A0:0x1E0] = chip
    return bytes(r)


MILAN_SPL = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}


def _verify(chain: Chain, report: bytes, vcek: bytes) -> Claims:
    quote = join_snp_evidence(chain.sign(report), cert_table(vcek=vcek, ask=chain.ask_der))
    return SevSnpVerifier(chain.ark_der).verify(quote, AT)


def test_own_chain_verifies_and_reads_the_policy(milan: Milan) -> None:
    chain = Chain("Milan")
    claims = _verify(chain, _report(milan.report), chain.vcek(b"\xc1" * 64, MILAN_SPL))
    assert claims.debug is False
    assert claims.extra["reported_tcb"] == MILAN_SPL


def test_vcek_of_another_chip(milan: Milan) -> None:
    chain = Chain("Milan")
    with pytest.raises(VerificationError, match="for another chip"):
        _verify(chain, _report(milan.report), chain.vcek(b"\xc2" * 64, MILAN_SPL))


def test_vcek_of_another_tcb(milan: Milan) -> None:
    chain = Chain("Milan")
    with pytest.raises(VerificationError, match=r"another TCB \(microcode SPL 114, report says"):
        _verify(chain, _report(milan.report), chain.vcek(b"\xc1" * 64,
                                                         {**MILAN_SPL, "microcode": 114}))
    missing = {k: v for k, v in MILAN_SPL.items() if k != "snp"}
    with pytest.raises(VerificationError, match="no snp SPL extension"):
        _verify(chain, _report(milan.report), chain.vcek(b"\xc1" * 64, missing))


def test_turin_tcb_layout(milan: Milan) -> None:
    chain = Chain("Turin")
    tcb = bytes([1, 2, 3, 4, 0, 0, 0, 9])  # fmc, bootloader, tee, snp, ..., microcode
    spl = {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 9}
    claims = _verify(chain, _report(milan.report, tcb=tcb), chain.vcek(b"\xc1" * 8, spl))
    assert claims.extra["reported_tcb"] == spl
    assert claims.extra["product"] == "Turin"


def test_vlek_signed_report_is_refused(milan: Milan) -> None:
    chain = Chain("Milan")
    with pytest.raises(VerificationError, match="signed by a VLEK; only VCEK"):
        _verify(chain, _report(milan.report, flags=1 << 2), chain.vcek(b"\xc1" * 64, MILAN_SPL))


def test_expired_vcek(milan: Milan) -> None:
    chain = Chain("Milan", vcek_days=(-30, -1))
    with pytest.raises(VerificationError, match="VCEK certificate is not valid"):
        _verify(chain, _report(milan.report), chain.vcek(b"\xc1" * 64, MILAN_SPL))


def test_parse_report_fields(milan: Milan) -> None:
    report = parse_report(milan.report)
    assert report.version == 2 and report.vmpl == 0 and report.signature_algo == 1
    assert report.signing_key == 0 and report.debug
    assert report.measurement.hex() == MEASUREMENT
