"""Executor side of confidential VMs (Intel TDX, AMD SEV-SNP) through Linux configfs-tsm.

The kernel interface (Documentation/ABI/testing/configfs-tsm-report, Linux 6.7+;
drivers/virt/coco/guest/report.c) lives under a configfs mount at
`/sys/kernel/config/tsm/report`:

- `mkdir report/$name` creates a report instance; the kernel fills the new
  directory with its attribute files at once, and `rmdir` removes the instance
  with all of them. Instances are independent, so one per request avoids
  sharing.
- `inblob` (write only): up to 64 bytes of user data, which become the TDX
  REPORTDATA or SEV-SNP REPORT_DATA. configfs buffers a binary attribute and
  commits it when the file is closed, so it must be written in one open/close.
- `outblob` (read only): the report, generated on the first read after a
  write: a TDX quote (`provider` "tdx_guest"; a DCAP quote v4/v5, or a CBOR
  Web Token above 8 KiB on DICE-based platforms) or a SEV-SNP ATTESTATION_REPORT
  of 1184 bytes (`provider` "sev_guest"). The kernel caps it at 32 KiB and
  fails the read with EFBIG beyond.
- `auxblob` (read only, SEV-SNP): the host's certificate table (GHCB spec
  4.1.8.1 MSG_REPORT_REQ "cert_table": {GUID, u32 offset, u32 length}
  entries up to an all-zero one, then the DER certificates, typically the
  VCEK and the ASK/ARK); empty when the host provides none. Other providers
  may hide it.
- `generation` (read only): a decimal counter the kernel increments on every
  write to `inblob` or another option. Reading it before and after lets a user
  detect that someone else wrote to the same instance in between; it also
  exposes a write the kernel refused when the file was closed (configfs cannot
  report that error to close()).
- `provider` (read only): the name of the outblob format, "tdx_guest" or
  "sev_guest".
- `privlevel` (write only, SEV-SNP): the VMPL to request, at least
  `privlevel_floor`; a write counts as a generation step.

`TsmBackend.evidence` creates a fresh uniquely named instance per call, checks
`provider`, reads `generation`, writes (optionally `privlevel` then) the 64
bytes of report data to `inblob`, reads `outblob` (and `auxblob` for SEV-SNP),
reads `generation` again and requires it to have advanced by exactly the
number of its own writes, then removes the instance, also on failure.

Framing of SEV-SNP evidence. `Evidence.quote` is one byte string, but a SEV-SNP
report is checked against the certificates of the host's table, so both
travel together in this container (all integers big-endian):

    SNP_MAGIC ("TFSNPEV1") | u32 len(report) | report | u32 len(auxblob) | auxblob

`join_snp_evidence` builds it, `split_snp_evidence` takes it apart (strictly:
exact lengths, no trailing bytes); the magic, like every format's, belongs to
`formats`, which names the TEE of evidence bytes for everyone. TDX evidence is
the raw outblob, a quote the DCAP verifier reads directly.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import uuid
from pathlib import Path

from teeflow.attestation.evidence import Evidence, check_report_data
from teeflow.attestation.formats import SNP_MAGIC, require_tee
from teeflow.core.errors import ConfigError, EvidenceFormatError, VerificationError

__all__ = [
    "DEFAULT_ROOT",
    "MAX_AUXBLOB",
    "MAX_OUTBLOB",
    "PROVIDERS",
    "SNP_MAGIC",
    "TsmBackend",
    "join_snp_evidence",
    "split_snp_evidence",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
PROVIDERS = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}
MAX_OUTBLOB = 64 * 1024  # the kernel's own cap is 32 KiB (TSM_OUTBLOB_MAX)
MAX_AUXBLOB = 64 * 1024
_MAX_ATTR = 64  # generation and provider are short text
_LEN = struct.Struct(">I")
_serial = itertools.count()


def join_snp_evidence(report: bytes, auxblob: bytes = b"") -> bytes:
    """The SEV-SNP evidence container: a report and the host's certificate table."""
    if not report:
        raise EvidenceFormatError("SEV-SNP report is empty")
    if len(report) > MAX_OUTBLOB:
        raise EvidenceFormatError(f"SEV-SNP report is more than {MAX_OUTBLOB} bytes")
    if len(auxblob) > MAX_AUXBLOB:
        raise EvidenceFormatError(f"SEV-SNP certificate table is more than {MAX_AUXBLOB} bytes")
    return b"".join(
        (SNP_MAGIC, _LEN.pack(len(report)), bytes(report), _LEN.pack(len(auxblob)),
         bytes(auxblob)))


def split_snp_evidence(quote: bytes) -> tuple[bytes, bytes]:
    """(report, auxblob) from a container made by `join_snp_evidence`."""
    if not isinstance(quote, bytes | bytearray):
        raise EvidenceFormatError(f"SEV-SNP evidence must be bytes, not {type(quote).__name__}")
    data = require_tee(quote, "sev-snp")
    at = len(SNP_MAGIC)
    parts: list[bytes] = []
    for what, cap in (("report", MAX_OUTBLOB), ("certificate table", MAX_AUXBLOB)):
        if len(data) < at + _LEN.size:
            raise EvidenceFormatError(f"SEV-SNP evidence is cut short before its {what} length")
        (n,) = _LEN.unpack_from(data, at)
        at += _LEN.size
        if n > cap:
            raise EvidenceFormatError(f"SEV-SNP {what} is {n} bytes, more than {cap}")
        if len(data) < at + n:
            raise EvidenceFormatError(f"SEV-SNP evidence is cut short inside its {what}")
        parts.append(data[at : at + n])
        at += n
    if at != len(data):
        raise EvidenceFormatError(f"SEV-SNP evidence has {len(data) - at} trailing bytes")
    if not parts[0]:
        raise EvidenceFormatError("SEV-SNP report is empty")
    return parts[0], parts[1]


def _read(path: Path, cap: int, what: str) -> bytes:
    """A whole attribute, refusing more than `cap` bytes."""
    chunks: list[bytes] = []
    total = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while total <= cap:
                chunk = f.read(cap + 1 - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except OSError as exc:
        raise EvidenceFormatError(f"configfs-tsm: cannot read {what}: {exc}") from exc
    if total > cap:
        raise EvidenceFormatError(f"configfs-tsm: {what} is more than {cap} bytes")
    return b"".join(chunks)


def _write(path: Path, data: bytes, what: str) -> None:
    """One open/write/close, as configfs commits a binary attribute on close."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise EvidenceFormatError(f"configfs-tsm: cannot write {what}: {exc}") from exc
    if written != len(data):
        raise EvidenceFormatError(
            f"configfs-tsm: {what} took {written} of {len(data)} bytes")


def _text(path: Path, what: str) -> str:
    raw = _read(path, _MAX_ATTR, what)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError(f"configfs-tsm: {what} is not ASCII text") from exc


def _generation(entry: Path) -> int:
    text = _text(entry / "generation", "generation")
    if not text.isdigit():
        raise EvidenceFormatError(f"configfs-tsm: generation is not a number: {text[:20]!r}")
    return int(text)


class TsmBackend:
    """A `TeeBackend` for a TDX or SEV-SNP guest, reporting through configfs-tsm."""

    def __init__(
        self, tee: str, root: str | Path = DEFAULT_ROOT, *, privlevel: int | None = None
    ) -> None:
        if tee not in PROVIDERS:
            raise ConfigError(
                f"tee: configfs-tsm serves {' or '.join(map(repr, PROVIDERS))}, not {tee!r}")
        if privlevel is not None:
            if tee != "sev-snp":
                raise ConfigError("tee: privlevel applies to sev-snp only")
            if isinstance(privlevel, bool) or not isinstance(privlevel, int) or not (
                    0 <= privlevel <= 3):
                raise ConfigError(f"tee: privlevel must be 0 to 3, not {privlevel!r}")
        self.tee = tee
        self.provider = PROVIDERS[tee]
        self.root = Path(root)
        self.privlevel = privlevel
        if not self.root.is_dir():
            raise ConfigError(
                f"tee: {tee}: {self.root} is missing: configfs-tsm is not available "
                f"(needs Linux 6.7+, configfs mounted and the {self.provider} driver)")

    def evidence(self, report_data: bytes) -> Evidence:
        report_data = check_report_data(report_data)
        entry = self.root / f"teeflow-{os.getpid()}-{next(_serial)}-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(entry)
        except OSError as exc:
            raise ConfigError(
                f"tee: {self.tee}: cannot create configfs-tsm report {entry}: {exc}") from exc
        try:
            outblob, auxblob = self._report(entry, bytes(report_data))
        finally:
            try:
                os.rmdir(entry)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("configfs-tsm: could not remove report %s: %s", entry, exc)
        if self.tee == "tdx":
            return Evidence(tee=self.tee, quote=outblob)
        return Evidence(tee=self.tee, quote=join_snp_evidence(outblob, auxblob))

    def _report(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes]:
        provider = _text(entry / "provider", "provider")
        if provider != self.provider:
            raise ConfigError(
                f"tee: configfs-tsm provider is {provider[:32]!r}; a {self.tee} guest "
                f"has {self.provider!r}")
        before = _generation(entry)
        writes = 0
        if self.privlevel is not None:
            _write(entry / "privlevel", f"{self.privlevel}\n".encode(), "privlevel")
            writes += 1
        _write(entry / "inblob", report_data, "inblob")
        writes += 1
        outblob = _read(entry / "outblob", MAX_OUTBLOB, "outblob")
        auxblob = b""
        if self.tee == "sev-snp" and (entry / "auxblob").exists():
            auxblob = _read(entry / "auxblob", MAX_AUXBLOB, "auxblob")
        after = _generation(entry)
        if after != before + writes:
            raise VerificationError(
                f"configfs-tsm generation changed: concurrent use (went from {before} to "
                f"{after} over {writes} write{'s' if writes > 1 else ''} of ours)")
        if not outblob:
            raise EvidenceFormatError("configfs-tsm: outblob is empty")
        return outblob, auxblob
