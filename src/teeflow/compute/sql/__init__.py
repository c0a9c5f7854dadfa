"""sql: one aggregate DuckDB query over the parties' tables; only aggregates leave.

Each input table is visible to the query as a view named after its dataset (quote names that
are not plain identifiers: ``FROM "alice-patients"``). The query must be one ``SELECT`` whose
output is aggregated, and every output group must count at least ``min_group_size`` input
rows; a query that breaks this fails with an error naming the rule, and returns nothing.

How the policy is enforced. DuckDB parses the query (``json_serialize_sql``); the parse tree,
never the text, is checked against these rules (fail closed: anything not listed is refused,
and so is a parse-tree field these checks do not know, so a DuckDB newer than the 1.5 series
they were written for refuses queries rather than letting a new clause through):

- one statement, a plain ``SELECT`` (no CTE, set operation, ``DISTINCT``, ``QUALIFY``,
  ``SAMPLE``, percent ``LIMIT``); ``LIMIT``/``OFFSET`` only as constants;
- ``FROM`` only the task's datasets, joined (inner, left, right, full, cross, natural,
  ``USING``/``ON``) with no subquery, table function, ``VALUES``, ``PIVOT``, ``LATERAL``,
  ``ASOF``/``POSITIONAL``/semi/anti join, schema-qualified name or column-alias list; so no
  file, extension or catalog is reachable (external access is also switched off and the
  configuration locked before the query runs);
- nowhere a subquery, window function, ``*`` (except ``count(*)`` and ``ORDER BY ALL``),
  lambda, prepared-statement parameter, or a macro other than a few harmless ones;
- the query aggregates: it has aggregate functions or a ``GROUP BY``. A column outside an
  aggregate must be a ``GROUP BY`` key (DuckDB's binder checks this as well);
- aggregates are statistics of many rows: count, sum, avg, standard deviation, variance, sem,
  skewness, kurtosis, correlation, covariance, the ``regr_*`` family, approximate count
  distinct. ``min``/``max``/``median``/quantiles/``mode``/``first``/``arg_max``/``list``/
  ``string_agg`` and the like are refused: each returns one row's value. An aggregate's
  arguments may only be columns and constants combined by ``+ - *``, division by a non-zero
  constant, and casts to number types; no ``FILTER``, ``ORDER BY``, ``CASE``, comparison or
  function inside, so an aggregate cannot simply single out rows (``sum(CASE WHEN id = 7 THEN
  salary END)``). Condition on a ``GROUP BY`` key instead: that group must then be large
  enough.

The group-size rule is enforced by rewriting, not by trusting the query: the checked tree gets
one more aggregate per dataset occurrence in ``FROM``, the number of distinct rows of that
dataset in the group (each table carries a hidden row number), and DuckDB runs that query.
Every result row must count at least ``min_group_size`` rows of *each* dataset it joins, so a
join cannot hide a single row of one party behind many of another. A query without ``GROUP
BY`` is one group. Groups removed by ``HAVING`` or cut by ``LIMIT`` are not output and not
checked. The counts are removed before the result is returned.

What this does not stop, and why the owners must read the exact query they sign: several
queries whose answers differ by one person; and arithmetic that singles out rows inside an
aggregate without any comparison, such as a value times a 0/1 column that marks one person
(``sum(salary * rare_flag)``, or ``covar_pop(salary, rare_flag)`` with the averages), a
polynomial of a column with few values, or rounding casts. The rules above remove the direct
ways (no ``CASE``, ``FILTER``, comparison, boolean cast or division by a column inside an
aggregate); no syntactic rule removes these.

Bounded memory: ``memory_limit`` caps DuckDB's buffer memory. Work beyond it spills to a fresh
temporary directory, deleted afterwards, and only encrypted: DuckDB's ``temp_file_encryption``
encrypts the spill with a random key generated and held in process memory. DuckDB writes
encrypted files only with the OpenSSL crypto of its ``httpfs`` extension (the built-in one is
read-only), loaded from the ``duckdb-extension-httpfs`` package (DuckDB verifies its
signature); without it spilling is disabled and a query that needs more than
``memory_limit`` fails. The result says which (``"spill": "encrypted"`` or ``"disabled"``).
For a join, the per-dataset row counts are exact ``count(DISTINCT ...)`` aggregates, which
DuckDB spills poorly: such a query can need memory in proportion to its input.

Errors never quote input values: DuckDB's messages are shown only for parse and bind errors
(checked against empty tables before any data moves); a failure while running gives the error
type only.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from teeflow.compute.params import Param, make_check_params
from teeflow.compute.rows import Source
from teeflow.core.errors import ParameterError

NAME = "sql"
DESCRIPTION = (
    "An aggregate DuckDB query over the datasets (each a view named after its dataset); only "
    "aggregates leave, each output group counting at least min_group_size input rows"
)
LAYOUT = "any"
MIN_DATASETS = 1
# What this computation's code digest covers (names, not imports: the engine loads lazily).
USES = (
    "teeflow.compute.errors", "teeflow.compute.params", "teeflow.compute.rows",
    "teeflow.compute.usercode",
    "teeflow.compute.sql.policy", "teeflow.compute.sql.analysis",
    "teeflow.compute.sql.tree", "teeflow.compute.sql.rewrite", "teeflow.compute.sql.session",
)

MAX_QUERY = 64 * 1024
MAX_ROWS = 100_000
MAX_NAME = 255
_RESERVED = "__teeflow"
_MEMORY = re.compile(r"^\d{1,9}(\.\d{1,3})?\s?(B|[KMGT]i?B)$", re.IGNORECASE)


PARAMS: tuple[Param, ...] = (
    Param(
        "query", "str", required=True,
        help="one SELECT over the datasets, each a view named after its dataset",
    ),
    Param(
        "min_group_size", "int", default=10, low=1, high=1_000_000_000,
        help="the fewest input rows (of each dataset joined) an output group may count",
    ),
    Param(
        "query_args", "str", default=None,
        help="for an owner-approved analysis template: a JSON object of its $parameters",
    ),
    Param(
        "memory_limit", "str", default=None,
        help="DuckDB memory budget, e.g. 512MB; work beyond it spills, encrypted, to disk",
    ),
)


# An approval rule must bind these (provider/consent.py): the query picks what is shown,
# and a floor of 1 shows every row.
REVEALING = ("query", "min_group_size")


def _memory_limit(checked: dict[str, Any]) -> None:
    limit = checked["memory_limit"]
    if limit is not None and not _MEMORY.match(limit):
        raise ParameterError(
            f"parameter 'memory_limit': not a size such as 512MB or 2GiB: {limit!r}"
        )
    if len(checked["query"]) > MAX_QUERY:
        raise ParameterError(f"parameter 'query': longer than {MAX_QUERY} characters")


# What every role can check without DuckDB (the scheduler, providers and the SDK): types,
# bounds, sizes, names. The output policy needs DuckDB's parser and runs in the executor.
precheck_params = make_check_params(NAME, PARAMS, _memory_limit)


def _post(checked: dict[str, Any]) -> None:
    from teeflow.compute.sql import policy

    _memory_limit(checked)
    if checked["query_args"] is not None:
        raise ParameterError("parameter 'query_args': only for an analysis template approved "
                             "by the datasets' analysis rules")
    policy.analyze(checked["query"])


check_params = make_check_params(NAME, PARAMS, _post)


def precheck_schemas(schemas: dict[str, pa.Schema], checked: dict[str, Any]) -> None:
    """Dataset names usable as views and no reserved column names (no DuckDB needed)."""
    from teeflow.compute.sql import rewrite

    rewrite.view_names(list(schemas))
    rewrite.check_columns(schemas)


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Dataset names usable as views, no reserved column names, and the query binds against
    (empty) tables of these schemas: column and type errors surface before any data moves."""
    from teeflow.compute.sql import session

    session.check_binds(schemas, params)


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    from teeflow.compute.sql import session

    return session.run(inputs, params)


def run_stream(sources: list[Source], params: dict[str, Any]) -> dict[str, Any]:
    from teeflow.compute.sql import session

    return session.run_stream(sources, params)
