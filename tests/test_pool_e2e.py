"""A task across a pool of three executors, end to end: real scheduler, executor and
provider processes on loopback ports they pick (issue 11).

Attackers: the executor host who runs one member as a debug enclave (its memory readable),
and the scheduler's operator who names it in the pool; a stranger who reaches a member's
port and tries to call it into a pool or to read its pool evidence; a member that dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import time

import pandas as pd
import pytest

from teeflow import plaintext as reference
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core import wire
from teeflow.core.errors import AuthError, StateError, TaskFailed, TeeflowError, UnknownTask
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, attested_client, run_cli, wait_task_state

pytestmark = pytest.mark.e2e
POLL_WAIT = 1
SLOW_ROWS = 30_000
SLOW_RATE = 4_000  # rows a second: carol's upload takes several seconds
# the one query alice's rules sign (by its digest), with its group-size floor
QUERY = ("SELECT y, count(*) AS n, sum(x0) AS s, avg(x1) AS m, var_samp(x2) AS v "
         "FROM pool_d1 WHERE x3 > 0 GROUP BY y ORDER BY y")
SQL_RULE = {"sql": {"query_sha256": hashlib.sha256(QUERY.encode()).hexdigest(),
                    "min_group_size": {"min": 10}}}


def _client(c: LocalCluster) -> Client:
    return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                  name=c.initiator_name)


def _provider(c: LocalCluster, party: Party, node_toml: str = "",
              bind: dict | None = None) -> None:
    config = c.write_provider_config(party, poll_wait=POLL_WAIT, node_toml=node_toml,
                                     max_pool=3, bind=bind)
    c._spawn(f"provider-{party.node}", "provider", "--config", str(config))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three honest executors, one run as a debug enclave, and three providers (carol
    uploads slowly, for the tests that act while a pool is taking its parts)."""
    work = tmp_path_factory.mktemp("pool")
    make_party_data(work / "alice.csv", 24_000, seed=21)
    make_party_data(work / "bob.parquet", 18_000, seed=22)
    make_party_data(work / "carol.csv", SLOW_ROWS, seed=23)
    parties = [Party("alice", "pool_d1", work / "alice.csv"),
               Party("bob", "pool_d2", work / "bob.parquet"),
               Party("carol", "pool_slow", work / "carol.csv")]
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.members = [c.start_executor(name="executor" if i == 0 else f"executor-{i + 1}")
                     for i in range(3)]
        c.debug = c.start_executor("--debug-enclave", name="executor-debug")
        _provider(c, parties[0], bind=SQL_RULE)
        _provider(c, parties[1])
        _provider(c, parties[2], f"upload_rows_per_second = {SLOW_RATE}")
        c.wait_for_datasets([p.dataset for p in parties])
        for address in [*c.members, c.debug]:
            c.wait_for_executor(address)
        c.parties = {p.dataset: p for p in parties}
        try:
            yield c
        finally:
            for proc in c.processes.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            c.stop()


def _frame(c: LocalCluster, dataset: str) -> pd.DataFrame:
    path = c.parties[dataset].path
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def _status(address: str, task_id: str):
    with ExecutorClient(address, None) as ex:
        return ex.status(task_id)


def _wait_wiped(members: list[str], task_id: str, timeout: float = 30.0) -> dict:
    """Each member's status once none holds an input of the task (or none knows it)."""
    end = time.monotonic() + timeout
    while True:
        seen = {}
        for address in members:
            try:
                seen[address] = _status(address, task_id)
            except UnknownTask:
                seen[address] = None
        if all(s is None or (s.inputs_held == [] and s.receiving == []) for s in seen.values()):
            return seen
        assert time.monotonic() < end, {a: s and s.inputs_held for a, s in seen.items()}
        time.sleep(0.3)


def test_pool_regressions_equal_one_executor_and_every_member_wipes(cluster):
    datasets = ["pool_d1", "pool_d2"]
    with _client(cluster) as client:
        pooled = client.submit(datasets, None, "linear_regression", {"label": "y"}, pool=3,
                               members=cluster.members)
        logit = client.submit(datasets, None, "logistic_regression", {"label": "y"}, pool=3,
                              members=cluster.members)
        single = client.submit(datasets, cluster.members[1], "linear_regression",
                               {"label": "y"})
        for task in (pooled, logit, single):
            client.wait(task["id"], timeout=180)
        values = {t["id"]: client.result(t["id"]).value for t in (pooled, logit, single)}
        history = wait_task_state(client, pooled["id"], {"released"})
    assert pooled["executor"] == cluster.members[0] and pooled["pool"] == cluster.members
    one, many = values[single["id"]], values[pooled["id"]]
    assert many["n_samples"] == one["n_samples"] == 42_000
    for name, value in one["coefficients"].items():
        assert many["coefficients"][name] == pytest.approx(value, abs=1e-6)
    assert many["intercept"] == pytest.approx(one["intercept"], abs=1e-6)
    frame = pd.concat([_frame(cluster, d) for d in datasets], ignore_index=True)
    ref = reference.plaintext_logistic_regression(frame, "y")
    for name, value in ref["coefficients"].items():
        assert values[logit["id"]]["coefficients"][name] == pytest.approx(value, abs=1e-6)
    # every member was attested by both owners and holds a third of each dataset, then wiped
    events = history["events"]
    attested = [e for e in events if e["event"] == "attested"]
    assert sorted(e["detail"]["executor"] for e in attested) == sorted(cluster.members * 2)
    received = [e["detail"] for e in events if e["event"] == "received"]
    assert len(received) == 6
    for dataset, rows in (("pool_d1", 24_000), ("pool_d2", 18_000)):
        parts = [r["rows"] for r in received if r["dataset"] == dataset]
        assert sum(parts) == rows and max(parts) - min(parts) <= 2 * 3
    wiped = [e for e in events if e["event"] == "wiped"]
    assert len(wiped) == 3 and all(e["detail"]["reason"] == "computed" for e in wiped)
    for address in cluster.members:
        status = _status(address, pooled["id"])
        assert status.status == "released" and status.inputs_held == []
    proc = run_cli("audit", "verify", "--db", str(cluster.db))
    assert proc.returncode == 0, proc.stderr


def test_pool_sql_equals_one_executor(cluster):
    """The query the owner signed, on a pool and on one executor: the same groups and
    counts exactly, the floating figures to summation order."""
    params = {"query": QUERY, "min_group_size": "10"}
    with _client(cluster) as client:
        pooled = client.submit(["pool_d1"], None, "sql", params, pool=3,
                               members=cluster.members)
        single = client.submit(["pool_d1"], cluster.members[2], "sql", params)
        rows = {}
        for task in (pooled, single):
            client.wait(task["id"], timeout=180)
            rows[task["id"]] = client.result(task["id"]).to_arrow().to_pylist()
    many, one = rows[pooled["id"]], rows[single["id"]]
    assert [(r["y"], r["n"]) for r in many] == [(r["y"], r["n"]) for r in one]
    assert sum(r["n"] for r in one) > 0
    for a, b in zip(many, one, strict=True):
        for column in ("s", "m", "v"):
            assert a[column] == pytest.approx(b[column], rel=1e-9)


def test_a_debug_member_is_refused_and_no_member_is_sent_a_byte(cluster):
    """The operator names a member the host runs as a debug enclave: every provider
    appraises it before it sends anything, so the task fails and nobody holds a row."""
    pool = [cluster.members[0], cluster.members[1], cluster.debug]
    with _client(cluster) as client:
        task = client.submit(["pool_d1", "pool_d2"], None, "linear_regression",
                             {"label": "y"}, pool=3, members=pool)
        with pytest.raises(TaskFailed, match="attestation refused"):
            client.wait(task["id"], timeout=120)
    seen = _wait_wiped(pool, task["id"])
    for address, status in seen.items():
        assert status is None or status.received == {}, address


def test_an_owner_rule_approves_no_pool_larger_than_its_max_pool(cluster):
    """The initiator asks for a pool of four where every owner's rules allow three: no
    provider signs by rule, each names its max_pool, and no executor is handed the task."""
    with _client(cluster) as client:
        task = client.submit(["pool_d1", "pool_d2"], None, "linear_regression",
                             {"label": "y"}, pool=4, members=[*cluster.members, cluster.debug])
        logs = [cluster.workdir / "logs" / f"provider-{n}.log" for n in ("alice", "bob")]
        end = time.monotonic() + 60
        while not all(f"task {task['id']}: no rule approves it" in log.read_text()
                      and "max_pool is 3" in log.read_text() for log in logs):
            assert time.monotonic() < end, "a provider never considered the task"
            time.sleep(0.2)
        assert client.task(task["id"])["state"] == "submitted"
        assert not [e for e in client.audit_log(task["id"]) if e.kind == "approved"]
        client.cancel(task["id"])
    for address in [*cluster.members, cluster.debug]:
        with pytest.raises(UnknownTask):
            _status(address, task["id"])


def test_a_stranger_cannot_call_a_member_into_a_pool(cluster):
    """While a pool takes its parts, a stranger at a member's port asks for its pool
    evidence under a made-up task and calls it into a scheduler of its own: refused, and
    the task goes on to its result."""
    with _client(cluster) as client:
        task = client.submit(["pool_slow"], None, "linear_regression", {"label": "y"},
                             pool=3, members=cluster.members)
        digest = client.task(task["id"])["spec_digest"]
        _wait_receiving(cluster.members[1], task["id"])
        with attested_client(cluster.members[1]) as stranger:
            with pytest.raises(UnknownTask):
                stranger.action("pool-evidence", wire.canonical(
                    {"spec_digest": secrets.token_hex(32), "nonce": "00" * 32}))
            with pytest.raises((AuthError, StateError)):
                stranger.action("pool-join", wire.canonical(
                    {"spec_digest": digest, "scheduler": "tls://127.0.0.1:9",
                     "signature": "00" * 64}))
            with pytest.raises(StateError):  # a member is run by its lead, never directly
                stranger.action("run", digest.encode())
        assert _status(cluster.members[1], task["id"]).status == "waiting"
        client.wait(task["id"], timeout=180)
        assert client.result(task["id"]).value["n_samples"] == SLOW_ROWS


def _wait_receiving(address: str, task_id: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(TeeflowError):
            if _status(address, task_id).receiving:
                return
        time.sleep(0.1)
    raise AssertionError(f"{address} never took a part of task {task_id}")


def test_a_member_that_dies_fails_the_task_and_the_others_wipe(cluster):
    victim = cluster.start_executor(name="executor-victim")
    cluster.wait_for_executor(victim)
    pool = [cluster.members[0], cluster.members[2], victim]
    with _client(cluster) as client:
        task = client.submit(["pool_slow"], None, "linear_regression", {"label": "y"},
                             pool=3, members=pool)
        _wait_receiving(victim, task["id"])
        os.killpg(cluster.processes["executor-victim"].pid, signal.SIGKILL)
        with pytest.raises(TaskFailed):
            client.wait(task["id"], timeout=180)
        error = client.task(task["id"])["error"]
    # the first report wins: carol's (her stream to the dead member broke) or a surviving
    # member's (carol then cut her stream to it too); either names the dataset
    assert "pool_slow" in error
    seen = _wait_wiped(pool[:2], task["id"])
    for address, status in seen.items():
        assert status is not None and status.status in ("failed", "cancelled"), address


def test_pool_spec_fields_are_signed(cluster):
    """The pool size is in the digest the owners sign: a spec with another size is
    another spec, and a pool with one seat is refused before anything is signed."""
    with _client(cluster) as client:
        spec = client.build_spec(["pool_d1"], "linear_regression", {"label": "y"}, pool=3)
        other = client.build_spec(["pool_d1"], "linear_regression", {"label": "y"}, pool=2)
    assert spec.to_dict()["pool"] == 3
    body = {**spec.to_dict(), "task_id": other.task_id, "nonce": other.nonce,
            "expires": other.expires}
    assert wire.TaskSpec.from_dict({**body, "pool": 2}).digest() != \
        wire.TaskSpec.from_dict(body).digest()
    with pytest.raises(TeeflowError, match="pool must be"):
        wire.TaskSpec.from_dict({**body, "pool": 1})
    with pytest.raises(TeeflowError, match="no single executor_key"):
        wire.TaskSpec.from_dict({**body, "executor_key": "ab" * 32})


@pytest.mark.parametrize("stage", ["linking", "computing"])
def test_a_member_that_dies_while_the_pool_runs_fails_the_task_and_the_others_wipe(
        cluster, stage):
    """Killed once the lead runs the task (while the members admit each other and link,
    or once the victim's worker holds its parts and the lead computes): the lead fails it,
    naming the member, and the members left hold nothing."""
    name = f"executor-victim-{stage}"
    victim = cluster.start_executor(name=name)
    cluster.wait_for_executor(victim)
    pool = [cluster.members[0], cluster.members[1], victim]
    watched = pool[0] if stage == "linking" else victim
    with _client(cluster) as client:
        task = client.submit(["pool_d1", "pool_d2"], None, "logistic_regression",
                             {"label": "y"}, pool=3, members=pool)
        end = time.monotonic() + 120
        while _lead_state(watched, task["id"]) != "running":
            assert time.monotonic() < end, f"{watched} never ran the task"
            time.sleep(0.05)
        if stage == "computing":  # its join has returned: the lead is computing (seconds)
            time.sleep(1.0)
            assert _lead_state(victim, task["id"]) == "running"
        os.killpg(cluster.processes[name].pid, signal.SIGKILL)
        with pytest.raises(TaskFailed):
            client.wait(task["id"], timeout=180)
        error = client.task(task["id"])["error"]
    if stage == "computing":
        assert "left before the task ended" in error, error
    else:
        assert "pool member" in error or victim in error, error
    seen = _wait_wiped(pool[:2], task["id"])
    for address, status in seen.items():
        assert status is not None and status.status in ("failed", "cancelled"), address
        assert status.inputs_held == []


def _lead_state(address: str, task_id: str) -> str:
    try:
        return _status(address, task_id).status
    except UnknownTask:
        return "unknown"
