"""Which TEE produced these evidence bytes: the one place that tells the formats apart.

Pure, and it believes nothing: it reads a format's fixed header (a magic, or a
DCAP quote header) and names the TEE whose verifier must judge the bytes. It
is an allow-list that fails closed: bytes in none of these formats raise
EvidenceFormatError, and input is capped before it is read.

    simulated  b"TFSIMQ01" ...                       (simulated.make_quote)
    sev-snp    b"TFSNPEV1" | u32 len | report | u32 len | auxblob
                                                     (configfs_tsm.join_snp_evidence)
    sgx        DCAP quote, header version 3, 4 or 5, TEE type 0x00000000
    tdx        DCAP quote, header version 4 or 5, TEE type 0x00000081

A DCAP header is 48 bytes, little-endian: u16 version, u16 attestation key
type, u32 TEE type, then fields this module does not read.
"""

from __future__ import annotations

import struct

from teeflow.attestation.evidence import MAX_EVIDENCE
from teeflow.core.errors import EvidenceFormatError

__all__ = [
    "DCAP_HEADER_LEN",
    "MAX_EVIDENCE",
    "SIMULATED_MAGIC",
    "SNP_MAGIC",
    "TEES",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "evidence_tee",
    "require_tee",
]

TEES = ("simulated", "sgx", "tdx", "sev-snp")
SIMULATED_MAGIC = b"TFSIMQ01"
SNP_MAGIC = b"TFSNPEV1"
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
DCAP_HEADER_LEN = 48
_DCAP_HEADER = struct.Struct("<HHI")  # version, attestation key type, TEE type
_DCAP_VERSIONS = {TEE_TYPE_SGX: ("sgx", (3, 4, 5)), TEE_TYPE_TDX: ("tdx", (4, 5))}
_MAGICS = {SIMULATED_MAGIC: "simulated", SNP_MAGIC: "sev-snp"}
_NAMES = {"simulated": "simulated", "sgx": "SGX", "tdx": "TDX", "sev-snp": "SEV-SNP"}
_HEADERS = {"simulated": "no TFSIMQ01 header", "sev-snp": "no TFSNPEV1 header",
            "sgx": "no SGX DCAP quote header", "tdx": "no TDX DCAP quote header"}


def evidence_tee(evidence: bytes) -> str:
    """The TEE whose format `evidence` has (not verified): one of TEES, or EvidenceFormatError."""
    if not isinstance(evidence, bytes | bytearray):
        raise EvidenceFormatError(f"evidence must be bytes, not {type(evidence).__name__}")
    if len(evidence) > MAX_EVIDENCE:
        raise EvidenceFormatError(
            f"evidence is {len(evidence)} bytes, more than {MAX_EVIDENCE}")
    head = bytes(evidence[:DCAP_HEADER_LEN])
    for magic, tee in _MAGICS.items():
        if head.startswith(magic):
            return tee
    if len(head) < DCAP_HEADER_LEN:
        raise EvidenceFormatError(
            f"evidence is {len(evidence)} bytes: neither simulated nor SEV-SNP evidence, and "
            f"shorter than a header of a DCAP quote ({DCAP_HEADER_LEN} bytes)")
    version, _, tee_type = _DCAP_HEADER.unpack_from(head)
    if tee_type not in _DCAP_VERSIONS:
        raise EvidenceFormatError(
            f"evidence is neither simulated nor SEV-SNP evidence nor an SGX/TDX DCAP quote "
            f"(unknown TEE type {tee_type:#x}, version {version})")
    tee, versions = _DCAP_VERSIONS[tee_type]
    if version not in versions:
        raise EvidenceFormatError(
            f"evidence is neither simulated nor SEV-SNP evidence nor an SGX/TDX DCAP quote "
            f"(unknown version {version} for TEE type {tee_type:#x})")
    return tee


def require_tee(evidence: bytes, tee: str) -> bytes:
    """`evidence` as bytes, if it is in `tee`'s format; else EvidenceFormatError naming both."""
    if tee not in TEES:
        raise EvidenceFormatError(f"unknown TEE type {tee!r} (known: {', '.join(TEES)})")
    try:
        found = evidence_tee(evidence)
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"not {_NAMES[tee]} evidence ({_HEADERS[tee]}): {exc}") from exc
    if found != tee:
        raise EvidenceFormatError(
            f"not {_NAMES[tee]} evidence ({_HEADERS[tee]}): it is {_NAMES[found]} evidence")
    return bytes(evidence)
