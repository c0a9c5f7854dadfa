"""Linear regression on the pool: count, means and centred cross-products per member,
merged on the lead; residuals summed per member.

Each member reduces its own part of every dataset (held.py) to the moments compute/linreg.py
keeps (``_Moments``, the same batch-by-batch update), in a task pinned to its worker; the
lead merges them with the same pairwise formula, solves the normal equations as
compute/linreg.py does (ridge ``alpha``, minimum-norm least squares at 0), and asks each
member for its sum of squared residuals. Only p x p aggregates and sums leave a member.
The same result as ``compute.get("linear_regression").run`` over the union of the parts, up
to rounding (summation order). A held-out split (``test_fraction`` > 0) picks rows by their
position in the union, which a pool does not have: refused (compute.check_pool_params).

``hold_partition`` / ``fit_on_pool`` are the first pool's interface (member.py's), kept
until member.py moves to held.py and compute.run_on_pool.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
from distributed import Client

from teeflow.compute import linreg as single
from teeflow.compute.columns import same_schema
from teeflow.compute.errors import public
from teeflow.compute.metrics import regression_metrics
from teeflow.compute.rows import Source, stream_xy
from teeflow.executor.pool import held

NAME = "linear_regression"


# -- the member side: tasks pinned to the worker that holds the part ---------------------

def part_problems(key: str, datasets: list[str], schemas: dict[str, pa.Schema],
                  columns: list[str], floats: list[str]) -> dict[str, list[tuple[int, int]]]:
    """(dataset index, column index) of this member's nulls in `columns`, and of
    non-finite values in those of `columns` named in `floats` (positions only, no value)."""
    nulls, non_finite = [], []
    for i, ds in enumerate(datasets):
        table = held.part(key, ds, schemas[ds])
        for j, name in enumerate(columns):
            col = table.column(name)
            if col.null_count:
                nulls.append((i, j))
            elif name in floats and table.num_rows:
                values = col.to_numpy().astype(np.float64, copy=False)
                if not np.isfinite(values).all():
                    non_finite.append((i, j))
    return {"nulls": nulls, "non_finite": non_finite}


def xy(key: str, datasets: list[str], schemas: dict[str, pa.Schema], features: list[str],
       label: str):
    """(x, y) float64 per record batch of this member's parts, in dataset order."""
    for ds in datasets:
        table = held.part(key, ds, schemas[ds])
        for batch in table.select([*features, label]).to_batches():
            if batch.num_rows == 0:
                continue
            cols = [c.to_numpy(zero_copy_only=False).astype(np.float64) for c in batch.columns]
            yield np.column_stack(cols[:-1]), cols[-1]


def member_moments(key: str, datasets: list[str], schemas: dict[str, pa.Schema],
                   features: list[str], label: str) -> dict[str, Any]:
    m = single._Moments(len(features))
    for x, y in xy(key, datasets, schemas, features, label):
        m.add(x, y)
    return {"n": m.n, "mx": m.mx, "my": m.my, "cxx": m.cxx, "cxy": m.cxy, "cyy": m.cyy}


def member_sse(key: str, datasets: list[str], schemas: dict[str, pa.Schema],
               features: list[str], label: str, w: np.ndarray, intercept: float) -> float:
    sse = 0.0
    for x, y in xy(key, datasets, schemas, features, label):
        r = y - (x @ w + intercept)
        sse += float(r @ r)
    return sse


# -- the lead side ------------------------------------------------------------------------

def first_problem(problems: list[dict[str, list[tuple[int, int]]]], datasets: list[str],
                  columns: list[str], label: str) -> None:
    """Raise the public error the single executor raises first: nulls before non-finite
    values, then by dataset and column order (pure)."""
    for kind in ("nulls", "non_finite"):
        found = sorted({tuple(p) for member in problems for p in member[kind]})
        if found:
            i, j = found[0]
            if kind == "nulls":
                raise public("nulls", dataset=datasets[i], column=columns[j])
            raise public("non_finite", dataset=datasets[i], column=columns[j],
                         kind="label" if columns[j] == label else "feature")


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two members' moments as one (Chan et al.'s pairwise update, as _Moments.add)."""
    if b["n"] == 0:
        return a
    if a["n"] == 0:
        return b
    n = a["n"] + b["n"]
    dx, dy = b["mx"] - a["mx"], b["my"] - a["my"]
    f = a["n"] * b["n"] / n
    return {
        "n": n,
        "mx": a["mx"] + dx * (b["n"] / n),
        "my": a["my"] + dy * (b["n"] / n),
        "cxx": a["cxx"] + b["cxx"] + f * np.outer(dx, dx),
        "cxy": a["cxy"] + b["cxy"] + f * dx * dy,
        "cyy": a["cyy"] + b["cyy"] + f * dy * dy,
    }


def coefficients(m: dict[str, Any], alpha: float) -> tuple[np.ndarray, float, int]:
    """(w, intercept, rank) from merged moments, as compute/linreg.py solves them (pure)."""
    p = len(m["mx"])
    gram = m["cxx"] + alpha * np.eye(p)
    try:
        if alpha > 0:
            w = np.linalg.solve(gram, m["cxy"])
            rank = p
        else:
            w, _, rank, _ = np.linalg.lstsq(gram, m["cxy"], rcond=None)
    except np.linalg.LinAlgError:
        raise public("fit_failed", computation=NAME) from None
    return w, float(m["my"] - float(m["mx"] @ w)), int(rank)


async def run(client: Client, workers: dict[str, str], keys: dict[str, str],
              params: dict[str, Any], schemas: dict[str, pa.Schema]) -> dict[str, Any]:
    datasets = list(schemas)
    cols, owner = same_schema(NAME, schemas, params)
    features = single.check_columns(cols, owner, params)
    label = params["label"]
    columns = [label, *features]
    floats = [c for c in columns if pa.types.is_floating(cols[c])]
    members = sorted(workers)

    def each(fn, *args):
        return client.gather([client.submit(fn, keys[m], datasets, schemas, *args,
                                            **held.pinned(workers[m])) for m in members])

    first_problem(await each(part_problems, columns, floats), datasets, columns, label)
    parts = await each(member_moments, features, label)
    total: dict[str, Any] = {"n": 0}
    for part in parts:
        total = merge(total, part)
    n = int(total["n"])
    if n == 0:
        raise public("no_rows", computation=NAME)
    w, intercept, rank = coefficients(total, params["alpha"])
    sse = float(sum(await each(member_sse, features, label, w, intercept)))
    return {
        "coefficients": {f: float(v) for f, v in zip(features, w, strict=True)},
        "intercept": intercept,
        "features": features,
        "alpha": params["alpha"],
        "rank": rank,
        "n_samples": n,
        "n_train": n,
        "n_test": 0,
        "metrics": regression_metrics(sse, float(total["cyy"]), n),
    }


# -- the first pool's interface (member.py), kept working ---------------------------------

# member name -> (x, y) of the partition this process's worker holds
_LOCAL: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def hold_partition(member: str, table: pa.Table, features: list[str], label: str) -> None:
    """Keep this member's rows as float64 (x, y), refusing nulls and non-finite values."""
    xs, ys = [], []
    for _, x, y in stream_xy([Source.of_table(member, table)], features, label):
        xs.append(x)
        ys.append(y)
    p = len(features)
    _LOCAL[member] = (np.vstack(xs) if xs else np.zeros((0, p)),
                      np.concatenate(ys) if ys else np.zeros(0))


def drop_partition(member: str) -> None:
    _LOCAL.pop(member, None)


def partition_rows(member: str) -> int:
    return len(_LOCAL[member][1])


def partition_x(member: str) -> np.ndarray:
    return _LOCAL[member][0]


def partition_y(member: str) -> np.ndarray:
    return _LOCAL[member][1]


async def fit_on_pool(client: Client, placement: dict[str, str],
                      features: list[str]) -> dict[str, Any]:
    """OLS over every member's partition; `placement` maps member -> its worker address."""
    p = len(features)
    xs, ys = [], []
    for member, worker in sorted(placement.items()):
        where = held.pinned(worker)
        n = await client.submit(partition_rows, member, **where)
        if n == 0:
            continue
        fx = client.submit(partition_x, member, **where)
        fy = client.submit(partition_y, member, **where)
        xs.append(da.from_delayed(dask.delayed(fx), shape=(n, p), dtype=np.float64))
        ys.append(da.from_delayed(dask.delayed(fy), shape=(n,), dtype=np.float64))
    if not xs:
        raise public("no_rows", computation=NAME)
    x, y = da.concatenate(xs, axis=0), da.concatenate(ys, axis=0)
    sums = client.compute([x.T @ x, x.T @ y, x.sum(axis=0), y.sum()])
    xtx, xty, sx, sy = await client.gather(sums)
    return solve(np.asarray(xtx), np.asarray(xty), np.asarray(sx), float(sy), int(y.shape[0]),
                 features)


def solve(xtx: np.ndarray, xty: np.ndarray, sx: np.ndarray, sy: float, n: int,
          features: list[str]) -> dict[str, Any]:
    """Coefficients and intercept from the totals (pure)."""
    mx, my = sx / n, sy / n
    cxx = xtx - n * np.outer(mx, mx)
    cxy = xty - n * mx * my
    try:
        w, _, rank, _ = np.linalg.lstsq(cxx, cxy, rcond=None)
    except np.linalg.LinAlgError:
        raise public("fit_failed", computation=NAME) from None
    intercept = my - float(mx @ w)
    return {
        "coefficients": {f: float(v) for f, v in zip(features, w, strict=True)},
        "intercept": float(intercept),
        "features": list(features),
        "rank": int(rank),
        "n_samples": n,
    }
