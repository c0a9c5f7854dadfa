"""Model metrics on the training and held-out rows (scikit-learn, imported when used)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def classification_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """accuracy, log loss and (when both classes occur) ROC AUC of probabilities ``p``."""
    from sklearn.metrics import log_loss, roc_auc_score  # heavy: executor only

    p = np.asarray(p, dtype=np.float64)
    out = {
        "accuracy": float(np.mean((p > 0.5) == (y == 1))),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }
    if 0 < int(np.sum(y)) < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    return out


def regression_metrics(sse: float, sst: float, n: int) -> dict[str, float]:
    """rmse, and r2 when the label varies, from sums of squares."""
    out = {"rmse": math.sqrt(sse / n)}
    if sst > 0:
        out["r2"] = 1.0 - sse / sst
    return out


def with_metrics(
    result: dict[str, Any],
    n: int,
    train: np.ndarray,
    test: np.ndarray,
    metric: Callable[[np.ndarray], dict[str, float]],
) -> dict[str, Any]:
    """Add n_samples, n_train, n_test, ``metrics`` (training rows) and, with a held-out set,
    ``test_metrics``."""
    result.update(n_samples=n, n_train=len(train), n_test=len(test), metrics=metric(train))
    if len(test):
        result["test_metrics"] = metric(test)
    return result
