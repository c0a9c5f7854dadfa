"""A provider's consent: which task specs it signs by rule, and whether a spec is one it signed.

Pure: specs, rules and keys in, decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teeflow.core import audit, wire
from teeflow.core.errors import AuthError, ConfigError


@dataclass(frozen=True)
class ApprovalRule:
    """Approve a task when it runs one of `compute` on datasets among `datasets`,
    and every result receiver is among `receivers` (public keys)."""

    compute: tuple[str, ...]
    datasets: tuple[str, ...]
    receivers: tuple[str, ...]
    code_digests: tuple[str, ...] = ()

    def matches(self, spec: wire.TaskSpec, owner_key: str) -> bool:
        mine = [d.name for d in spec.datasets if d.owner_key == owner_key]
        return (spec.compute in self.compute
                and all(name in self.datasets for name in mine)
                and all(r.sign_key in self.receivers for r in spec.receivers)
                and (not self.code_digests or spec.code_digest in self.code_digests))


RULE_FIELDS = ("compute", "datasets", "receivers", "code_digests")


def load_rules(raw: Any) -> tuple[ApprovalRule, ...]:
    """Check the config's [[approve]] tables, defaults already given (provider/config.py)."""
    if not isinstance(raw, list):
        raise ConfigError("approve: expected an array of tables [[approve]]")
    rules = []
    for i, r in enumerate(raw):
        where = f"approve[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: expected a table")
        for key in r:
            if key not in RULE_FIELDS:
                raise ConfigError(f"{where}.{key}: unknown field")
        fields = {}
        for key in RULE_FIELDS:
            value = r.get(key)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key}: required, a list of strings")
            if key != "code_digests" and not value:
                raise ConfigError(f"{where}.{key}: name at least one")
            fields[key] = tuple(value)
        rules.append(ApprovalRule(fields["compute"], fields["datasets"], fields["receivers"],
                                  fields["code_digests"]))
    return tuple(rules)


def approval_body(spec: wire.TaskSpec) -> dict[str, str]:
    return {"spec_digest": spec.digest()}


def check_signed_by(spec: wire.TaskSpec, approvals: list[dict[str, Any]], owner_key: str) -> None:
    """Raise unless `approvals` hold this owner's valid approval of exactly this spec."""
    for a in approvals:
        if a.get("owner_key") == owner_key and a.get("decision") == "approved":
            audit.verify_entry_signature(spec.task_id, "approved", approval_body(spec),
                                         audit.ed25519_signer(owner_key), str(a["signature"]))
            return
    raise AuthError(f"task {spec.task_id}: this node never signed its spec")
