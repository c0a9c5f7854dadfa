"""A dataset's analysis rules: what a query over it may compute, as its owner declares them.

Pure: values in, a checked `DatasetRules` (or ConfigError naming the bad field) out. The
owner writes them as `[datasets.rules]` in its provider config; the provider publishes their
canonical form (`to_dict`) with the dataset's catalog entry, the signed spec carries their
digest (`DatasetRef.rules`), and the executor enforces the rules whose digest it was given
(compute/sql/analysis.py). Three kinds, any of them per dataset:

- `aggregation`: which aggregate functions may take which columns, the columns that may be
  joined on, the dimension columns (GROUP BY, WHERE, and the select list as group keys), the
  scalar functions allowed on dimensions, and an identity column with the fewest distinct
  identities an output row must count (checked on the output, after joins and filters);
- `list`: the columns that may be listed for rows that match another dataset on the join
  columns (overlap analysis);
- `analyses`: query texts (or templates with typed `$parameters`) approved by SHA-256.

Never holds a data value: only column names, function names, numbers and digests.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from teeflow.core.errors import ConfigError
from teeflow.core.wire import canonical

MAX_COLUMNS = 256
MAX_ANALYSES = 64
MAX_NAME = 128
MAX_TEMPLATE = 64 * 1024
MAX_MIN_IDENTITIES = 1_000_000_000

# Aggregates a rule may grant: each summarises many rows. `count_distinct` is
# count(DISTINCT col). min, max, median, quantiles, mode, first, list, string_agg, arg_max
# and the like are not grantable: each returns one row's value.
AGGREGATES = frozenset({"count", "count_distinct", "sum", "avg", "stddev", "variance"})
# Scalar functions a rule may grant on dimension columns, with the kind of argument each
# takes and the kind it returns. None of them can fail on a value of the right kind, so a
# query cannot learn a bit from an error (no casts, no arithmetic: those overflow or fail).
SCALARS: dict[str, tuple[str, str]] = {
    "lower": ("text", "text"), "upper": ("text", "text"), "trim": ("text", "text"),
    "length": ("text", "number"),
    "year": ("time", "number"), "month": ("time", "number"),
    "date_trunc": ("time", "time"),
    "floor": ("number", "number"), "ceil": ("number", "number"),
    "round": ("number", "number"),
}
PARAMETER_TYPES = frozenset({"str", "int", "float"})
COMPUTATIONS_DEFAULT = ("sql",)

RULES_FIELDS = ("computations", "aggregation", "list", "analyses")
AGGREGATION_FIELDS = ("aggregates", "join_columns", "dimension_columns", "scalar_functions",
                      "identity", "min_identities")
LIST_FIELDS = ("list_columns", "join_columns")
ANALYSIS_FIELDS = ("name", "sha256", "query", "parameters")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class AggregationRule:
    aggregates: dict[str, frozenset[str]]  # function -> columns ("*" for count(*))
    join_columns: frozenset[str]
    dimension_columns: frozenset[str]
    scalar_functions: frozenset[str]
    identity: str
    min_identities: int

    def to_dict(self) -> dict[str, Any]:
        return {"aggregates": {f: sorted(c) for f, c in sorted(self.aggregates.items())},
                "join_columns": sorted(self.join_columns),
                "dimension_columns": sorted(self.dimension_columns),
                "scalar_functions": sorted(self.scalar_functions),
                "identity": self.identity, "min_identities": self.min_identities}


@dataclass(frozen=True)
class ListRule:
    list_columns: frozenset[str]
    join_columns: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        return {"list_columns": sorted(self.list_columns),
                "join_columns": sorted(self.join_columns)}


@dataclass(frozen=True)
class Analysis:
    name: str
    sha256: str  # query_digest of the query text
    query: str | None = None  # published so initiators can use it
    parameters: dict[str, str] = field(default_factory=dict)  # $name -> str | int | float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256,
                               "parameters": dict(sorted(self.parameters.items()))}
        if self.query is not None:
            out["query"] = self.query
        return out


@dataclass(frozen=True)
class DatasetRules:
    computations: tuple[str, ...] = COMPUTATIONS_DEFAULT
    aggregation: AggregationRule | None = None
    listing: ListRule | None = None  # the `list` rule
    analyses: tuple[Analysis, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"computations": sorted(self.computations),
                               "analyses": [a.to_dict() for a in self.analyses]}
        if self.aggregation is not None:
            out["aggregation"] = self.aggregation.to_dict()
        if self.listing is not None:
            out["list"] = self.listing.to_dict()
        return out

    def digest(self) -> str:
        """What the signed spec carries: SHA-256 of the canonical (RFC 8785) form."""
        return hashlib.sha256(canonical(self.to_dict())).hexdigest()

    def kinds(self) -> list[str]:
        return (["aggregation"] * (self.aggregation is not None)
                + ["list"] * (self.listing is not None)
                + (["analyses"] if self.analyses else []))

    def analysis(self, sha256: str) -> Analysis | None:
        return next((a for a in self.analyses if a.sha256 == sha256), None)


def check_columns(rules: DatasetRules, columns: list[str], where: str) -> None:
    """ConfigError naming the first column a rule names that the dataset lacks."""
    have = {c.lower() for c in columns}
    named: list[tuple[str, frozenset[str] | set[str]]] = []
    if rules.aggregation is not None:
        a = rules.aggregation
        named += [(f"aggregation.aggregates.{f}", cols - {"*"})
                  for f, cols in sorted(a.aggregates.items())]
        named += [("aggregation.join_columns", a.join_columns),
                  ("aggregation.dimension_columns", a.dimension_columns),
                  ("aggregation.identity", {a.identity})]
    if rules.listing is not None:
        named += [("list.list_columns", rules.listing.list_columns),
                  ("list.join_columns", rules.listing.join_columns)]
    for field_name, cols in named:
        for col in sorted(cols):
            if col not in have:
                raise ConfigError(f"{where}.{field_name}: the dataset has no column {col!r}")


def query_digest(query: str) -> str:
    """What an approved analysis is named by: SHA-256 of its text, UTF-8, without leading
    or trailing white space (a task's `query` parameter is stripped the same way)."""
    return hashlib.sha256(query.strip().encode()).hexdigest()


# -- loading -----------------------------------------------------------------------------------
def _table(raw: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown field")
    return raw


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME \
            or not value.isprintable():
        raise ConfigError(f"{where}: a name of 1 to {MAX_NAME} printable characters")
    return value


def _names(raw: Any, where: str, allowed: frozenset[str] | None = None,
           star: bool = False) -> frozenset[str]:
    if not isinstance(raw, list) or len(raw) > MAX_COLUMNS:
        raise ConfigError(f"{where}: expected a list of at most {MAX_COLUMNS} names")
    out = set()
    for i, item in enumerate(raw):
        name = _name(item, f"{where}[{i}]")
        if allowed is not None and name.lower() not in allowed:
            raise ConfigError(f"{where}[{i}]: {name!r} is not one of "
                              f"{', '.join(sorted(allowed))}")
        if name == "*" and not star:
            raise ConfigError(f"{where}[{i}]: '*' is only for count")
        out.add(name.lower())
    return frozenset(out)


def _aggregation(raw: Any, where: str) -> AggregationRule:
    t = _table(raw, AGGREGATION_FIELDS, where)
    aggs = t.get("aggregates")
    if not isinstance(aggs, dict) or not aggs:
        raise ConfigError(f"{where}.aggregates: required, a table of function = [columns], "
                          f"functions among {', '.join(sorted(AGGREGATES))}")
    granted: dict[str, frozenset[str]] = {}
    for fn, cols in aggs.items():
        if fn.lower() not in AGGREGATES:
            raise ConfigError(f"{where}.aggregates.{fn}: not an aggregate a rule can grant "
                              f"(grantable: {', '.join(sorted(AGGREGATES))}; min, max, "
                              "first, list, string_agg and the like return one row's value)")
        granted[fn.lower()] = _names(cols, f"{where}.aggregates.{fn}", star=fn == "count")
    identity = _name(t.get("identity"), f"{where}.identity").lower()
    k = t.get("min_identities")
    if type(k) is not int or not 1 <= k <= MAX_MIN_IDENTITIES:
        raise ConfigError(f"{where}.min_identities: required, an integer from 1 to "
                          f"{MAX_MIN_IDENTITIES}")
    return AggregationRule(
        aggregates=granted,
        join_columns=_names(t.get("join_columns", []), f"{where}.join_columns"),
        dimension_columns=_names(t.get("dimension_columns", []), f"{where}.dimension_columns"),
        scalar_functions=_names(t.get("scalar_functions", []), f"{where}.scalar_functions",
                                allowed=frozenset(SCALARS)),
        identity=identity, min_identities=k)


def _list(raw: Any, where: str) -> ListRule:
    t = _table(raw, LIST_FIELDS, where)
    join = _names(t.get("join_columns", []), f"{where}.join_columns")
    if not join:
        raise ConfigError(f"{where}.join_columns: required, the columns rows match on")
    cols = _names(t.get("list_columns", []), f"{where}.list_columns")
    if not cols:
        raise ConfigError(f"{where}.list_columns: required, the columns that may be listed")
    return ListRule(list_columns=cols, join_columns=join)


def _analysis(raw: Any, where: str) -> Analysis:
    t = _table(raw, ANALYSIS_FIELDS, where)
    name = _name(t.get("name"), f"{where}.name")
    query, digest = t.get("query"), t.get("sha256")
    if query is not None and (not isinstance(query, str) or not query
                              or len(query) > MAX_TEMPLATE):
        raise ConfigError(f"{where}.query: the query text, 1 to {MAX_TEMPLATE} characters")
    if digest is None and query is None:
        raise ConfigError(f"{where}: give sha256 (of the query text) or query")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.match(digest)):
        raise ConfigError(f"{where}.sha256: 64 lower-case hex digits")
    if query is not None and digest is not None and query_digest(query) != digest:
        raise ConfigError(f"{where}.sha256: not the digest of {where}.query")
    params = t.get("parameters", {})
    if not isinstance(params, dict) or len(params) > MAX_COLUMNS:
        raise ConfigError(f"{where}.parameters: a table of name = \"str\" | \"int\" | "
                          "\"float\"")
    for p, kind in params.items():
        if not _PARAM_NAME.match(p):
            raise ConfigError(f"{where}.parameters.{p}: a lower-case identifier")
        if kind not in PARAMETER_TYPES:
            raise ConfigError(f"{where}.parameters.{p}: one of str, int, float")
    return Analysis(name, digest or query_digest(str(query)), query, dict(params))


def load_rules(raw: Any, where: str = "rules") -> DatasetRules:
    """Check one `[datasets.rules]` table (or its published `to_dict` form)."""
    t = _table(raw, RULES_FIELDS, where)
    comps = t.get("computations", list(COMPUTATIONS_DEFAULT))
    if not isinstance(comps, list) or not comps or not all(
            isinstance(c, str) and c for c in comps) or len(comps) > MAX_COLUMNS:
        raise ConfigError(f"{where}.computations: a non-empty list of computation names")
    analyses_raw = t.get("analyses", [])
    if not isinstance(analyses_raw, list) or len(analyses_raw) > MAX_ANALYSES:
        raise ConfigError(f"{where}.analyses: a list of at most {MAX_ANALYSES} tables")
    analyses = tuple(_analysis(a, f"{where}.analyses[{i}]") for i, a in enumerate(analyses_raw))
    if len({a.name for a in analyses}) != len(analyses):
        raise ConfigError(f"{where}.analyses: a name appears twice")
    rules = DatasetRules(
        computations=tuple(sorted(set(comps))),
        aggregation=_aggregation(t["aggregation"], f"{where}.aggregation")
        if "aggregation" in t else None,
        listing=_list(t["list"], f"{where}.list") if "list" in t else None,
        analyses=analyses)
    if "sql" in rules.computations and not rules.kinds():
        raise ConfigError(f"{where}: grants sql but no aggregation, list or analyses rule")
    return rules


def given_rules(spec: Any, given: Any) -> dict[str, DatasetRules]:
    """The rules of each dataset of `spec` (a wire.TaskSpec) whose entry carries a rules
    digest, from `given` ({dataset: published rules}), each checked against that digest.
    Refuses rules for a dataset whose entry carries none, and a digest without its rules:
    the executor enforces exactly what each owner signed."""
    from teeflow.core.errors import AuthError, InputError

    if not isinstance(given, dict) or len(given) > len(spec.datasets):
        raise InputError("analysis rules: expected one object per dataset that has rules")
    out: dict[str, DatasetRules] = {}
    names = {d.name for d in spec.datasets}
    for name in given:
        if name not in names:
            raise InputError(f"analysis rules given for {name!r}, not a dataset of the task")
    for ref in spec.datasets:
        raw = given.get(ref.name)
        if ref.rules is None:
            if raw is not None:
                raise AuthError(f"dataset {ref.name!r}: analysis rules given, but its owner "
                                "signed a spec without any")
            continue
        if raw is None:
            raise AuthError(f"dataset {ref.name!r}: its owner signed analysis rules "
                            f"{ref.rules[:16]}, none were given")
        try:
            rules = load_rules(raw, f"dataset {ref.name!r}: rules")
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        if rules.digest() != ref.rules:
            raise AuthError(f"dataset {ref.name!r}: the analysis rules given are not the ones "
                            f"its owner signed ({ref.rules[:16]})")
        out[ref.name] = rules
    return out
