"""AMD SEV-SNP attestation report verification, offline, with `cryptography`.

Pure: no network and no clock; the verification time `at` (unix seconds) is an
argument and every certificate must be valid at it.

What is checked (SEV-SNP Firmware ABI spec, ATTESTATION_REPORT; AMD KDS
certificate formats):

1. The evidence is the `configfs_tsm` container: a 1184-byte report and the
   host's certificate table (GHCB spec 4.1.8.1), possibly empty.
2. Trust starts at an AMD Root Key (ARK) certificate the verifier is *given*
   (one per product line, from AMD's KDS: pin it by fingerprint); an ARK
   carried in the evidence is ignored. The ARK must be self-signed.
3. The AMD SEV Key (ASK) is signed by a trusted ARK; the Versioned Chip
   Endorsement Key (VCEK) certificate is signed by that ASK. ASK and VCEK come
   from the certificate table, or from `certs` given to the verifier (say, as
   fetched from AMD's KDS). Every certificate is valid at `at`.
4. The report is signed by the VCEK: ECDSA P-384 with SHA-384 over bytes
   0..0x2A0, the signature's R and S stored little-endian (72 bytes each) at
   0x2A0. Reports signed by a VLEK (a cloud provider's key) are refused.
5. The VCEK is the one for this chip at this TCB: its hwID extension equals the
   report's CHIP_ID and its bootloader/TEE/SNP/microcode (and, on Turin, FMC)
   SPL extensions equal the report's REPORTED_TCB.

Claims: `measurements = {"measurement": MEASUREMENT hex}`, `debug` = guest
policy bit 19, the 64 bytes of REPORT_DATA. SEV-SNP has no TCB status service
like Intel's: the VCEK certifies the reported TCB itself, so `tcb_status` is
"UpToDate" and the TCB components are in `extra["reported_tcb"]` for a policy
that wants a minimum. ASK revocation (AMD's CRL) is not checked here.

AMD's VCEK certificates carry serial number 0, which `cryptography` (>= 43)
warns about while loading (and may refuse in a future release); the warning is
silenced for these loads only, under a lock as `warnings` state is global.
"""

from __future__ import annotations

import struct
import threading
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from teeflow.attestation.configfs_tsm import split_snp_evidence
from teeflow.attestation.evidence import Claims
from teeflow.core.errors import ConfigError, EvidenceFormatError, InputError, VerificationError

__all__ = ["REPORT_LEN", "SevSnpVerifier", "SnpReport", "parse_cert_table", "parse_report"]

TEE = "sev-snp"
REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
POLICY_DEBUG = 1 << 19
SIG_ALGO_ECDSA_P384_SHA384 = 1
MAX_CERT = 16 * 1024
_MAX_AT = 2**63 - 1

GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_GUID_NAMES = {GUID_VCEK: "vcek", GUID_VLEK: "vlek", GUID_ASK: "ask", GUID_ARK: "ark"}
_ENTRY = struct.Struct("<16sII")

_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
_OID_SPL = {
    "bootloader": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1"),
    "tee": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2"),
    "snp": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3"),
    "microcode": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8"),
    "fmc": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.9"),
}
# Byte positions of the TCB components in a 64-bit TCB_VERSION, per product line.
_TCB_LAYOUT = {
    "default": {"bootloader": 0, "tee": 1, "snp": 6, "microcode": 7},  # Milan, Genoa
    "Turin": {"fmc": 0, "bootloader": 1, "tee": 2, "snp": 3, "microcode": 7},
}

_load_lock = threading.Lock()


@dataclass(frozen=True)
class SnpReport:
    """The fields of an ATTESTATION_REPORT (not yet to be believed)."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    signature_r: int
    signature_s: int
    signed: bytes

    @property
    def signing_key(self) -> int:
        """0: VCEK, 1: VLEK, 7: none (bits 2..4 of the flags word)."""
        return (self.flags >> 2) & 0x7

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse_report(report: bytes) -> SnpReport:
    if not isinstance(report, bytes | bytearray):
        raise EvidenceFormatError(f"SEV-SNP report must be bytes, not {type(report).__name__}")
    raw = bytes(report)
    if len(raw) != REPORT_LEN:
        raise EvidenceFormatError(
            f"SEV-SNP report must be {REPORT_LEN} bytes, got {len(raw)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    if version < 2:
        raise EvidenceFormatError(f"SEV-SNP report version {version} is not supported (need 2+)")
    vmpl, sig_algo, current_tcb, platform_info, flags = struct.unpack_from("<IIQQI", raw, 0x30)
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    (committed_tcb,) = struct.unpack_from("<Q", raw, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", raw, 0x1F0)
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        flags=flags,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=reported_tcb,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=committed_tcb,
        launch_tcb=launch_tcb,
        signature_r=int.from_bytes(raw[SIGNED_LEN : SIGNED_LEN + 72], "little"),
        signature_s=int.from_bytes(raw[SIGNED_LEN + 72 : SIGNED_LEN + 144], "little"),
        signed=raw[:SIGNED_LEN],
    )


def parse_cert_table(table: bytes) -> dict[str, bytes]:
    """Certificates of a GHCB certificate table by role ("vcek", "ask", ...; else the GUID)."""
    data = bytes(table)
    out: dict[str, bytes] = {}
    if not data:
        return out
    at = 0
    while True:
        if len(data) < at + _ENTRY.size:
            raise EvidenceFormatError("SEV-SNP certificate table has no terminating entry")
        guid_bytes, offset, length = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        if guid_bytes == bytes(16) and offset == 0 and length == 0:
            return out
        guid = uuid.UUID(bytes=guid_bytes)
        name = _GUID_NAMES.get(guid, str(guid))
        if length > MAX_CERT or offset < at or offset + length > len(data):
            raise EvidenceFormatError(
                f"SEV-SNP certificate table entry {name} points outside the table")
        if name in out:
            raise EvidenceFormatError(f"SEV-SNP certificate table lists {name} twice")
        out[name] = data[offset : offset + length]


@lru_cache(maxsize=64)
def _load_der(der: bytes) -> x509.Certificate:
    with _load_lock, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*serial number.*", category=CryptographyDeprecationWarning)
        return x509.load_der_x509_certificate(der)


def _load(blob: bytes) -> x509.Certificate:
    """A certificate from DER or PEM bytes (ValueError if it is neither)."""
    raw = bytes(blob).strip()
    if raw.startswith(b"-----BEGIN"):
        with _load_lock, warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*serial number.*", category=CryptographyDeprecationWarning)
            cert = x509.load_pem_x509_certificate(raw)
        return _load_der(cert.public_bytes(Encoding.DER))
    return _load_der(bytes(blob))


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _valid_at(cert: x509.Certificate, at: int, what: str) -> None:
    when = datetime.fromtimestamp(at, UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise VerificationError(
            f"{what} certificate is not valid at {when:%Y-%m-%dT%H:%M:%SZ} "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} .. "
            f"{cert.not_valid_after_utc:%Y-%m-%d})")


def _der_int(value: bytes) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 8:
        raise ValueError("not a small DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _hwid(cert: x509.Certificate) -> bytes:
    raw = _ext(cert, _OID_HWID)
    if raw is None:
        raise VerificationError("VCEK certificate has no hwID extension")
    if len(raw) >= 2 and raw[0] == 0x04 and raw[1] == len(raw) - 2:  # DER OCTET STRING
        raw = raw[2:]
    return raw


def _tcb_parts(tcb: int, product: str) -> dict[str, int]:
    layout = _TCB_LAYOUT.get(product, _TCB_LAYOUT["default"])
    raw = tcb.to_bytes(8, "little")
    return {name: raw[at] for name, at in layout.items()}


def _product(ask: x509.Certificate) -> str:
    cn = _cn(ask.subject)  # "SEV-Milan", "SEV-Genoa", "SEV-Turin"
    return cn[4:] if cn.startswith("SEV-") else cn


def _check_vcek_binding(vcek: x509.Certificate, report: SnpReport, product: str) -> None:
    hwid = _hwid(vcek)
    chip = report.chip_id[: len(hwid)] if len(hwid) == 8 else report.chip_id
    if hwid != chip:
        raise VerificationError("VCEK certificate is for another chip (hwID is not CHIP_ID)")
    expected = _tcb_parts(report.reported_tcb, product)
    for name, want in expected.items():
        raw = _ext(vcek, _OID_SPL[name])
        if raw is None:
            raise VerificationError(f"VCEK certificate has no {name} SPL extension")
        try:
            got = _der_int(raw)
        except ValueError as exc:
            raise VerificationError(f"VCEK {name} SPL extension is malformed") from exc
        if got != want:
            raise VerificationError(
                f"VCEK certificate is for another TCB ({name} SPL {got}, report says {want})")


def _check_at(at: int) -> None:
    if isinstance(at, bool) or not isinstance(at, int):
        raise InputError(f"verification time must be integer unix seconds, not {at!r}")
    if not 0 <= at <= _MAX_AT:
        raise InputError(f"verification time {at} is out of range")


def _config_certs(
    blobs: bytes | Iterable[bytes], what: str
) -> list[x509.Certificate]:
    items = [blobs] if isinstance(blobs, bytes | bytearray) else list(blobs)
    out = []
    for i, blob in enumerate(items):
        try:
            out.append(_load(blob))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what}[{i}] is not an X.509 certificate: {exc}") from exc
    return out


class SevSnpVerifier:
    """A `Verifier` for SEV-SNP evidence, trusting the given AMD root keys (ARKs)."""

    tee = TEE

    def __init__(self, ark: bytes | Iterable[bytes], *, certs: Iterable[bytes] = ()) -> None:
        self.arks = _config_certs(ark, "sev-snp ark")
        if not self.arks:
            raise ConfigError("sev-snp ark: at least one trusted AMD root key is needed")
        for cert in self.arks:
            if not _issued_by(cert, cert):
                raise ConfigError(
                    f"sev-snp ark: {_cn(cert.subject)!r} is not a self-signed root")
        self.certs = _config_certs(certs, "sev-snp certs")

    def verify(self, quote: bytes, at: int) -> Claims:
        _check_at(at)
        report_bytes, table = split_snp_evidence(quote)
        report = parse_report(report_bytes)
        if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise EvidenceFormatError(
                f"SEV-SNP report signature algorithm {report.signature_algo} is not "
                "ECDSA P-384 with SHA-384")
        if report.signing_key != 0:
            kind = {1: "a VLEK", 7: "no key"}.get(report.signing_key, "an unknown key")
            raise VerificationError(f"SEV-SNP report is signed by {kind}; only VCEK is accepted")
        entries = parse_cert_table(table)
        try:
            given = {name: _load(der) for name, der in entries.items()
                     if name in ("vcek", "ask")}
        except (ValueError, TypeError) as exc:
            raise EvidenceFormatError(
                f"SEV-SNP certificate table holds a bad certificate: {exc}") from exc
        ask, ark = self._ask(given.get("ask"), at)
        product = _product(ask)
        vcek = self._vcek(given.get("vcek"), ask, report, at)
        _check_vcek_binding(vcek, report, product)
        return Claims(
            tee=TEE,
            measurements={"measurement": report.measurement.hex()},
            debug=report.debug,
            report_data=report.report_data,
            tcb_status="UpToDate",
            simulated=False,
            extra=_extra(report, product, _cn(ark.subject)),
        )

    def _ask(
        self, given: x509.Certificate | None, at: int
    ) -> tuple[x509.Certificate, x509.Certificate]:
        candidates = ([given] if given is not None else []) + self.certs
        for cert in candidates:
            for ark in self.arks:
                if cert is not ark and _issued_by(cert, ark):
                    _valid_at(ark, at, f"AMD root {_cn(ark.subject)}")
                    _valid_at(cert, at, f"AMD {_cn(cert.subject)}")
                    return cert, ark
        raise VerificationError(
            "no AMD SEV key (ASK) signed by a trusted AMD root key: the report does not "
            "chain to an accepted ARK")

    def _vcek(
        self, given: x509.Certificate | None, ask: x509.Certificate, report: SnpReport,
        at: int,
    ) -> x509.Certificate:
        candidates = ([given] if given is not None else []) + [
            c for c in self.certs if _cn(c.subject) == "SEV-VCEK"]
        if not candidates:
            raise VerificationError(
                "no VCEK certificate: the host's certificate table has none and none was given")
        signature = utils.encode_dss_signature(report.signature_r, report.signature_s)
        last = "no VCEK certificate is signed by the ASK"
        for cert in candidates:
            if not _issued_by(cert, ask):
                continue
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
                last = "VCEK certificate does not hold a P-384 key"
                continue
            try:
                key.verify(signature, report.signed, ec.ECDSA(hashes.SHA384()))
            except InvalidSignature:
                last = "SEV-SNP report signature does not verify with the VCEK"
                continue
            _valid_at(cert, at, "VCEK")
            return cert
        raise VerificationError(last)


def _extra(report: SnpReport, product: str, ark: str) -> dict[str, Any]:
    return {
        "report_version": report.version,
        "product": product,
        "ark": ark,
        "guest_svn": report.guest_svn,
        "policy": f"{report.policy:#x}",
        "vmpl": report.vmpl,
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "chip_id": report.chip_id.hex(),
        "platform_info": f"{report.platform_info:#x}",
        "reported_tcb": _tcb_parts(report.reported_tcb, product),
        "current_tcb": _tcb_parts(report.current_tcb, product),
        "committed_tcb": _tcb_parts(report.committed_tcb, product),
        "launch_tcb": _tcb_parts(report.launch_tcb, product),
    }
