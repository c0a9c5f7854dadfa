"""logistic_regression: one L2-regularised binary logistic regression over the union of rows.

Every dataset must have the same columns with the same types (order and nullability aside).
Parameters (all strings on the wire):

- ``label`` (required): the label column; exactly two distinct values. The sorted classes are
  mapped to 0 and 1 and reported as ``classes``.
- ``features`` (optional): comma-separated feature columns; default every integer or floating
  column other than the label, in the first dataset's column order.
- ``C`` (float > 0, default 1.0): inverse regularisation strength, as in scikit-learn.
- ``max_iter`` (int > 0, default 1000): L-BFGS iteration limit.

The result carries the fitted coefficients and intercept, and accuracy, log loss and ROC AUC
on the training rows. Not converging within ``max_iter`` is reported (``converged``), not
raised.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch

NAME = "logistic_regression"
DESCRIPTION = (
    "Binary logistic regression (L2, L-BFGS) over the union of all datasets' rows; "
    "params: label (required), features (comma list), C (default 1.0), max_iter (default 1000)"
)

_PARAMS = ("label", "features", "C", "max_iter")
_MAX_ITER_LIMIT = 100_000
_TOL = 1e-10


# --- parameters -------------------------------------------------------------------------------


def check_params(raw: dict[str, str]) -> dict[str, Any]:
    """Validate and convert the string parameters; raises ParameterError naming the parameter."""
    for key, value in raw.items():
        if key not in _PARAMS:
            raise ParameterError(
                f"parameter {key!r}: unknown parameter for {NAME} (accepted: {', '.join(_PARAMS)})"
            )
        if not isinstance(value, str):
            raise ParameterError(f"parameter {key!r}: must be a string, got {type(value).__name__}")

    label = raw.get("label", "").strip()
    if not label:
        raise ParameterError("parameter 'label': required (the name of the label column)")

    features: list[str] | None = None
    if "features" in raw:
        features = [f.strip() for f in raw["features"].split(",")]
        if any(not f for f in features):
            raise ParameterError(
                f"parameter 'features': empty column name in {raw['features']!r} "
                "(expected a comma-separated list of column names)"
            )
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise ParameterError(f"parameter 'features': duplicate column(s) {dupes}")
        if label in features:
            raise ParameterError(f"parameter 'features': includes the label column {label!r}")

    c_raw = raw.get("C", "1.0")
    try:
        c = float(c_raw)
    except ValueError:
        raise ParameterError(f"parameter 'C': not a number: {c_raw!r}") from None
    if not math.isfinite(c) or c <= 0:
        raise ParameterError(f"parameter 'C': must be a finite number > 0, got {c_raw!r}")

    it_raw = raw.get("max_iter", "1000")
    try:
        max_iter = int(it_raw.strip(), 10)
    except ValueError:
        raise ParameterError(f"parameter 'max_iter': not an integer: {it_raw!r}") from None
    if not 1 <= max_iter <= _MAX_ITER_LIMIT:
        raise ParameterError(
            f"parameter 'max_iter': must be between 1 and {_MAX_ITER_LIMIT}, got {max_iter}"
        )

    return {"label": label, "features": features, "C": c, "max_iter": max_iter}


# --- schemas ----------------------------------------------------------------------------------


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_label_type(t: pa.DataType) -> bool:
    return (
        _is_numeric(t)
        or pa.types.is_boolean(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
    )


def _columns(dataset: str, schema: pa.Schema) -> dict[str, pa.DataType]:
    cols: dict[str, pa.DataType] = {}
    for field in schema:
        if field.name in cols:
            raise SchemaMismatch(f"dataset {dataset!r}: duplicate column {field.name!r}")
        cols[field.name] = field.type
    return cols


def _resolve_features(schema: pa.Schema, params: dict[str, Any]) -> list[str]:
    if params.get("features"):
        return list(params["features"])
    return [f.name for f in schema if f.name != params["label"] and _is_numeric(f.type)]


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Check the datasets' schemas against each other and the (checked) params."""
    if not schemas:
        raise SchemaMismatch(f"{NAME} needs at least one dataset, got none")
    cols = {ds: _columns(ds, schema) for ds, schema in schemas.items()}
    first = next(iter(cols))
    base = cols[first]

    # A column named by a parameter that no dataset has is the parameter's fault.
    label = params["label"]
    if all(label not in c for c in cols.values()):
        raise ParameterError(
            f"parameter 'label': no column {label!r} in any dataset (columns of {first!r}: "
            f"{', '.join(base)})"
        )
    for feature in params.get("features") or []:
        if all(feature not in c for c in cols.values()):
            raise ParameterError(
                f"parameter 'features': no column {feature!r} in any dataset (columns of "
                f"{first!r}: {', '.join(base)})"
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

    # All schemas are now equal: checking the first checks them all.
    if not _is_label_type(base[label]):
        raise SchemaMismatch(
            f"dataset {first!r}: label column {label!r} has type {base[label]}; "
            "need an integer, floating, boolean or string column"
        )
    features = _resolve_features(schemas[first], params)
    if not features:
        raise SchemaMismatch(
            f"dataset {first!r}: no numeric feature columns besides the label {label!r}"
        )
    for feature in features:
        if not _is_numeric(base[feature]):
            raise SchemaMismatch(
                f"dataset {first!r}: feature column {feature!r} has type {base[feature]}; "
                "features must be integer or floating"
            )


# --- run --------------------------------------------------------------------------------------


def _to_matrix(
    table: pa.Table, features: list[str], spans: list[tuple[str, int, int]]
) -> np.ndarray:
    """float64 (n, p) matrix, filled chunk by chunk (zero-copy reads for float64 chunks)."""
    x = np.empty((table.num_rows, len(features)), dtype=np.float64, order="F")
    for j, name in enumerate(features):
        offset = 0
        for chunk in table[name].chunks:
            x[offset : offset + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
            offset += len(chunk)
        finite = np.isfinite(x[:, j])
        if not finite.all():
            row = int(np.argmin(finite))
            ds, start = next((ds, s) for ds, s, e in spans if s <= row < e)
            raise ComputeError(
                f"dataset {ds!r}: feature column {name!r} has a non-finite value (NaN or "
                f"infinity) at row {row - start}"
            )
    return x


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    check_schemas({ds: t.schema for ds, t in inputs}, params)
    label = params["label"]
    features = _resolve_features(inputs[0][1].schema, params)
    columns = [label, *features]

    # One common schema (first dataset's types, all nullable, no metadata) so that tables
    # differing only in column order or nullability concatenate.
    first = inputs[0][1].schema
    common = pa.schema([pa.field(n, first.field(n).type) for n in columns])
    parts = []
    spans: list[tuple[str, int, int]] = []
    start = 0
    for ds, table in inputs:
        part = table.select(columns)
        for name in columns:
            nulls = part[name].null_count
            if nulls:
                raise ComputeError(f"dataset {ds!r}: column {name!r} has {nulls} null value(s)")
        parts.append(part.cast(common))
        spans.append((ds, start, start + part.num_rows))
        start += part.num_rows
    table = pa.concat_tables(parts)
    n = table.num_rows
    if n == 0:
        raise ComputeError(f"{NAME}: the datasets have no rows")

    y_col = table[label]
    if pa.types.is_floating(y_col.type) and not pc.all(pc.is_finite(y_col)).as_py():
        raise ComputeError(f"label column {label!r} has non-finite values (NaN or infinity)")
    classes = sorted(pc.unique(y_col).to_pylist())
    if len(classes) != 2:
        shown = classes[:10] + (["..."] if len(classes) > 10 else [])
        raise ComputeError(
            f"label column {label!r} must have exactly two distinct values, found "
            f"{len(classes)}: {shown}"
        )
    y = pc.equal(y_col, pa.scalar(classes[1], type=y_col.type)).to_numpy().astype(np.int8)
    x = _to_matrix(table, features, spans)

    model = LogisticRegression(C=params["C"], solver="lbfgs", tol=_TOL, max_iter=params["max_iter"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
    except ValueError as e:
        raise ComputeError(f"{NAME}: fitting failed: {e}") from None
    n_iter = int(model.n_iter_[0])

    p = model.predict_proba(x)[:, 1]
    pred = (p > 0.5).astype(np.int8)
    return {
        "coefficients": {f: float(w) for f, w in zip(features, model.coef_[0], strict=True)},
        "intercept": float(model.intercept_[0]),
        "classes": classes,
        "features": features,
        "n_samples": n,
        "n_iter": n_iter,
        "converged": n_iter < params["max_iter"],
        "metrics": {
            "accuracy": float(np.mean(pred == y)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
            "auc": float(roc_auc_score(y, p)),
        },
    }
