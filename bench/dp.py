"""Differential privacy: what it costs in accuracy and in time.

- Accuracy: `dp_linear_regression` at a few epsilons versus `linear_regression` (no noise)
  trained on the same rows (ROWS rows, 5 features uniform in [-1, 1], a linear label plus
  Gaussian noise, one fixed seed; 80% train, 20% held out), scored on the held-out rows by
  the bench itself: the median R² and RMSE over the repeats (each DP fit draws fresh noise).
- Time: `dp_aggregate` (a mean per declared category of g, with at most 2 rows per identity)
  versus the `sql` computation's `SELECT g, avg(v) ... GROUP BY g` (no noise, its output
  policy on) on the same Arrow table, both as the executor calls them (`check_params`,
  `check_schemas`, `run`): median seconds over the repeats.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from bench import Options, Row, median_range
from teeflow import compute

FULL_ROWS, QUICK_ROWS = 200_000, 20_000
FULL_REPEATS, QUICK_REPEATS = 7, 3
EPSILONS = (0.1, 0.5, 1.0, 5.0)
P = 5
SEED = 20261202


def _data(n: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(SEED)
    x = rng.uniform(-1, 1, size=(n, P))
    y = x @ np.linspace(2, -1, P) + 0.5 + rng.normal(0, 0.5, n)
    cols = {f"x{j}": x[:, j] for j in range(P)}
    table = pa.table({**cols, "y": y, "g": rng.integers(0, 8, n),
                      "pid": rng.integers(0, n // 2, n).astype(str)})
    cut = int(n * 0.8)
    return table.slice(0, cut), table.slice(cut)


def _score(result: dict, test: pa.Table) -> tuple[float, float]:
    x = np.column_stack([test[f"x{j}"].to_numpy() for j in range(P)])
    y = test["y"].to_numpy()
    w = np.array([result["coefficients"][f"x{j}"] for j in range(P)])
    r = y - (x @ w + result["intercept"])
    return 1 - float(r @ r) / float(((y - y.mean()) ** 2).sum()), float(np.sqrt(np.mean(r * r)))


def _run(name: str, raw: dict[str, str], inputs: list[tuple[str, pa.Table]]) -> dict:
    comp = compute.get(name)
    params = comp.check_params(raw)
    comp.check_schemas({ds: t.schema for ds, t in inputs}, params)
    return comp.run(inputs, params)


def run(opts: Options) -> list[Row]:
    n = QUICK_ROWS if opts.quick else FULL_ROWS
    repeats = opts.repeats or (QUICK_REPEATS if opts.quick else FULL_REPEATS)
    train, test = _data(n)
    inputs = [("a", train.slice(0, len(train) // 2)), ("b", train.slice(len(train) // 2))]
    features = ",".join(f"x{j}" for j in range(P))
    plain = _run("linear_regression", {"label": "y", "features": features}, inputs)
    r2, rmse = _score(plain, test)
    rows = [Row("linear_regression (no DP)", f"R² {r2:.3f}",
                f"RMSE {rmse:.3f} on {len(test)} held-out rows; trained on {len(train)}")]
    for eps in EPSILONS:
        scores = [_score(_run("dp_linear_regression", {
            "label": "y", "features": features, "feature_bounds": "-1:1",
            "label_lower": "-6", "label_upper": "6", "epsilon": str(eps)}, inputs), test)
            for _ in range(repeats)]
        mid, lo, hi = median_range([s[0] for s in scores])
        rmse_mid = median_range([s[1] for s in scores])[0]
        rows.append(Row(f"dp_linear_regression ε={eps:g}", f"R² {mid:.3f}",
                        f"ΔR² {mid - r2:+.3f} vs no DP; range {lo:.3f}..{hi:.3f}; median "
                        f"RMSE {rmse_mid:.3f}; {repeats} draws"))

    cats = ",".join(str(g) for g in range(8))
    dp_raw = {"statistic": "mean", "column": "y", "lower": "-6", "upper": "6",
              "group_by": "g", "categories": cats, "epsilon": "1", "identity": "pid",
              "max_contributions": "2"}
    sql_raw = {"query": "SELECT g, avg(y) AS mean_y FROM a GROUP BY g ORDER BY g",
               "min_group_size": "10"}
    whole = [("a", train)]
    times: dict[str, list[float]] = {"dp": [], "sql": []}
    for _ in range(repeats):
        for key, name, raw in (("dp", "dp_aggregate", dp_raw), ("sql", "sql", sql_raw)):
            t0 = time.perf_counter()
            _run(name, raw, whole)
            times[key].append(time.perf_counter() - t0)
    dp_t, sql_t = median_range(times["dp"])[0], median_range(times["sql"])[0]
    rows.append(Row("dp_aggregate mean by g (ε=1, ≤2 rows per identity)", f"{dp_t * 1e3:.1f} ms",
                    f"{len(train)} rows, 8 declared categories; median of {repeats}"))
    rows.append(Row("sql avg(y) GROUP BY g (no DP)", f"{sql_t * 1e3:.1f} ms",
                    f"ratio DP / SQL {dp_t / sql_t:.2f}x"))
    return rows
