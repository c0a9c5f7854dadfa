"""xgboost: gradient-boosted trees (the ``xgboost`` package) over the union of rows.

Every dataset must have the same columns with the same types (order and nullability aside).
Parameters (all strings on the wire):

- ``label`` (required): the label column. For ``binary:logistic`` exactly two distinct values;
  the sorted classes map to 0 and 1 and are reported as ``classes``. For
  ``reg:squarederror`` a numeric column.
- ``features`` (optional): comma-separated feature columns; default every integer or floating
  column other than the label, in the first dataset's column order. The model refers to them
  by position (f0, f1, ...) in this order, reported as ``features``.
- ``objective``: ``binary:logistic`` (default) or ``reg:squarederror``.
- ``n_estimators`` (boosting rounds, 1..10000, default 100), ``max_depth`` (1..20, default 6),
  ``eta`` (0 < eta <= 1, default 0.3), ``subsample`` (0 < s <= 1, default 1),
  ``min_child_weight`` (>= 0, default 1), ``reg_lambda`` (L2 on leaf weights, >= 0, default 1).
- ``test_fraction`` (0 <= f < 1, default 0) and ``seed`` (default 0): held-out split, see
  ``split``; ``seed`` also seeds XGBoost.

Training uses the ``hist`` tree method on one thread, so the same rows and parameters give the
same model. The result is ``model``, the booster in XGBoost's JSON format
(``Booster.load_model(bytearray(json.dumps(model), "utf-8"))`` restores it), plus ``features``
and the metrics: accuracy, log loss and AUC (binary) or RMSE and R² (regression) on the training
rows (``metrics``) and on the held-out rows (``test_metrics``).
"""

from __future__ import annotations

import json
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
from teeflow.compute.metrics import classification_metrics, regression_metrics, with_metrics
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
    binary_label,
    column_vector,
    feature_matrix,
    gather_rows,
    split,
)

NAME = "xgboost"
DESCRIPTION = (
    "Gradient-boosted trees (XGBoost, hist, one thread) over the union of all datasets' rows, "
    "binary:logistic or reg:squarederror, with an optional held-out split; returns the model "
    "as XGBoost JSON plus metrics"
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

OBJECTIVES = ("binary:logistic", "reg:squarederror")
PARAMS = (
    LABEL,
    FEATURES,
    Param("objective", "str", default="binary:logistic", choices=OBJECTIVES,
          help="learning objective"),
    Param("n_estimators", "int", default=100, low=1, high=10_000, help="boosting rounds"),
    Param("max_depth", "int", default=6, low=1, high=20, help="maximum tree depth"),
    Param("eta", "float", default=0.3, low=0.0, low_open=True, high=1.0, help="learning rate"),
    Param("subsample", "float", default=1.0, low=0.0, low_open=True, high=1.0,
          help="share of the training rows sampled for each tree"),
    Param("min_child_weight", "float", default=1.0, low=0.0,
          help="minimum sum of instance weight (hessian) in a child"),
    Param("reg_lambda", "float", default=1.0, low=0.0, help="L2 regularisation of leaf weights"),
    TEST_FRACTION,
    SEED,
)

# The model carries its trees: split points are quantiles of the data, and deep trees
# with light leaves fit single rows.
REVEALING = ("max_depth", "min_child_weight", "n_estimators")
check_params = make_check_params(NAME, PARAMS, check_label_not_feature)


def check_columns(
    cols: dict[str, pa.DataType], owner: dict[str, str], params: dict[str, Any]
) -> list[str]:
    """Check the combined columns against the params; returns the features."""
    if params["objective"] == "binary:logistic":
        return check_label_and_features(
            cols, owner, params, is_class_label,
            "an integer, floating, boolean or string column",
        )
    return check_label_and_features(
        cols, owner, params, is_numeric, "an integer or floating column"
    )


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    """Check the datasets' schemas against each other and the (checked) params."""
    check_columns(*same_schema(NAME, schemas, params), params)


def booster_params(params: dict[str, Any]) -> dict[str, Any]:
    """The XGBoost training parameters for checked params."""
    return {
        "objective": params["objective"],
        "max_depth": params["max_depth"],
        "eta": params["eta"],
        "subsample": params["subsample"],
        "min_child_weight": params["min_child_weight"],
        "lambda": params["reg_lambda"],
        "seed": params["seed"],
        "tree_method": "hist",
        "nthread": 1,
        "verbosity": 0,
    }


def fit(rows: Rows, params: dict[str, Any]) -> dict[str, Any]:
    """Train on ``rows`` (already combined); ``params['features']`` must be resolved."""
    try:
        import xgboost
    except ImportError:  # pragma: no cover - xgboost is a dependency
        raise public("not_installed", computation=NAME, package="xgboost") from None

    features = list(params["features"])
    n = rows.table.num_rows
    train, test = split(n, params["test_fraction"], params["seed"])
    binary = params["objective"] == "binary:logistic"
    result: dict[str, Any] = {}
    if binary:
        y, classes = binary_label(rows, params["label"])
        result["classes"] = classes
    else:
        y = column_vector(rows, params["label"], "label")
    x = feature_matrix(rows, features)

    try:
        dtrain = xgboost.DMatrix(x[train], label=y[train], nthread=1)
        booster = xgboost.train(
            booster_params(params), dtrain, num_boost_round=params["n_estimators"]
        )
        pred = booster.predict(xgboost.DMatrix(x, nthread=1)).astype(np.float64)
    except xgboost.core.XGBoostError:
        raise public("fit_failed", computation=NAME) from None  # its text may quote data
    model = json.loads(booster.save_raw("json"))
    del dtrain, booster

    if binary:
        def metric(idx: np.ndarray) -> dict[str, float]:
            return classification_metrics(y[idx], pred[idx])
    else:
        def metric(idx: np.ndarray) -> dict[str, float]:
            r = y[idx] - pred[idx]
            d = y[idx] - y[idx].mean()
            return regression_metrics(float(r @ r), float(d @ d), len(idx))

    result.update(
        model=model,
        features=features,
        objective=params["objective"],
        n_estimators=params["n_estimators"],
    )
    return with_metrics(result, n, train, test, metric)


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    cols, owner = same_schema(NAME, {ds: t.schema for ds, t in inputs}, params)
    features = check_columns(cols, owner, params)
    rows = gather_rows(inputs, [params["label"], *features])
    if rows.table.num_rows == 0:
        raise public("no_rows", computation=NAME)
    return fit(rows, {**params, "features": features})
