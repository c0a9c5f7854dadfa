"""Schema checks shared by the computations: column presence and types, named by dataset.
Light (pyarrow only): the scheduler and providers run these before any data moves."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa

from teeflow.core.errors import ParameterError, SchemaMismatch


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_class_label(t: pa.DataType) -> bool:
    return is_numeric(t) or pa.types.is_boolean(t) or is_string(t)


def columns_of(dataset: str, schema: pa.Schema) -> dict[str, pa.DataType]:
    """name → type, in schema order; raises SchemaMismatch on a duplicate name."""
    cols: dict[str, pa.DataType] = {}
    for f in schema:
        if f.name in cols:
            raise SchemaMismatch(f"dataset {dataset!r}: duplicate column {f.name!r}")
        cols[f.name] = f.type
    return cols


def _shown(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def require_columns(
    named: Sequence[tuple[str, str]], available: Iterable[dict[str, pa.DataType]], where: str
) -> None:
    """ParameterError for the first (parameter, column) whose column no dataset has."""
    available = list(available)
    for param, column in named:
        if all(column not in cols for cols in available):
            raise ParameterError(
                f"parameter {param!r}: no column {column!r} in any dataset ({where})"
            )


def named_columns(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(parameter, column) for the label and the explicit features."""
    return [("label", params["label"])] + [("features", f) for f in params.get("features") or []]


def same_schema(
    computation: str, schemas: dict[str, pa.Schema], params: dict[str, Any]
) -> tuple[dict[str, pa.DataType], dict[str, str]]:
    """Rows layout: every dataset must have the same columns with the same types (order and
    nullability aside). Returns (columns, owner) where owner maps each column to the first
    dataset, for messages."""
    if not schemas:
        raise SchemaMismatch(f"{computation} needs at least one dataset, got none")
    cols = {ds: columns_of(ds, schema) for ds, schema in schemas.items()}
    first = next(iter(cols))
    base = cols[first]
    require_columns(
        named_columns(params), cols.values(), f"columns of {first!r}: {_shown(base)}"
    )
    for ds, c in cols.items():
        if c == base:
            continue
        problems = []
        missing = [n for n in base if n not in c]
        extra = [n for n in c if n not in base]
        if missing:
            problems.append(f"missing column(s) {missing}")
        if extra:
            problems.append(f"extra column(s) {extra}")
        for n, t in c.items():
            if n in base and base[n] != t:
                problems.append(f"column {n!r} is {t}, not {base[n]}")
        raise SchemaMismatch(
            f"dataset {ds!r}: schema differs from dataset {first!r}: {'; '.join(problems)}"
        )
    return base, dict.fromkeys(base, first)


def resolve_features(cols: dict[str, pa.DataType], params: dict[str, Any]) -> list[str]:
    if params.get("features"):
        return list(params["features"])
    return [n for n, t in cols.items() if n != params["label"] and is_numeric(t)]


def check_label_and_features(
    cols: dict[str, pa.DataType],
    owner: dict[str, str],
    params: dict[str, Any],
    label_ok: Callable[[pa.DataType], bool],
    label_need: str,
) -> list[str]:
    """Check the label's and features' types over the combined columns; returns the features.
    ``owner`` names the dataset holding each column, for messages."""
    require_columns(named_columns(params), [cols], f"columns: {_shown(cols)}")
    label = params["label"]
    if not label_ok(cols[label]):
        raise SchemaMismatch(
            f"dataset {owner[label]!r}: label column {label!r} has type {cols[label]}; "
            f"need {label_need}"
        )
    features = resolve_features(cols, params)
    if not features:
        raise SchemaMismatch(
            f"dataset {next(iter(owner.values()))!r}: no numeric feature columns besides the "
            f"label {label!r}"
        )
    for f in features:
        if not is_numeric(cols[f]):
            raise SchemaMismatch(
                f"dataset {owner[f]!r}: feature column {f!r} has type {cols[f]}; "
                "features must be integer or floating"
            )
    return features
