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
  ``_common.split``.

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
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from teeflow.core.errors import ComputeError
from teeflow.executor.compute import _common
from teeflow.executor.compute._common import FEATURES, LABEL, SEED, TEST_FRACTION, Param, Rows

NAME = "logistic_regression"
DESCRIPTION = (
    "Binary logistic regression (L2, L-BFGS) over the union of all datasets' rows, with an "
    "optional held-out split; reports accuracy, log loss and AUC"
)
LAYOUT = "rows"
MIN_DATASETS = 1
USES = (_common,)

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

check_params = _common.make_check_params(NAME, PARAMS, _common.check_label_not_feature)


def check_columns(
    cols: dict[str, pa.DataType], owner: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Check the combined columns against the params; returns the features."""
    return _common.check_label_and_features(
        cols, owner, params, _common.is_class_label,
        "an integer, floating, boolean or string column",
    )


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Check the datasets' schemas against each other and the (checked) params."""
    check_columns(*_common.same_schema(NAME, schemas, params), params)


def fit(rows: Rows, params: dict[str, Any]) -> dict[str, Any]:
    """Train on ``rows`` (already combined); ``params['features']`` must be resolved."""
    features = list(params["features"])
    n = rows.table.num_rows
    train, test = _common.split(n, params["test_fraction"], params["seed"])
    y, classes = _common.binary_label(rows, params["label"])
    x = _common.feature_matrix(rows, features)

    model = LogisticRegression(
        C=params["C"], solver="lbfgs", tol=_TOL, max_iter=params["max_iter"]
    )
    x_train = x if len(test) == 0 else x[train]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y[train])
    except ValueError as e:
        raise ComputeError(f"{NAME}: fitting failed: {e}") from None
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
    return _common.with_metrics(
        result, n, train, test, lambda idx: _common.classification_metrics(y[idx], p[idx])
    )


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    cols, owner = _common.same_schema(NAME, {ds: t.schema for ds, t in inputs}, params)
    features = check_columns(cols, owner, params)
    rows = _common.gather_rows(inputs, [params["label"], *features])
    if rows.table.num_rows == 0:
        raise ComputeError(f"{NAME}: the datasets have no rows")
    return fit(rows, {**params, "features": features})
