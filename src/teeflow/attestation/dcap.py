"""Intel SGX and TDX DCAP quote verification, offline, on top of `dcap_qvl`.

Pure: no network and no clock. Collateral comes in as data (or from a
`CollateralSource`) and the verification time `at` (unix seconds) is an
argument; dcap_qvl checks every certificate, CRL, TCB info and QE identity
against it, so verifying with old collateral at "now" fails.

Every failure of dcap_qvl, whatever its exception type (including pyo3
panics, which derive from BaseException), becomes an EvidenceFormatError
(the quote or collateral does not parse) or a VerificationError (a
signature, chain, collateral or TCB check failed). Claims are returned only
for a quote that dcap_qvl fully verified.

What the signatures cover (measured with dcap-qvl 0.7.0): the header, the
report body, the attestation key, the QE report and QE authentication data,
and the PCK leaf and intermediate certificates. Not covered, and not needed
for trust: the copy of Intel's root certificate at the end of the quote's
PEM chain (the verifier uses its built-in root), PEM whitespace, the
certificate-data length, trailing bytes after a v4/v5 quote, the v4/v5
outer certification-data type, and the collateral's issuer-chain root copies
and `pck_crl_issuer_chain` (the PCK CRL is checked against the quote's own
PCK CA certificate).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import dcap_qvl

from teeflow.attestation.collateral import (
    MAX_COLLATERAL,
    BundleCollateral,
    CachedPcsCollateral,
    CollateralRequest,
    CollateralSource,
)
from teeflow.attestation.evidence import REPORT_DATA_LEN, Claims
from teeflow.attestation.formats import TEE_TYPE_SGX, TEE_TYPE_TDX, evidence_tee
from teeflow.core.errors import (
    AttestationError,
    ConfigError,
    EvidenceFormatError,
    InputError,
    TeeflowError,
    VerificationError,
)

__all__ = [
    "MAX_COLLATERAL",
    "MAX_QUOTE",
    "BundleCollateral",
    "CachedPcsCollateral",
    "CollateralRequest",
    "CollateralSource",
    "DcapVerifier",
    "QuoteInfo",
    "inspect_quote",
    "verify_quote",
]

MAX_QUOTE = 64 * 1024
_TEE_BY_TYPE = {TEE_TYPE_SGX: "sgx", TEE_TYPE_TDX: "tdx"}
_MAX_AT = 2**63 - 1
SGX_ATTR_DEBUG = 0x02  # bit 1 of the first byte of SGX ATTRIBUTES.FLAGS
TD_ATTR_DEBUG = 0x01  # bit 0 of TDX TD_ATTRIBUTES (TUD.DEBUG)
# First-line prefixes of dcap_qvl errors that mean "does not parse" rather than "does not verify".
_FORMAT_PREFIXES = ("Failed to decode", "Failed to parse", "Failed to extract", "Unsupported DCAP")

T = TypeVar("T")


@dataclass(frozen=True)
class QuoteInfo:
    """A quote's header facts, read before verification (so not yet to be believed)."""

    tee: str  # "sgx" or "tdx", from the header's TEE type
    version: int  # quote format version (3, 4 or 5)
    fmspc: str  # 12 upper-case hex digits, from the PCK certificate
    ca: str  # "processor" or "platform"

    def request(self) -> CollateralRequest:
        return CollateralRequest(tee=self.tee, fmspc=self.fmspc, ca=self.ca)


def _describe(exc: BaseException) -> str:
    """dcap_qvl's multi-line error as one line: 'what failed: cause: cause'."""
    text = str(exc).strip()
    if text.startswith("Verification failed:"):
        text = text[len("Verification failed:") :]
    parts = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "Caused by:":
            continue
        head, sep, rest = line.partition(": ")
        parts.append(rest if sep and head.isdigit() else line)
    summary = ": ".join(parts) or type(exc).__name__
    if not isinstance(exc, ValueError):
        summary = f"{type(exc).__name__}: {summary}"
    return summary if len(summary) <= 400 else summary[:397] + "..."


def _call(
    what: str,
    error: Callable[[str], AttestationError],
    fn: Callable[..., T],
    *args: Any,
) -> T:
    """Call into dcap_qvl; turn any failure (even a Rust panic) into `error`."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise error(f"{what}: {_describe(exc)}") from exc


def _verify_error(message: str) -> AttestationError:
    _, _, detail = message.partition(": ")
    if detail.startswith(_FORMAT_PREFIXES):
        return EvidenceFormatError(message)
    return VerificationError(message)


def _check_quote(quote: bytes) -> bytes:
    if not isinstance(quote, bytes | bytearray):
        raise EvidenceFormatError(f"quote must be bytes, not {type(quote).__name__}")
    if len(quote) > MAX_QUOTE:
        raise EvidenceFormatError(f"quote is {len(quote)} bytes, more than {MAX_QUOTE}")
    if not quote:
        raise EvidenceFormatError("quote is empty")
    return bytes(quote)


def _check_at(at: int) -> None:
    if isinstance(at, bool) or not isinstance(at, int):
        raise InputError(f"verification time must be integer unix seconds, not {at!r}")
    if not 0 <= at <= _MAX_AT:
        raise InputError(f"verification time {at} is out of range")


def inspect_quote(quote: bytes, *, require_fmspc: bool = True) -> QuoteInfo:
    """TEE type, version, FMSPC and PCK CA of a quote, by parsing it (no verification).

    FMSPC and CA come from the PCK certificate embedded in the quote; with
    `require_fmspc=False` they are left empty when it cannot be read (the
    verifier will then say what is wrong with it).
    """
    raw = _check_quote(quote)
    parsed = _call("quote does not parse", EvidenceFormatError, dcap_qvl.parse_quote, raw)

    def header() -> tuple[int, int]:
        return int(parsed.header.tee_type), int(parsed.header.version)

    def pck() -> tuple[str, str]:
        return str(parsed.fmspc()).upper(), str(parsed.ca())

    tee_type, version = _call("quote header does not parse", EvidenceFormatError, header)
    tee = evidence_tee(raw)
    if tee not in ("sgx", "tdx"):
        raise EvidenceFormatError(f"quote is {tee} evidence, not an SGX or TDX DCAP quote")
    if _TEE_BY_TYPE.get(tee_type) != tee:  # our header reading and dcap_qvl's must agree
        raise EvidenceFormatError(
            f"quote header is {tee.upper()} but dcap_qvl reads TEE type {tee_type:#x}")
    try:
        fmspc, ca = _call("quote's PCK certificate does not parse", EvidenceFormatError, pck)
    except EvidenceFormatError:
        if require_fmspc:
            raise
        fmspc, ca = "", ""
    return QuoteInfo(tee=tee, version=version, fmspc=fmspc, ca=ca)


def _hex(value: Any, name: str) -> str:
    if isinstance(value, str):
        bytes.fromhex(value)
        return value.lower()
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).hex()
    raise ValueError(f"{name} is neither hex nor a byte list")


def _flatten(report: dict[str, Any]) -> dict[str, Any]:
    """Fields of a TD15-style report ({"base": TD10, ...}) on one level."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key == "base" and isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def _claims(info: QuoteInfo, verified: Any, raw: bytes) -> Claims:
    status = str(verified.status)
    advisories = tuple(str(a) for a in verified.advisory_ids)
    document = json.loads(verified.to_json())
    (kind, body), = document["report"].items()
    fields = _flatten(body)
    report_data = bytes.fromhex(_hex(fields["report_data"], "report_data"))
    if len(report_data) != REPORT_DATA_LEN:
        raise ValueError(f"report_data is {len(report_data)} bytes")
    # The typed view of the same (now verified) bytes must agree with the JSON one.
    parsed = dcap_qvl.parse_quote(raw).report
    if parsed.report_data != report_data:
        raise ValueError("parsed and verified report data differ")
    extra: dict[str, Any] = {"quote_version": info.version}
    if info.fmspc:
        extra["fmspc"] = info.fmspc
    if info.tee == "sgx":
        if kind != "SgxEnclave":
            raise ValueError(f"SGX quote verified as a {kind} report")
        attributes = _hex(fields["attributes"], "attributes")
        measurements = {
            "mrenclave": _hex(fields["mr_enclave"], "mr_enclave"),
            "mrsigner": _hex(fields["mr_signer"], "mr_signer"),
        }
        if measurements["mrenclave"] != parsed.mr_enclave.hex():
            raise ValueError("parsed and verified MRENCLAVE differ")
        extra.update(
            isv_prod_id=int(fields["isv_prod_id"]),
            isv_svn=int(fields["isv_svn"]),
            attributes=attributes,
            misc_select=int(fields["misc_select"]),
            cpu_svn=_hex(fields["cpu_svn"], "cpu_svn"),
        )
        debug = bool(bytes.fromhex(attributes)[0] & SGX_ATTR_DEBUG)
    else:
        if not kind.startswith("TD"):
            raise ValueError(f"TDX quote verified as a {kind} report")
        measurements = {"mrtd": _hex(fields["mr_td"], "mr_td")}
        for i in range(4):
            measurements[f"rtmr{i}"] = _hex(fields[f"rt_mr{i}"], f"rt_mr{i}")
        if measurements["mrtd"] != parsed.mr_td.hex():
            raise ValueError("parsed and verified MRTD differ")
        td_attributes = _hex(fields["td_attributes"], "td_attributes")
        for name in ("xfam", "mr_config_id", "mr_owner", "mr_owner_config", "mr_seam",
                     "mr_signer_seam", "seam_attributes", "tee_tcb_svn", "tee_tcb_svn2",
                     "mr_service_td"):
            if name in fields:
                extra[name] = _hex(fields[name], name)
        extra["td_attributes"] = td_attributes
        extra["report_type"] = kind
        debug = bool(bytes.fromhex(td_attributes)[0] & TD_ATTR_DEBUG)
    return Claims(
        tee=info.tee,
        measurements=measurements,
        debug=debug,
        report_data=report_data,
        tcb_status=status,
        advisory_ids=advisories,
        simulated=False,
        extra=extra,
    )


def _collateral_text(collateral_json: bytes | str) -> str:
    if not isinstance(collateral_json, bytes | bytearray | str):
        raise EvidenceFormatError(
            f"collateral must be JSON bytes, not {type(collateral_json).__name__}"
        )
    if len(collateral_json) > MAX_COLLATERAL:
        raise EvidenceFormatError(
            f"collateral is {len(collateral_json)} bytes, more than {MAX_COLLATERAL}"
        )
    if isinstance(collateral_json, str):
        return collateral_json
    try:
        return bytes(collateral_json).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError("collateral is not UTF-8 JSON") from exc


def _verify(info: QuoteInfo, quote: bytes, text: str, at: int) -> Claims:
    collateral = _call(
        "collateral is not DCAP collateral JSON",
        EvidenceFormatError,
        dcap_qvl.QuoteCollateralV3.from_json,
        text,
    )
    name = info.tee.upper()
    raw = bytes(quote)
    verified = _call(f"{name} quote rejected", _verify_error, dcap_qvl.verify, raw, collateral, at)
    try:
        claims = _claims(info, verified, raw)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise VerificationError(
            f"{name} quote verified but its report is unreadable: {_describe(exc)}"
        ) from exc
    if claims.tcb_status == "Revoked":
        raise VerificationError(f"{name} platform or QE TCB is revoked")
    return claims


def verify_quote(quote: bytes, collateral_json: bytes | str, at: int) -> Claims:
    """Verify an SGX or TDX quote (told apart by its header) against collateral at `at`."""
    _check_at(at)
    _check_quote(quote)
    text = _collateral_text(collateral_json)
    info = inspect_quote(quote, require_fmspc=False)
    return _verify(info, quote, text, at)


class DcapVerifier:
    """A `Verifier` for one TEE type ("sgx" or "tdx"), with collateral from a source."""

    def __init__(self, tee: str, collateral: CollateralSource) -> None:
        if tee not in ("sgx", "tdx"):
            raise ConfigError(f"tee: DcapVerifier checks 'sgx' or 'tdx', not {tee!r}")
        self.tee = tee
        self.collateral = collateral

    def verify(self, quote: bytes, at: int) -> Claims:
        _check_at(at)
        kind = evidence_tee(_check_quote(quote))
        if kind != self.tee:
            raise EvidenceFormatError(
                f"quote is a {kind.upper()} quote; this verifier checks {self.tee.upper()}"
            )
        info = inspect_quote(quote)  # collateral is looked up by the PCK certificate's FMSPC
        try:
            collateral_json = self.collateral.collateral(info.request(), bytes(quote), at)
        except TeeflowError:
            raise
        except Exception as exc:
            raise VerificationError(
                f"no {info.tee} collateral for FMSPC {info.fmspc}: {type(exc).__name__}: {exc}"
            ) from exc
        return _verify(info, quote, _collateral_text(collateral_json), at)
