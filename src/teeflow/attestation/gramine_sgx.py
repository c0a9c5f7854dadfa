"""Executor side of Intel SGX under Gramine: DCAP quotes from `/dev/attestation`.

Gramine (with `sgx.remote_attestation = "dcap"` in the manifest) exposes its
attestation interface as pseudo-files inside the enclave:

- `attestation_type`: "none", "epid" or "dcap" (what the manifest enabled);
- `user_report_data`: write exactly 64 bytes, the REPORTDATA of the next quote;
- `quote`: read it to get an SGX quote (v3, ~4.5 KiB for DCAP) over the report
  data last written, made by the platform's Quoting Enclave.

The pseudo-files are per-process state: one `user_report_data` for the whole
enclave, so two threads that interleave "write report data, read quote" would
get each other's quote. `GramineSgxBackend` serialises the pair with a lock,
and checks that the quote it read carries the report data it wrote.

Only DCAP is accepted: an EPID quote cannot be checked by the provider's DCAP
verifier, and "none" means the enclave cannot attest at all.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from teeflow.attestation.evidence import REPORT_DATA_LEN, Evidence, check_report_data
from teeflow.attestation.formats import TEE_TYPE_TDX, evidence_tee
from teeflow.core.errors import ConfigError, EvidenceFormatError

TEE = "sgx"
DEFAULT_DIR = "/dev/attestation"
MAX_QUOTE = 64 * 1024
_TYPE_MAX = 64  # attestation_type holds a short word
_FILES = ("attestation_type", "user_report_data", "quote")
_HEADER_LEN = 48  # SGX quote header
# Offset of REPORTDATA in the quote: header, then (v5 only) a 6-byte body descriptor,
# then the 384-byte SGX report body whose last 64 bytes are REPORTDATA.
_REPORT_DATA_AT = {3: _HEADER_LEN + 320, 4: _HEADER_LEN + 320, 5: _HEADER_LEN + 6 + 320}


def _read_capped(path: Path, cap: int) -> bytes:
    """Read a whole pseudo-file, refusing more than `cap` bytes."""
    chunks: list[bytes] = []
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(cap + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                break
    return b"".join(chunks)


class GramineSgxBackend:
    """A `TeeBackend` for an enclave running under `gramine-sgx` with DCAP attestation."""

    tee = TEE

    def __init__(self, attestation_dir: str | Path = DEFAULT_DIR) -> None:
        self.dir = Path(attestation_dir)
        missing = [name for name in _FILES if not (self.dir / name).is_file()]
        if not self.dir.is_dir() or missing:
            what = f"{self.dir} is missing" if not self.dir.is_dir() else (
                f"{self.dir} lacks {', '.join(missing)}")
            raise ConfigError(
                f"tee: sgx: {what}: not running under Gramine with remote attestation enabled")
        self._lock = threading.Lock()
        self._check_type()

    def _check_type(self) -> None:
        try:
            raw = _read_capped(self.dir / "attestation_type", _TYPE_MAX)
        except OSError as exc:
            raise ConfigError(
                f"tee: sgx: cannot read {self.dir / 'attestation_type'}: {exc}") from exc
        kind = raw[:_TYPE_MAX].decode("ascii", "replace").strip()
        if kind != "dcap" or len(raw) > _TYPE_MAX:
            raise ConfigError(
                f"tee: sgx: Gramine attestation_type is {kind!r}, need 'dcap' "
                '(set sgx.remote_attestation = "dcap" in the manifest)')

    def evidence(self, report_data: bytes) -> Evidence:
        report_data = check_report_data(report_data)
        data = bytes(report_data)
        with self._lock:
            self._check_type()
            try:
                self._write_report_data(data)
                quote = _read_capped(self.dir / "quote", MAX_QUOTE)
            except OSError as exc:
                raise EvidenceFormatError(f"Gramine could not produce a quote: {exc}") from exc
        if not quote:
            raise EvidenceFormatError("Gramine returned an empty quote")
        if len(quote) > MAX_QUOTE:
            raise EvidenceFormatError(f"Gramine returned a quote of more than {MAX_QUOTE} bytes")
        _check_report_data(quote, data)
        return Evidence(tee=TEE, quote=quote)

    def _write_report_data(self, data: bytes) -> None:
        fd = os.open(self.dir / "user_report_data", os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise EvidenceFormatError(
                f"Gramine took {written} of the {len(data)} bytes of report data")


def _check_report_data(quote: bytes, report_data: bytes) -> None:
    """The quote read must be the one over the report data just written."""
    try:
        tee = evidence_tee(quote)
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"Gramine quote: {exc}") from exc
    if tee != TEE:
        kind = f"TEE type {TEE_TYPE_TDX:#x}" if tee == "tdx" else f"the format of {tee}"
        raise EvidenceFormatError(f"Gramine quote has {kind}, not SGX")
    (version,) = struct.unpack_from("<H", quote)
    at = _REPORT_DATA_AT[version]  # every SGX version formats.py accepts
    if quote[at : at + REPORT_DATA_LEN] != report_data:
        raise EvidenceFormatError(
            "Gramine quote does not carry the report data just written "
            "(is another process or thread using /dev/attestation?)")
