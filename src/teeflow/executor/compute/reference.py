"""Plaintext reference versions of the computations, for tests and the demo.

These deliberately share no code with the executor's computations: they take pandas
DataFrames and do the straightforward thing, so comparing the two is meaningful.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def plaintext_logistic_regression(
    df: pd.DataFrame,
    label: str,
    features: list[str] | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """Fit the same model as ``logistic_regression`` on one DataFrame holding all rows."""
    if features is None:
        features = [c for c in df.select_dtypes(include="number").columns if c != label]
    classes = sorted(_py(v) for v in df[label].unique())
    if len(classes) != 2:
        raise ValueError(f"label {label!r} must have two distinct values, got {classes}")
    y = (df[label] == classes[1]).astype(int).to_numpy()
    x = df[features].astype("float64").to_numpy()

    model = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=max_iter).fit(x, y)
    p = model.predict_proba(x)[:, 1]
    return {
        "coefficients": dict(zip(features, map(float, model.coef_[0]), strict=True)),
        "intercept": float(model.intercept_[0]),
        "classes": classes,
        "features": list(features),
        "n_samples": len(df),
        "metrics": {
            "accuracy": float(accuracy_score(y, model.predict(x))),
            "log_loss": float(log_loss(y, p)),
            "auc": float(roc_auc_score(y, p)),
        },
    }


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
