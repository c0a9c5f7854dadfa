"""federated_logistic_regression: FedAvg rounds with the TEE as the trusted aggregator.

The data never leaves its owners. Each round, every provider takes the global model from
the executor, runs `local_epochs` of full-batch gradient descent on its own rows (logistic
loss + l2/2 * ||w||^2), and sends its new weights, its row count and its local loss to the
executor over the attested channel. The executor averages the weights by row count
(FedAvg) into the next global model. No party and no host sees another party's update:
updates travel only inside TLS that terminates in the TEE, and only the averaged model
goes back. After `rounds` rounds the final model is the result, sealed as any other.

`local_update` is the providers' step and `aggregate` the executor's; both are pure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from teeflow.compute.columns import (
    check_label_and_features,
    columns_of,
    is_numeric,
    resolve_features,
    same_schema,
)
from teeflow.compute.errors import public
from teeflow.compute.params import (
    FEATURES,
    LABEL,
    Param,
    check_label_not_feature,
    make_check_params,
)
from teeflow.core.errors import ComputeError

NAME = "federated_logistic_regression"
DESCRIPTION = (
    "Federated logistic regression: data stays with the providers; each round they train "
    "locally and the TEE averages their updates (FedAvg) into the next global model"
)
LAYOUT = "federated"
MIN_DATASETS = 1
USES = (
    "teeflow.compute.errors",
    "teeflow.compute.columns",
    "teeflow.compute.params",
)
PARAMS = (
    LABEL,
    FEATURES,
    Param("rounds", "int", default=10, low=1, high=1000, help="aggregation rounds"),
    Param("local_epochs", "int", default=5, low=1, high=10_000,
          help="gradient steps each provider takes per round"),
    Param("lr", "float", default=0.5, low=0.0, low_open=True, help="learning rate"),
    Param("l2", "float", default=0.0, low=0.0, help="L2 penalty on the weights"),
)
MAX_FEATURES = 10_000

check_params = make_check_params(NAME, PARAMS, check_label_not_feature)


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    cols, owner = same_schema(NAME, schemas, params)
    check_label_and_features(cols, owner, params, is_numeric,
                                     "a numeric 0/1 label")


def features_for(schema: pa.Schema, params: dict[str, Any]) -> list[str]:
    """The model's features for a dataset schema (same rule on every party)."""
    check_schemas({"local": schema}, params)
    return resolve_features(columns_of("local", schema), params)


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    raise public("federated_uploads", computation=NAME)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def local_update(x: np.ndarray, y: np.ndarray, weights: np.ndarray, params: dict[str, Any]
                 ) -> tuple[np.ndarray, float]:
    """A provider's round: (new weights [coef..., intercept], loss before the steps)."""
    n = x.shape[0]
    if n == 0:
        raise ComputeError("a provider with no rows cannot take part")
    xb = np.hstack([x, np.ones((n, 1))])
    w = weights.astype(np.float64).copy()
    loss = 0.0
    for step in range(params["local_epochs"]):
        p = _sigmoid(xb @ w)
        if step == 0:
            eps = 1e-12
            loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        grad = xb.T @ (p - y) / n
        grad[:-1] += params["l2"] * w[:-1]
        w -= params["lr"] * grad
    return w, loss


def check_update(update: dict[str, Any], n_weights: int | None) -> tuple[np.ndarray, int, float]:
    """An update as the executor accepts it: finite weights of the right length."""
    try:
        weights = np.asarray(update["weights"], dtype=np.float64)
        n = int(update["n_samples"])
        loss = float(update["loss"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ComputeError("update needs weights, n_samples and loss") from exc
    if weights.ndim != 1 or not 2 <= weights.size <= MAX_FEATURES + 1:
        raise ComputeError("update weights must be a flat list of 2 or more numbers")
    if n_weights is not None and weights.size != n_weights:
        raise ComputeError(f"update has {weights.size} weights; the model has {n_weights}")
    if not np.all(np.isfinite(weights)) or not np.isfinite(loss) or n <= 0:
        raise ComputeError("update weights and loss must be finite and n_samples positive")
    return weights, n, loss


def aggregate(updates: list[tuple[np.ndarray, int, float]]) -> tuple[np.ndarray, float]:
    """FedAvg: row-count-weighted mean of the weights; and the weighted mean local loss."""
    total = sum(n for _, n, _ in updates)
    weights = sum(w * n for w, n, _ in updates) / total
    loss = sum(loss * n for _, n, loss in updates) / total
    return np.asarray(weights, dtype=np.float64), float(loss)


def result(features: list[str], weights: np.ndarray, history: list[dict[str, Any]],
           n_samples: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"coefficients": {f: float(w) for f, w in zip(features, weights[:-1], strict=True)},
            "intercept": float(weights[-1]), "features": features,
            "rounds": params["rounds"], "n_samples": n_samples, "history": history}
