"""Decode evidence for people, without judging it: nothing here verifies anything."""

from __future__ import annotations

from typing import Any

from teeflow.attestation import dcap, simulated
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
    """The fields of a simulated, SGX or TDX quote, as JSON-ready values."""
    if quote[:8] == b"TFSNPEV1":
        from teeflow.attestation import sevsnp

        report, _ = sevsnp.split_snp_evidence(quote)
        parsed = sevsnp.parse_report(report)
        return {"tee": "sev-snp", **{k: _plain(v) for k, v in vars(parsed).items()
                                     if not k.startswith("_")}}
    if quote[:8] == simulated.MAGIC:
        body = quote[: len(quote) - simulated.SIG_LEN]
        if len(quote) != simulated.QUOTE_LEN:
            raise EvidenceFormatError("simulated quote has the wrong length")
        flags = body[8]
        return {"tee": "simulated", "debug": bool(flags & simulated.FLAG_DEBUG),
                "measurement": body[9:41].hex(), "report_data": body[41:105].hex(),
                "note": "software-signed: proves nothing about hardware"}
    info = dcap.inspect_quote(quote, require_fmspc=False)
    import dcap_qvl

    try:
        parsed = dcap_qvl.parse_quote(quote)
    except Exception as exc:  # parsing only; the verifier names real failures
        raise EvidenceFormatError(f"quote does not parse: {exc}") from exc
    return {"tee": info.tee, "version": info.version, "fmspc": info.fmspc, "pck_ca": info.ca,
            "header": _fields(parsed.header), "report": _fields(parsed.report)}


def claimed_measurements(tee: str, quote: bytes) -> dict[str, str]:
    """The identity values a quote states, unverified (for listings and routing only)."""
    if tee == "simulated":
        return {"measurement": describe_quote(quote)["measurement"]}
    import dcap_qvl

    try:
        report = dcap_qvl.parse_quote(quote).report
    except Exception as exc:
        raise EvidenceFormatError(f"quote does not parse: {exc}") from exc
    if tee == "sgx":
        return {"mrenclave": bytes(report.mr_enclave).hex(),
                "mrsigner": bytes(report.mr_signer).hex()}
    if tee == "tdx":
        out = {"mrtd": bytes(report.mr_td).hex()}
        for i in range(4):
            out[f"rtmr{i}"] = bytes(getattr(report, f"rt_mr{i}")).hex()
        return out
    raise EvidenceFormatError(f"no measurements known for TEE type {tee!r}")


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
