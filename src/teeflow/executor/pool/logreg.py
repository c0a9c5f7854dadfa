"""Logistic regression on the pool: scikit-learn's own L-BFGS run on the lead, its loss and
gradient summed over the members each step.

compute/logreg.py fits ``LogisticRegression(C, solver="lbfgs", tol=1e-10, max_iter)``. Here
the lead runs the same ``scipy.optimize.minimize`` call scikit-learn makes (same start at
zero, options and objective: the mean of the half-binomial losses plus ``||w||^2 / (2 C n)``,
intercept unpenalised), and each evaluation asks every member, in a task pinned to its
worker, for the sum of its rows' losses and of their gradients (scikit-learn's own
HalfBinomialLoss); only those p + 2 numbers leave a member. The metrics are sums too:
correct predictions and log losses per member, and the ROC AUC from each member's count of
positive and negative rows per distinct score, merged on the lead: the area over the
merged counts is the area over the rows (exact, ties included). Those counts are the one
aggregate finer than a sum: with continuous features most scores are distinct, so the
lead member learns each of another member's rows' score and class (never its features).

A held-out split picks rows by their position in the union: refused on a pool
(compute.check_pool_params).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from distributed import Client

from teeflow.compute import logreg as single
from teeflow.compute.columns import same_schema
from teeflow.compute.errors import public
from teeflow.executor.pool import held
from teeflow.executor.pool.linreg import first_problem, part_problems

NAME = "logistic_regression"
# token/key -> this member's (x, y in {0, 1}) for the fit in progress
_XY: dict[str, tuple[np.ndarray, np.ndarray]] = {}


# -- the member side ----------------------------------------------------------------------

def member_classes(key: str, datasets: list[str], schemas: dict[str, pa.Schema],
                   label: str) -> list[Any]:
    """The distinct labels in this member's parts, at most three (two is all a fit takes)."""
    seen: set[Any] = set()
    for ds in datasets:
        col = held.part(key, ds, schemas[ds]).column(label)
        seen.update(pc.unique(col).to_pylist())
        if len(seen) > 2:
            break
    return sorted(seen)[:3]


def member_prepare(key: str, datasets: list[str], schemas: dict[str, pa.Schema],
                   features: list[str], label: str, positive: Any, token: str) -> int:
    """Keep this member's (x, y) as compute/logreg.py builds them; returns the row count."""
    xs, ys = [], []
    for ds in datasets:
        table = held.part(key, ds, schemas[ds])
        if table.num_rows == 0:
            continue
        x = np.empty((table.num_rows, len(features)), dtype=np.float64, order="F")
        for j, name in enumerate(features):
            x[:, j] = table.column(name).to_numpy().astype(np.float64)
        col = table.column(label)
        y = pc.equal(col, pa.scalar(positive, type=col.type)).to_numpy(zero_copy_only=False)
        xs.append(x)
        ys.append(y.astype(np.float64))
    x = np.asfortranarray(np.vstack(xs)) if xs else np.zeros((0, len(features)))
    _XY[f"{token}/{key}"] = (x, np.concatenate(ys) if ys else np.zeros(0))
    return len(_XY[f"{token}/{key}"][1])


def member_loss(key: str, token: str, coef: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(sum of losses, X' gradient, sum of gradients) of this member's rows at `coef`."""
    from sklearn._loss.loss import HalfBinomialLoss

    x, y = _XY[f"{token}/{key}"]
    raw = x @ coef[:-1] + coef[-1]
    loss, grad = HalfBinomialLoss().loss_gradient(y_true=y, raw_prediction=raw,
                                                  sample_weight=None, n_threads=1)
    return float(np.sum(loss)), x.T @ grad, float(np.sum(grad))


def member_metrics(key: str, token: str, w: np.ndarray, b: float) -> dict[str, Any]:
    """Correct predictions, the log-loss sum and the per-score class counts of this part."""
    from scipy.special import expit
    from sklearn.metrics import log_loss

    x, y = _XY[f"{token}/{key}"]
    p = expit(x @ w + b)
    scores, where = np.unique(p, return_inverse=True)
    positives = np.bincount(where, weights=y, minlength=len(scores))
    return {
        "correct": int(np.sum((p > 0.5) == (y == 1))),
        "log_loss": float(log_loss(y, p, labels=[0, 1], normalize=False)),
        "scores": scores,
        "positives": positives,
        "negatives": np.bincount(where, minlength=len(scores)) - positives,
    }


def member_release(key: str, token: str) -> None:
    _XY.pop(f"{token}/{key}", None)


# -- the lead side ------------------------------------------------------------------------

def merged_auc(parts: list[dict[str, Any]]) -> float:
    """ROC AUC from the members' per-score counts: scikit-learn's, weighted by the counts,
    which is its area over the rows themselves (pure)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([np.concatenate([p["scores"], p["scores"]]) for p in parts])
    truth = np.concatenate([np.concatenate([np.ones(len(p["scores"])),
                                            np.zeros(len(p["scores"]))]) for p in parts])
    counts = np.concatenate([np.concatenate([p["positives"], p["negatives"]]) for p in parts])
    keep = counts > 0
    return float(roc_auc_score(truth[keep], scores[keep], sample_weight=counts[keep]))


def _lbfgs_extra() -> dict[str, Any]:
    try:
        from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
    except ImportError:  # pragma: no cover - a scikit-learn without it passes no iprint
        return {}
    return dict(_get_additional_lbfgs_options_dict("iprint", -1))


async def run(client: Client, workers: dict[str, str], keys: dict[str, str],
              params: dict[str, Any], schemas: dict[str, pa.Schema]) -> dict[str, Any]:
    from scipy import optimize

    datasets = list(schemas)
    cols, owner = same_schema(NAME, schemas, params)
    features = single.check_columns(cols, owner, params)
    label = params["label"]
    columns = [label, *features]
    floats = [c for c in columns if pa.types.is_floating(cols[c])]
    members = sorted(workers)

    def each(fn, *args, common=True):
        head = (datasets, schemas) if common else ()
        return client.gather([client.submit(fn, keys[m], *head, *args,
                                            **held.pinned(workers[m])) for m in members])

    # the single executor's order: nulls, no rows, the label, then the features
    problems = await each(part_problems, columns, floats)
    first_problem([{"nulls": p["nulls"], "non_finite": []} for p in problems], datasets,
                  columns, label)
    if sum(await each(_rows)) == 0:
        raise public("no_rows", computation=NAME)
    bad = sorted((j, i) for p in problems for i, j in p["non_finite"])
    if bad and bad[0][0] == 0:
        raise public("non_finite", dataset=datasets[bad[0][1]], column=label, kind="label")
    seen = sorted({v for part in await each(member_classes, label) for v in part})
    if len(seen) != 2:
        raise public("label_not_binary", column=label)
    if bad:
        j, i = bad[0]
        raise public("non_finite", dataset=datasets[i], column=columns[j], kind="feature")

    token = secrets.token_hex(8)
    try:
        counts = await each(member_prepare, features, label, seen[1], token)
        n = int(sum(counts))
        live = [m for m, c in zip(members, counts, strict=True) if c]
        solved = await _fit(client, workers, keys, live, token, n, len(features), params,
                            optimize)
        p = len(features)
        w, b = solved.x[:p], float(solved.x[p])
        metrics = await client.gather([
            client.submit(member_metrics, keys[m], token, w, b, **held.pinned(workers[m]))
            for m in live])
    finally:
        await each(member_release, token, common=False)
    n_iter = int(min(solved.nit, params["max_iter"]))
    positives = sum(float(np.sum(m["positives"])) for m in metrics)
    out = {
        "accuracy": float(sum(m["correct"] for m in metrics) / n),
        "log_loss": float(sum(m["log_loss"] for m in metrics) / n),
    }
    if 0 < positives < n:
        out["auc"] = merged_auc(metrics)
    return {
        "coefficients": {f: float(v) for f, v in zip(features, w, strict=True)},
        "intercept": b,
        "classes": seen,
        "features": features,
        "n_iter": n_iter,
        "converged": n_iter < params["max_iter"],
        "n_samples": n,
        "n_train": n,
        "n_test": 0,
        "metrics": out,
    }


def _rows(key: str, datasets: list[str], schemas: dict[str, pa.Schema]) -> int:
    return sum(held.part(key, ds, schemas[ds]).num_rows for ds in datasets)


async def _fit(client: Client, workers: dict[str, str], keys: dict[str, str],
               live: list[str], token: str, n: int, p: int, params: dict[str, Any],
               optimize: Any) -> Any:
    """scikit-learn's minimize call, run in a thread; each evaluation one pinned round."""
    loop = asyncio.get_running_loop()
    l2 = 1.0 / (params["C"] * n)

    async def sums(coef: np.ndarray) -> list[tuple[float, np.ndarray, float]]:
        return await client.gather([
            client.submit(member_loss, keys[m], token, coef, **held.pinned(workers[m]))
            for m in live])

    def objective(coef: np.ndarray) -> tuple[float, np.ndarray]:
        parts = asyncio.run_coroutine_threadsafe(sums(np.array(coef)), loop).result()
        w = coef[:-1]
        grad = np.empty_like(coef)
        grad[:-1] = sum(p[1] for p in parts) / n + l2 * w
        grad[-1] = sum(p[2] for p in parts) / n
        loss = sum(p[0] for p in parts) / n + float(0.5 * l2 * (w @ w))
        return loss, grad

    start = np.zeros(p + 1)
    return await asyncio.to_thread(
        optimize.minimize, objective, start, method="L-BFGS-B", jac=True,
        options={"maxiter": params["max_iter"], "maxls": 50, "gtol": single._TOL,
                 "ftol": 64 * np.finfo(float).eps, **_lbfgs_extra()})

