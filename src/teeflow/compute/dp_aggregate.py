"""dp_aggregate: a count, sum, mean or histogram over the union of rows, with OpenDP's
Laplace noise (epsilon-DP per identity; see ``dp``).

Parameters (strings on the wire):

- ``statistic``: ``count``, ``sum``, ``mean`` or ``histogram`` (a count per category of
  ``column``).
- ``column``: the numeric column summed or averaged, or the histogram's column.
- ``lower``/``upper``: the declared bounds each value is clamped to (sum and mean).
- ``group_by`` and ``categories``: one output per declared category (count, sum, mean); a
  row whose group is not declared is left out. The categories come from the params, never
  from the data, and every one is always in the result, so the output's keys reveal nothing.
- ``epsilon``, ``identity``, ``max_contributions``: see ``dp``.

Nothing the data holds can make it fail: rows with a null or non-finite value, or a null
identity, are left out (a per-row step); an empty input gets noise like any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute import dp
from teeflow.compute.columns import columns_of, is_numeric, is_string
from teeflow.compute.params import Param, make_check_params
from teeflow.core.errors import ParameterError, SchemaMismatch

NAME = "dp_aggregate"
DESCRIPTION = (
    "Differentially private count, sum, mean or histogram over the union of the datasets' "
    "rows, optionally per declared category, with contribution bounds per identity and "
    "OpenDP Laplace noise; the result carries the epsilon spent"
)
LAYOUT = "rows"
MIN_DATASETS = 1
USES = ("teeflow.compute.dp", "teeflow.compute.columns", "teeflow.compute.params")
MAX_CATEGORIES = 100
MAX_CATEGORY_CHARS = 100
STATISTICS = ("count", "sum", "mean", "histogram")

PARAMS = (
    Param("statistic", "str", required=True, choices=STATISTICS,
          help="count, sum, mean or histogram"),
    Param("column", "str", help="the value column (sum, mean) or the histogram's column"),
    Param("lower", "float", low=-dp.BOUND_CAP, high=dp.BOUND_CAP,
          help="values are clamped to [lower, upper] (sum, mean)"),
    Param("upper", "float", low=-dp.BOUND_CAP, high=dp.BOUND_CAP,
          help="values are clamped to [lower, upper] (sum, mean)"),
    Param("group_by", "str", help="a column whose declared categories each get an output"),
    Param("categories", "list[str]",
          help="the declared categories of group_by (or of the histogram's column)"),
    *dp.PRIVACY_PARAMS,
)


# What the release spends and protects: the unit of privacy, its bounds, the columns.
REVEALING = ("epsilon", "identity", "max_contributions", "column", "lower", "upper",
             "group_by")


def _cross_check(p: dict[str, Any]) -> None:
    stat = p["statistic"]
    if stat in ("sum", "mean", "histogram") and not p["column"]:
        raise ParameterError(f"parameter 'column': required for statistic {stat}")
    if stat == "count" and p["column"]:
        raise ParameterError("parameter 'column': not used by statistic count")
    if stat in ("sum", "mean"):
        if p["lower"] is None or p["upper"] is None:
            raise ParameterError(f"parameter 'lower': lower and upper are required for {stat}")
        if not p["lower"] < p["upper"]:
            raise ParameterError("parameter 'upper': must be greater than lower")
    elif p["lower"] is not None or p["upper"] is not None:
        raise ParameterError(f"parameter 'lower': bounds are not used by statistic {stat}")
    if stat == "histogram" and p["group_by"]:
        raise ParameterError("parameter 'group_by': a histogram groups by its column")
    grouped = stat == "histogram" or p["group_by"]
    cats = p["categories"]
    if grouped and not cats:
        raise ParameterError("parameter 'categories': required to group (declare the "
                             "categories; they are never read from the data)")
    if cats and not grouped:
        raise ParameterError("parameter 'categories': only with group_by or histogram")
    if cats and len(cats) > MAX_CATEGORIES:
        raise ParameterError(f"parameter 'categories': at most {MAX_CATEGORIES}")
    if cats and any(len(c) > MAX_CATEGORY_CHARS for c in cats):
        raise ParameterError(f"parameter 'categories': each at most {MAX_CATEGORY_CHARS} chars")
    if p["max_contributions"] != 1 and not p["identity"]:
        raise ParameterError("parameter 'max_contributions': needs identity")


check_params = make_check_params(NAME, PARAMS, _cross_check)
privacy_cost = dp.privacy_cost


def _group_column(p: dict[str, Any]) -> str | None:
    return p["column"] if p["statistic"] == "histogram" else p["group_by"]


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Every dataset has the columns named, of usable types (names only, never values)."""
    for ds, schema in schemas.items():
        cols = columns_of(ds, schema)
        needs = [("column", params["column"]), ("group_by", params["group_by"]),
                 ("identity", params["identity"])]
        for param, col in needs:
            if col and col not in cols:
                raise SchemaMismatch(f"dataset {ds!r}: no column {col!r} (parameter {param!r})")
        if params["statistic"] in ("sum", "mean") and not is_numeric(cols[params["column"]]):
            raise SchemaMismatch(f"dataset {ds!r}: column {params['column']!r} must be numeric")
        group = _group_column(params)
        if group:
            t = cols[group]
            if not (is_string(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)):
                raise SchemaMismatch(
                    f"dataset {ds!r}: column {group!r} must be a string, integer or boolean")


def _rows(inputs: list[tuple[str, pa.Table]], p: dict[str, Any]) -> pa.Table:
    """The union of the rows over the columns used: values as float64, groups and
    identities as strings (so an integer 1 and a string "1" group alike)."""
    value = p["column"] if p["statistic"] in ("sum", "mean") else None
    group, identity = _group_column(p), p["identity"]
    parts = []
    for _, table in inputs:
        cols: dict[str, pa.ChunkedArray] = {}
        if value:
            cols["value"] = table[value].cast(pa.float64())
        if group:
            cols["group"] = table[group].cast(pa.string())
        if identity:
            cols["identity"] = table[identity].cast(pa.string())
        if not cols:
            cols["row"] = pa.chunked_array([pa.nulls(table.num_rows, pa.int8())])
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


def release(table: pa.Table, p: dict[str, Any]) -> dict[str, Any]:
    """The noised statistic of rows already bounded per identity (``value``/``group`` columns)."""
    stat, eps = p["statistic"], p["epsilon"]
    k = p["max_contributions"] if p["identity"] else 1
    if stat in ("sum", "mean"):
        table, _ = dp.finite_values(table, "value")
    cats = p["categories"] or [None]
    if "group" in table.column_names:
        groups = [table.filter(pc.equal(table["group"], c).fill_null(False)) for c in cats]
    else:
        groups = [table]
    out: list[dict[str, Any]] = []
    if stat in ("count", "histogram"):
        counts = dp.noisy_counts([g.num_rows for g in groups], k, eps)
        out = [{"count": c} for c in counts]
    else:
        lo, hi = p["lower"], p["upper"]
        # every group's sum is OpenDP's; one identity's k rows move the vector of sums by at
        # most the bound OpenDP gives for one sum of them (rounding included)
        sums = [dp.clamped_sum(g["value"].to_numpy(zero_copy_only=False), lo, hi)
                for g in groups]
        sens = dp.sum_sensitivity(lo, hi, k)
        if stat == "sum":
            out = [{"sum": s} for s in dp.noisy_vector(sums, sens, eps)]
        else:  # half the budget on the sums, half on the counts
            noisy_sums = dp.noisy_vector(sums, sens, eps / 2)
            counts = dp.noisy_counts([g.num_rows for g in groups], k, eps / 2)
            out = [{"sum": s, "count": c,
                    "mean": float(np.clip(s / c, lo, hi)) if c > 0 else None}
                   for s, c in zip(noisy_sums, counts, strict=True)]
    result: dict[str, Any] = {"statistic": stat, "privacy": dp.privacy_note(p, "laplace")}
    if p["categories"]:
        result["by"] = _group_column(p)
        result["groups"] = [{"category": c, **o} for c, o in zip(cats, out, strict=True)]
    else:
        result.update(out[0])
    return result


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    table = _rows(inputs, params)
    k = params["max_contributions"]
    table = dp.bound_contributions(table, "identity" if params["identity"] else None, k)
    return release(table, params)
