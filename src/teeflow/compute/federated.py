"""federated_logistic_regression: FedAvg rounds with the TEE as the trusted aggregator.

The data never leaves its owners. Each round, every provider takes the global model from
the executor, runs `local_epochs` of full-batch gradient descent on its own rows (logistic
loss + l2/2 * ||w||^2), and sends its new weights, its row count and its local loss to the
executor over the attested channel. The executor averages the weights by row count
(FedAvg) into the next global model. No party and no host sees another party's update:
updates travel only inside TLS that terminates in the TEE, and only the averaged model
goes back. After `rounds` rounds the final model is the result, sealed as any other.

What the owners may ask for (each a parameter their approval rules can bind):

- ``min_parties`` (default 3): with two parties each recovers the other's exact
  update from the global model (it knows its own); a task with fewer owners is refused.
- ``clip_norm`` and ``noise_multiplier`` (DP-FedAvg, McMahan et al. 2018): each party's
  change to the global model is clipped to L2 norm ``clip_norm``, the clipped changes are
  summed and Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is added
  (OpenDP's Gaussian mechanism) before the mean is taken. The guarantee is per party and per
  round (rho-zCDP, rho = 1 / (2 * noise_multiplier**2) a round, summed over rounds); noised
  rounds report no loss, as the loss is not noised.
- ``final_only``: the providers get no global model between rounds; each trains on from its
  own last weights and the executor averages once, at the end (one-shot averaging).

`local_update` is the providers' step and `aggregate` the executor's; both are pure but
for the noise.
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
from teeflow.core.errors import ComputeError, ParameterError

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
    "teeflow.compute.dp",  # OpenDP's Gaussian noise for DP-FedAvg
)
PARAMS = (
    LABEL,
    FEATURES,
    Param("rounds", "int", default=10, low=1, high=1000, help="aggregation rounds"),
    Param("local_epochs", "int", default=5, low=1, high=10_000,
          help="gradient steps each provider takes per round"),
    Param("lr", "float", default=0.5, low=0.0, low_open=True, help="learning rate"),
    Param("l2", "float", default=0.0, low=0.0, help="L2 penalty on the weights"),
    Param("min_parties", "int", default=3, low=1, high=1000,
          help="the fewest owners a task may have (two recover each other's updates)"),
    Param("clip_norm", "float", default=1.0, low=0.0, low_open=True, high=1e6,
          help="DP-FedAvg: each party's change to the model is clipped to this L2 norm"),
    Param("noise_multiplier", "float", default=0.0, low=0.0, high=1e6,
          help="DP-FedAvg: Gaussian noise of this many clip_norms on the summed changes; "
               "0: no noise"),
    Param("final_only", "bool", default=False,
          help="the providers get no global model between rounds, only the sealed result"),
)
MAX_FEATURES = 10_000
# Fewer parties than this lets each recover the others' updates: the owners decide.
REVEALING = ("min_parties",)

check_params = make_check_params(NAME, PARAMS, check_label_not_feature)


def check_parties(parties: int, params: dict[str, Any]) -> None:
    if parties < params["min_parties"]:
        raise public("too_few_parties", ParameterError, computation=NAME,
                     limit=params["min_parties"])


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


def aggregate(updates: list[tuple[np.ndarray, int, float]], params: dict[str, Any] | None = None,
              previous: np.ndarray | None = None) -> tuple[np.ndarray, float | None]:
    """FedAvg: row-count-weighted mean of the weights, and the weighted mean local loss.
    With ``noise_multiplier`` > 0, DP-FedAvg instead: the unweighted mean of each party's
    clipped change from ``previous``, noised (the loss is then None: it is not noised)."""
    sigma = float((params or {}).get("noise_multiplier") or 0.0)
    if sigma > 0:
        assert params is not None
        return dp_fedavg(updates, previous, float(params["clip_norm"]), sigma), None
    total = sum(n for _, n, _ in updates)
    weights = sum(w * n for w, n, _ in updates) / total
    loss = sum(loss * n for _, n, loss in updates) / total
    return np.asarray(weights, dtype=np.float64), float(loss)


def clip(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    norm = float(np.linalg.norm(delta))
    return delta if norm <= clip_norm else delta * (clip_norm / norm)


def dp_fedavg(updates: list[tuple[np.ndarray, int, float]], previous: np.ndarray | None,
              clip_norm: float, sigma: float) -> np.ndarray:
    """previous + (sum of clipped changes + N(0, (sigma * clip_norm)^2 I)) / parties. Adding
    or removing one party moves the sum by at most clip_norm (L2), so one round is
    1 / (2 sigma^2)-zCDP for each party. The noise is OpenDP's."""
    from teeflow.compute.dp import opendp

    base = np.zeros_like(updates[0][0]) if previous is None else previous
    total = sum(clip(w - base, clip_norm) for w, _, _ in updates)
    dp = opendp()
    meas = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                              dp.l2_distance(T=float), sigma * clip_norm)
    noised = np.asarray(meas([float(v) for v in np.asarray(total)]), dtype=np.float64)
    return np.asarray(base + noised / len(updates), dtype=np.float64)


def privacy_note(params: dict[str, Any]) -> dict[str, Any] | None:
    """What a DP-FedAvg result says it spent (per party, over all rounds); None: no noise."""
    sigma = float(params.get("noise_multiplier") or 0.0)
    if sigma <= 0:
        return None
    rounds = 1 if params.get("final_only") else int(params["rounds"])
    return {"mechanism": "DP-FedAvg (clipped updates, OpenDP Gaussian noise)",
            "unit": "party", "clip_norm": float(params["clip_norm"]),
            "noise_multiplier": sigma, "noised_rounds": rounds,
            "rho_zcdp": rounds / (2 * sigma * sigma)}


def result(features: list[str], weights: np.ndarray, history: list[dict[str, Any]],
           n_samples: int, params: dict[str, Any]) -> dict[str, Any]:
    out = {"coefficients": {f: float(w) for f, w in zip(features, weights[:-1], strict=True)},
           "intercept": float(weights[-1]), "features": features,
           "rounds": params["rounds"], "n_samples": n_samples, "history": history,
           "final_only": bool(params.get("final_only"))}
    note = privacy_note(params)
    if note is not None:
        out["privacy"] = note
    return out
