"""Computations on an executor pool (executor/pool/compute.py): the result over members'
parts equals the single executor's over their union, only aggregates move, and what a pool
cannot reproduce is refused.

One in-process Dask cluster (a scheduler and three workers on loopback, port 0) serves the
module; a background thread runs its event loop. Data is split three ways unevenly, one
member holding no rows of a dataset.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from distributed import Client, Scheduler, Worker

from teeflow import compute
from teeflow.core.errors import ComputeError, ParameterError, StateError
from teeflow.executor.pool import held
from teeflow.executor.pool.compute import check_pool_params, run_on_pool

MEMBERS = ["m1", "m2", "m3"]


class Pool:
    """A scheduler, three workers and an asynchronous client on a loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.workers: dict[str, str] = {}
        self.call(self._start())

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.scheduler = await Scheduler(host="127.0.0.1", port=0, dashboard=False,
                                         dashboard_address="127.0.0.1:0")
        self.nodes = [await Worker(self.scheduler.address, host="127.0.0.1", port=0,
                                   name=m, nthreads=1, dashboard=False,
                                   dashboard_address="127.0.0.1:0", memory_limit=0)
                      for m in MEMBERS]
        self.workers = {m: w.address for m, w in zip(MEMBERS, self.nodes, strict=True)}
        self.client = await Client(self.scheduler.address, asynchronous=True)

    async def _stop(self) -> None:
        await self.client.close()
        for w in self.nodes:
            await w.close()
        await self.scheduler.close()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    p = Pool()
    try:
        yield p
    finally:
        p.close()


def split(table: pa.Table, sizes: tuple[float, ...] = (0.6, 0.0, 0.4)) -> list[pa.Table]:
    """The table in three contiguous parts of these shares (one may be empty)."""
    n = table.num_rows
    cuts = np.cumsum([0, *[round(s * n) for s in sizes[:-1]]]).tolist() + [n]
    return [table.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def on_pool(pool: Pool, name: str, raw: dict[str, str],
            datasets: dict[str, list[pa.Table]]) -> dict[str, Any]:
    """Hold each member's parts, run `name` on the pool, drop them."""
    keys = {m: f"digest/{m}" for m in MEMBERS}
    for i, m in enumerate(MEMBERS):
        held.hold(keys[m], {ds: parts[i] for ds, parts in datasets.items()})
    schemas = {ds: parts[0].schema for ds, parts in datasets.items()}
    try:
        params = compute.get(name).check_params(raw)
        return pool.call(run_on_pool(pool.client, pool.workers, keys, name, params, schemas))
    finally:
        for k in keys.values():
            held.drop(k)


def single(name: str, raw: dict[str, str], datasets: dict[str, list[pa.Table]]
           ) -> dict[str, Any]:
    comp = compute.get(name)
    params = comp.check_params(raw)
    inputs = [(ds, pa.concat_tables(parts)) for ds, parts in datasets.items()]
    comp.check_schemas({ds: t.schema for ds, t in inputs}, params)
    return comp.run(inputs, params)


def close(a: Any, b: Any, tol: float, path: str = "") -> None:
    """a equals b: the same keys and types, floats within `tol` (relative or absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, float), path
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def regression_data(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = x @ [1.5, -0.2, 3.0] + 0.7 + rng.normal(scale=0.5, size=n)
    return pa.table({"a": x[:, 0], "b": x[:, 1], "c": np.round(x[:, 2] * 100).astype(np.int64),
                     "y": y})


def classification_data(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    z = x @ [1.2, -0.8, 0.3] + 0.4
    label = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), "yes", "no")
    return pa.table({"a": x[:, 0], "b": x[:, 1], "c": np.round(x[:, 2] * 3).astype(np.int64),
                     "label": label})


# --- models ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [{"label": "y"}, {"label": "y", "alpha": "2.5"},
                                 {"label": "y", "features": "c,a"}])
def test_linear_regression_on_the_pool_is_the_single_executors(pool, raw):
    data = {"alice": split(regression_data(1, 300)),
            "bob": split(regression_data(2, 170), (0.1, 0.3, 0.6))}
    got = on_pool(pool, "linear_regression", raw, data)
    want = single("linear_regression", raw, data)
    close(got, want, 1e-9)


def test_logistic_regression_on_the_pool_is_the_single_executors(pool):
    data = {"alice": split(classification_data(3, 400)),
            "bob": split(classification_data(4, 150), (0.2, 0.5, 0.3))}
    for raw in ({"label": "label"}, {"label": "label", "C": "0.05", "features": "b,c"}):
        got = on_pool(pool, "logistic_regression", raw, data)
        want = single("logistic_regression", raw, data)
        close(got, want, 1e-6)
        assert got["n_iter"] == want["n_iter"]
