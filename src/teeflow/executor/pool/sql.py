"""sql on the pool: the single executor's checked query, split into a per-member partial
aggregation and a final one on the lead, with its output policy on the whole result.

The query is checked by compute/sql's own policy (``policy.analyze``), then rewritten on
DuckDB's parse tree:

- each member runs, in DuckDB, in a task pinned to its worker and on its own part only,
  ``SELECT <group keys>, <partial aggregates>, count(*) FROM <dataset> WHERE <where>
  GROUP BY <group keys>``: per-group partial aggregates, no row;
- the lead runs the original SELECT list, HAVING, ORDER BY and LIMIT over the union of
  those partials, each aggregate replaced by its combination (a count is the sum of the
  counts, an average the sum of the sums over the sum of the counts, a variance from the
  members' counts, means and population variances), plus the single executor's hidden
  group-size column: the sum of the members' row counts per group, so ``min_group_size``
  is checked on each output group's count over *all* members, exactly as one executor
  checks it (a group small overall but spread over members is refused, and a group small
  on one member but large overall is not);
- the output columns get the single executor's names and types (its query bound on empty
  tables), then the same size checks and result form (``usercode.table_json``).

What a pool runs: one dataset in FROM (no join: a join matches rows across members);
aggregates count, sum, fsum, sumkahan, kahan_sum, avg, mean, favg, and var_pop, var_samp,
variance, stddev, stddev_pop, stddev_samp; no DISTINCT aggregate, GROUP BY ALL, grouping
sets, GROUP BY a select alias (group by the expression or its position), or analysis
rules. Everything else the single executor allows is refused by ``check`` naming it.
Counts, integer and decimal sums and the group keys are exact; floating sums and averages
differ from one executor's only by summation order (about 1e-15 relative), and variances
by the combination of partial moments (about 1e-12 relative for well-scaled data).

A member's partial groups are aggregates, but one of a group that is small on that member
is close to its rows; they go only to the lead member, and nothing leaves the pool before
the group-size rule has passed on the whole result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from distributed import Client

from teeflow.compute.sql import _RESERVED, NAME
from teeflow.compute.sql import tree as parse_tree
from teeflow.core.errors import ParameterError
from teeflow.executor.pool import held

PARTS = f"{_RESERVED}_parts"
_RAW = f"{_RESERVED}_raw"
_COUNT = f"{_RESERVED}_n"
_SUMS = frozenset({"sum", "fsum", "sumkahan", "kahan_sum"})
_AVERAGES = {"avg": "sum", "mean": "sum", "favg": "fsum"}
_SPREADS = frozenset({"var_pop", "var_samp", "variance", "stddev", "stddev_pop",
                      "stddev_samp"})
AGGREGATES = tuple(sorted({"count", *_SUMS, *_AVERAGES, *_SPREADS}))


def _refuse(what: str) -> ParameterError:
    return ParameterError(f"parameter 'query': on an executor pool: {what}")


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _expr(sql: str) -> dict[str, Any]:
    """The parse tree of one expression (written by this module, over its own columns)."""
    return _copy(parse_tree.parse(f"SELECT {sql}")["statements"][0]["node"]["select_list"][0])


def _column(name: str) -> dict[str, Any]:
    return {"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "", "column_names": [name]}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Split:
    """A checked query as a member's partial query and the lead's final one."""

    table: str  # the dataset as FROM names it
    member: dict[str, Any]  # the members' parse tree
    final: dict[str, Any]  # the lead's, over PARTS; select items get their names at run
    width: int  # the original select list's length


class _Rewrite:
    """Walks the output expressions, replacing group keys by the partials' key columns and
    aggregates by combinations of partial aggregates (registered in `partials`)."""

    def __init__(self, keys: list[dict[str, Any]], aliases: set[str]) -> None:
        self.keys = keys
        self.shapes = [parse_tree.shape(k) for k in keys]
        self.key_columns = {parse_tree.column_name(k): i for i, k in enumerate(keys)
                            if k.get("class") == "COLUMN_REF"}
        self.aliases = aliases
        self.kinds = parse_tree.function_kinds()
        self.partials: list[dict[str, Any]] = []

    def _partial(self, function: str, like: dict[str, Any]) -> str:
        node = _copy(like)
        node["function_name"] = function
        node["alias"] = f"{_RESERVED}_a{len(self.partials)}"
        if function == "count_star":
            node["children"] = []
        self.partials.append(node)
        return _q(node["alias"])

    def aggregate(self, expr: dict[str, Any]) -> dict[str, Any]:
        name = str(expr.get("function_name", "")).lower()
        if expr.get("distinct"):
            raise _refuse(f"{name}(DISTINCT ...) is not available (it counts values across "
                          "members' rows)")
        if name == "count_star" or (name == "count" and not expr.get("children")):
            return _expr(f"CAST(coalesce(sum({self._partial('count_star', expr)}), 0) AS "
                         "BIGINT)")
        if name == "count":
            return _expr(f"CAST(coalesce(sum({self._partial('count', expr)}), 0) AS BIGINT)")
        if name in _SUMS:
            return _expr(f"{name}({self._partial(name, expr)})")
        if name in _AVERAGES:
            s, c = self._partial(_AVERAGES[name], expr), self._partial("count", expr)
            return _expr(f"CASE WHEN sum({c}) = 0 THEN NULL ELSE CAST({_AVERAGES[name]}({s}) "
                         f"AS DOUBLE) / CAST(sum({c}) AS DOUBLE) END")
        if name in _SPREADS:
            c, m, v = (self._partial(f, expr) for f in ("count", "avg", "var_pop"))
            m2 = (f"greatest(sum({c} * {v}) + sum({c} * {m} * {m}) - sum({c} * {m}) * "
                  f"sum({c} * {m}) / sum({c}), 0)")
            pop = name.endswith("_pop")
            floor, divisor = (0, f"sum({c})") if pop else (1, f"(sum({c}) - 1)")
            value = f"{m2} / {divisor}"
            if name.startswith("stddev"):
                value = f"sqrt({value})"
            return _expr(f"CASE WHEN sum({c}) > {floor} THEN {value} ELSE NULL END")
        raise _refuse(f"aggregate {name}() is not available (a pool combines "
                      f"{', '.join(AGGREGATES)})")

    def output(self, expr: dict[str, Any]) -> dict[str, Any]:
        shape = parse_tree.shape(expr)
        if shape in self.shapes:
            return _column(f"{_RESERVED}_k{self.shapes.index(shape)}")
        cls = expr.get("class")
        if cls == "COLUMN_REF":
            name = parse_tree.column_name(expr)
            if name in self.key_columns:
                return _column(f"{_RESERVED}_k{self.key_columns[name]}")
            return _copy(expr)  # a select alias (policy.analyze allowed nothing else)
        if cls == "FUNCTION" and "aggregate" in self.kinds.get(
                str(expr.get("function_name", "")).lower(), frozenset()):
            return self.aggregate(expr)
        return self._children(expr)

    def _children(self, expr: dict[str, Any]) -> dict[str, Any]:
        def walk(value: Any) -> Any:
            if isinstance(value, dict):
                if "class" in value:
                    return self.output(value)
                return {k: walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value

        return {k: (v if k == "value" and expr.get("class") == "CONSTANT" else walk(v))
                for k, v in expr.items()}


def split(query: str) -> Split:
    """The pool's form of a query the single executor's policy allows; raises
    ParameterError for one the policy refuses or a pool cannot run (pure: DuckDB's parser)."""
    from teeflow.compute.sql.policy import analyze

    plan = analyze(query)
    tree = _copy(plan.tree)
    node = tree["statements"][0]["node"]
    if len(plan.tables) != 1 or node["from_table"].get("type") != "BASE_TABLE":
        raise _refuse("the query must read exactly one dataset (a join matches rows held by "
                      "different members)")
    if node.get("aggregate_handling") != "STANDARD_HANDLING":
        raise _refuse("GROUP BY ALL is not available; name the group keys")
    select = node["select_list"]
    aliases = {str(e.get("alias")).lower() for e in select if e.get("alias")}
    keys: list[dict[str, Any]] = []
    for expr in node.get("group_expressions", []):
        position = parse_tree.int_constant(expr)
        if position is not None:
            expr = select[position - 1]  # policy.analyze checked the position
        elif (expr.get("class") == "COLUMN_REF" and len(expr.get("column_names", [])) == 1
              and parse_tree.column_name(expr) in aliases):
            named = [e for e in select if str(e.get("alias", "")).lower()
                     == parse_tree.column_name(expr)]
            if not named or parse_tree.shape({**named[0], "alias": ""}) != parse_tree.shape(
                    expr):
                raise _refuse("GROUP BY a select alias is not available; group by the "
                              "expression or its position")
        key = _copy(expr)
        key["alias"] = ""
        keys.append(key)
    width = len(keys)
    if node.get("group_sets", []) != ([list(range(width))] if width else []):
        raise _refuse("GROUPING SETS, ROLLUP and CUBE are not available")

    rewrite = _Rewrite(keys, aliases)
    final = _copy(tree)
    fnode = final["statements"][0]["node"]
    fnode["select_list"] = [rewrite.output(e) for e in select]
    if node.get("having") is not None:
        fnode["having"] = rewrite.output(node["having"])
    for modifier in fnode.get("modifiers", []):
        for order in modifier.get("orders", []):
            expr = order.get("expression", {})
            if parse_tree.int_constant(expr) is None and expr.get("class") != "STAR":
                order["expression"] = rewrite.output(expr)
    count = _expr(f"CAST(coalesce(sum({_q(_COUNT)}), 0) AS BIGINT)")
    count["alias"] = f"{_RESERVED}_n0"  # as compute/sql/rewrite.py names it
    fnode["select_list"].append(count)
    fnode["from_table"] = _copy(parse_tree.parse(f"SELECT 1 FROM {PARTS}")
                                ["statements"][0]["node"]["from_table"])
    fnode["where_clause"] = None
    fnode["group_expressions"] = [_column(f"{_RESERVED}_k{i}") for i in range(width)]

    member = _copy(tree)
    mnode = member["statements"][0]["node"]
    named_keys = []
    for i, key in enumerate(keys):
        named_keys.append({**_copy(key), "alias": f"{_RESERVED}_k{i}"})
    mcount = _expr("count_star()")
    mcount["alias"] = _COUNT
    mnode["select_list"] = [*named_keys, *rewrite.partials, mcount]
    mnode["group_expressions"] = _copy(keys)
    mnode["having"] = None
    mnode["modifiers"] = []
    return Split(plan.tables[0][1], member, final, len(select))


def check(params: dict[str, Any]) -> None:
    """What a pool cannot do with these checked sql params (ParameterError)."""
    if params.get("_rules") or params.get("query_args") is not None:
        raise ParameterError("parameter 'query': on an executor pool: the datasets' analysis "
                             "rules are not available")
    split(params["query"])


def _sql(tree: dict[str, Any]) -> str:
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        row = con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchone()
    finally:
        con.close()
    if not row:  # pragma: no cover - DuckDB format change
        raise ParameterError("parameter 'query': on an executor pool: cannot be rewritten")
    return str(row[0])


# -- the member side ----------------------------------------------------------------------

def member_partial(key: str, dataset: str, schema: pa.Schema, sql: str,
                   memory_limit: str | None) -> tuple[pa.Table, str]:
    """This member's partial aggregates of its part of `dataset` (run on its worker)."""
    from teeflow.compute.sql import session

    table = held.part(key, dataset, schema)
    return session._execute([(dataset, table)], {"memory_limit": memory_limit}, sql)


# -- the lead side ------------------------------------------------------------------------

def _bound(schemas: dict[str, pa.Schema], params: dict[str, Any], dataset: str,
           member_sql: str) -> tuple[pa.Schema, list[tuple[str, str]]]:
    """The single executor's output schema (its counting query over empty tables), and the
    members' partial columns with their DuckDB types (the partial query over an empty part)."""
    import duckdb

    from teeflow.compute.sql import session
    from teeflow.compute.sql.policy import analyze
    from teeflow.compute.sql.rewrite import check_columns, counting_query, view_names

    views = view_names(list(schemas))
    check_columns(schemas)
    sql, _ = counting_query(analyze(params["query"]), views)
    empty = [(ds, schema.empty_table()) for ds, schema in schemas.items()]
    with session._Session(empty, memory_limit=None, spill=False) as s:
        try:
            target = s.con.sql(sql).to_arrow_table().schema
            rel = s.con.sql(member_sql)
            columns = list(zip(rel.columns, [str(t) for t in rel.types], strict=True))
        except duckdb.Error as exc:
            raise ParameterError(f"parameter 'query': does not fit the datasets: {exc}") from None
    return target, columns


def _combine(parts: pa.Table, columns: list[tuple[str, str]], final_sql: str,
             params: dict[str, Any]) -> pa.Table:
    import duckdb

    from teeflow.compute.errors import public
    from teeflow.compute.sql import session

    typed = ", ".join(f"CAST({_q(c)} AS {t}) AS {_q(c)}" for c, t in columns)
    with session._Session([(_RAW, parts)], params.get("memory_limit"), spill=True) as s:
        try:
            s.con.execute(f"CREATE TEMP VIEW {PARTS} AS SELECT {typed} FROM {_RAW}")
            return s.con.sql(final_sql).to_arrow_table()
        except duckdb.OutOfMemoryException:
            raise public("out_of_memory", computation=NAME,
                         limit=params.get("memory_limit") or "DuckDB's default",
                         how="combining the members' partial aggregates") from None
        except duckdb.Error as exc:
            raise public("query_failed", computation=NAME, kind=type(exc).__name__) from None


async def run(client: Client, workers: dict[str, str], keys: dict[str, str],
              params: dict[str, Any], schemas: dict[str, pa.Schema]) -> dict[str, Any]:
    import pyarrow.compute as pc

    from teeflow.compute import usercode
    from teeflow.compute.errors import public
    from teeflow.compute.sql import MAX_ROWS
    from teeflow.compute.sql.rewrite import view_names

    check(params)
    plan = split(params["query"])
    views = view_names(list(schemas))
    if plan.table.lower() not in views:
        raise ParameterError(f"parameter 'query': table {plan.table!r} is not a dataset of "
                             f"this task (datasets: {', '.join(sorted(views))})")
    dataset = list(schemas)[views[plan.table.lower()]]
    member_sql = _sql(plan.member)
    target, columns = _bound(schemas, params, dataset, member_sql)
    final = _copy(plan.final)
    for item, field in zip(final["statements"][0]["node"]["select_list"], target,
                           strict=True):
        item["alias"] = field.name
    final_sql = _sql(final)

    members = sorted(workers)
    got = await client.gather([
        client.submit(member_partial, keys[m], dataset, schemas[dataset], member_sql,
                      params.get("memory_limit"), **held.pinned(workers[m]))
        for m in members])
    parts = pa.concat_tables([t for t, _ in got])
    spill = "encrypted" if all(s == "encrypted" for _, s in got) else "disabled"
    result = _combine(parts, columns, final_sql, params)
    result = result.rename_columns(target.names).cast(target)

    k = int(params.get("min_group_size", 10))
    width = result.num_columns - 1
    smallest = pc.min(result.column(width)).as_py() if result.num_rows else None
    if smallest is not None and smallest < k:
        raise public("small_group", computation=NAME, limit=k, source=f"dataset {plan.table!r}")
    if result.num_rows > MAX_ROWS:
        raise public("result_too_large", computation=NAME, limit=MAX_ROWS, unit="rows")
    out = usercode.table_json(result.select(list(range(width))))
    out["spill"] = spill
    return out
