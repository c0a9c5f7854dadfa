"""The SQL output policy: an allow-list over DuckDB's parse tree (see the package docstring).

A query is checked, never its text: anything these checks do not know is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teeflow.compute.sql import _RESERVED, MAX_QUERY
from teeflow.compute.sql import tree as parse_tree
from teeflow.core.errors import ParameterError

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
            raise parse_tree.refuse(f"function {name!r}: a qualified function name is not allowed")
        kinds = self.kinds.get(name, frozenset())
        if "aggregate" in kinds:
            if name not in ALLOWED_AGGREGATES:
                raise parse_tree.refuse(
                    f"aggregate {name}() is not allowed: it can return single rows' values "
                    f"(allowed: {', '.join(sorted(ALLOWED_AGGREGATES))})"
                )
            return name, True
        if name in _DENIED_FUNCTIONS:
            raise parse_tree.refuse(f"function {name}() is not allowed")
        if "scalar" in kinds or ("macro" in kinds and name in _ALLOWED_MACROS):
            return name, False
        raise parse_tree.refuse(f"function {name}() is not allowed")

    def _common(self, expr: dict[str, Any]) -> None:
        cls = expr.get("class")
        if cls == "WINDOW":
            raise parse_tree.refuse("window functions are not allowed")
        if cls == "SUBQUERY":
            raise parse_tree.refuse("subqueries are not allowed")
        if cls == "STAR":
            raise parse_tree.refuse("* and COLUMNS() are not allowed (name the columns)")
        if cls not in _EXPRESSION_CLASSES:
            raise parse_tree.refuse(f"{str(cls).lower()} expressions are not allowed")
        if cls == "CAST" and expr.get("try_cast"):
            raise parse_tree.refuse("TRY_CAST is not allowed")

    def row(self, expr: dict[str, Any], where: str) -> None:
        """WHERE, JOIN conditions, GROUP BY keys: per-row expressions, no aggregates."""
        self._common(expr)
        if expr["class"] == "FUNCTION":
            name, aggregate = self._function(expr)
            if aggregate:
                raise parse_tree.refuse(f"aggregate {name}() is not allowed in {where}")
        for child in parse_tree.children(expr):
            self.row(child, where)

    def argument(self, expr: dict[str, Any], aggregate: str) -> None:
        """An aggregate's argument: columns and constants, + - *, / by a constant, casts."""
        cls = expr.get("class")
        if cls in ("COLUMN_REF", "CONSTANT"):
            return
        if cls == "CAST" and not expr.get("try_cast"):
            target = str(expr.get("cast_type", {}).get("id", "")).upper()
            if target not in _NUMERIC_TYPES:
                raise parse_tree.refuse(
                    f"the argument of {aggregate}() may only be cast to a number type, not "
                    f"{target or 'this type'}"
                )
            for child in parse_tree.children(expr):
                self.argument(child, aggregate)
            return
        if cls == "FUNCTION" and expr.get("is_operator"):
            name = expr.get("function_name")
            children = expr.get("children", [])
            if name in _AGG_OPERATORS or (
                name == "/" and len(children) == 2 and parse_tree.is_nonzero_constant(children[1])
            ):
                for child in children:
                    self.argument(child, aggregate)
                return
        what = expr.get("function_name") or str(cls).lower()
        raise parse_tree.refuse(
            f"the argument of {aggregate}() may only combine columns and constants with "
            f"+, -, *, division by a non-zero constant and casts; {what!r} is not allowed "
            "(group by a condition instead of filtering inside an aggregate)"
        )

    def output(self, expr: dict[str, Any], where: str) -> None:
        """SELECT list, HAVING, ORDER BY: aggregates, GROUP BY keys, and scalars of them."""
        if parse_tree.shape(expr) in self.group_keys:
            return
        self._common(expr)
        cls = expr["class"]
        if cls == "COLUMN_REF":
            name = parse_tree.column_name(expr)
            if name in self.group_columns or (
                len(expr.get("column_names", [])) == 1 and name in self.aliases
            ):
                return
            raise parse_tree.refuse(
                f"the query returns rows that are not aggregates: column {name!r} in {where} "
                "is neither aggregated nor a GROUP BY key"
            )
        if cls == "FUNCTION":
            name, aggregate = self._function(expr)
            if aggregate:
                self.aggregates += 1
                if expr.get("filter") is not None:
                    raise parse_tree.refuse(f"{name}() FILTER (WHERE ...) is not allowed")
                if expr.get("order_bys", {}).get("orders"):
                    raise parse_tree.refuse(f"ORDER BY inside {name}() is not allowed")
                if expr.get("export_state"):
                    raise parse_tree.refuse(f"EXPORT_STATE of {name}() is not allowed")
                for child in expr.get("children", []):
                    self.argument(child, name)
                return
        for child in parse_tree.children(expr):
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
        raise parse_tree.refuse("TABLESAMPLE is not allowed")
    if kind in _REF_FIELDS:
        parse_tree.known_fields(ref, _REF_FIELDS[str(kind)], "FROM")
    if kind == "BASE_TABLE":
        table = str(ref.get("table_name", ""))
        if ref.get("schema_name") or ref.get("catalog_name"):
            raise parse_tree.refuse(
                f"table {table!r}: name the dataset without a schema or catalog")
        if ref.get("at_clause") is not None:
            raise parse_tree.refuse(f"table {table!r}: AT (...) is not allowed")
        if ref.get("column_name_alias"):
            raise parse_tree.refuse(f"table {table!r}: column alias lists are not allowed")
        return [(str(ref.get("alias") or table), table)]
    if kind == "JOIN":
        join, how = ref.get("join_type"), ref.get("ref_type")
        if join not in _JOIN_TYPES or how not in _JOIN_REFS:
            raise parse_tree.refuse(f"{how} {join} joins are not allowed")
        if ref.get("condition") is not None:
            checker.row(ref["condition"], "a JOIN condition")
        return _from_tables(ref["left"], checker) + _from_tables(ref["right"], checker)
    if kind == "EMPTY":
        return []
    described = {
        "SUBQUERY": "subqueries", "TABLE_FUNCTION": "table functions (such as read_csv)",
        "EXPRESSION_LIST": "VALUES lists", "PIVOT": "PIVOT/UNPIVOT",
    }.get(str(kind), f"{str(kind).lower()} table references")
    raise parse_tree.refuse(f"{described} in FROM are not allowed; name the datasets")


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
    tree = parse_tree.parse(query)
    if any(_RESERVED in s.lower() for s in parse_tree.strings(tree)):
        raise parse_tree.refuse(f"names starting with {_RESERVED} are reserved")
    node = tree["statements"][0]["node"]
    if node.get("type") != "SELECT_NODE":
        raise parse_tree.refuse("UNION, INTERSECT and EXCEPT are not allowed; query one SELECT")
    parse_tree.known_fields(node, _NODE_FIELDS, "SELECT")
    if node.get("cte_map", {}).get("map"):
        raise parse_tree.refuse("WITH (common table expressions) is not allowed")
    if node.get("sample") is not None:
        raise parse_tree.refuse("USING SAMPLE is not allowed")
    if node.get("qualify") is not None:
        raise parse_tree.refuse("QUALIFY is not allowed")
    for modifier in node.get("modifiers", []):
        kind = modifier.get("type")
        if kind in _MODIFIER_FIELDS:
            parse_tree.known_fields(modifier, _MODIFIER_FIELDS[str(kind)], str(kind).lower())
        if kind == "DISTINCT_MODIFIER":
            raise parse_tree.refuse("SELECT DISTINCT is not allowed; use GROUP BY")
        if kind == "LIMIT_MODIFIER":
            for part in ("limit", "offset"):
                value = modifier.get(part)
                if value is not None and value.get("class") != "CONSTANT":
                    raise parse_tree.refuse(f"{part.upper()} must be a constant")
        elif kind != "ORDER_MODIFIER":
            raise parse_tree.refuse(f"{str(kind).lower().replace('_', ' ')} is not allowed")

    select = node.get("select_list", [])
    aliases = {str(e.get("alias")).lower() for e in select if e.get("alias")}
    group_all = node.get("aggregate_handling") == "FORCE_AGGREGATES"
    checker = _Checker(parse_tree.function_kinds(), [], set(), aliases)

    tables = _from_tables(node.get("from_table", {}), checker)
    if not tables:
        raise parse_tree.refuse("the query reads no dataset")
    if node.get("where_clause") is not None:
        checker.row(node["where_clause"], "WHERE")

    keys: list[dict[str, Any]] = []
    for expr in node.get("group_expressions", []):
        position = parse_tree.int_constant(expr)
        if position is not None:  # GROUP BY 1: a select-list position
            if not 1 <= position <= len(select):
                raise parse_tree.refuse(f"GROUP BY position {position} is not in the select list")
            checker.row(select[position - 1], "GROUP BY")
            keys.append(select[position - 1])
            continue
        checker.row(expr, "GROUP BY")
        keys.append(expr)
        if expr.get("class") == "COLUMN_REF" and len(expr.get("column_names", [])) == 1:
            # GROUP BY an alias of the select list groups by that expression
            alias = parse_tree.column_name(expr)
            for named in select:
                if str(named.get("alias", "")).lower() == alias:
                    checker.row(named, "GROUP BY")
                    keys.append(named)
    if group_all:  # GROUP BY ALL: the select expressions without aggregates are the keys
        for expr in select:
            if not parse_tree.has_aggregate(expr, checker.kinds):
                checker.row(expr, "GROUP BY ALL")
                keys.append(expr)
    checker.group_keys = [parse_tree.shape(k) for k in keys]
    checker.group_columns = {
        parse_tree.column_name(k) for k in keys if k.get("class") == "COLUMN_REF"}
    grouped = bool(keys) or group_all

    for expr in select:
        checker.output(expr, "SELECT")
    if node.get("having") is not None:
        checker.output(node["having"], "HAVING")
    for modifier in node.get("modifiers", []):
        for order in modifier.get("orders", []):
            expr = order.get("expression", {})
            position = parse_tree.int_constant(expr)
            if position is not None and not 1 <= position <= len(select):
                raise parse_tree.refuse(f"ORDER BY position {position} is not in the select list")
            if expr.get("class") == "STAR" and expr.get("columns") and not (
                expr.get("relation_name") or expr.get("exclude_list")
                or expr.get("replace_list") or expr.get("expr")
            ):
                continue  # ORDER BY ALL
            checker.output(expr, "ORDER BY")
    if not grouped and not checker.aggregates:
        raise parse_tree.refuse(
            "the query returns rows that are not aggregates (use aggregate functions or "
            "GROUP BY)"
        )
    return _Plan(tree, tuple(tables))
