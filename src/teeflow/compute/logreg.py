"""logistic_regression: one L2-regularised binary logistic regression over the union of rows.

Every dataset must have the same columns with the same types (order and nullability aside).
Parameters (all strings on the wire):

- ``label`` (required): the label column; exactly two distinct values. The sorted classes are
  mapped to 0 and 1 and reported as ``classes``.
- ``features`` (optional): comma-separated feature columns; default every integer or floating
  column other than the label, in the first dataset's column order.
- ``C`` (float > 0, default 1.0): inverse regularisation strength, as in scikit-learn.
- ``max_iter`` (int, 1..100000, default 1000): L-BFGS iteration limit.
- ``test_fraction`` (0 <= f < 1, default 0) and ``seed`` (default 0): held-out split, see
  ``split``.

The result carries the fitted coefficients and intercept, and accuracy, log loss and ROC AUC
on the training rows (``metrics``) and on the held-out rows (``test_metrics``, when
``test_fraction`` > 0). Not converging within ``max_iter`` is reported (``converged``), not
raised.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from teeflow.compute.columns import (
    check_label_and_features,
    is_class_label,
    is_numeric,
    same_schema,
)
from teeflow.compute.errors import public
from teeflow.compute.metrics import classification_metrics, with_metrics
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
    binary_label,
    feature_matrix,
    gather_rows,
    split,
    stream_xy,
)

NAME = "logistic_regression"
DESCRIPTION = (
    "Binary logistic regression (L2, L-BFGS) over the union of all datasets' rows, with an "
    "optional held-out split; reports accuracy, log loss and AUC"
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
    Param("C", "float", default=1.0, low=0.0, low_open=True,
          help="inverse regularisation strength, as in scikit-learn"),
    Param("max_iter", "int", default=1000, low=1, high=100_000, help="L-BFGS iteration limit"),
    TEST_FRACTION,
    SEED,
)
_TOL = 1e-10

# A model of fixed form: none of its parameters picks rows to show.
REVEALING: tuple[str, ...] = ()
check_params = make_check_params(NAME, PARAMS, check_label_not_feature)


def check_columns(
    cols: dict[str, pa.DataType], owner: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Check the combined columns against the params; returns the features."""
    return check_label_and_features(
        cols, owner, params, is_class_label,
        "an integer, floating, boolean or string column",
    )


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Check the datasets' schemas against each other and the (checked) params."""
    check_columns(*same_schema(NAME, schemas, params), params)


def fit(rows: Rows, params: dict[str, Any]) -> dict[str, Any]:
    """Train on ``rows`` (already combined); ``params['features']`` must be resolved."""
    from sklearn.exceptions import ConvergenceWarning  # heavy: only inside the executor
    from sklearn.linear_model import LogisticRegression

    features = list(params["features"])
    n = rows.table.num_rows
    train, test = split(n, params["test_fraction"], params["seed"])
    y, classes = binary_label(rows, params["label"])
    x = feature_matrix(rows, features)

    model = LogisticRegression(
        C=params["C"], solver="lbfgs", tol=_TOL, max_iter=params["max_iter"]
    )
    x_train = x if len(test) == 0 else x[train]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y[train])
    except ValueError:
        raise public("fit_failed", computation=NAME) from None  # its text may quote data
    n_iter = int(np.asarray(model.n_iter_).ravel()[0])
    p = model.predict_proba(x)[:, 1]

    result: dict[str, Any] = {
        "coefficients": {f: float(w) for f, w in zip(features, model.coef_[0], strict=True)},
        "intercept": float(model.intercept_[0]),
        "classes": classes,
        "features": features,
        "n_iter": n_iter,
        "converged": n_iter < params["max_iter"],
    }
    return with_metrics(
        result, n, train, test, lambda idx: classification_metrics(y[idx], p[idx])
    )


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    cols, owner = same_schema(NAME, {ds: t.schema for ds, t in inputs}, params)
    features = check_columns(cols, owner, params)
    rows = gather_rows(inputs, [params["label"], *features])
    if rows.table.num_rows == 0:
        raise public("no_rows", computation=NAME)
    return fit(rows, {**params, "features": features})


def run_stream(sources: list[Source], params: dict[str, Any]) -> dict[str, Any]:
    """The same model for inputs larger than memory: L-BFGS on the same objective
    (sum of log losses + ||w||^2 / (2C), intercept unpenalised), each step one streamed
    pass over the rows. Agrees with the in-memory fit to the solver's tolerance; only a
    numeric two-valued label is supported here."""
    from scipy.optimize import minimize

    cols, owner = same_schema(NAME, {s.name: s.schema for s in sources}, params)
    features = check_columns(cols, owner, params)
    if not is_numeric(cols[params["label"]]):
        raise public("label_streamed_numeric", computation=NAME)
    label = params["label"]
    n = sum(s.rows for s in sources)
    if n == 0:
        raise public("no_rows", computation=NAME)
    values: set[float] = set()
    for _, _, y in stream_xy(sources, features, label):
        values.update(np.unique(y).tolist())
        if len(values) > 2:
            break
    if len(values) != 2:
        raise public("label_not_binary", column=label)
    low, high = sorted(values)
    train, test = split(n, params["test_fraction"], params["seed"])
    is_train = np.zeros(n, dtype=bool)
    is_train[train] = True
    c, p = params["C"], len(features)

    def objective(wb: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = wb[:p], wb[p]
        loss, grad = 0.5 * float(w @ w) / c, np.zeros(p + 1)
        grad[:p] = w / c
        for offset, x, y in stream_xy(sources, features, label):
            keep = is_train[offset : offset + len(y)]
            x, t = x[keep], (y[keep] == high).astype(np.float64)
            z = x @ w + b
            loss += float(np.sum(np.logaddexp(0.0, z) - t * z))
            r = 0.5 * (1.0 + np.tanh(0.5 * z)) - t
            grad[:p] += x.T @ r
            grad[p] += float(r.sum())
        return loss, grad

    solved = minimize(objective, np.zeros(p + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": params["max_iter"], "gtol": 1e-8, "ftol": 1e-15})
    w, b = solved.x[:p], float(solved.x[p])
    prob, truth = np.empty(n), np.empty(n, dtype=np.int8)
    for offset, x, y in stream_xy(sources, features, label):
        prob[offset : offset + len(y)] = 0.5 * (1.0 + np.tanh(0.5 * (x @ w + b)))
        truth[offset : offset + len(y)] = y == high
    result: dict[str, Any] = {
        "coefficients": {f: float(v) for f, v in zip(features, w, strict=True)},
        "intercept": b,
        "classes": [_plain(low), _plain(high)],
        "features": features,
        "n_iter": int(solved.nit),
        "converged": bool(solved.success),
        "streamed": True,
    }
    return with_metrics(
        result, n, train, test, lambda idx: classification_metrics(truth[idx], prob[idx])
    )


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
