"""A provider's config file (TOML): load, give defaults, then check with named fields."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow.attestation.collateral import CollateralSource
from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.attestation.registry import amd_ark, collateral_source
from teeflow.core.errors import ConfigError
from teeflow.files import read_capped
from teeflow.provider.consent import ApprovalRule, load_rules

MAX_CONFIG = 1024 * 1024


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: Path


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

    def dataset(self, name: str) -> DatasetConfig | None:
        return next((d for d in self.datasets if d.name == name), None)


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: required, a non-empty string")
    return value


def load_config(path: Path) -> ProviderConfig:
    raw = read_capped(path, MAX_CONFIG, "config")
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc
    return check_config(doc, base=path.parent)


def check_config(doc: dict[str, Any], base: Path) -> ProviderConfig:
    for key in doc:
        if key not in ("node", "datasets", "policy", "collateral", "approve"):
            raise ConfigError(f"{key}: unknown section")
    node = doc.get("node")
    if not isinstance(node, dict):
        raise ConfigError("node: required table with name, key_file, scheduler")
    for key in node:
        if key not in ("name", "key_file", "scheduler", "poll_wait", "upload_rows_per_second"):
            raise ConfigError(f"node.{key}: unknown field")
    poll_wait = node.get("poll_wait", 20.0)
    if not isinstance(poll_wait, (int, float)) or not 0 < poll_wait <= 60:
        raise ConfigError("node.poll_wait: a number of seconds in (0, 60]")
    rate = node.get("upload_rows_per_second")
    if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
        raise ConfigError("node.upload_rows_per_second: a positive number (or leave it out)")
    datasets = doc.get("datasets", [])
    if not isinstance(datasets, list):
        raise ConfigError("datasets: expected an array of tables [[datasets]]")
    checked: list[DatasetConfig] = []
    for i, d in enumerate(datasets):
        where = f"datasets[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table")
        for key in d:
            if key not in ("name", "path"):
                raise ConfigError(f"{where}.{key}: unknown field")
        p = Path(_str(d, "path", where))
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise ConfigError(f"{where}.path: no such file {p}")
        checked.append(DatasetConfig(_str(d, "name", where), p))
    if len({d.name for d in checked}) != len(checked):
        raise ConfigError("datasets: a dataset name appears twice")
    if "policy" not in doc:
        raise ConfigError("policy: required; a provider must say which executors it accepts")
    key_file = Path(_str(node, "key_file", "node"))
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
        approve=load_rules(doc.get("approve")),
    )
