"""Reading DuckDB's JSON parse tree: parsing one statement, walking expressions, reading
constants. No policy here: `policy` decides what the tree may contain."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import duckdb

from teeflow.core.errors import ParameterError

_PARAM = "parameter 'query': sql policy"

LOCATION_KEYS = frozenset({"query_location", "query_location_length"})
IGNORED_KEYS = LOCATION_KEYS | {"alias"}


def refuse(message: str) -> ParameterError:
    return ParameterError(f"{_PARAM}: {message}")


@lru_cache(maxsize=1)
def function_kinds() -> dict[str, frozenset[str]]:
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


def parse(query: str) -> dict[str, Any]:
    """The SELECT node of a one-statement query, as DuckDB's JSON parse tree."""
    con = duckdb.connect(":memory:")
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as exc:
            raise ParameterError(f"parameter 'query': does not parse: {exc}") from None
        if len(statements) != 1:
            raise refuse(f"exactly one statement is allowed, got {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            kind = statements[0].type.name
            raise refuse(f"only a SELECT statement is allowed, got {kind}")
        raw = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchone()
    finally:
        con.close()
    tree: dict[str, Any] = json.loads(raw[0]) if raw else {"error": True}
    if tree.get("error"):
        detail = tree.get("error_message", "not serializable")
        raise refuse(f"only a plain SELECT statement is allowed ({detail})")
    if len(tree.get("statements", [])) != 1:
        raise refuse("exactly one statement is allowed")
    return tree


def strings(node: Any) -> Any:
    """Every string in a JSON tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def children(expr: dict[str, Any]) -> list[dict[str, Any]]:
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


def shape(expr: Any) -> Any:
    """An expression with positions and aliases removed, for comparing two expressions."""
    if isinstance(expr, dict):
        return {k: shape(v) for k, v in expr.items() if k not in IGNORED_KEYS}
    if isinstance(expr, list):
        return [shape(v) for v in expr]
    return expr


def known_fields(obj: dict[str, Any], known: frozenset[str], what: str) -> None:
    for key, value in obj.items():
        if key in known or key in LOCATION_KEYS or value in (None, False, "", [], {}):
            continue
        raise refuse(f"{what}: unsupported construct (parse tree field {key!r})")


def int_constant(expr: dict[str, Any]) -> int | None:
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


def column_name(expr: dict[str, Any]) -> str:
    return str(expr.get("column_names", ["?"])[-1]).lower()


def is_nonzero_constant(expr: dict[str, Any]) -> bool:
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


def has_aggregate(expr: dict[str, Any], kinds: dict[str, frozenset[str]]) -> bool:
    if expr.get("class") == "FUNCTION":
        if "aggregate" in kinds.get(str(expr.get("function_name", "")).lower(), ()):
            return True
    return any(has_aggregate(child, kinds) for child in children(expr))
