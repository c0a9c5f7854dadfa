"""vertical: train a model on columns that different parties hold for the same entities.

Each dataset holds an ID column (the same name in every dataset, integer or string, unique
within the dataset) and its own columns; no other column name may occur in two datasets. Inside
the enclave the datasets are inner-joined on the ID (a private set intersection no party sees),
the joined rows are ordered by ID and the ID is dropped; then the chosen model trains on them
exactly as it would on one table holding those rows.

Parameters (all strings on the wire):

- ``id`` (required): the ID column.
- ``model`` (required): ``logistic_regression``, ``linear_regression`` or ``xgboost``.
- ``min_intersection`` (default 10): the fewest common IDs the owners allow. Below it nothing
  is released, not even an error that says how many (or which) IDs matched; an owner binds
  it with an approval rule (provider/consent.py).
- every other parameter is the model's (``label`` is required; it is in exactly one dataset).

The result is the model's result plus ``model_name`` and ``intersection_size``. No ID and no
row leaves the enclave; error messages name datasets and columns, never an ID, a value or a
count. Every check of one party's rows (null IDs, duplicate IDs, nulls in a used column) runs
over its whole table before the join, so no error depends on which IDs the other party holds.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute import linreg, logreg, xgb
from teeflow.compute.columns import columns_of, is_string
from teeflow.compute.errors import public
from teeflow.compute.params import Param, parse_params
from teeflow.compute.rows import Rows
from teeflow.core.errors import ParameterError, SchemaMismatch

NAME = "vertical"
DESCRIPTION = (
    "Vertical partitioning: inner-join the datasets' columns on an ID column inside the "
    "enclave, then train logistic_regression, linear_regression or xgboost on the joined "
    "rows; only the model and the intersection size leave"
)
LAYOUT = "columns"
MIN_DATASETS = 2

MODELS: dict[str, ModuleType] = {m.NAME: m for m in (logreg, linreg, xgb)}
USES = (
    "teeflow.compute.errors",
    "teeflow.compute.columns",
    "teeflow.compute.params",
    "teeflow.compute.logreg",
    "teeflow.compute.linreg",
    "teeflow.compute.xgb",
)

MIN_INTERSECTION = 10
PARAMS = (
    Param("id", "str", required=True, help="the ID column present in every dataset"),
    Param("model", "str", required=True, choices=tuple(MODELS),
          help="the model to train on the joined rows; its parameters are accepted too"),
    Param("min_intersection", "int", default=MIN_INTERSECTION, low=1, high=1_000_000_000,
          help="the fewest IDs the datasets must share; below it nothing is released"),
)


def _all_params() -> tuple[Param, ...]:
    """Its own parameters and every model's (the first of each name), for approval rules."""
    out: dict[str, Param] = {p.name: p for p in PARAMS}
    for m in MODELS.values():
        for p in m.PARAMS:
            out.setdefault(p.name, p)
    return tuple(out.values())


ALL_PARAMS = _all_params()
# The minimum keeps a one-ID probe from answering "is this ID theirs?"; the model's own
# revealing parameters (xgboost's trees) come with it.
REVEALING = ("min_intersection", *xgb.REVEALING)


def check_params(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"id", "model", "model_params"}``; the model's own parameters are checked by it."""
    if not isinstance(raw, dict):
        raise ParameterError(f"{NAME}: parameters must be a mapping of names to strings")
    own = {p.name for p in PARAMS}
    checked = parse_params(NAME, PARAMS, {k: v for k, v in raw.items() if k in own})
    model = MODELS[checked["model"]]
    model_params = model.check_params({k: v for k, v in raw.items() if k not in own})
    id_col = checked["id"]
    if model_params["label"] == id_col:
        raise ParameterError(f"parameter 'label': is the id column {id_col!r}")
    if id_col in (model_params.get("features") or []):
        raise ParameterError(f"parameter 'features': includes the id column {id_col!r}")
    return {**checked, "model_params": model_params}


def describe_extra() -> dict[str, Any]:
    return {
        "model_params": {
            name: [p.describe() for p in m.PARAMS] for name, m in MODELS.items()
        }
    }


def _joined_columns(
    schemas: dict[str, pa.Schema], id_col: str
) -> tuple[dict[str, pa.DataType], dict[str, str]]:
    """(column → type, column → dataset) of the joined table, ID excluded, in dataset order."""
    cols = {ds: columns_of(ds, schema) for ds, schema in schemas.items()}
    if all(id_col not in c for c in cols.values()):
        raise ParameterError(
            f"parameter 'id': no column {id_col!r} in any dataset "
            f"(datasets: {', '.join(cols)})"
        )
    first_ds, first_type = None, None
    joined: dict[str, pa.DataType] = {}
    owner: dict[str, str] = {}
    for ds, c in cols.items():
        if id_col not in c:
            raise SchemaMismatch(f"dataset {ds!r}: missing the id column {id_col!r}")
        t = c[id_col]
        if not (pa.types.is_integer(t) or is_string(t)):
            raise SchemaMismatch(
                f"dataset {ds!r}: id column {id_col!r} has type {t}; need integer or string"
            )
        if first_type is None:
            first_ds, first_type = ds, t
        elif pa.types.is_integer(t) != pa.types.is_integer(first_type):
            raise SchemaMismatch(
                f"dataset {ds!r}: id column {id_col!r} is {t} but {first_type} in dataset "
                f"{first_ds!r}"
            )
        for name, ty in c.items():
            if name == id_col:
                continue
            if name in owner:
                raise SchemaMismatch(
                    f"column {name!r} is in both dataset {owner[name]!r} and dataset {ds!r} "
                    f"(only the id column {id_col!r} may be shared)"
                )
            joined[name] = ty
            owner[name] = ds
    return joined, owner


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    if len(schemas) < MIN_DATASETS:
        raise SchemaMismatch(
            f"{NAME} needs at least {MIN_DATASETS} datasets, got {len(schemas)}"
        )
    cols, owner = _joined_columns(schemas, params["id"])
    MODELS[params["model"]].check_columns(cols, owner, params["model_params"])


def _ids(ds: str, table: pa.Table, id_col: str) -> pa.ChunkedArray:
    """The dataset's IDs as int64 or large_string, checked: no nulls, no duplicates."""
    ids = table[id_col]
    nulls = ids.null_count
    if nulls:
        raise public("nulls", dataset=ds, column=id_col)
    ids = ids.cast(pa.int64() if pa.types.is_integer(ids.type) else pa.large_string())
    distinct = pc.count_distinct(ids).as_py()
    if distinct != len(ids):
        raise public("duplicate_ids", dataset=ds, column=id_col)
    return ids


def join(
    inputs: list[tuple[str, pa.Table]], id_col: str, owner: dict[str, str], columns: list[str],
    minimum: int = 1,
) -> pa.Table:
    """The inner join of the datasets on ``id_col``, ordered by ID, holding ``columns`` (which
    excludes the ID). Fewer than ``minimum`` common IDs (none included) is one fixed error,
    raised before anything about the joined rows is looked at."""
    ids = [_ids(ds, t, id_col) for ds, t in inputs]
    for ds, table in inputs:  # each party's own rows, all of them: not steered by the join
        for c in columns:
            if owner[c] == ds and table[c].null_count:
                raise public("nulls", dataset=ds, column=c)
    common = pc.unique(ids[0])
    for other in ids[1:]:
        common = common.filter(pc.is_in(common, value_set=other))
    if len(common) < max(minimum, 1):
        raise public("small_intersection", computation=NAME, limit=minimum)
    common = common.sort()
    parts: dict[str, pa.ChunkedArray] = {}
    for (ds, table), table_ids in zip(inputs, ids, strict=True):
        keep = pc.is_in(table_ids, value_set=common)
        kept = table_ids.filter(keep)
        order = pc.array_sort_indices(kept)
        if not kept.take(order).equals(pa.chunked_array([common])):  # pragma: no cover
            raise public("internal", computation=NAME)
        mine = [c for c in columns if owner[c] == ds]
        part = table.select(mine).filter(keep).take(order)
        for c in mine:
            parts[c] = part[c]
    return pa.table({c: parts[c] for c in columns})


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    schemas = {ds: t.schema for ds, t in inputs}
    check_schemas(schemas, params)
    model = MODELS[params["model"]]
    model_params = params["model_params"]
    cols, owner = _joined_columns(schemas, params["id"])
    features = model.check_columns(cols, owner, model_params)
    columns = [model_params["label"], *features]

    table = join(inputs, params["id"], owner, columns,
                 params.get("min_intersection", MIN_INTERSECTION))
    result = model.fit(Rows(table, owner=owner), {**model_params, "features": features})
    return {"model_name": params["model"], "intersection_size": table.num_rows, **result}
