"""A provider's consent: which task specs it signs by rule, and whether a spec is one it signed.

Pure: specs, rules and keys in, decisions out.

An approval rule (`[[approve]]` in the provider's config) names computations, this node's
datasets and the receivers (each by signing *and* encryption key), and binds parameters in
its `[approve.params]` table, one constraint per parameter:

    values   query = ["..."]  or  rounds = {values = [5, 10]}   one of these values
    digest   query_sha256 = "hex" (or a list)   SHA-256 of the parameter's text as signed
    bounds   min_group_size = {min = 20}   epsilon = {max = 0.5}   a number within
    subset   features = {subset = ["age", "bmi"]}   a list drawn from these
    default  min_parties = {default = true}   left out, or given as its default
    rules    query = {analysis_rules = true}   any query this node's datasets' analysis
             rules (`[datasets.rules]`) grant: the spec carries their digest, the provider
             checks it is its own, and the executor enforces them before any data moves

A rule matches a task only if every parameter the computation declares REVEALING (one that
can make a result show rows: a query, code, a group-size floor, epsilon, a minimum of
parties...) is bound by the rule, and every bound holds. A rule that binds less does not
match: the task waits for a person (`teeflow approve`); it is not refused.

A rule approves a task on one executor only, unless its `max_pool = N` allows a pool of up
to N executors (each member then holds a part of this node's rows): more enclaves see the
data, so an owner opts in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from teeflow import compute
from teeflow.compute.params import Param
from teeflow.core import audit, wire
from teeflow.core.errors import AuthError, ConfigError, TeeflowError

KINDS = ("values", "sha256", "range", "subset", "default", "rules")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_ITEMS = 1000  # values, digests or subset members in one constraint


@dataclass(frozen=True)
class Constraint:
    """What one parameter may be. ``items``: allowed values (converted as the computation
    converts the task's), digests or subset members; ``low``/``high``: inclusive bounds."""

    kind: str
    items: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    def allows(self, param: Param, raw: str | None) -> bool:
        """Whether the task's raw value (None: left out) satisfies this constraint."""
        if self.kind == "sha256":
            if raw is None:
                return False
            try:
                return hashlib.sha256(raw.encode()).hexdigest() in self.items
            except UnicodeEncodeError:
                return False
        try:
            value = param.default if raw is None else param.parse(raw)
        except TeeflowError:
            return False
        if self.kind == "default":
            return raw is None or value == param.default
        if self.kind == "values":
            return value is not None and _key(value) in self.items
        if self.kind == "subset":
            return isinstance(value, list) and all(v in self.items for v in value)
        if self.kind != "range" or isinstance(value, bool) or not isinstance(value, int | float):
            return False  # an unknown kind allows nothing
        return ((self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class ApprovalRule:
    """Approve a task when it runs one of `compute` on datasets among `datasets`, every
    result receiver is among `receivers` (both keys), its code is among `code_digests` (if
    given), and `params` bind each of its revealing parameters, and hold."""

    compute: tuple[str, ...]
    datasets: tuple[str, ...]
    receivers: tuple[wire.Receiver, ...]
    code_digests: tuple[str, ...] = ()
    params: tuple[tuple[str, Constraint], ...] = ()
    max_pool: int = 1  # executors the task may run across (1: one executor, no pool)

    def matches(self, spec: wire.TaskSpec, owner_key: str) -> bool:
        return self.mismatch(spec, owner_key) is None

    def mismatch(self, spec: wire.TaskSpec, owner_key: str) -> str | None:
        """Why this rule does not match the spec (names only, never a value), or None."""
        if spec.compute not in self.compute:
            return f"computation {spec.compute!r} is not in the rule"
        for d in spec.datasets:
            if d.owner_key == owner_key and d.name not in self.datasets:
                return f"dataset {d.name!r} is not in the rule"
        for i, r in enumerate(spec.receivers):
            if r not in self.receivers:
                pinned = any(p.sign_key == r.sign_key for p in self.receivers)
                return f"receiver {i}: " + ("its enc_key is not the pinned one" if pinned
                                            else "not among the rule's receivers")
        if self.code_digests and spec.code_digest not in self.code_digests:
            return "the computation's code digest is not in code_digests"
        if (spec.pool or 1) > self.max_pool:
            return (f"the task runs across a pool of {spec.pool} executors; the rule's "
                    f"max_pool is {self.max_pool}")
        return self.unbound(spec, owner_key)

    def unbound(self, spec: wire.TaskSpec, owner_key: str = "") -> str | None:
        """The first revealing parameter of the spec's computation this rule leaves unbound,
        or the first bound that does not hold; None if every one holds."""
        try:
            comp = compute.get(spec.compute)
        except TeeflowError:
            return f"unknown computation {spec.compute!r}"
        bound = dict(self.params)
        for name in comp.revealing:
            if name not in bound:
                return f"parameter {name!r} can reveal rows and the rule does not bind it"
        for name, constraint in self.params:
            param = comp.param(name)
            if param is None:
                continue  # a parameter of another computation the rule names
            if constraint.kind == "rules":
                mine = [d for d in spec.datasets if d.owner_key == owner_key]
                if not mine or any(d.rules is None for d in mine):
                    # only under rules the executor will enforce
                    return f"parameter {name!r}: a dataset of this node has no analysis rules"
                continue
            if not constraint.allows(param, spec.params.get(name)):
                return f"parameter {name!r} is outside the rule's {constraint.kind} bound"
        return None


RULE_FIELDS = ("compute", "datasets", "receivers", "code_digests", "params", "max_pool")


def _strings(value: Any, where: str, empty_ok: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: required, a list of strings")
    if not empty_ok and not value:
        raise ConfigError(f"{where}: name at least one")
    return tuple(value)


def _receivers(value: Any, where: str) -> tuple[wire.Receiver, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: required, a list of {{sign_key = \"..\", enc_key = \"..\"}}")
    out = []
    for i, r in enumerate(value):
        if not isinstance(r, dict) or set(r) != {"sign_key", "enc_key"} or not all(
                isinstance(v, str) and v for v in r.values()):
            raise ConfigError(f"{where}[{i}]: a receiver is pinned by both keys: "
                              "{sign_key = \"..\", enc_key = \"..\"}")
        out.append(wire.Receiver(r["sign_key"], r["enc_key"]))
    return tuple(out)


def _params_of(names: tuple[str, ...]) -> dict[str, Param]:
    """Every parameter of the named computations, by name."""
    out: dict[str, Param] = {}
    for name in names:
        comp = compute.get(name)
        for p in comp.all_params or comp.params:
            out.setdefault(p.name, p)
    return out


def _as_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return None


def _constraint(param: Param | None, key: str, raw: Any, where: str) -> tuple[str, Constraint]:
    """The parameter a `[approve.params]` entry binds, and how; ConfigError naming it."""
    if param is None and key.endswith("_sha256"):
        raise ConfigError(f"{where}: no such parameter {key.removesuffix('_sha256')!r} in the "
                          "rule's computations")
    if param is None:
        raise ConfigError(f"{where}: no such parameter in the rule's computations")
    if isinstance(raw, list):
        raw = {"values": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a list of values or a table "
                          "(values, min/max, subset or default)")
    keys = set(raw)
    if keys == {"values"}:
        items = raw["values"]
        if not isinstance(items, list) or not items or len(items) > MAX_ITEMS:
            raise ConfigError(f"{where}.values: a list of 1 to {MAX_ITEMS} values")
        parsed = []
        for i, item in enumerate(items):
            text = _as_text(item)
            try:
                if text is None:
                    raise ConfigError("")
                parsed.append(_key(param.parse(text)))
            except (ConfigError, TeeflowError):
                raise ConfigError(f"{where}.values[{i}]: not a valid {param.type} for "
                                  f"parameter {param.name!r}") from None
        return param.name, Constraint("values", tuple(parsed))
    if keys and keys <= {"min", "max"}:
        if param.type not in ("int", "float"):
            raise ConfigError(f"{where}: min/max bound numbers; {param.name!r} is {param.type}")
        low, high = raw.get("min"), raw.get("max")
        for name, v in (("min", low), ("max", high)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ConfigError(f"{where}.{name}: a number")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{where}: min is above max")
        return param.name, Constraint("range", low=low, high=high)
    if keys == {"subset"}:
        items = raw["subset"]
        if param.type != "list[str]":
            raise ConfigError(f"{where}: subset binds a list parameter; {param.name!r} is "
                              f"{param.type}")
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items) or \
                len(items) > MAX_ITEMS:
            raise ConfigError(f"{where}.subset: a list of at most {MAX_ITEMS} strings")
        return param.name, Constraint("subset", tuple(items))
    if keys == {"analysis_rules"}:
        if raw["analysis_rules"] is not True or param.name != "query":
            raise ConfigError(f"{where}.analysis_rules: only `query = {{analysis_rules = "
                              "true}`")
        return param.name, Constraint("rules")
    if keys == {"default"}:
        if raw["default"] is not True:
            raise ConfigError(f"{where}.default: only `default = true` (left out or default)")
        return param.name, Constraint("default")
    raise ConfigError(f"{where}: expected one of values, min/max, subset, default = true, "
                      "analysis_rules = true")


def _digests(param: Param, raw: Any, where: str) -> tuple[str, Constraint]:
    if param.type != "str":
        raise ConfigError(f"{where}: a digest binds a text parameter; {param.name!r} is "
                          f"{param.type}")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or len(items) > MAX_ITEMS or not all(
            isinstance(v, str) and _HEX64.match(v.lower()) for v in items):
        raise ConfigError(f"{where}: SHA-256 digests, 64 hexadecimal digits each")
    return param.name, Constraint("sha256", tuple(v.lower() for v in items))


def load_params(raw: Any, computations: tuple[str, ...], where: str
                ) -> tuple[tuple[str, Constraint], ...]:
    """A rule's `[approve.params]` table, checked against its computations' parameters."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table [approve.params]")
    known = _params_of(computations)
    out: dict[str, Constraint] = {}
    for key, value in raw.items():
        at = f"{where}.{key}"
        base = key.removesuffix("_sha256")
        if key.endswith("_sha256") and base in known:  # e.g. query_sha256, code_sha256
            name, constraint = _digests(known[base], value, at)
        else:
            name, constraint = _constraint(known.get(key), key, value, at)
        if name in out:
            raise ConfigError(f"{at}: parameter {name!r} is bound twice")
        out[name] = constraint
    return tuple(sorted(out.items()))


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
        names = _strings(r.get("compute"), f"{where}.compute", empty_ok=False)
        for name in names:
            try:
                compute.get(name)
            except TeeflowError:
                raise ConfigError(f"{where}.compute: unknown computation {name!r}") from None
        rules.append(ApprovalRule(
            names,
            _strings(r.get("datasets"), f"{where}.datasets", empty_ok=False),
            _receivers(r.get("receivers"), f"{where}.receivers"),
            _strings(r.get("code_digests", []), f"{where}.code_digests", empty_ok=True),
            load_params(r.get("params", {}), names, f"{where}.params"),
            _max_pool(r.get("max_pool", 1), f"{where}.max_pool")))
    return tuple(rules)


def _max_pool(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= wire.MAX_POOL:
        raise ConfigError(f"{where}: a whole number from 1 (one executor) to {wire.MAX_POOL}")
    return value


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
