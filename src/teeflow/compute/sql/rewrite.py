"""Rewriting a checked query so DuckDB counts each dataset's rows per output group, and the
view names the datasets get."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa

from teeflow.compute.errors import public
from teeflow.compute.sql import _RESERVED, MAX_NAME, NAME
from teeflow.core.errors import ParameterError, SchemaMismatch

if TYPE_CHECKING:
    from teeflow.compute.sql.policy import _Plan


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rid(index: int) -> str:
    return f"{_RESERVED}_rid_{index}"


def view_names(names: list[str]) -> dict[str, int]:
    """{lower-case view name: dataset index}; raises SchemaMismatch for unusable names."""
    views: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise SchemaMismatch(
                f"dataset {name[:40]!r}: not usable as a view name (1 to {MAX_NAME} printable "
                "characters)"
            )
        if name.lower().startswith(_RESERVED):
            raise SchemaMismatch(f"dataset {name!r}: names starting with {_RESERVED} are reserved")
        if name.lower() in views:
            raise SchemaMismatch(
                f"dataset {name!r}: another dataset has the same name up to case; SQL names "
                "are case-insensitive"
            )
        views[name.lower()] = i
    return views


def counting_query(plan: _Plan, views: dict[str, int]) -> tuple[str, int]:
    """The checked query with one more output column per dataset occurrence in FROM: the
    number of that dataset's rows in the group. Returns (SQL, number of columns added)."""
    for _, table in plan.tables:
        if table.lower() not in views:
            known = ", ".join(sorted(views))
            raise ParameterError(
                f"parameter 'query': table {table!r} is not a dataset of this task "
                f"(datasets: {known})"
            )
    if len(plan.tables) == 1:
        counts = ["count(*)"]
    else:
        counts = [
            f"count(DISTINCT {_quote(binding)}.{_quote(_rid(views[table.lower()]))})"
            for binding, table in plan.tables
        ]
    extra = ", ".join(f"{c} AS {_quote(f'{_RESERVED}_n{i}')}" for i, c in enumerate(counts))
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        raw = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [f"SELECT {extra}"]).fetchone()
        added = json.loads(raw[0])["statements"][0]["node"]["select_list"] if raw else []
        tree = json.loads(json.dumps(plan.tree))
        tree["statements"][0]["node"]["select_list"].extend(added)
        sql = con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchone()
    finally:
        con.close()
    if not sql or len(added) != len(counts):  # pragma: no cover - DuckDB format change
        raise public("internal", computation=NAME)
    return str(sql[0]), len(counts)


def check_columns(schemas: dict[str, pa.Schema]) -> None:
    for ds, schema in schemas.items():
        for name in schema.names:
            if name.lower().startswith(_RESERVED):
                raise SchemaMismatch(
                    f"dataset {ds!r}: column {name!r}: names starting with {_RESERVED} are "
                    "reserved"
                )
