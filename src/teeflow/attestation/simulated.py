"""The simulated TEE: same code paths as real hardware, software-signed evidence.

Its signing key is derived from a published constant, so anyone can forge
simulated evidence: it proves nothing, which is why every policy refuses it
unless it says `allow_simulated = true`, and why every result made under it
is marked simulated.
"""

from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from teeflow.attestation.evidence import REPORT_DATA_LEN, Claims, Evidence
from teeflow.attestation.formats import SIMULATED_MAGIC
from teeflow.core.errors import EvidenceFormatError, VerificationError

TEE = "simulated"
MAGIC = SIMULATED_MAGIC  # formats.py tells the formats apart
_HEADER = struct.Struct(">8sB32s64s")  # magic, flags, measurement, report data
SIG_LEN = 64
QUOTE_LEN = _HEADER.size + SIG_LEN
FLAG_DEBUG = 0x01
_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"teeflow simulated TEE attestation key - NOT A SECRET").digest()
)


@lru_cache(maxsize=4)
def code_measurement(root: Path | None = None) -> str:
    """SHA-256 over the executor's code: every .py file of the teeflow package."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(struct.pack(">I", len(rel)) + rel + struct.pack(">Q", len(data)) + data)
    return h.hexdigest()


def make_quote(measurement: bytes, report_data: bytes, *, debug: bool = False) -> bytes:
    if len(measurement) != 32 or len(report_data) != REPORT_DATA_LEN:
        raise EvidenceFormatError("measurement must be 32 bytes and report data 64")
    body = _HEADER.pack(MAGIC, FLAG_DEBUG if debug else 0, measurement, report_data)
    return body + _KEY.sign(body)


class SimulatedBackend:
    """Executor side: produces simulated evidence for the running code."""

    tee = TEE

    def __init__(self, *, debug: bool = False, measurement: str | None = None) -> None:
        self.debug = debug
        self.measurement = measurement or code_measurement()

    def evidence(self, report_data: bytes) -> Evidence:
        quote = make_quote(bytes.fromhex(self.measurement), report_data, debug=self.debug)
        return Evidence(tee=TEE, quote=quote)


class SimulatedVerifier:
    """Provider side: checks the simulated signature and returns the claims."""

    tee = TEE

    def verify(self, quote: bytes, at: int) -> Claims:
        del at  # simulated evidence has no collateral to expire
        if len(quote) != QUOTE_LEN:
            raise EvidenceFormatError(
                f"simulated quote must be {QUOTE_LEN} bytes, got {len(quote)}")
        body, sig = quote[: _HEADER.size], quote[_HEADER.size :]
        magic, flags, measurement, report_data = _HEADER.unpack(body)
        if magic != MAGIC:
            raise EvidenceFormatError("not a simulated quote (bad magic)")
        if flags & ~FLAG_DEBUG:
            raise EvidenceFormatError(f"simulated quote has unknown flags {flags:#x}")
        try:
            _KEY.public_key().verify(sig, body)
        except InvalidSignature as exc:
            raise VerificationError("simulated quote signature does not verify") from exc
        return Claims(
            tee=TEE,
            measurements={"measurement": measurement.hex()},
            debug=bool(flags & FLAG_DEBUG),
            report_data=report_data,
            tcb_status="UpToDate",
            simulated=True,
        )
