"""Running a checked query: a locked-down DuckDB session over the inputs, spilling only
encrypted, and the group-size check on its output. Errors never quote an input value."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute import usercode
from teeflow.compute.errors import public
from teeflow.compute.rows import Source
from teeflow.compute.sql import _RESERVED, MAX_ROWS, NAME, analysis
from teeflow.compute.sql.policy import analyze
from teeflow.compute.sql.rewrite import _quote, _rid, check_columns, counting_query, view_names
from teeflow.core.errors import ParameterError

# The executor names its own directory for DuckDB's temp folders, so that a start can
# remove what a killed run left (executor/spill.py `RunDir`); unset, the system's TMPDIR.
TEMP_ROOT_ENV = "TEEFLOW_SQL_TEMP_ROOT"


def check_binds(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Dataset names usable as views, no reserved column names, and the query binds against
    (empty) tables of these schemas: column and type errors surface before any data moves."""
    views = view_names(list(schemas))
    check_columns(schemas)
    ruled = _rules_plan(params, schemas)
    args = None
    if ruled is not None:
        sql, args = ruled.sql, ruled.args
    else:
        sql, _ = counting_query(analyze(params["query"]), views)
    empty = [(ds, schema.empty_table()) for ds, schema in schemas.items()]
    with _Session(empty, memory_limit=None, spill=False) as session:
        try:
            session.con.execute(sql, args).fetchall()
        except duckdb.Error as exc:
            # tables are empty here, so DuckDB's message can only quote the query and schema
            raise ParameterError(f"parameter 'query': does not fit the datasets: {exc}") from None


def _rules_plan(params: dict[str, Any], schemas: dict[str, pa.Schema]
                ) -> analysis.RulesPlan | None:
    """The plan under the datasets' analysis rules, when the task has any (the executor
    puts them in `_rules`); None: the plain output policy applies."""
    rules = params.get("_rules")
    if not rules:
        return None
    return analysis.plan(params["query"], rules, schemas, params.get("query_args"))


def _httpfs_extension() -> Path | None:
    """The httpfs extension file matching this DuckDB, from the duckdb-extension-httpfs
    package, if installed."""
    try:
        import duckdb_extension_httpfs as pkg  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    path = path / "httpfs.duckdb_extension"
    return path if path.is_file() else None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Session:
    """A locked-down in-memory DuckDB with the inputs registered as views, each with a hidden
    row-number column; spilling to an encrypted temporary directory when possible."""

    def __init__(
        self, inputs: list[tuple[str, pa.Table | Source]], memory_limit: str | None,
        spill: bool,
    ) -> None:
        self.tempdir: str | None = None
        self.spill = "disabled"
        self.con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "allow_persistent_secrets": False,
            "python_enable_replacements": False,
        })
        try:
            self._setup(inputs, memory_limit, spill)
        except BaseException:
            self.close()
            raise

    def _setup(
        self, inputs: list[tuple[str, pa.Table | Source]], memory_limit: str | None,
        spill: bool,
    ) -> None:
        con = self.con
        con.execute("SET preserve_insertion_order = false")
        if memory_limit is not None:
            con.execute(f"SET memory_limit = {_literal(memory_limit)}")
        extension = _httpfs_extension() if spill else None
        if extension is not None:
            try:
                con.execute(f"LOAD {_literal(str(extension))}")
            except duckdb.Error:
                extension = None
        if extension is not None:
            self.tempdir = tempfile.mkdtemp(prefix="teeflow-sql-",
                                            dir=os.environ.get(TEMP_ROOT_ENV) or None)
            con.execute(f"SET temp_directory = {_literal(self.tempdir)}")
            con.execute("SET temp_file_encryption = true")
            self.spill = "encrypted"
        else:
            con.execute("SET temp_directory = ''")  # no spilling, rather than plaintext
        for i, (ds, table) in enumerate(inputs):
            if isinstance(table, Source):  # larger than memory: DuckDB holds it,
                reader = pa.RecordBatchReader.from_batches(  # spilling to sealed temp files
                    table.schema.append(pa.field(_rid(i), pa.int64())),
                    _numbered(table.batches(), _rid(i)))
                con.register("__teeflow_source", reader)
                con.execute(f"CREATE TABLE {_quote(ds)} AS SELECT * FROM __teeflow_source")
                con.unregister("__teeflow_source")
                continue
            rid = pa.array(np.arange(table.num_rows, dtype=np.int64))
            con.register(ds, table.append_column(_rid(i), rid))
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            if self.tempdir is not None:
                shutil.rmtree(self.tempdir, ignore_errors=True)
                self.tempdir = None

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DUCKDB_FLOOR = 64 * 2**20


def _numbered(batches, column: str):
    """The batches with a running row number appended (the hidden row id)."""
    start = 0
    for batch in batches:
        ids = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
        start += batch.num_rows
        yield batch.append_column(column, ids)


def run_stream(sources: list[Source], params: dict[str, Any]) -> dict[str, Any]:
    """The same query over inputs larger than memory: DuckDB loads them into its own
    tables and spills beyond `memory_limit` (default: the executor's budget), encrypted."""
    limit = params.get("memory_limit")
    if limit is None and params.get("_memory_budget"):
        budget = int(str(params["_memory_budget"]).rstrip("B"))
        limit = f"{max(budget, DUCKDB_FLOOR)}B"  # DuckDB needs some room of its own
    return _run([(s.name, s) for s in sources], {**params, "memory_limit": limit})


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    return _run(list(inputs), params)


def _run(inputs: list[tuple[str, pa.Table | Source]], params: dict[str, Any]
         ) -> dict[str, Any]:
    views = view_names([ds for ds, _ in inputs])
    check_columns({ds: table.schema for ds, table in inputs})
    ruled = _rules_plan(params, {ds: table.schema for ds, table in inputs})
    if ruled is not None:
        return _run_ruled(inputs, params, ruled)
    plan = analyze(params["query"])
    sql, added = counting_query(plan, views)
    k = int(params.get("min_group_size", 10))
    result, spill = _execute(inputs, params, sql)
    width = result.num_columns - added
    for j in range(added):
        smallest = pc.min(result.column(width + j)).as_py() if result.num_rows else None
        if smallest is not None and smallest < k:
            binding, table = plan.tables[j]
            source = f"dataset {table!r}" if len(plan.tables) == 1 else (
                f"dataset {table!r} (as {binding!r})"
            )
            raise public("small_group", computation=NAME, limit=k, source=source)
    if result.num_rows > MAX_ROWS:
        raise public("result_too_large", computation=NAME, limit=MAX_ROWS, unit="rows")
    result = result.select(list(range(width)))
    out = usercode.table_json(result)
    out["spill"] = spill
    return out


def _execute(inputs: list[tuple[str, pa.Table | Source]], params: dict[str, Any], sql: str,
             args: dict[str, Any] | None = None) -> tuple[pa.Table, str]:
    """Run `sql` in a locked-down session; (result, how it spilled). Errors: type only."""
    with _Session(inputs, params.get("memory_limit"), spill=True) as session:
        try:
            if args is None:
                result = session.con.sql(sql).to_arrow_table()
            else:
                result = session.con.execute(sql, args).to_arrow_table()
        except duckdb.OutOfMemoryException:
            budget = params.get("memory_limit") or "DuckDB's default"
            how = "even spilling to disk" if session.spill == "encrypted" else (
                "and spilling is disabled (no encrypted temporary storage available)"
            )
            raise public("out_of_memory", computation=NAME, limit=budget, how=how) from None
        except duckdb.Error as exc:
            raise public("query_failed", computation=NAME, kind=type(exc).__name__) from None
        return result, session.spill


def _run_ruled(inputs: list[tuple[str, pa.Table | Source]], params: dict[str, Any],
               ruled: analysis.RulesPlan) -> dict[str, Any]:
    """A query the analysis rules grant: rows counting fewer distinct identities of a
    dataset than its rule's minimum are dropped (not refused: the analyst sees only rows
    that pass), then the counts and the hidden row numbers are removed."""
    result, spill = _execute(inputs, params, ruled.sql, ruled.args)
    width = result.num_columns - len(ruled.floors)
    if ruled.floors and result.num_rows:
        keep = None
        for j, (_, floor) in enumerate(ruled.floors):
            ok = pc.fill_null(pc.greater_equal(result.column(width + j), floor), False)
            keep = ok if keep is None else pc.and_(keep, ok)
        result = result.filter(keep)
    names = result.column_names[:width]
    result = result.select([i for i, n in enumerate(names)
                            if not n.lower().startswith(_RESERVED)])
    if result.num_rows > MAX_ROWS:
        raise public("result_too_large", computation=NAME, limit=MAX_ROWS, unit="rows")
    out = usercode.table_json(result)
    out["spill"] = spill
    out["analysis_rules"] = {"mode": ruled.mode}
    if ruled.floors:
        out["analysis_rules"]["min_identities"] = {ds: k for ds, k in ruled.floors}
        out["analysis_rules"]["rows_below_minimum"] = "dropped"
    return out
