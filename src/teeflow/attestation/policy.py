"""Appraisal: a provider's own judgement of an executor's evidence.

Pure: the verification time is an argument, verifiers are passed in.
`appraise` returns verified claims or raises; it never returns False.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from teeflow.attestation.evidence import Claims, Evidence
from teeflow.core.errors import ConfigError, PolicyRefused

KNOWN_TEES = ("simulated", "sgx", "tdx", "sev-snp")
# Per TEE type, the claim names a policy may pin to a list of accepted values.
MEASUREMENT_FIELDS: dict[str, tuple[str, ...]] = {
    "simulated": ("measurement",),
    "sgx": ("mrenclave", "mrsigner"),
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"),
    "sev-snp": ("measurement",),
}
# Claims that identify the code; one of them must be pinned for each accepted TEE type.
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "simulated": ("measurement",),
    "sgx": ("mrenclave", "mrsigner"),
    "tdx": ("mrtd",),
    "sev-snp": ("measurement",),
}
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                "ConfigurationAndSWHardeningNeeded", "OutOfDate",
                "OutOfDateConfigurationNeeded", "Revoked")


class Verifier(Protocol):
    tee: str

    def verify(self, quote: bytes, at: int) -> Claims: ...


USER_CODE_ISOLATION = ("full",)  # the levels of executor.sandbox.jail.LEVELS


@dataclass(frozen=True)
class AppraisalPolicy:
    tee_types: tuple[str, ...] = ()
    allow_simulated: bool = False
    allow_debug: bool = False
    accepted_tcb_status: tuple[str, ...] = ("UpToDate",)
    refused_advisories: tuple[str, ...] = ()
    # tee -> claim name -> accepted lower-case hex values
    measurements: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    # SGX signer-based identity: with mrsigner, the product id must match and the
    # security version be at least this.
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    # the user-code sandbox isolation the executor must report (its catalog's user_code entry)
    # before this owner uploads to a user_code task: None demands nothing beyond the
    # executor's own refusal, "full" every piece (executor.sandbox.jail.PIECES)
    user_code_isolation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tee_types": list(self.tee_types),
            "allow_simulated": self.allow_simulated,
            "allow_debug": self.allow_debug,
            "accepted_tcb_status": list(self.accepted_tcb_status),
            "refused_advisories": list(self.refused_advisories),
        }
        for tee, fields in self.measurements.items():
            out[tee] = {k: list(v) for k, v in fields.items()}
        if self.isv_prod_id is not None:
            out.setdefault("sgx", {}).update(isv_prod_id=self.isv_prod_id,
                                             min_isv_svn=self.min_isv_svn)
        if self.user_code_isolation is not None:
            out["user_code_isolation"] = self.user_code_isolation
        return out


def _str_list(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(raw)


def _bool(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"{where}: expected true or false")
    return raw


def _uint(raw: Any, where: str, bits: int = 16) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**bits:
        raise ConfigError(f"{where}: expected a whole number from 0 to {2**bits - 1}")
    return raw


def _hex_list(raw: Any, where: str) -> tuple[str, ...]:
    values = _str_list(raw, where)
    for v in values:
        try:
            bytes.fromhex(v)
        except ValueError as exc:
            raise ConfigError(f"{where}: {v!r} is not hex") from exc
    return tuple(v.lower() for v in values)


def load_policy(raw: Any, where: str = "policy") -> AppraisalPolicy:
    """Check a policy table (from TOML or JSON), naming the bad field.

    What the table leaves out gets the default of `AppraisalPolicy`, the one place
    those are written; everything after that is checking.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    default = AppraisalPolicy()
    raw = {"tee_types": list(default.tee_types), "allow_simulated": default.allow_simulated,
           "allow_debug": default.allow_debug,
           "accepted_tcb_status": list(default.accepted_tcb_status),
           "refused_advisories": list(default.refused_advisories), **raw}
    known = {"tee_types", "allow_simulated", "allow_debug", "accepted_tcb_status",
             "refused_advisories", "user_code_isolation", *KNOWN_TEES}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown field")
    tee_types = _str_list(raw["tee_types"], f"{where}.tee_types")
    if not tee_types:
        raise ConfigError(f"{where}.tee_types: name at least one accepted TEE type")
    for tee in tee_types:
        if tee not in KNOWN_TEES:
            raise ConfigError(f"{where}.tee_types: unknown TEE type {tee!r}")
    measurements: dict[str, dict[str, tuple[str, ...]]] = {}
    for tee in KNOWN_TEES:
        if tee not in raw:
            continue
        section = raw[tee]
        if not isinstance(section, dict):
            raise ConfigError(f"{where}.{tee}: expected a table")
        fields: dict[str, tuple[str, ...]] = {}
        for name, values in section.items():
            if tee == "sgx" and name in ("isv_prod_id", "min_isv_svn"):
                continue
            if name not in MEASUREMENT_FIELDS[tee]:
                raise ConfigError(f"{where}.{tee}.{name}: unknown field")
            fields[name] = _hex_list(values, f"{where}.{tee}.{name}")
        measurements[tee] = fields
    for tee in tee_types:
        if not any(measurements.get(tee, {}).get(f) for f in IDENTITY_FIELDS[tee]):
            raise ConfigError(
                f"{where}.{tee}: accepting {tee} needs at least one of "
                f"{', '.join(IDENTITY_FIELDS[tee])}"
            )
    sgx = raw.get("sgx", {})
    isv_prod_id = None
    if "isv_prod_id" in sgx:
        isv_prod_id = _uint(sgx["isv_prod_id"], f"{where}.sgx.isv_prod_id")
    min_isv_svn = _uint(sgx.get("min_isv_svn", default.min_isv_svn), f"{where}.sgx.min_isv_svn")
    if measurements.get("sgx", {}).get("mrsigner") and isv_prod_id is None:
        raise ConfigError(f"{where}.sgx.isv_prod_id: required with mrsigner (a signer signs "
                          "many products)")
    tcb = _str_list(raw["accepted_tcb_status"], f"{where}.accepted_tcb_status")
    for status in tcb:
        if status not in TCB_STATUSES:
            raise ConfigError(f"{where}.accepted_tcb_status: unknown status {status!r} "
                              f"(known: {', '.join(TCB_STATUSES)})")
    isolation = raw.get("user_code_isolation")
    if isolation is not None and isolation not in USER_CODE_ISOLATION:
        raise ConfigError(f"{where}.user_code_isolation: expected one of "
                          f"{', '.join(USER_CODE_ISOLATION)}")
    policy = AppraisalPolicy(
        tee_types=tee_types,
        allow_simulated=_bool(raw["allow_simulated"], f"{where}.allow_simulated"),
        allow_debug=_bool(raw["allow_debug"], f"{where}.allow_debug"),
        accepted_tcb_status=tcb,
        refused_advisories=_str_list(raw["refused_advisories"], f"{where}.refused_advisories"),
        measurements=measurements,
        isv_prod_id=isv_prod_id,
        min_isv_svn=min_isv_svn,
        user_code_isolation=isolation,
    )
    if "simulated" in tee_types and not policy.allow_simulated:
        raise ConfigError(f"{where}.tee_types: lists simulated but allow_simulated is not true")
    return policy


def appraise(
    evidence: Evidence,
    policy: AppraisalPolicy,
    verifiers: Mapping[str, Verifier],
    *,
    expected_report_data: bytes | None,
    at: int,
) -> Claims:
    """Verify `evidence` and check it against `policy`; return the claims or raise.

    `expected_report_data` is what binds the evidence to a channel and a nonce;
    only an operator's offline look at a quote file passes None.
    """
    if evidence.tee not in policy.tee_types:
        raise PolicyRefused(
            "tee_type", f"{evidence.tee!r} is not among accepted {list(policy.tee_types)}"
        )
    if evidence.tee == "simulated" and not policy.allow_simulated:
        raise PolicyRefused("allow_simulated", "simulated evidence and allow_simulated is false")
    verifier = verifiers.get(evidence.tee)
    if verifier is None:
        raise PolicyRefused("tee_type", f"no verifier configured for {evidence.tee!r}")
    claims = verifier.verify(evidence.quote, at)
    if claims.tee != evidence.tee:
        raise PolicyRefused("tee_type", f"evidence says {evidence.tee!r}, quote is {claims.tee!r}")
    if claims.simulated and not policy.allow_simulated:
        raise PolicyRefused("allow_simulated", "simulated evidence and allow_simulated is false")
    if expected_report_data is not None:
        _check_binding(claims, expected_report_data)
    _check_identity(claims, policy)
    return claims


def satisfies(claims: Claims, policy: AppraisalPolicy) -> None:
    """Check already-verified claims against another policy (e.g. the one in a task spec)."""
    if claims.tee not in policy.tee_types:
        raise PolicyRefused("tee_type",
                            f"{claims.tee!r} is not among accepted {list(policy.tee_types)}")
    if claims.simulated and not policy.allow_simulated:
        raise PolicyRefused("allow_simulated", "simulated evidence and allow_simulated is false")
    _check_identity(claims, policy)


def _check_binding(claims: Claims, expected_report_data: bytes) -> None:
    if claims.report_data[:32] != expected_report_data[:32]:
        raise PolicyRefused(
            "tls_key",
            f"evidence binds key hash {claims.report_data[:32].hex()}, "
            f"the TLS certificate has {expected_report_data[:32].hex()}",
        )
    if claims.report_data[32:64] != expected_report_data[32:64]:
        raise PolicyRefused("nonce", "evidence does not answer the nonce this provider chose")


def _check_identity(claims: Claims, policy: AppraisalPolicy) -> None:
    if claims.debug and not policy.allow_debug:
        raise PolicyRefused("debug", "the TEE runs in debug mode and allow_debug is false")
    for name, accepted in policy.measurements.get(claims.tee, {}).items():
        seen = claims.measurements.get(name)
        if seen not in accepted:
            raise PolicyRefused(
                f"measurement.{name}", f"{seen} is not among accepted {list(accepted)}"
            )
    if claims.tee == "sgx" and policy.measurements.get("sgx", {}).get("mrsigner"):
        prod, svn = claims.extra.get("isv_prod_id"), claims.extra.get("isv_svn")
        if prod != policy.isv_prod_id:
            raise PolicyRefused("isv_prod_id", f"{prod} is not the accepted {policy.isv_prod_id}")
        if not isinstance(svn, int) or svn < policy.min_isv_svn:
            raise PolicyRefused("isv_svn", f"{svn} is below the minimum {policy.min_isv_svn}")
    if claims.tcb_status not in policy.accepted_tcb_status:
        raise PolicyRefused(
            "tcb_status",
            f"{claims.tcb_status} is not among accepted {list(policy.accepted_tcb_status)}",
        )
    refused = sorted(set(claims.advisory_ids) & set(policy.refused_advisories))
    if refused:
        raise PolicyRefused("advisories", f"refused advisories present: {refused}")
