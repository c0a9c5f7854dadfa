"""Plaintext reference versions of the computations, for tests and the demo.

Not part of any computation's code digest: nothing here runs in the executor. Apart from the
federated rounds (which replay the providers' own local step), these share no code with the
computations: they take pandas
DataFrames holding all rows in one process and do the straightforward thing (scikit-learn,
pandas merge, xgboost on a numpy array), so comparing the two is meaningful. The held-out split
follows the same written rule: the test rows are the first ceil(test_fraction * n) of
``numpy.random.default_rng(seed).permutation(n)``, both parts kept in row order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from teeflow.compute import federated


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _features(df: pd.DataFrame, label: str, features: list[str] | None) -> list[str]:
    if features is None:
        return [c for c in df.select_dtypes(include="number").columns if c != label]
    return list(features)


def plaintext_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row positions by the documented rule."""
    if test_fraction == 0:
        return np.arange(n), np.arange(0)
    n_test = math.ceil(test_fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(perm[:n_test])
    return np.setdiff1d(np.arange(n), test), test


def _binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    out = {
        "accuracy": float(accuracy_score(y, (p > 0.5).astype(int))),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }
    if len(set(y.tolist())) == 2:
        out["auc"] = float(roc_auc_score(y, p))
    return out


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    out = {"rmse": float(np.sqrt(mean_squared_error(y, pred)))}
    if len(y) > 1 and np.ptp(y) > 0:
        out["r2"] = float(r2_score(y, pred))
    return out


def _with_metrics(result: dict[str, Any], n: int, train, test, metric) -> dict[str, Any]:
    result.update(n_samples=n, n_train=len(train), n_test=len(test), metrics=metric(train))
    if len(test):
        result["test_metrics"] = metric(test)
    return result


def plaintext_logistic_regression(
    df: pd.DataFrame,
    label: str,
    features: list[str] | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the same model as ``logistic_regression`` on one DataFrame holding all rows."""
    features = _features(df, label, features)
    classes = sorted(_py(v) for v in df[label].unique())
    if len(classes) != 2:
        raise ValueError(f"label {label!r} must have two distinct values, got {classes}")
    y = (df[label] == classes[1]).astype(int).to_numpy()
    x = df[features].astype("float64").to_numpy()
    train, test = plaintext_split(len(df), test_fraction, seed)

    model = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=max_iter)
    model.fit(x[train], y[train])
    p = model.predict_proba(x)[:, 1]
    result = {
        "coefficients": dict(zip(features, map(float, model.coef_[0]), strict=True)),
        "intercept": float(model.intercept_[0]),
        "classes": classes,
        "features": list(features),
    }
    return _with_metrics(
        result, len(df), train, test, lambda idx: _binary_metrics(y[idx], p[idx])
    )


def plaintext_linear_regression(
    df: pd.DataFrame,
    label: str,
    features: list[str] | None = None,
    alpha: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the same model as ``linear_regression``: scikit-learn's LinearRegression, or Ridge
    when alpha > 0."""
    features = _features(df, label, features)
    x = df[features].astype("float64").to_numpy()
    y = df[label].astype("float64").to_numpy()
    train, test = plaintext_split(len(df), test_fraction, seed)
    model = Ridge(alpha=alpha) if alpha > 0 else LinearRegression()
    model.fit(x[train], y[train])
    pred = model.predict(x)
    result = {
        "coefficients": dict(zip(features, map(float, model.coef_), strict=True)),
        "intercept": float(model.intercept_),
        "features": list(features),
    }
    return _with_metrics(
        result, len(df), train, test, lambda idx: _regression_metrics(y[idx], pred[idx])
    )


def plaintext_xgboost(
    df: pd.DataFrame,
    label: str,
    features: list[str] | None = None,
    objective: str = "binary:logistic",
    n_estimators: int = 100,
    max_depth: int = 6,
    eta: float = 0.3,
    subsample: float = 1.0,
    min_child_weight: float = 1.0,
    reg_lambda: float = 1.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the same booster as ``xgboost``. Returns the booster itself (``booster``), the
    feature matrix it was evaluated on (``x``), its predictions and the metrics."""
    import xgboost

    features = _features(df, label, features)
    x = df[features].astype("float64").to_numpy()
    result: dict[str, Any] = {"features": list(features)}
    if objective == "binary:logistic":
        classes = sorted(_py(v) for v in df[label].unique())
        y = (df[label] == classes[1]).astype(int).to_numpy()
        result["classes"] = classes
    else:
        y = df[label].astype("float64").to_numpy()
    train, test = plaintext_split(len(df), test_fraction, seed)
    params = {
        "objective": objective, "max_depth": max_depth, "eta": eta, "subsample": subsample,
        "min_child_weight": min_child_weight, "lambda": reg_lambda, "seed": seed,
        "tree_method": "hist", "nthread": 1, "verbosity": 0,
    }
    booster = xgboost.train(
        params, xgboost.DMatrix(x[train], label=y[train]), num_boost_round=n_estimators
    )
    pred = booster.predict(xgboost.DMatrix(x)).astype(np.float64)
    if objective == "binary:logistic":
        def metric(idx):
            return _binary_metrics(y[idx], pred[idx])
    else:
        def metric(idx):
            return _regression_metrics(y[idx], pred[idx])
    result.update(booster=booster, x=x, predictions=pred)
    return _with_metrics(result, len(df), train, test, metric)


PLAINTEXT_MODELS: dict[str, Callable[..., dict[str, Any]]] = {
    "logistic_regression": plaintext_logistic_regression,
    "linear_regression": plaintext_linear_regression,
    "xgboost": plaintext_xgboost,
}


def plaintext_join(frames: list[pd.DataFrame], id_col: str) -> pd.DataFrame:
    """Inner join on ``id_col``, rows ordered by ID, ID dropped."""
    joined = frames[0]
    for f in frames[1:]:
        joined = joined.merge(f, on=id_col, how="inner", validate="one_to_one")
    return joined.sort_values(id_col, kind="stable").drop(columns=id_col).reset_index(drop=True)


def plaintext_vertical(
    frames: list[pd.DataFrame], id_col: str, model: str, **model_params: Any
) -> dict[str, Any]:
    """Join the parties' columns in one process, then fit ``model`` on the joined rows."""
    joined = plaintext_join(frames, id_col)
    result = PLAINTEXT_MODELS[model](joined, **model_params)
    return {"model_name": model, "intersection_size": len(joined), **result}


def plaintext_fedavg(frames: list[pd.DataFrame]) -> dict[str, Any]:
    """Sample-weighted mean of each named parameter over the parties' (name, value, n_samples)."""
    counts = [int(f["n_samples"].iloc[0]) for f in frames]
    allrows = pd.concat(frames, ignore_index=True)
    allrows["weighted"] = allrows["value"] * allrows["n_samples"]
    sums = allrows.groupby("name", sort=False)[["weighted", "n_samples"]].sum()
    means = sums["weighted"] / sums["n_samples"]
    return {
        "parameters": {str(k): float(v) for k, v in means.items()},
        "n_samples": sum(counts),
        "parties": len(frames),
    }


def plaintext_federated(parts: list[tuple[np.ndarray, np.ndarray]], features: list[str],
                    params: dict[str, Any]) -> dict[str, Any]:
    """The same rounds in one process, for checking the federated run."""
    weights = np.zeros(len(features) + 1)
    history = []
    for r in range(params["rounds"]):
        updates = [(*federated.local_update(x, y, weights, params), x.shape[0]) for x, y in parts]
        weights, loss = federated.aggregate([(w, n, loss) for w, loss, n in updates])
        history.append({"round": r, "loss": loss})
    return federated.result(features, weights, history, sum(x.shape[0] for x, _ in parts), params)

