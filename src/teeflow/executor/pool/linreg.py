"""Linear regression on the pool: partial sums per partition, summed on the pool.

Each member holds its own partition (`hold_partition`, in its own process: what a provider
streamed to it). Dask arrays are built over those partitions, each block made by a task
pinned to its member's worker, and X'X, X'y and the column sums of X and y are computed by Dask
(one partial sum per block, then a sum); only those p x p totals reach the member that
solves the normal equations, centred as compute/linreg.py does. Ordinary least squares
with an intercept (no ridge, no held-out split yet).
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
from distributed import Client

from teeflow.compute.errors import public
from teeflow.compute.rows import Source, stream_xy

NAME = "linear_regression"
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


# Run on a worker: only the worker of the member that holds the partition has it.
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
        where = {"workers": [worker], "allow_other_workers": False, "pure": False}
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
