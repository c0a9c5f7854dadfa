"""The SQL output policy: an allow-list over DuckDB's parse tree (see the package docstring).

A query is checked, never its text: anything these checks do not know is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import duckdb

from teeflow.compute.sql import _RESERVED, MAX_QUERY
from teeflow.core.errors import ParameterError

_PARAM = "parameter 'query': sql policy"

# Aggregates that summarise many rows; anything else that DuckDB knows as an aggregate
# (min, max, median, quantile, mode, first, arg_max, list, string_agg, histogram, ...) returns
# one row's value or all of them, and is refused.
ALLOWED_AGGREGATES = frozenset({
    "count", "count_star", "sum", "fsum", "sumkahan", "kahan_sum", "avg", "mean", "favg",
    "stddev", "stddev_samp", "stddev_pop", "variance", "var_samp", "var_pop", "sem",
    "skewness", "kurtosis", "kurtosis_pop", "corr", "covar_pop", "covar_samp",
    "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope",
    "regr_sxx", "regr_sxy", "regr_syy", "approx_count_distinct",
})
# Built-in macros that are plain scalar arithmetic; every other macro is refused (some hide
# aggregates or subqueries).
_ALLOWED_MACROS = frozenset({
    "nullif", "fdiv", "fmod", "date_add", "round_even", "roundbankers", "split_part",
})
_DENIED_FUNCTIONS = frozenset({"error", "sleep_ms"})
# The arithmetic allowed inside an aggregate's arguments ("/" only by a non-zero constant).
_AGG_OPERATORS = frozenset({"+", "-", "*"})
_NUMERIC_TYPES = frozenset({
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
    "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL",
})
_EXPRESSION_CLASSES = frozenset({
    "COLUMN_REF", "CONSTANT", "FUNCTION", "CAST", "COMPARISON", "CONJUNCTION", "OPERATOR",
    "CASE", "BETWEEN", "COLLATE",
})
_JOIN_TYPES = frozenset({"INNER", "LEFT", "RIGHT", "OUTER", "FULL"})
_JOIN_REFS = frozenset({"REGULAR", "CROSS", "NATURAL"})
_LOCATION_KEYS = frozenset({"query_location", "query_location_length"})
_IGNORED_KEYS = _LOCATION_KEYS | {"alias"}
# The fields of DuckDB's parse tree (as of DuckDB 1.5) that the checks below understand. A
# field not listed here, with a value other than empty or false, is refused: a newer DuckDB
# with a new clause fails closed instead of slipping it past the policy.
_NODE_FIELDS = frozenset({
    "type", "modifiers", "cte_map", "select_list", "from_table", "where_clause",
    "group_expressions", "group_sets", "aggregate_handling", "having", "sample", "qualify",
})
_REF_FIELDS = {
    "BASE_TABLE": frozenset({
        "type", "alias", "sample", "schema_name", "table_name", "column_name_alias",
        "catalog_name", "at_clause",
    }),
    "JOIN": frozenset({
        "type", "alias", "sample", "left", "right", "condition", "join_type", "ref_type",
        "using_columns", "delim_flipped", "duplicate_eliminated_columns",
    }),
    "EMPTY": frozenset({"type", "alias", "sample"}),
}
_MODIFIER_FIELDS = {
    "ORDER_MODIFIER": frozenset({"type", "orders"}),
    "LIMIT_MODIFIER": frozenset({"type", "limit", "offset"}),
    "DISTINCT_MODIFIER": frozenset({"type", "distinct_on_targets"}),
}


def _refuse(message: str) -> ParameterError:
    return ParameterError(f"{_PARAM}: {message}")


# --- the parse tree -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _function_kinds() -> dict[str, frozenset[str]]:
    """DuckDB's built-in function names and their kinds (scalar, aggregate, macro, ...)."""
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(
            "SELECT lower(function_name), list(DISTINCT function_type) "
            "FROM duckdb_functions() GROUP BY 1"
        ).fetchall()
    finally:
        con.close()
    return {name: frozenset(kinds) for name, kinds in rows}


def _parse(query: str) -> dict[str, Any]:
    """The SELECT node of a one-statement query, as DuckDB's JSON parse tree."""
    con = duckdb.connect(":memory:")
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as exc:
            raise ParameterError(f"parameter 'query': does not parse: {exc}") from None
        if len(statements) != 1:
            raise _refuse(f"exactly one statement is allowed, got {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            kind = statements[0].type.name
            raise _refuse(f"only a SELECT statement is allowed, got {kind}")
        raw = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchone()
    finally:
        con.close()
    tree: dict[str, Any] = json.loads(raw[0]) if raw else {"error": True}
    if tree.get("error"):
        detail = tree.get("error_message", "not serializable")
        raise _refuse(f"only a plain SELECT statement is allowed ({detail})")
    if len(tree.get("statements", [])) != 1:
        raise _refuse("exactly one statement is allowed")
    return tree


def _strings(node: Any) -> Any:
    """Every string in a JSON tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _children(expr: dict[str, Any]) -> list[dict[str, Any]]:
    """The direct sub-expressions of an expression node (those nested in plain dicts and
    lists, such as CASE branches, included)."""
    out: list[dict[str, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if "class" in value:
                out.append(value)
            else:
                for v in value.values():
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for key, value in expr.items():
        if not (key == "value" and expr.get("class") == "CONSTANT"):  # a value, not an expression
            walk(value)
    return out


def _shape(expr: Any) -> Any:
    """An expression with positions and aliases removed, for comparing two expressions."""
    if isinstance(expr, dict):
        return {k: _shape(v) for k, v in expr.items() if k not in _IGNORED_KEYS}
    if isinstance(expr, list):
        return [_shape(v) for v in expr]
    return expr


def _known_fields(obj: dict[str, Any], known: frozenset[str], what: str) -> None:
    for key, value in obj.items():
        if key in known or key in _LOCATION_KEYS or value in (None, False, "", [], {}):
            continue
        raise _refuse(f"{what}: unsupported construct (parse tree field {key!r})")


def _int_constant(expr: dict[str, Any]) -> int | None:
    """The value of an integer literal expression, else None."""
    if expr.get("class") != "CONSTANT":
        return None
    value = expr.get("value")
    if isinstance(value, dict):
        number = value.get("value")
        if not value.get("is_null") and isinstance(number, int) and not isinstance(number, bool):
            return number
        return None
    literal = expr.get("literal")  # the form of newer DuckDB versions
    if isinstance(literal, dict) and literal.get("kind") == "INTEGER":
        try:
            return int(str(literal.get("text")))
        except ValueError:
            return None
    return None


def _column_name(expr: dict[str, Any]) -> str:
    return str(expr.get("column_names", ["?"])[-1]).lower()


def _is_nonzero_constant(expr: dict[str, Any]) -> bool:
    if expr.get("class") != "CONSTANT":
        return False
    value = expr.get("value")
    if isinstance(value, dict):
        number = value.get("value")
        return not value.get("is_null") and isinstance(number, int | float) and number != 0
    literal = expr.get("literal")
    if isinstance(literal, dict) and literal.get("kind") in ("INTEGER", "DECIMAL", "DOUBLE"):
        try:
            return float(str(literal.get("text"))) != 0
        except ValueError:
            return False
    return False


def _has_aggregate(expr: dict[str, Any], kinds: dict[str, frozenset[str]]) -> bool:
    if expr.get("class") == "FUNCTION":
        if "aggregate" in kinds.get(str(expr.get("function_name", "")).lower(), ()):
            return True
    return any(_has_aggregate(child, kinds) for child in _children(expr))


@dataclass
class _Checker:
    """Walks a SELECT node's expressions, raising ParameterError at the first rule broken."""

    kinds: dict[str, frozenset[str]]
    group_keys: list[Any]
    group_columns: set[str]
    aliases: set[str]
    aggregates: int = 0

    def _function(self, expr: dict[str, Any]) -> tuple[str, bool]:
        """(lower-case name, is an aggregate) of a FUNCTION node allowed at all."""
        name = str(expr.get("function_name", "")).lower()
        if expr.get("schema") or expr.get("catalog"):
            raise _refuse(f"function {name!r}: a qualified function name is not allowed")
        kinds = self.kinds.get(name, frozenset())
        if "aggregate" in kinds:
            if name not in ALLOWED_AGGREGATES:
                raise _refuse(
                    f"aggregate {name}() is not allowed: it can return single rows' values "
                    f"(allowed: {', '.join(sorted(ALLOWED_AGGREGATES))})"
                )
            return name, True
        if name in _DENIED_FUNCTIONS:
            raise _refuse(f"function {name}() is not allowed")
        if "scalar" in kinds or ("macro" in kinds and name in _ALLOWED_MACROS):
            return name, False
        raise _refuse(f"function {name}() is not allowed")

    def _common(self, expr: dict[str, Any]) -> None:
        cls = expr.get("class")
        if cls == "WINDOW":
            raise _refuse("window functions are not allowed")
        if cls == "SUBQUERY":
            raise _refuse("subqueries are not allowed")
        if cls == "STAR":
            raise _refuse("* and COLUMNS() are not allowed (name the columns)")
        if cls not in _EXPRESSION_CLASSES:
            raise _refuse(f"{str(cls).lower()} expressions are not allowed")
        if cls == "CAST" and expr.get("try_cast"):
            raise _refuse("TRY_CAST is not allowed")

    def row(self, expr: dict[str, Any], where: str) -> None:
        """WHERE, JOIN conditions, GROUP BY keys: per-row expressions, no aggregates."""
        self._common(expr)
        if expr["class"] == "FUNCTION":
            name, aggregate = self._function(expr)
            if aggregate:
                raise _refuse(f"aggregate {name}() is not allowed in {where}")
        for child in _children(expr):
            self.row(child, where)

    def argument(self, expr: dict[str, Any], aggregate: str) -> None:
        """An aggregate's argument: columns and constants, + - *, / by a constant, casts."""
        cls = expr.get("class")
        if cls in ("COLUMN_REF", "CONSTANT"):
            return
        if cls == "CAST" and not expr.get("try_cast"):
            target = str(expr.get("cast_type", {}).get("id", "")).upper()
            if target not in _NUMERIC_TYPES:
                raise _refuse(
                    f"the argument of {aggregate}() may only be cast to a number type, not "
                    f"{target or 'this type'}"
                )
            for child in _children(expr):
                self.argument(child, aggregate)
            return
        if cls == "FUNCTION" and expr.get("is_operator"):
            name = expr.get("function_name")
            children = expr.get("children", [])
            if name in _AGG_OPERATORS or (
                name == "/" and len(children) == 2 and _is_nonzero_constant(children[1])
            ):
                for child in children:
                    self.argument(child, aggregate)
                return
        what = expr.get("function_name") or str(cls).lower()
        raise _refuse(
            f"the argument of {aggregate}() may only combine columns and constants with "
            f"+, -, *, division by a non-zero constant and casts; {what!r} is not allowed "
            "(group by a condition instead of filtering inside an aggregate)"
        )

    def output(self, expr: dict[str, Any], where: str) -> None:
        """SELECT list, HAVING, ORDER BY: aggregates, GROUP BY keys, and scalars of them."""
        if _shape(expr) in self.group_keys:
            return
        self._common(expr)
        cls = expr["class"]
        if cls == "COLUMN_REF":
            name = _column_name(expr)
            if name in self.group_columns or (
                len(expr.get("column_names", [])) == 1 and name in self.aliases
            ):
                return
            raise _refuse(
                f"the query returns rows that are not aggregates: column {name!r} in {where} "
                "is neither aggregated nor a GROUP BY key"
            )
        if cls == "FUNCTION":
            name, aggregate = self._function(expr)
            if aggregate:
                self.aggregates += 1
                if expr.get("filter") is not None:
                    raise _refuse(f"{name}() FILTER (WHERE ...) is not allowed")
                if expr.get("order_bys", {}).get("orders"):
                    raise _refuse(f"ORDER BY inside {name}() is not allowed")
                if expr.get("export_state"):
                    raise _refuse(f"EXPORT_STATE of {name}() is not allowed")
                for child in expr.get("children", []):
                    self.argument(child, name)
                return
        for child in _children(expr):
            self.output(child, where)


@dataclass(frozen=True)
class _Plan:
    """A checked query: its parse tree and the dataset occurrences in its FROM clause."""

    tree: dict[str, Any]
    tables: tuple[tuple[str, str], ...]  # (binding name in the query, table name), in order

    @property
    def node(self) -> dict[str, Any]:
        return self.tree["statements"][0]["node"]


def _from_tables(ref: dict[str, Any], checker: _Checker) -> list[tuple[str, str]]:
    kind = ref.get("type")
    if ref.get("sample") is not None:
        raise _refuse("TABLESAMPLE is not allowed")
    if kind in _REF_FIELDS:
        _known_fields(ref, _REF_FIELDS[str(kind)], "FROM")
    if kind == "BASE_TABLE":
        table = str(ref.get("table_name", ""))
        if ref.get("schema_name") or ref.get("catalog_name"):
            raise _refuse(f"table {table!r}: name the dataset without a schema or catalog")
        if ref.get("at_clause") is not None:
            raise _refuse(f"table {table!r}: AT (...) is not allowed")
        if ref.get("column_name_alias"):
            raise _refuse(f"table {table!r}: column alias lists are not allowed")
        return [(str(ref.get("alias") or table), table)]
    if kind == "JOIN":
        join, how = ref.get("join_type"), ref.get("ref_type")
        if join not in _JOIN_TYPES or how not in _JOIN_REFS:
            raise _refuse(f"{how} {join} joins are not allowed")
        if ref.get("condition") is not None:
            checker.row(ref["condition"], "a JOIN condition")
        return _from_tables(ref["left"], checker) + _from_tables(ref["right"], checker)
    if kind == "EMPTY":
        return []
    described = {
        "SUBQUERY": "subqueries", "TABLE_FUNCTION": "table functions (such as read_csv)",
        "EXPRESSION_LIST": "VALUES lists", "PIVOT": "PIVOT/UNPIVOT",
    }.get(str(kind), f"{str(kind).lower()} table references")
    raise _refuse(f"{described} in FROM are not allowed; name the datasets")


def analyze(query: str) -> _Plan:
    """Check a query against the output policy (see the module docstring); raises
    ParameterError naming the first rule it breaks."""
    if len(query) > MAX_QUERY:
        raise ParameterError(f"parameter 'query': longer than {MAX_QUERY} characters")
    try:
        return _analyze(query)
    except RecursionError:
        raise ParameterError("parameter 'query': expressions nested too deeply") from None


def _analyze(query: str) -> _Plan:
    tree = _parse(query)
    if any(_RESERVED in s.lower() for s in _strings(tree)):
        raise _refuse(f"names starting with {_RESERVED} are reserved")
    node = tree["statements"][0]["node"]
    if node.get("type") != "SELECT_NODE":
        raise _refuse("UNION, INTERSECT and EXCEPT are not allowed; query one SELECT")
    _known_fields(node, _NODE_FIELDS, "SELECT")
    if node.get("cte_map", {}).get("map"):
        raise _refuse("WITH (common table expressions) is not allowed")
    if node.get("sample") is not None:
        raise _refuse("USING SAMPLE is not allowed")
    if node.get("qualify") is not None:
        raise _refuse("QUALIFY is not allowed")
    for modifier in node.get("modifiers", []):
        kind = modifier.get("type")
        if kind in _MODIFIER_FIELDS:
            _known_fields(modifier, _MODIFIER_FIELDS[str(kind)], str(kind).lower())
        if kind == "DISTINCT_MODIFIER":
            raise _refuse("SELECT DISTINCT is not allowed; use GROUP BY")
        if kind == "LIMIT_MODIFIER":
            for part in ("limit", "offset"):
                value = modifier.get(part)
                if value is not None and value.get("class") != "CONSTANT":
                    raise _refuse(f"{part.upper()} must be a constant")
        elif kind != "ORDER_MODIFIER":
            raise _refuse(f"{str(kind).lower().replace('_', ' ')} is not allowed")

    select = node.get("select_list", [])
    aliases = {str(e.get("alias")).lower() for e in select if e.get("alias")}
    group_all = node.get("aggregate_handling") == "FORCE_AGGREGATES"
    checker = _Checker(_function_kinds(), [], set(), aliases)

    tables = _from_tables(node.get("from_table", {}), checker)
    if not tables:
        raise _refuse("the query reads no dataset")
    if node.get("where_clause") is not None:
        checker.row(node["where_clause"], "WHERE")

    keys: list[dict[str, Any]] = []
    for expr in node.get("group_expressions", []):
        position = _int_constant(expr)
        if position is not None:  # GROUP BY 1: a select-list position
            if not 1 <= position <= len(select):
                raise _refuse(f"GROUP BY position {position} is not in the select list")
            checker.row(select[position - 1], "GROUP BY")
            keys.append(select[position - 1])
            continue
        checker.row(expr, "GROUP BY")
        keys.append(expr)
        if expr.get("class") == "COLUMN_REF" and len(expr.get("column_names", [])) == 1:
            # GROUP BY an alias of the select list groups by that expression
            alias = _column_name(expr)
            for named in select:
                if str(named.get("alias", "")).lower() == alias:
                    checker.row(named, "GROUP BY")
                    keys.append(named)
    if group_all:  # GROUP BY ALL: the select expressions without aggregates are the keys
        for expr in select:
            if not _has_aggregate(expr, checker.kinds):
                checker.row(expr, "GROUP BY ALL")
                keys.append(expr)
    checker.group_keys = [_shape(k) for k in keys]
    checker.group_columns = {_column_name(k) for k in keys if k.get("class") == "COLUMN_REF"}
    grouped = bool(keys) or group_all

    for expr in select:
        checker.output(expr, "SELECT")
    if node.get("having") is not None:
        checker.output(node["having"], "HAVING")
    for modifier in node.get("modifiers", []):
        for order in modifier.get("orders", []):
            expr = order.get("expression", {})
            position = _int_constant(expr)
            if position is not None and not 1 <= position <= len(select):
                raise _refuse(f"ORDER BY position {position} is not in the select list")
            if expr.get("class") == "STAR" and expr.get("columns") and not (
                expr.get("relation_name") or expr.get("exclude_list")
                or expr.get("replace_list") or expr.get("expr")
            ):
                continue  # ORDER BY ALL
            checker.output(expr, "ORDER BY")
    if not grouped and not checker.aggregates:
        raise _refuse(
            "the query returns rows that are not aggregates (use aggregate functions or "
            "GROUP BY)"
        )
    return _Plan(tree, tuple(tables))
