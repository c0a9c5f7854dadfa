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
from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch, StateError
from teeflow.executor.pool import held
from teeflow.executor.pool.cluster import pool_config, start_scheduler, start_worker
from teeflow.executor.pool.compute import check_pool_params, run_on_pool
from teeflow.executor.pool.identity import make_member_identity
from teeflow.executor.pool.tls import PinnedSecurity

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


KEYS = {m: f"digest/{m}" for m in MEMBERS}


def on_pool(pool: Pool, name: str, raw: dict[str, str],
            datasets: dict[str, list[pa.Table]]) -> dict[str, Any]:
    """Hold each member's parts, run `name` on the pool, drop them."""
    schemas = hold(datasets)
    try:
        params = compute.get(name).check_params(raw)
        return pool.call(run_on_pool(pool.client, pool.workers, KEYS, name, params, schemas))
    finally:
        for k in KEYS.values():
            held.drop(k)


def hold(datasets: dict[str, list[pa.Table]]) -> dict[str, pa.Schema]:
    for i, m in enumerate(MEMBERS):
        held.hold(KEYS[m], {ds: parts[i] for ds, parts in datasets.items()})
    return {ds: parts[0].schema for ds, parts in datasets.items()}


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


# --- sql ---------------------------------------------------------------------------------

def people(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    dept = rng.choice(["eng", "ops", "sales", "legal"], size=n, p=[0.4, 0.3, 0.25, 0.05])
    salary = rng.integers(30_000, 150_000, size=n)
    score = rng.normal(50.0, 12.0, size=n)
    age = pa.array(rng.integers(20, 65, size=n).tolist(), mask=rng.random(n) < 0.1)
    return pa.table({"dept": dept, "salary": salary, "score": score, "age": age,
                     "level": rng.integers(1, 4, size=n).astype(np.int32)})


def rows_of(result: dict[str, Any], ordered: bool) -> list[list[Any]]:
    rows = result["rows"]
    return rows if ordered else sorted(rows, key=repr)


QUERIES = [
    ("SELECT dept, count(*) AS n, sum(salary) AS total, avg(score) FROM people "
     "GROUP BY dept ORDER BY dept", True),
    ("SELECT count(*), sum(salary), avg(salary), count(age), avg(age), sum(score) FROM people",
     True),
    ("SELECT dept, level, count(*), stddev(score), var_pop(salary * 0.001), "
     "variance(age) FROM people WHERE salary > 40000 GROUP BY dept, level "
     "HAVING count(*) >= 12 ORDER BY 1, 2", True),
    ("SELECT level * 10 AS tier, round(avg(score), 3) AS m, sum(salary) / count(*) FROM people "
     "GROUP BY 1 ORDER BY m DESC LIMIT 2", True),
    ("SELECT dept, count(*), sum(salary), count(age), sum(age), sum(level * 2 - 1) "
     "FROM people GROUP BY dept ORDER BY dept", True),
    ("SELECT dept, sum(salary) FROM people GROUP BY dept ORDER BY count(*) DESC, people.dept",
     True),
    ("SELECT upper(dept) AS d, fsum(score), favg(score), stddev_pop(score) FROM people "
     "WHERE dept <> 'legal' GROUP BY upper(dept)", False),
]


@pytest.mark.parametrize("query,ordered", QUERIES)
def test_sql_on_the_pool_is_the_single_executors(pool, query, ordered):
    data = {"people": split(people(5, 900), (0.5, 0.0, 0.5)),
            "other": split(people(6, 50))}
    raw = {"query": query, "min_group_size": "10"}
    got = on_pool(pool, "sql", raw, data)
    want = single("sql", raw, data)
    assert got["columns"] == want["columns"]
    got_rows, want_rows = rows_of(got, ordered), rows_of(want, ordered)
    close(got_rows, want_rows, 1e-12)
    ints = [[v for v in r if not isinstance(v, float)] for r in got_rows]
    assert ints == [[v for v in r if not isinstance(v, float)] for r in want_rows]
    assert got["spill"] == want["spill"]
    if not any(isinstance(v, float) for r in want_rows for v in r):
        assert got["arrow"] == want["arrow"]  # the same Arrow table, types included


def test_a_group_small_overall_but_spread_over_members_is_refused(pool):
    """An attack on the rule: 'legal' has 6 rows in all, 2 on each member, so no member
    sees a small group it could refuse, yet the output group counts 6 < 10 people."""
    base = people(7, 600).filter(pa.compute.not_equal(pa.compute.field("dept"), "legal"))
    legal = people(8, 6).set_column(0, "dept", pa.array(["legal"] * 6))
    parts = [pa.concat_tables([base.slice(i * 200, 200), legal.slice(2 * i, 2)])
             for i in range(3)]
    data = {"people": parts}
    raw = {"query": "SELECT dept, avg(salary) FROM people GROUP BY dept", "min_group_size": "5"}
    on_pool(pool, "sql", raw, data)  # 6 >= 5: released
    raw["min_group_size"] = "10"
    with pytest.raises(ComputeError, match="min_group_size=10") as one:
        single("sql", raw, data)
    with pytest.raises(ComputeError, match="min_group_size=10") as many:
        on_pool(pool, "sql", raw, data)
    assert str(many.value) == str(one.value)
    assert many.value.public == "small_group"


def test_a_group_small_on_one_member_but_large_overall_is_released(pool):
    table = people(9, 300)
    parts = [table.slice(0, 3), table.slice(3, 0), table.slice(3)]  # a member of 3 rows
    raw = {"query": "SELECT count(*) AS n FROM people", "min_group_size": "50"}
    assert on_pool(pool, "sql", raw, {"people": parts})["rows"] == [[300]]


def test_what_one_executor_refuses_a_pool_refuses(pool):
    data = {"people": split(people(10, 100))}
    for query in ["SELECT dept, max(salary) FROM people GROUP BY dept",
                  "SELECT salary FROM people",
                  "SELECT dept, sum(CASE WHEN age = 30 THEN salary END) FROM people "
                  "GROUP BY dept"]:
        raw = {"query": query}
        with pytest.raises(ParameterError, match="sql policy") as refused:
            on_pool(pool, "sql", raw, data)
        with pytest.raises(ParameterError) as alone:
            single("sql", raw, data)
        assert str(refused.value) == str(alone.value)


# --- what a pool refuses -----------------------------------------------------------------

@pytest.mark.parametrize("name,raw,what", [
    ("linear_regression", {"label": "y", "test_fraction": "0.2"}, "test_fraction"),
    ("logistic_regression", {"label": "y", "test_fraction": "0.1"}, "test_fraction"),
    ("xgboost", {"label": "y"}, "not available on an executor pool"),
    ("sql", {"query": "SELECT count(*) FROM a JOIN b USING (id)"}, "exactly one dataset"),
    ("sql", {"query": "SELECT count(DISTINCT x) FROM a"}, "DISTINCT"),
    ("sql", {"query": "SELECT k, corr(x, y) FROM a GROUP BY k"}, "corr"),
    ("sql", {"query": "SELECT k, count(*) FROM a GROUP BY ALL"}, "GROUP BY ALL"),
    ("sql", {"query": "SELECT k, count(*) FROM a GROUP BY ROLLUP (k)"}, "ROLLUP"),
    ("sql", {"query": "SELECT k + 1 AS g, count(*) FROM a GROUP BY g"}, "alias"),
])
def test_what_a_pool_cannot_reproduce_is_refused_by_name(name, raw, what):
    params = compute.get(name).check_params(raw)
    with pytest.raises(ParameterError, match=what):
        check_pool_params(name, params)


def test_the_pool_versions_of_the_defaults_are_accepted():
    check_pool_params("linear_regression",
                      compute.get("linear_regression").check_params({"label": "y"}))
    check_pool_params("logistic_regression",
                      compute.get("logistic_regression").check_params({"label": "y"}))
    check_pool_params("sql", compute.get("sql").check_params(
        {"query": "SELECT k, count(*), avg(x) FROM a WHERE x > 0 GROUP BY k"}))


def test_a_part_not_held_or_not_of_the_tasks_schema_is_a_named_error():
    with pytest.raises(StateError, match="no partition held"):
        held.tables("digest/nobody")
    held.drop("digest/nobody")  # idempotent
    schema = pa.schema([("a", pa.float64())])
    held.hold("digest/odd", {"d": pa.table({"a": pa.array([1], pa.int64())})})
    try:
        with pytest.raises(SchemaMismatch, match="'d'.*column 'a'"):
            held.part("digest/odd", "d", schema)
        assert held.part("digest/odd", "other", schema).num_rows == 0
    finally:
        held.drop("digest/odd")


# --- where rows are read -----------------------------------------------------------------

def test_every_read_of_a_members_rows_runs_on_that_members_worker(pool, monkeypatch):
    """Rows never move: each read of a held part (the only way a task reaches rows) runs
    on the worker of the member whose key it reads, for every computation."""
    from distributed import get_worker

    reads: list[tuple[str, str]] = []
    part = held.part

    def watched(key: str, dataset: str, schema: pa.Schema) -> pa.Table:
        reads.append((key, get_worker().address))
        return part(key, dataset, schema)

    monkeypatch.setattr(held, "part", watched)
    on_pool(pool, "linear_regression", {"label": "y"}, {"d": split(regression_data(11, 90))})
    on_pool(pool, "logistic_regression", {"label": "label"},
            {"d": split(classification_data(12, 90))})
    on_pool(pool, "sql", {"query": "SELECT dept, count(*) FROM d GROUP BY dept",
                          "min_group_size": "1"}, {"d": split(people(13, 90))})
    owner = {KEYS[m]: pool.workers[m] for m in MEMBERS}
    assert reads and {k for k, _ in reads} == set(owner)
    assert all(address == owner[key] for key, address in reads)


def test_on_pinned_tls_the_pool_computes_what_one_executor_does(tmp_path):
    """The pool's own links (tls.py, cluster.py): a scheduler and three workers on TLS
    pinned to the three members' certificates, the lead member's client."""
    backend = SimulatedBackend()
    ids = {m: make_member_identity(backend) for m in MEMBERS}
    bundle = b"".join(i.cert_pem for i in ids.values()).decode()
    data = {"d": split(regression_data(14, 200), (0.2, 0.8, 0.0))}
    sql_raw = {"query": "SELECT count(*), avg(y) FROM d", "min_group_size": "5"}

    async def main() -> list[dict[str, Any]]:
        security = {m: PinnedSecurity(i, bundle) for m, i in ids.items()}
        scheduler = await start_scheduler(security["m1"], local_directory=str(tmp_path))
        nodes = [await start_worker(scheduler.address, security[m], name=m,
                                    local_directory=str(tmp_path)) for m in MEMBERS]
        try:
            workers = {m: w.address for m, w in zip(MEMBERS, nodes, strict=True)}
            assert all(a.startswith("tls://") for a in workers.values())
            schemas = hold(data)
            with pool_config(str(tmp_path)):
                async with Client(scheduler.address, security=security["m1"],
                                  asynchronous=True) as client:
                    out = []
                    for name, raw in [("linear_regression", {"label": "y"}), ("sql", sql_raw)]:
                        params = compute.get(name).check_params(raw)
                        out.append(await run_on_pool(client, workers, KEYS, name, params,
                                                     schemas))
                    return out
        finally:
            for k in KEYS.values():
                held.drop(k)
            for w in nodes:
                await w.close()
            await scheduler.close()

    fitted, counted = asyncio.run(main())
    close(fitted, single("linear_regression", {"label": "y"}, data), 1e-9)
    want = single("sql", sql_raw, data)
    close(counted["rows"], want["rows"], 1e-12)


def _with(table: pa.Table, column: str, values: list[Any]) -> pa.Table:
    i = table.column_names.index(column)
    return table.set_column(i, column, pa.array(values, type=table.schema.field(i).type))


@pytest.mark.parametrize("name,label,column,bad", [
    ("linear_regression", "y", "b", None),
    ("linear_regression", "y", "y", float("nan")),
    ("logistic_regression", "label", "a", float("inf")),
    ("logistic_regression", "label", "label", None),
])
def test_bad_values_fail_with_the_single_executors_public_error(pool, name, label, column,
                                                                 bad):
    """A null or non-finite value on one member's part of the second dataset: the same
    catalogued error, naming the dataset and column, never the value."""
    make = regression_data if name == "linear_regression" else classification_data
    second = split(make(16, 60))
    values = second[2].column(column).to_pylist()
    values[3] = bad
    second[2] = _with(second[2], column, values)
    data = {"first": split(make(15, 60)), "second": second}
    with pytest.raises(ComputeError) as alone:
        single(name, {"label": label}, data)
    with pytest.raises(ComputeError) as pooled:
        on_pool(pool, name, {"label": label}, data)
    assert str(pooled.value) == str(alone.value)
    assert pooled.value.public == alone.value.public
    assert "'second'" in str(pooled.value)


def test_logistic_regression_with_a_numeric_label_and_a_member_without_one_class(pool):
    table = classification_data(17, 240)
    label = pa.array((pa.compute.equal(table.column("label"), "yes")).to_pylist(),
                     type=pa.bool_()).cast(pa.int64())
    table = table.set_column(3, "label", label)
    order = pa.compute.sort_indices(table, [("label", "ascending")])
    parts = split(table.take(order), (0.3, 0.3, 0.4))  # m1 holds only 0s
    data = {"d": parts}
    got = on_pool(pool, "logistic_regression", {"label": "label"}, data)
    want = single("logistic_regression", {"label": "label"}, data)
    close(got, want, 1e-6)
    assert got["classes"] == [0, 1]
