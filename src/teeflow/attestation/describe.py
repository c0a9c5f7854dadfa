"""Decode evidence for people, without judging it: nothing here verifies anything.

Which TEE made the bytes is `formats.evidence_tee`'s to say; this module only reads
the fields of the format it names.
"""

from __future__ import annotations

from typing import Any

from teeflow.attestation import dcap, simulated
from teeflow.attestation.formats import evidence_tee
from teeflow.core.errors import EvidenceFormatError


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return bytes(value).hex() if all(0 <= v < 256 for v in value) else value
    if isinstance(value, (int, str, float, bool)) or value is None:
        return value
    return str(value)


def _fields(obj: Any) -> dict[str, Any]:
    out = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        value = getattr(obj, name)
        if callable(value):
            continue
        out[name] = _plain(value)
    return out


def describe_quote(quote: bytes) -> dict[str, Any]:
    """The fields of simulated, SEV-SNP, SGX or TDX evidence, as JSON-ready values."""
    tee = evidence_tee(quote)
    if tee == "sev-snp":
        parsed = _snp_report(quote)
        return {"tee": tee, **{k: _plain(v) for k, v in vars(parsed).items()
                               if not k.startswith("_")}}
    if tee == "simulated":
        body = quote[: len(quote) - simulated.SIG_LEN]
        if len(quote) != simulated.QUOTE_LEN:
            raise EvidenceFormatError("simulated quote has the wrong length")
        flags = body[8]
        return {"tee": tee, "debug": bool(flags & simulated.FLAG_DEBUG),
                "measurement": body[9:41].hex(), "report_data": body[41:105].hex(),
                "note": "software-signed: proves nothing about hardware"}
    info = dcap.inspect_quote(quote, require_fmspc=False)
    parsed = _dcap_parse(quote)
    return {"tee": info.tee, "version": info.version, "fmspc": info.fmspc, "pck_ca": info.ca,
            "header": _fields(parsed.header), "report": _fields(parsed.report)}


def claimed_measurements(tee: str, quote: bytes) -> dict[str, str]:
    """The identity values a quote states, unverified (for listings and routing only).

    The names are the policy's (`policy.MEASUREMENT_FIELDS`); `tee` must be the
    TEE whose format the quote has.
    """
    found = evidence_tee(quote)
    if found != tee:
        raise EvidenceFormatError(f"evidence says TEE {tee!r} but the quote is {found!r}")
    if tee == "simulated":
        return {"measurement": describe_quote(quote)["measurement"]}
    if tee == "sev-snp":
        return {"measurement": _snp_report(quote).measurement.hex()}
    dcap.inspect_quote(quote, require_fmspc=False)  # capped, and the header cross-checked
    report = _dcap_parse(quote).report
    if tee == "sgx":
        return {"mrenclave": bytes(report.mr_enclave).hex(),
                "mrsigner": bytes(report.mr_signer).hex()}
    out = {"mrtd": bytes(report.mr_td).hex()}
    for i in range(4):
        out[f"rtmr{i}"] = bytes(getattr(report, f"rt_mr{i}")).hex()
    return out


def _snp_report(quote: bytes) -> Any:
    from teeflow.attestation import sevsnp
    from teeflow.attestation.configfs_tsm import split_snp_evidence

    report, _ = split_snp_evidence(quote)
    return sevsnp.parse_report(report)


def _dcap_parse(quote: bytes) -> Any:
    import dcap_qvl

    try:
        return dcap_qvl.parse_quote(quote)
    except Exception as exc:  # parsing only; the verifier names real failures
        raise EvidenceFormatError(f"quote does not parse: {exc}") from exc


def describe_certificate(cert: bytes) -> dict[str, Any]:
    """An RA-TLS certificate's subject, validity and the evidence it carries."""
    from teeflow.attestation.ratls import read_certificate_evidence
    from teeflow.core.crypto import load_cert

    parsed = load_cert(cert)
    found = read_certificate_evidence(cert)
    return {"subject": parsed.subject.rfc4514_string(),
            "not_before": parsed.not_valid_before_utc.isoformat(),
            "not_after": parsed.not_valid_after_utc.isoformat(),
            "spki_sha256": found.spki_sha256.hex(), "format": found.format,
            "claims": {k: (v.hex() if isinstance(v, bytes) else v)
                       for k, v in found.claims.items()},
            "evidence": describe_quote(found.quote)}
