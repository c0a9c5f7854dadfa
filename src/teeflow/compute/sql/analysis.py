"""Checking a query against its datasets' analysis rules (core/rules.py), on DuckDB's parse
tree, before any data moves; and the rewrite that counts distinct identities per output row.

An allow-list: every node class, expression type, function, operator and parse-tree field is
refused unless this module knows it and a rule grants it. A refusal names the rule (the kind
and its dataset) and the clause, never a data value (a query holds only the analyst's own
constants). Three ways a query can pass, tried in order:

- it is an approved analysis of *every* dataset of the task (its text's SHA-256 is in each
  one's `analyses`); a template's `$parameters` are bound from `query_args`, never spliced;
- it aggregates (GROUP BY or an aggregate function), and every dataset it reads has an
  aggregation rule granting each aggregate, join, dimension and scalar function it uses;
- it lists rows (no aggregate), reads two or more different datasets joined on their list
  rules' join columns, and selects and filters only list columns.

A task over a dataset with rules may read only datasets with rules. Aggregation queries are
rewritten to count distinct identities of each dataset per output row (after the joins and
filters, as DuckDB runs it); rows below a dataset's `min_identities` are dropped from the
result, and the counts are removed before it leaves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from teeflow.compute.sql import _RESERVED, MAX_QUERY
from teeflow.compute.sql import tree as parse_tree
from teeflow.core.errors import ParameterError
from teeflow.core.rules import SCALARS, DatasetRules, query_digest

_EXPR_FIELDS = {
    "COLUMN_REF": frozenset({"class", "type", "alias", "column_names"}),
    "CONSTANT": frozenset({"class", "type", "alias", "value"}),
    "FUNCTION": frozenset({"class", "type", "alias", "function_name", "children", "distinct",
                           "order_bys", "is_operator"}),
    "COMPARISON": frozenset({"class", "type", "alias", "left", "right"}),
    "CONJUNCTION": frozenset({"class", "type", "alias", "children"}),
    "OPERATOR": frozenset({"class", "type", "alias", "children"}),
    "BETWEEN": frozenset({"class", "type", "alias", "input", "lower", "upper"}),
}
_NODE_FIELDS = frozenset({
    "type", "modifiers", "cte_map", "select_list", "from_table", "where_clause",
    "group_expressions", "group_sets", "aggregate_handling", "having",
})
_COMPARISONS = frozenset({
    "COMPARE_EQUAL", "COMPARE_NOTEQUAL", "COMPARE_LESSTHAN", "COMPARE_GREATERTHAN",
    "COMPARE_LESSTHANOREQUALTO", "COMPARE_GREATERTHANOREQUALTO",
})
_DESCRIBED = {
    "CASE": "CASE expressions", "CAST": "casts (a failing cast reveals a value)",
    "WINDOW": "window functions", "SUBQUERY": "subqueries", "STAR": "* and COLUMNS()",
    "LAMBDA": "lambdas", "PARAMETER": "$parameters (only in an approved analysis template)",
    "COLLATE": "COLLATE", "CONJUNCTION": "AND/OR here", "COMPARISON": "comparisons here",
}
_DATE_PARTS = frozenset({"millennium", "century", "decade", "year", "quarter", "month", "week",
                         "day", "hour", "minute", "second"})
# Aggregate names in the parse tree -> the name a rule grants.
_AGG_NAMES = {"count": "count", "count_star": "count", "sum": "sum", "avg": "avg",
              "mean": "avg", "stddev": "stddev", "stddev_samp": "stddev",
              "variance": "variance", "var_samp": "variance"}


def _family(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_temporal(t):
        return "time"
    if pa.types.is_boolean(t):
        return "bool"
    return "other"


_CONSTANT_FAMILY = {"VARCHAR": "text", "BOOLEAN": "bool", "DATE": "time", "TIMESTAMP": "time"}


@dataclass
class _Binding:
    name: str  # as the query names it (alias or dataset), lower case
    dataset: str
    rules: DatasetRules
    columns: dict[str, str]  # lower-case column -> family
    types: dict[str, pa.DataType] = field(default_factory=dict)  # lower-case column -> type


@dataclass(frozen=True)
class RulesPlan:
    """What DuckDB runs for a query the rules grant, and how its output is cut."""

    sql: str
    mode: str  # "aggregation", "list" or "analysis"
    args: dict[str, Any] | None = None
    floors: tuple[tuple[str, int], ...] = ()  # (dataset, min_identities) per added column


class _Refuse:
    def __init__(self, rule: str | None) -> None:
        self.rule = rule

    def __call__(self, clause: str, reason: str, dataset: str | None = None) -> ParameterError:
        whose = f" ({self.rule} rule of dataset {dataset!r})" if dataset else (
            f" ({self.rule} rule)" if self.rule else "")
        return ParameterError(f"parameter 'query': analysis rules{whose}, in {clause}: "
                              f"{reason}")


@dataclass
class _Checker:
    mode: str  # "aggregation" | "list"
    bindings: dict[str, _Binding]
    refuse: _Refuse
    aliases: set[str] = field(default_factory=set)
    group_keys: list[Any] = field(default_factory=list)

    # -- columns -------------------------------------------------------------------------
    def resolve(self, expr: dict[str, Any], clause: str) -> tuple[_Binding, str]:
        names = [str(n).lower() for n in expr.get("column_names", [])]
        if len(names) == 2 and names[0] in self.bindings:
            b = self.bindings[names[0]]
            if names[1] in b.columns:
                return b, names[1]
            raise self.refuse(clause, f"dataset {b.dataset!r} has no column {names[1]!r}")
        if len(names) == 1:
            found = [b for b in self.bindings.values() if names[0] in b.columns]
            if len(found) == 1:
                return found[0], names[0]
            if found:
                raise self.refuse(clause, f"column {names[0]!r} is ambiguous; qualify it")
        raise self.refuse(clause, f"column {'.'.join(names)!r} is not a column of a dataset "
                                  "in FROM")

    def _rule(self, b: _Binding) -> Any:
        return b.rules.aggregation if self.mode == "aggregation" else b.rules.listing

    def column(self, expr: dict[str, Any], clause: str, kind: str) -> str:
        """A column used as a dimension (aggregation) or listed/filtered (list)."""
        b, col = self.resolve(expr, clause)
        rule = self._rule(b)
        allowed = rule.dimension_columns if kind == "dimension" else rule.list_columns
        if col not in allowed:
            what = "a dimension column" if kind == "dimension" else "a list column"
            raise self.refuse(clause, f"column {col!r} is not {what} (granted: "
                                      f"{', '.join(sorted(allowed)) or 'none'})", b.dataset)
        return b.columns[col]

    # -- expressions ---------------------------------------------------------------------
    def known(self, expr: dict[str, Any], clause: str) -> str:
        cls = str(expr.get("class"))
        if cls not in _EXPR_FIELDS:
            raise self.refuse(clause, f"{_DESCRIBED.get(cls, cls.lower() + ' expressions')} "
                                      "are not allowed")
        for key, value in expr.items():
            if key in _EXPR_FIELDS[cls] or key in parse_tree.LOCATION_KEYS:
                continue
            if value in (None, False, "", [], {}):
                continue
            raise self.refuse(clause, f"unsupported construct (parse tree field {key!r})")
        if cls == "FUNCTION":
            orders = expr.get("order_bys") or {}
            if orders.get("orders") or set(orders) - {"type", "orders"}:
                raise self.refuse(clause, "ORDER BY inside a function is not allowed")
        return cls

    def value(self, expr: dict[str, Any], clause: str, kind: str) -> str:
        """A per-row value (GROUP BY key, WHERE operand); returns its family."""
        cls = self.known(expr, clause)
        if cls == "COLUMN_REF":
            return self.column(expr, clause, kind)
        if cls == "CONSTANT":
            value = expr.get("value") or {}
            if value.get("is_null"):
                return "null"
            t = str((value.get("type") or {}).get("id", ""))
            return _CONSTANT_FAMILY.get(t, "number" if t else "other")
        if cls == "FUNCTION" and not expr.get("is_operator") and kind == "dimension":
            return self.scalar(expr, clause)
        what = expr.get("function_name") or cls.lower()
        raise self.refuse(clause, f"{what!r} is not allowed on a "
                                  f"{'dimension' if kind == 'dimension' else 'listed'} value "
                                  "(only columns, constants and granted scalar functions; no "
                                  "arithmetic, CASE, casts or comparisons)")

    def scalar(self, expr: dict[str, Any], clause: str) -> str:
        name = str(expr.get("function_name", "")).lower()
        if name in _AGG_NAMES or name not in SCALARS:
            raise self.refuse(clause, f"function {name}() is not allowed here")
        if expr.get("distinct"):
            raise self.refuse(clause, f"DISTINCT in {name}() is not allowed")
        args = expr.get("children", [])
        takes, gives = SCALARS[name]
        if name == "date_trunc":
            part = str((args[0].get("value") or {}).get("value", "")).lower() if args else ""
            if len(args) != 2 or args[0].get("class") != "CONSTANT" or part not in _DATE_PARTS:
                # an unknown part fails only when a row reaches it: checked here instead
                raise self.refuse(clause, "date_trunc() takes a constant part ("
                                          f"{', '.join(sorted(_DATE_PARTS))}) and a column")
            args = args[1:]
        elif name == "round" and len(args) == 2:
            if parse_tree.int_constant(args[1]) is None:
                raise self.refuse(clause, "round()'s precision must be an integer constant")
            args = args[:1]
        if len(args) != 1:
            raise self.refuse(clause, f"{name}() takes one argument here")
        if self.value(args[0], clause, "dimension") != takes:
            raise self.refuse(clause, f"{name}() takes a {takes} value (an implicit cast "
                                      "could fail on a value)")
        for b in self._touched(args[0]):
            if name not in b.rules.aggregation.scalar_functions:  # type: ignore[union-attr]
                raise self.refuse(clause, f"scalar function {name}() is not granted",
                                  b.dataset)
        return gives

    def _touched(self, expr: dict[str, Any]) -> list[_Binding]:
        if expr.get("class") == "COLUMN_REF":
            return [self.resolve(expr, "?")[0]]
        return [b for c in parse_tree.children(expr) for b in self._touched(c)]

    def condition(self, expr: dict[str, Any], clause: str, kind: str) -> None:
        """WHERE (and, in list queries, the same): a boolean over columns and constants."""
        cls = self.known(expr, clause)
        kind_of = str(expr.get("type"))
        if cls == "CONJUNCTION":
            for child in expr.get("children", []):
                self.condition(child, clause, kind)
            return
        if cls == "OPERATOR" and kind_of == "OPERATOR_NOT":
            for child in expr.get("children", []):
                self.condition(child, clause, kind)
            return
        if cls == "OPERATOR" and kind_of in ("OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL"):
            for child in expr.get("children", []):
                self.value(child, clause, kind)
            return
        if cls == "OPERATOR" and kind_of in ("COMPARE_IN", "COMPARE_NOT_IN"):
            first, *rest = expr.get("children", [])
            self.same_family([first, *rest], clause, kind, constants=rest)
            return
        if cls == "COMPARISON" and kind_of in _COMPARISONS:
            self.same_family([expr["left"], expr["right"]], clause, kind)
            return
        if cls == "BETWEEN":
            self.same_family([expr["input"], expr["lower"], expr["upper"]], clause, kind)
            return
        raise self.refuse(clause, f"{kind_of.lower()} is not an allowed condition (AND, OR, "
                                  "NOT, comparisons, IN, BETWEEN, IS NULL)")

    def same_family(self, exprs: list[dict[str, Any]], clause: str, kind: str,
                    constants: list[dict[str, Any]] | None = None) -> None:
        for c in constants or []:
            if c.get("class") != "CONSTANT":
                raise self.refuse(clause, "IN lists may hold only constants")
        families, texts = [], []
        for e in exprs:
            family = self.value(e, clause, kind)
            if family == "text" and e.get("class") == "CONSTANT":
                texts.append(e)  # DuckDB casts a text constant to the other side's type
            elif family != "null":
                families.append((family, e))
        if len({f for f, _ in families}) > 1 or not _castable(
                [self._type(e) for _, e in families]):
            raise self.refuse(clause, "compares values of different kinds (the implicit cast "
                                      "could fail on a value)")
        if texts and families and families[0][0] != "text":
            family, e = families[0]
            target = self._time_type(e) if family == "time" else None
            if target is None:
                raise self.refuse(clause, f"compares a {family} value with a text constant; "
                                          "use a constant of the same kind")
            for t in texts:
                if not _converts(str((t.get("value") or {}).get("value")), target):
                    raise self.refuse(clause, f"a text constant that is not a {target}")

    def _type(self, expr: dict[str, Any]) -> pa.DataType | None:
        """A column's type; None for any other expression."""
        if expr.get("class") != "COLUMN_REF":
            return None
        b, col = self.resolve(expr, "?")
        return b.types.get(col)

    def _time_type(self, expr: dict[str, Any]) -> str | None:
        """DATE or TIMESTAMP: what a text constant compared with `expr` is cast to."""
        if expr.get("class") == "COLUMN_REF":
            b, col = self.resolve(expr, "?")
            return "DATE" if pa.types.is_date(b.types[col]) else (
                "TIMESTAMP" if pa.types.is_timestamp(b.types[col]) else None)
        return "TIMESTAMP"

    def join(self, cond: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
        clause = "JOIN"
        cls = self.known(cond, clause)
        if cls == "CONJUNCTION" and cond.get("type") == "CONJUNCTION_AND":
            for child in cond.get("children", []):
                self.join(child, pairs)
            return
        if cls != "COMPARISON" or cond.get("type") != "COMPARE_EQUAL":
            raise self.refuse(clause, "a join condition is one or more column = column "
                                      "joined by AND")
        sides = []
        for e in (cond["left"], cond["right"]):
            if self.known(e, clause) != "COLUMN_REF":
                raise self.refuse(clause, "a join condition compares two columns")
            b, col = self.resolve(e, clause)
            rule = self._rule(b)
            if col not in rule.join_columns:
                raise self.refuse(clause, f"column {col!r} is not a join column (granted: "
                                          f"{', '.join(sorted(rule.join_columns)) or 'none'})",
                                  b.dataset)
            sides.append((b, col))
        (lb, lc), (rb, rc) = sides
        if lb.dataset == rb.dataset:
            raise self.refuse(clause, "a join condition must match two different datasets")
        if lb.columns[lc] != rb.columns[rc] or not _castable(
                [lb.types.get(lc), rb.types.get(rc)]):
            raise self.refuse(clause, "joins columns of different kinds (the implicit cast "
                                      "could fail on a value)")
        pairs.append((lb.name, rb.name))

    def aggregate(self, expr: dict[str, Any], clause: str) -> None:
        name = str(expr.get("function_name", "")).lower()
        granted = _AGG_NAMES.get(name)
        if granted is None:
            raise self.refuse(clause, f"aggregate {name}() is not grantable (it can return "
                                      "one row's value, or all of them)")
        if expr.get("distinct"):
            if granted != "count":
                raise self.refuse(clause, f"{name}(DISTINCT ...) is not allowed")
            granted = "count_distinct"
        args = expr.get("children", [])
        if name == "count_star":
            targets: list[tuple[_Binding, str]] = [(b, "*") for b in self.bindings.values()]
        elif len(args) == 1 and args[0].get("class") == "COLUMN_REF":
            self.known(args[0], clause)
            targets = [self.resolve(args[0], clause)]
        else:
            raise self.refuse(clause, f"the argument of {name}() must be one column (no "
                                      "arithmetic, CASE or casts inside an aggregate: they "
                                      "can single out rows)")
        for b, col in targets:
            t = b.types.get(col)
            if granted in ("sum", "avg") and t is not None and pa.types.is_decimal(t) \
                    and t.precision > 18:
                raise self.refuse(clause, f"{granted}() of a DECIMAL column wider than 18 "
                                          "digits can overflow, and the error would reveal "
                                          "a value", b.dataset)
            rule = b.rules.aggregation
            allowed = rule.aggregates.get(granted, frozenset()) if rule else frozenset()
            if col not in allowed:
                shown = "count(*)" if col == "*" else f"{granted}({col})"
                raise self.refuse(clause, f"{shown} is not granted (granted: "
                                          f"{_grants(rule.aggregates) if rule else 'none'})",
                                  b.dataset)

    def output(self, expr: dict[str, Any], clause: str) -> None:
        """SELECT, HAVING, ORDER BY of an aggregation: aggregates, GROUP BY keys, constants,
        and (in HAVING) comparisons and AND/OR/NOT of those."""
        if _shape(expr, self.bindings) in self.group_keys:
            return
        cls = self.known(expr, clause)
        names = expr.get("column_names", [])
        if cls == "COLUMN_REF" and len(names) == 1 and str(names[0]).lower() in self.aliases \
                and clause != "SELECT":
            return
        if cls == "CONSTANT":
            return
        if cls == "FUNCTION" and not expr.get("is_operator") \
                and str(expr.get("function_name", "")).lower() in _AGG_NAMES:
            self.aggregate(expr, clause)
            return
        if cls == "FUNCTION" and str(expr.get("function_name", "")).lower() in _all_aggregates():
            self.aggregate(expr, clause)
            return
        if clause == "HAVING" and (cls in ("COMPARISON", "CONJUNCTION") or (
                cls == "OPERATOR" and expr.get("type") == "OPERATOR_NOT")):
            for child in parse_tree.children(expr):
                self.output(child, clause)
            return
        if cls == "COLUMN_REF":
            b, col = self.resolve(expr, clause)
            raise self.refuse(clause, f"column {col!r} is neither aggregated nor a GROUP BY "
                                      "key", b.dataset)
        what = expr.get("function_name") or cls.lower()
        raise self.refuse(clause, f"{what!r} is not allowed: only granted aggregates and "
                                  "GROUP BY keys may be output")


def _castable(types: list[pa.DataType | None]) -> bool:
    """Whether DuckDB can compare columns of these types without a cast that may fail:
    the same type, or integers with integers, or floats with floats and integers. A
    DECIMAL compared with another type could overflow its precision."""
    known = [t for t in types if t is not None]
    if len({str(t) for t in known}) <= 1:
        return True
    return all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in known) or all(
        pa.types.is_string(t) or pa.types.is_large_string(t) for t in known) or all(
        pa.types.is_temporal(t) and not pa.types.is_time(t) and not pa.types.is_duration(t)
        for t in known)


def _converts(text: str, target: str) -> bool:
    """Whether a text constant casts to DATE or TIMESTAMP, checked now, with no data: the
    cast in the query can then not fail, whatever rows it meets."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        row = con.execute(f"SELECT TRY_CAST(?::VARCHAR AS {target}) IS NOT NULL",
                          [text]).fetchone()
    finally:
        con.close()
    return bool(row and row[0])


def _shape(expr: Any, bindings: dict[str, _Binding] | None = None) -> Any:
    """An expression for comparing GROUP BY keys: no positions or aliases, and each column
    as (binding, column) in lower case, however the query qualified or quoted it."""
    if isinstance(expr, dict):
        if expr.get("class") == "COLUMN_REF" and bindings is not None:
            names = [str(n).lower() for n in expr.get("column_names", [])]
            found = [b for b in bindings.values() if names and names[-1] in b.columns
                     and (len(names) == 1 or names[0] == b.name)]
            if len(names) <= 2 and len(found) == 1:
                names = [found[0].name, names[-1]]
            return {"class": "COLUMN_REF", "column_names": names}
        return {k: ([str(n).lower() for n in v] if k == "column_names" else
                    _shape(v, bindings))
                for k, v in expr.items() if k not in parse_tree.IGNORED_KEYS}
    if isinstance(expr, list):
        return [_shape(v, bindings) for v in expr]
    return expr


def _all_aggregates() -> frozenset[str]:
    return frozenset(n for n, kinds in parse_tree.function_kinds().items()
                     if "aggregate" in kinds)


def _grants(aggregates: dict[str, frozenset[str]]) -> str:
    return ", ".join(f"{f}({c})" for f, cols in sorted(aggregates.items())
                     for c in sorted(cols)) or "none"


def plan(query: str, rules: dict[str, DatasetRules | None], schemas: dict[str, pa.Schema],
         args: str | None = None) -> RulesPlan:
    """Check `query` against the rules of the task's datasets (`rules`: every dataset of the
    task, None for one without) and return what to run; raises ParameterError naming the
    rule and clause it breaks."""
    if len(query) > MAX_QUERY:
        raise ParameterError(f"parameter 'query': longer than {MAX_QUERY} characters")
    bare = [ds for ds, r in rules.items() if r is None]
    if bare:
        raise ParameterError(f"parameter 'query': analysis rules: dataset {bare[0]!r} has no "
                             "analysis rules, and this task reads datasets that have them; "
                             "such a query may read only datasets with rules")
    granted: dict[str, DatasetRules] = {ds: r for ds, r in rules.items() if r is not None}
    try:
        return _plan(query, granted, schemas, args)
    except RecursionError:
        raise ParameterError("parameter 'query': expressions nested too deeply") from None


def _plan(query: str, rules: dict[str, DatasetRules], schemas: dict[str, pa.Schema],
          args: str | None) -> RulesPlan:
    tree = parse_tree.parse(query)  # one SELECT statement, or refused
    digest = query_digest(query)
    approved = [r.analysis(digest) for r in rules.values()]
    if all(a is not None for a in approved):
        return RulesPlan(query, "analysis", _template_args(approved, args))
    if args is not None:
        raise ParameterError("parameter 'query_args': only for an approved analysis template "
                             "(this query's digest is not approved by every dataset)")
    if any(_RESERVED in s.lower() for s in parse_tree.strings(tree)):
        raise ParameterError(f"parameter 'query': names starting with {_RESERVED} are reserved")
    node = tree["statements"][0]["node"]
    general = _Refuse(None)
    if node.get("type") != "SELECT_NODE":
        raise general("the query", "UNION, INTERSECT and EXCEPT are not allowed")
    for key, value in node.items():
        if key not in _NODE_FIELDS and key not in parse_tree.LOCATION_KEYS \
                and value not in (None, False, "", [], {}):
            what = {"sample": "USING SAMPLE", "qualify": "QUALIFY"}.get(key, repr(key))
            raise general("the query", f"unsupported construct ({what})")
    if (node.get("cte_map") or {}).get("map"):
        raise general("WITH", "common table expressions are not allowed")
    _prescan(node, general)
    kinds = parse_tree.function_kinds()
    aggregated = bool(node.get("group_expressions")) or any(
        parse_tree.has_aggregate(e, kinds) for e in node.get("select_list", [])
    ) or node.get("having") is not None or node.get("aggregate_handling") == "FORCE_AGGREGATES"
    mode = "aggregation" if aggregated else "list"
    refuse = _Refuse(mode)
    bindings = _bindings(node.get("from_table") or {}, rules, schemas, refuse)
    if not bindings:
        raise refuse("FROM", "the query reads no dataset")
    for b in bindings.values():
        if (b.rules.aggregation if aggregated else b.rules.listing) is None:
            what = "aggregates" if aggregated else "lists rows"
            raise refuse("the query", f"the query {what}, and the dataset's rules grant no "
                                      f"{mode} rule (granted: "
                                      f"{', '.join(b.rules.kinds()) or 'none'})", b.dataset)
    datasets = [b.dataset for b in bindings.values()]
    if len(set(datasets)) != len(datasets):
        raise refuse("FROM", "a dataset appears twice (self-joins are not allowed)")
    checker = _Checker(mode, bindings, refuse)
    pairs: list[tuple[str, str]] = []
    _joins(node.get("from_table") or {}, checker, pairs)
    if node.get("where_clause") is not None:
        checker.condition(node["where_clause"], "WHERE", "dimension" if aggregated else "list")
    select = node.get("select_list", [])
    checker.aliases = {str(e["alias"]).lower() for e in select if e.get("alias")}
    _modifiers(node, checker, len(select))
    if aggregated:
        return _aggregation(node, tree, checker)
    _listing(node, checker, pairs)
    return RulesPlan(query, "list")


_CLAUSES = {"select_list": "SELECT", "where_clause": "WHERE", "group_expressions": "GROUP BY",
            "having": "HAVING", "modifiers": "ORDER BY / LIMIT", "from_table": "FROM"}
_NOWHERE = {"WINDOW": "window functions", "SUBQUERY": "subqueries", "LAMBDA": "lambdas",
            "PARAMETER": "$parameters (only in an approved analysis template)"}


def _prescan(node: dict[str, Any], refuse: _Refuse) -> None:
    """Constructs refused in every clause, named before the clause-by-clause checks."""
    def walk(value: Any, clause: str) -> None:
        if isinstance(value, dict):
            cls = value.get("class")
            if cls in _NOWHERE:
                raise refuse(clause, f"{_NOWHERE[str(cls)]} are not allowed")
            if value.get("type") == "SUBQUERY":
                raise refuse(clause, "subqueries are not allowed")
            for v in value.values():
                walk(v, clause)
        elif isinstance(value, list):
            for v in value:
                walk(v, clause)

    for key, clause in _CLAUSES.items():
        walk(node.get(key), clause)


def _template_args(approved: list[Any], args: str | None) -> dict[str, Any] | None:
    declared = approved[0].parameters
    if any(a.parameters != declared for a in approved):
        raise ParameterError("parameter 'query': the datasets approve this analysis with "
                             "different parameters")
    if not declared:
        if args is not None:
            raise ParameterError("parameter 'query_args': this approved analysis takes none")
        return None
    try:
        given = json.loads(args or "")
    except ValueError:
        raise ParameterError("parameter 'query_args': a JSON object of the template's "
                             f"parameters ({', '.join(sorted(declared))})") from None
    if not isinstance(given, dict) or set(given) != set(declared):
        raise ParameterError("parameter 'query_args': must give exactly the parameters "
                             f"{', '.join(sorted(declared))}")
    for name, kind in declared.items():
        v = given[name]
        ok = {"str": isinstance(v, str), "int": type(v) is int,
              "float": type(v) in (int, float)}[kind]
        if not ok:
            raise ParameterError(f"parameter 'query_args': {name} must be a {kind}")
    return given


def _bindings(ref: dict[str, Any], rules: dict[str, DatasetRules],
              schemas: dict[str, pa.Schema], refuse: _Refuse) -> dict[str, _Binding]:
    kind = ref.get("type")
    if kind == "EMPTY":
        return {}
    if ref.get("sample") is not None:
        raise refuse("FROM", "TABLESAMPLE is not allowed")
    if kind == "JOIN":
        left = _bindings(ref["left"], rules, schemas, refuse)
        right = _bindings(ref["right"], rules, schemas, refuse)
        for name in left:
            if name in right:
                raise refuse("FROM", f"{name!r} is named twice")
        return {**left, **right}
    if kind != "BASE_TABLE":
        described = {"SUBQUERY": "subqueries", "TABLE_FUNCTION": "table functions",
                     "EXPRESSION_LIST": "VALUES lists", "PIVOT": "PIVOT"}.get(str(kind),
                                                                           str(kind).lower())
        raise refuse("FROM", f"{described} are not allowed; name the datasets")
    for key, value in ref.items():
        if key not in ("type", "alias", "table_name") and key not in parse_tree.LOCATION_KEYS \
                and value not in (None, False, "", [], {}):
            raise refuse("FROM", f"unsupported table reference (parse tree field {key!r})")
    table = str(ref.get("table_name", "")).lower()
    by_lower = {ds.lower(): ds for ds in rules}
    if table not in by_lower:
        raise refuse("FROM", f"{table!r} is not a dataset of this task")
    ds = by_lower[table]
    name = str(ref.get("alias") or table).lower()
    columns = {f.name.lower(): _family(f.type) for f in schemas[ds]}
    types = {f.name.lower(): f.type for f in schemas[ds]}
    return {name: _Binding(name, ds, rules[ds], columns, types)}


def _joins(ref: dict[str, Any], checker: _Checker, pairs: list[tuple[str, str]]) -> None:
    if ref.get("type") != "JOIN":
        return
    if ref.get("join_type") != "INNER" or ref.get("ref_type") != "REGULAR":
        raise checker.refuse("JOIN", f"{ref.get('ref_type')} {ref.get('join_type')} joins are "
                                     "not allowed (only INNER JOIN ... ON column = column)")
    for key, value in ref.items():
        if key not in ("type", "alias", "left", "right", "condition", "join_type", "ref_type") \
                and key not in parse_tree.LOCATION_KEYS \
                and value not in (None, False, "", [], {}):
            raise checker.refuse("JOIN", f"unsupported join (parse tree field {key!r})")
    if ref.get("condition") is None:
        raise checker.refuse("JOIN", "a join needs an ON condition over join columns")
    _joins(ref["left"], checker, pairs)
    _joins(ref["right"], checker, pairs)
    checker.join(ref["condition"], pairs)


def _modifiers(node: dict[str, Any], checker: _Checker, width: int) -> None:
    for modifier in node.get("modifiers", []):
        kind = modifier.get("type")
        if kind == "LIMIT_MODIFIER":
            for part in ("limit", "offset"):
                value = modifier.get(part)
                if value is not None and parse_tree.int_constant(value) is None:
                    raise checker.refuse(part.upper(), "must be an integer constant")
        elif kind == "DISTINCT_MODIFIER":
            if checker.mode != "list" or modifier.get("distinct_on_targets"):
                raise checker.refuse("SELECT", "DISTINCT is allowed only in a list query "
                                               "(use GROUP BY)")
        elif kind != "ORDER_MODIFIER":
            raise checker.refuse("the query", f"{str(kind).lower()} is not allowed")
        for key in modifier:
            if key not in ("type", "orders", "limit", "offset", "distinct_on_targets"):
                raise checker.refuse("the query", f"unsupported construct ({key!r})")


def _orders(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [o.get("expression", {}) for m in node.get("modifiers", [])
            for o in m.get("orders", [])]


def _aggregation(node: dict[str, Any], tree: dict[str, Any], checker: _Checker) -> RulesPlan:
    refuse = checker.refuse
    if node.get("aggregate_handling") == "FORCE_AGGREGATES":
        raise refuse("GROUP BY", "GROUP BY ALL is not allowed; name the keys")
    if len(node.get("group_sets") or []) > 1:
        raise refuse("GROUP BY", "ROLLUP, CUBE and GROUPING SETS are not allowed")
    select = node.get("select_list", [])
    keys = []
    for expr in node.get("group_expressions", []):
        position = parse_tree.int_constant(expr)
        if position is not None:
            if not 1 <= position <= len(select):
                raise refuse("GROUP BY", f"position {position} is not in the select list")
            expr = select[position - 1]
        elif expr.get("class") == "COLUMN_REF" and len(expr.get("column_names", [])) == 1:
            alias = str(expr["column_names"][0]).lower()
            if alias in checker.aliases and not any(
                    alias in b.columns for b in checker.bindings.values()):
                expr = next(e for e in select if str(e.get("alias", "")).lower() == alias)
        checker.value(expr, "GROUP BY", "dimension")
        keys.append(expr)
    checker.group_keys = [_shape(k, checker.bindings) for k in keys]
    for expr in select:
        checker.output(expr, "SELECT")
    if node.get("having") is not None:
        checker.output(node["having"], "HAVING")
    for expr in _orders(node):
        if parse_tree.int_constant(expr) is not None:
            continue
        checker.output(expr, "ORDER BY")
    floors = []
    counts = []
    for b in checker.bindings.values():
        rule = b.rules.aggregation
        assert rule is not None
        if rule.identity not in b.columns:
            raise refuse("the query", f"the identity column {rule.identity!r} is not in the "
                                      "dataset's schema", b.dataset)
        counts.append(f'count(DISTINCT {_quote(b.name)}.{_quote(rule.identity)})')
        floors.append((b.dataset, rule.min_identities))
    return RulesPlan(_with_counts(tree, counts), "aggregation", floors=tuple(floors))


def _listing(node: dict[str, Any], checker: _Checker, pairs: list[tuple[str, str]]) -> None:
    refuse = checker.refuse
    datasets = {b.dataset for b in checker.bindings.values()}
    if len(datasets) < 2:
        raise refuse("FROM", "a list query lists rows that match across datasets: join two "
                             "or more datasets on their join columns")
    joined = {n for pair in pairs for n in pair}
    for name, b in checker.bindings.items():
        if name not in joined:
            raise refuse("JOIN", "every dataset must be joined on its join columns", b.dataset)
    for expr in node.get("select_list", []):
        checker.value(expr, "SELECT", "list")
        if expr.get("class") != "COLUMN_REF":
            raise refuse("SELECT", "a list query selects columns only")
    for expr in _orders(node):
        if parse_tree.int_constant(expr) is not None:
            continue
        names = expr.get("column_names", [])
        if expr.get("class") == "COLUMN_REF" and len(names) == 1 \
                and str(names[0]).lower() in checker.aliases:
            continue
        checker.value(expr, "ORDER BY", "list")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_counts(tree: dict[str, Any], counts: list[str]) -> str:
    """The checked tree with the identity counts appended to its select list, as SQL."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        raw = con.execute("SELECT json_serialize_sql(?::VARCHAR)",
                          [f"SELECT {', '.join(counts)}"]).fetchone()
        added = json.loads(raw[0])["statements"][0]["node"]["select_list"] if raw else []
        for i, expr in enumerate(added):
            expr["alias"] = f"{_RESERVED}_ids_{i}"
        out = json.loads(json.dumps(tree))
        out["statements"][0]["node"]["select_list"].extend(added)
        sql = con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(out)]).fetchone()
    finally:
        con.close()
    if not sql or len(added) != len(counts):  # pragma: no cover - DuckDB format change
        raise ParameterError("parameter 'query': could not be rewritten")
    return str(sql[0])
