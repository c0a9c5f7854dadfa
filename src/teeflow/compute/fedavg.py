"""model_aggregation: federated averaging of model parameters, weighted by sample count.

Each party's table has one row per parameter:

- ``name`` (string): the parameter's name, unique within the table;
- ``value`` (float64): the party's value for it;
- ``n_samples`` (int64): the party's sample count, the same positive number in every row.

Every table must name the same set of parameters. The result is, for each name,
``sum_i n_i * value_i / sum_i n_i``, in the first table's row order. Other columns are ignored.
One parameter, ``min_parties`` (default 1): the fewest distinct owners a task may have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute.errors import public
from teeflow.compute.params import Param, make_check_params
from teeflow.compute.rows import Source
from teeflow.core.errors import ParameterError, SchemaMismatch

NAME = "model_aggregation"
DESCRIPTION = (
    "Federated averaging: per-parameter mean of each party's values weighted by its n_samples; "
    "tables (name: string, value: float64, n_samples: int64); min_parties, the fewest owners"
)

_COLUMNS: dict[str, tuple[str, Any]] = {
    "name": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "value": ("float64", lambda t: t == pa.float64()),
    "n_samples": ("int64", lambda t: t == pa.int64()),
}


LAYOUT = "rows"
MIN_DATASETS = 1
USES = (
    "teeflow.compute.errors",
    "teeflow.compute.params",
    "teeflow.compute.rows",
)
PARAMS: tuple[Param, ...] = (
    # default 1 keeps one-owner averaging working; owners who want more bind it by rule
    Param("min_parties", "int", default=1, low=1, high=1000,
          help="the fewest owners a task may have (with two, each recovers the other's)"),
)
# With one party the mean is its own table; with two, each party that receives the result
# recovers the other's values (it knows its own and n_samples): owners decide the minimum.
REVEALING = ("min_parties",)


def check_parties(parties: int, params: dict[str, Any]) -> None:
    if parties < params["min_parties"]:
        raise public("too_few_parties", ParameterError, computation=NAME,
                     limit=params["min_parties"])

check_params = make_check_params(NAME, PARAMS)


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    if not schemas:
        raise SchemaMismatch(f"{NAME} needs at least one dataset, got none")
    for ds, schema in schemas.items():
        for column, (want, ok) in _COLUMNS.items():
            idx = schema.get_all_field_indices(column)
            if not idx:
                raise SchemaMismatch(f"dataset {ds!r}: missing column {column!r} ({want})")
            if len(idx) > 1:
                raise SchemaMismatch(f"dataset {ds!r}: duplicate column {column!r}")
            got = schema.field(idx[0]).type
            if not ok(got):
                raise SchemaMismatch(f"dataset {ds!r}: column {column!r} is {got}, need {want}")


def _party(ds: str, table: pa.Table) -> tuple[list[str], np.ndarray, int]:
    """(names, values, n_samples) of one party's table, checked."""
    if table.num_rows == 0:
        raise public("dataset_no_rows", dataset=ds)
    for column in _COLUMNS:
        if table[column].null_count:
            raise public("nulls", dataset=ds, column=column)
    names = table["name"].to_pylist()
    if len(set(names)) != len(names):
        raise public("duplicate_names", dataset=ds)
    values = table["value"].to_numpy()
    if not np.isfinite(values).all():
        raise public("values_non_finite", dataset=ds)
    counts = pc.unique(table["n_samples"]).to_pylist()
    if len(counts) != 1:
        raise public("n_samples_vary", dataset=ds)
    n = counts[0]
    if n <= 0:
        raise public("n_samples_positive", dataset=ds)
    return names, values, n


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    check_schemas({ds: t.schema for ds, t in inputs}, params)
    parties = [(ds, *_party(ds, table)) for ds, table in inputs]

    first_ds, order, _, _ = parties[0]
    expected = set(order)
    rows = np.empty((len(parties), len(order)), dtype=np.float64)
    weights = np.empty(len(parties), dtype=np.float64)
    total = 0
    for i, (ds, names, values, n) in enumerate(parties):
        if set(names) != expected:
            # which names differ is the other parties' data: not said
            raise public("names_differ", dataset=ds, other=first_ds)
        position = {name: j for j, name in enumerate(names)}
        rows[i] = values[[position[name] for name in order]]
        weights[i] = n
        total += n

    means = (weights / weights.sum()) @ rows
    return {
        "parameters": {name: float(v) for name, v in zip(order, means, strict=True)},
        "names": list(order),  # the parameters' order (JSON keys come back sorted)
        "n_samples": total,
        "parties": len(parties),
    }


def run_stream(sources: list[Source], params: dict[str, Any]) -> dict[str, Any]:
    """The same average with one party's table in memory at a time (plus the running sums),
    for when all parties together exceed the executor's budget."""
    check_schemas({s.name: s.schema for s in sources}, params)
    order: list[str] = []
    sums = np.empty(0)
    total = 0
    for i, src in enumerate(sources):
        table = pa.Table.from_batches(list(src.batches()), src.schema)
        names, values, n = _party(src.name, table)
        del table
        if i == 0:
            order, sums = names, np.zeros(len(names))
        position = {name: j for j, name in enumerate(names)}
        if set(position) != set(order):
            raise public("names_differ", dataset=src.name, other=sources[0].name)
        sums += n * values[[position[name] for name in order]]
        total += n
    return {"parameters": {name: float(v) for name, v in zip(order, sums / total, strict=True)},
            "names": list(order), "n_samples": total, "parties": len(sources)}
