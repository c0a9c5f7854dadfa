"""linear_regression: least squares (optionally ridge) over the union of rows, streamed.

Every dataset must have the same columns with the same types (order and nullability aside).
Parameters (all strings on the wire):

- ``label`` (required): the numeric label column.
- ``features`` (optional): comma-separated feature columns; default every integer or floating
  column other than the label, in the first dataset's column order.
- ``alpha`` (float >= 0, default 0): ridge penalty ``alpha * ||w||^2`` on the coefficients, not
  on the intercept (as scikit-learn's Ridge); 0 is ordinary least squares.
- ``test_fraction`` (0 <= f < 1, default 0) and ``seed`` (default 0): held-out split, see
  ``split``.

The fit never holds more than one record batch as a matrix: one pass over the batches merges
each batch's means and centered cross-products (X'X, X'y, y'y) into running totals (Chan et
al.'s pairwise update, exact up to rounding), the normal equations are solved on the centered
totals (minimum-norm solution when features are collinear and alpha is 0), and a second pass
sums the squared residuals. The result carries the coefficients and intercept, and RMSE and R²
on the training rows (``metrics``) and on the held-out rows (``test_metrics``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from teeflow.compute.columns import check_label_and_features, is_numeric, same_schema
from teeflow.compute.errors import public
from teeflow.compute.metrics import regression_metrics
from teeflow.compute.params import (
    FEATURES,
    LABEL,
    SEED,
    TEST_FRACTION,
    Param,
    check_label_not_feature,
    make_check_params,
)
from teeflow.compute.rows import (
    Rows,
    Source,
    column_vector,
    feature_matrix,
    gather_rows,
    split,
    stream_xy,
)

NAME = "linear_regression"
DESCRIPTION = (
    "Linear least squares (optional ridge alpha) over the union of all datasets' rows, "
    "streamed over record batches, with an optional held-out split; reports RMSE and R²"
)
LAYOUT = "rows"
MIN_DATASETS = 1
USES = (
    "teeflow.compute.errors",
    "teeflow.compute.columns",
    "teeflow.compute.metrics",
    "teeflow.compute.params",
    "teeflow.compute.rows",
)

PARAMS = (
    LABEL,
    FEATURES,
    Param("alpha", "float", default=0.0, low=0.0,
          help="ridge penalty on the coefficients (not the intercept); 0 = ordinary least squares"),
    TEST_FRACTION,
    SEED,
)

# A model of fixed form: none of its parameters picks rows to show.
REVEALING: tuple[str, ...] = ()
check_params = make_check_params(NAME, PARAMS, check_label_not_feature)


def check_columns(
    cols: dict[str, pa.DataType], owner: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Check the combined columns against the params; returns the features."""
    return check_label_and_features(
        cols, owner, params, is_numeric, "an integer or floating column"
    )


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Check the datasets' schemas against each other and the (checked) params."""
    check_columns(*same_schema(NAME, schemas, params), params)


class _Moments:
    """Count, means and centered cross-products of (x, y), merged batch by batch."""

    def __init__(self, p: int) -> None:
        self.n = 0
        self.mx = np.zeros(p)
        self.my = 0.0
        self.cxx = np.zeros((p, p))
        self.cxy = np.zeros(p)
        self.cyy = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        nb = len(y)
        if nb == 0:
            return
        mxb, myb = x.mean(axis=0), float(y.mean())
        xc, yc = x - mxb, y - myb
        if self.n == 0:
            self.n, self.mx, self.my = nb, mxb, myb
            self.cxx, self.cxy, self.cyy = xc.T @ xc, xc.T @ yc, float(yc @ yc)
            return
        n = self.n + nb
        dx, dy = mxb - self.mx, myb - self.my
        f = self.n * nb / n
        self.cxx += xc.T @ xc + f * np.outer(dx, dx)
        self.cxy += xc.T @ yc + f * dx * dy
        self.cyy += float(yc @ yc) + f * dy * dy
        self.mx = self.mx + dx * (nb / n)
        self.my += dy * (nb / n)
        self.n = n


def _batches(rows: Rows, params: dict[str, Any]):
    """(offset, x, y) for each record batch of the rows."""
    offset = 0
    for batch in rows.table.to_batches():
        if batch.num_rows == 0:
            continue
        x = feature_matrix(rows, params["features"], offset, batch)
        y = column_vector(rows, params["label"], "label", offset, batch)
        yield offset, x, y
        offset += batch.num_rows


def fit(rows: Rows, params: dict[str, Any]) -> dict[str, Any]:
    """Train on ``rows`` (already combined); ``params['features']`` must be resolved."""
    return _fit(lambda: _batches(rows, params), rows.table.num_rows, params)


def run_stream(sources: list[Source], params: dict[str, Any]) -> dict[str, Any]:
    """The same model in two streamed passes, for inputs larger than memory."""
    cols, owner = same_schema(NAME, {s.name: s.schema for s in sources}, params)
    features = check_columns(cols, owner, params)
    n = sum(s.rows for s in sources)
    if n == 0:
        raise public("no_rows", computation=NAME)
    return _fit(lambda: stream_xy(sources, features, params["label"]), n,
                {**params, "features": features})


def _fit(passes, n: int, params: dict[str, Any]) -> dict[str, Any]:
    """Normal equations from one pass over `passes()`, residuals from a second."""
    features = list(params["features"])
    p = len(features)
    train, test = split(n, params["test_fraction"], params["seed"])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True

    moments = {"train": _Moments(p), "test": _Moments(p)}
    for offset, x, y in passes():
        t = is_test[offset : offset + len(y)]
        moments["train"].add(x[~t], y[~t])
        moments["test"].add(x[t], y[t])

    m = moments["train"]
    alpha = params["alpha"]
    gram = m.cxx + alpha * np.eye(p)
    try:
        if alpha > 0:
            w = np.linalg.solve(gram, m.cxy)
            rank = p
        else:
            w, _, rank, _ = np.linalg.lstsq(gram, m.cxy, rcond=None)
    except np.linalg.LinAlgError:
        raise public("fit_failed", computation=NAME) from None
    intercept = m.my - float(m.mx @ w)

    sse = {"train": 0.0, "test": 0.0}
    for offset, x, y in passes():
        t = is_test[offset : offset + len(y)]
        r = y - (x @ w + intercept)
        sse["test"] += float(r[t] @ r[t])
        sse["train"] += float(r[~t] @ r[~t])

    def metric(part: str) -> dict[str, float]:
        return regression_metrics(sse[part], moments[part].cyy, moments[part].n)

    result = {
        "coefficients": {f: float(v) for f, v in zip(features, w, strict=True)},
        "intercept": float(intercept),
        "features": features,
        "alpha": alpha,
        "rank": int(rank),
        "n_samples": n,
        "n_train": len(train),
        "n_test": len(test),
        "metrics": metric("train"),
    }
    if len(test):
        result["test_metrics"] = metric("test")
    return result


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    cols, owner = same_schema(NAME, {ds: t.schema for ds, t in inputs}, params)
    features = check_columns(cols, owner, params)
    rows = gather_rows(inputs, [params["label"], *features])
    if rows.table.num_rows == 0:
        raise public("no_rows", computation=NAME)
    return fit(rows, {**params, "features": features})
