"""Evidence and verified claims: the values every TEE backend produces or yields.

Pure: no sockets, no files, no clocks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from teeflow.core.errors import EvidenceFormatError

MAX_EVIDENCE = 256 * 1024
REPORT_DATA_LEN = 64
NONCE_LEN = 32


@dataclass(frozen=True)
class Evidence:
    """What an executor presents: its TEE type and the raw quote or report."""

    tee: str
    quote: bytes

    def encode(self) -> bytes:
        body = {"tee": self.tee, "quote": base64.b64encode(self.quote).decode()}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        if len(data) > MAX_EVIDENCE:
            raise EvidenceFormatError(f"evidence larger than {MAX_EVIDENCE} bytes")
        try:
            body = json.loads(data)
            tee = body["tee"]
            quote = base64.b64decode(body["quote"], validate=True)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise EvidenceFormatError("evidence is not {tee, quote} JSON") from exc
        if not isinstance(tee, str) or not tee:
            raise EvidenceFormatError("evidence names no TEE type")
        return cls(tee=tee, quote=quote)


@dataclass(frozen=True)
class Claims:
    """What a verifier vouches for after checking a quote's signatures.

    `measurements` holds the identity values of the TEE type (mrenclave,
    mrsigner, mrtd, rtmr0..3, ...) as lower-case hex.
    """

    tee: str
    measurements: dict[str, str]
    debug: bool
    report_data: bytes
    tcb_status: str = "UpToDate"
    advisory_ids: tuple[str, ...] = ()
    simulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tee": self.tee,
            "measurements": dict(self.measurements),
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "simulated": self.simulated,
            **({"extra": self.extra} if self.extra else {}),
        }


def check_report_data(report_data: bytes) -> bytes:
    """The 64 bytes a TEE backend is asked to put in its evidence, checked."""
    if not isinstance(report_data, bytes | bytearray):
        raise EvidenceFormatError(
            f"report data must be bytes, not {type(report_data).__name__}")
    if len(report_data) != REPORT_DATA_LEN:
        raise EvidenceFormatError(
            f"report data must be exactly {REPORT_DATA_LEN} bytes, got {len(report_data)}")
    return bytes(report_data)


def bind_report_data(spki_hash: bytes, nonce: bytes) -> bytes:
    """The 64 bytes of report data for a TLS key and a caller's nonce.

    First half: SHA-256 of the TLS SubjectPublicKeyInfo; second half:
    SHA-256 of the nonce, so any nonce length maps to a fixed field.
    """
    if len(spki_hash) != 32:
        raise EvidenceFormatError("TLS key hash must be 32 bytes")
    if not 16 <= len(nonce) <= 64:
        raise EvidenceFormatError("nonce must be 16 to 64 bytes")
    return spki_hash + hashlib.sha256(b"teeflow-nonce:" + nonce).digest()
