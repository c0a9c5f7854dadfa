"""A provider's config file (TOML), in three steps: `read_config` parses it (capped),
`with_defaults` fills what it leaves out from the one table `DEFAULTS`, and
`check_fields` checks the result, raising ConfigError that names the bad field.

`load_config(path)` runs all three; `check_config(doc, base)` the last two.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow.attestation.collateral import CollateralSource
from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.attestation.registry import amd_ark, collateral_source
from teeflow.core.errors import ConfigError
from teeflow.core.rules import DatasetRules
from teeflow.core.rules import check_columns as check_rule_columns
from teeflow.core.rules import load_rules as load_analysis_rules
from teeflow.files import read_capped
from teeflow.files.datasets import read_schema
from teeflow.provider.budget import PrivacyConfig, load_privacy
from teeflow.provider.consent import ApprovalRule, load_rules

MAX_CONFIG = 1024 * 1024


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: Path
    privacy: PrivacyConfig | None = None  # [datasets.privacy]: DP only, within a budget
    rules: DatasetRules | None = None  # [datasets.rules]: what a query over it may compute


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    key_file: Path
    scheduler: str
    datasets: tuple[DatasetConfig, ...]
    policy: AppraisalPolicy
    poll_wait: float = 20.0
    upload_rows_per_second: float | None = None
    collateral: CollateralSource | None = None
    amd_ark: bytes | None = None
    approve: tuple[ApprovalRule, ...] = ()
    invite: str | None = None  # the operator's one-time token, spent on first registration
    # the owner's own record of its datasets' privacy budgets (provider/budget.py);
    # None: next to the node's key, which is the node's own too
    budget_file: Path | None = None

    @property
    def budget_path(self) -> Path:
        return self.budget_file or self.key_file.with_name(self.key_file.name + ".budget.sqlite")

    @property
    def ledger_path(self) -> Path:
        """The owner's consent ledger (provider/ledger.py), next to its key."""
        return self.key_file.with_name(self.key_file.name + ".uploads.sqlite")

    @property
    def specs_path(self) -> Path:
        """The specs this node's key signed (files/signed_specs.py), next to the key:
        `teeflow approve` with the same key file records there too."""
        return self.key_file.with_name(self.key_file.name + ".specs.sqlite")

    def dataset(self, name: str) -> DatasetConfig | None:
        return next((d for d in self.datasets if d.name == name), None)


# The one table of defaults: field (dotted; `[]` means each table of an array) ->
# what a config that leaves it out gets. A table is given defaults only if present:
# a missing required table stays missing, for the check to name. Values a config
# built in code also gets come from the dataclasses, so the two cannot disagree.
DEFAULTS: dict[str, Any] = {
    "node.poll_wait": ProviderConfig.poll_wait,
    "datasets": [],
    "approve": [],
    "approve[].code_digests": list(ApprovalRule.code_digests),
    "approve[].params": dict(ApprovalRule.params),
    "approve[].max_pool": ApprovalRule.max_pool,
}
SECTIONS = ("node", "datasets", "policy", "collateral", "approve")
NODE_FIELDS = ("name", "key_file", "scheduler", "poll_wait", "upload_rows_per_second",
               "budget_file", "invite")
DATASET_FIELDS = ("name", "path", "privacy", "rules")


def load_config(path: Path) -> ProviderConfig:
    return check_config(read_config(path), base=path.parent)


def check_config(doc: dict[str, Any], base: Path) -> ProviderConfig:
    """A parsed config file, given its defaults and checked; `base` resolves relative paths."""
    return check_fields(with_defaults(doc), base)


# -- 1. read -----------------------------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    raw = read_capped(path, MAX_CONFIG, "config")
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc


# -- 2. defaults -------------------------------------------------------------------------------
def with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with every field of `DEFAULTS` it leaves out filled in.

    Checks nothing: a table of the wrong type is left as it is, for `check_fields`.
    """
    out = copy.deepcopy(doc)
    for field, value in DEFAULTS.items():
        section, _, name = field.partition(".")
        if not name:
            out.setdefault(section, copy.deepcopy(value))
            continue
        if section.endswith("[]"):
            items = out.get(section[:-2])
            tables = [t for t in items if isinstance(t, dict)] if isinstance(items, list) else []
        else:
            table = out.get(section)
            tables = [table] if isinstance(table, dict) else []
        for t in tables:
            t.setdefault(name, copy.deepcopy(value))
    return out


# -- 3. check ----------------------------------------------------------------------------------
def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: required, a non-empty string")
    return value


def _unknown(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown field")


def _check_rule_computations(rules: DatasetRules, privacy: PrivacyConfig | None,
                             where: str) -> None:
    from teeflow import compute

    known = compute.names()
    for name in rules.computations:
        if name not in known:
            raise ConfigError(f"{where}: unknown computation {name!r}")
    if privacy is not None and privacy.required and not any(
            compute.get(n).differentially_private for n in rules.computations):
        raise ConfigError(f"{where}: the dataset requires differential privacy "
                          "(privacy.required), so list its DP computations here")


def _columns(path: Path) -> list[str] | None:
    try:
        return list(read_schema(path).names) if path.is_file() else None
    except ConfigError:
        return None


def check_fields(doc: dict[str, Any], base: Path) -> ProviderConfig:
    """Check a config that `with_defaults` has filled in; the error names the bad field."""
    for key in doc:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section")
    node = doc.get("node")
    if not isinstance(node, dict):
        raise ConfigError("node: required table with name, key_file, scheduler")
    _unknown(node, NODE_FIELDS, "node")
    poll_wait = node["poll_wait"]
    if not isinstance(poll_wait, (int, float)) or not 0 < poll_wait <= 60:
        raise ConfigError("node.poll_wait: a number of seconds in (0, 60]")
    rate = node.get("upload_rows_per_second")
    if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
        raise ConfigError("node.upload_rows_per_second: a positive number (or leave it out)")
    datasets = doc["datasets"]
    if not isinstance(datasets, list):
        raise ConfigError("datasets: expected an array of tables [[datasets]]")
    checked: list[DatasetConfig] = []
    for i, d in enumerate(datasets):
        where = f"datasets[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table")
        _unknown(d, DATASET_FIELDS, where)
        p = Path(_str(d, "path", where))
        p = p if p.is_absolute() else base / p
        # a missing or unreadable file is not a config error: it takes only its own dataset
        # offline when the node catalogues it (provider/catalog.py)
        privacy = load_privacy(d["privacy"], f"{where}.privacy") if "privacy" in d else None
        rules = load_analysis_rules(d["rules"], f"{where}.rules") if "rules" in d else None
        if rules is not None:
            _check_rule_computations(rules, privacy, f"{where}.rules.computations")
            columns = _columns(p)
            if columns is not None:
                check_rule_columns(rules, columns, f"{where}.rules")
        checked.append(DatasetConfig(_str(d, "name", where), p, privacy, rules))
    if len({d.name for d in checked}) != len(checked):
        raise ConfigError("datasets: a dataset name appears twice")
    if "policy" not in doc:
        raise ConfigError("policy: required; a provider must say which executors it accepts")
    key_file = Path(_str(node, "key_file", "node"))
    budget = node.get("budget_file")
    if budget is not None and (not isinstance(budget, str) or not budget):
        raise ConfigError("node.budget_file: a path (or leave it out)")
    budget_file = None if budget is None else (
        Path(budget) if Path(budget).is_absolute() else base / budget)
    invite = node.get("invite")
    if invite is not None and (not isinstance(invite, str) or not invite):
        raise ConfigError("node.invite: the invitation token, a string (or leave it out)")
    return ProviderConfig(
        name=_str(node, "name", "node"),
        key_file=key_file if key_file.is_absolute() else base / key_file,
        scheduler=_str(node, "scheduler", "node"),
        datasets=tuple(checked),
        policy=load_policy(doc["policy"], "policy"),
        poll_wait=float(poll_wait),
        upload_rows_per_second=float(rate) if rate is not None else None,
        collateral=collateral_source(doc.get("collateral"), base),
        amd_ark=amd_ark(doc.get("collateral"), base),
        approve=load_rules(doc["approve"]),
        budget_file=budget_file,
        invite=invite,
    )
