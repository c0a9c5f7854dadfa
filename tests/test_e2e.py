"""End to end: real scheduler, executor and provider processes on loopback ports they pick."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teeflow import plaintext as reference
from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party, policy_toml
from teeflow.cli.demo import make_party_data
from teeflow.core.errors import TaskFailed, UnknownTask
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli, wait_task_state

pytestmark = pytest.mark.e2e

# A provider's long poll of the scheduler, in seconds. The scheduler's shutdown waits for the
# polls open at the time, so a short one keeps each cluster's stop (and restart) short.
POLL_WAIT = 1



def _client(c: LocalCluster) -> Client:
    """The cluster's initiator: the receiver its providers' approval rules accept."""
    return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                  name=c.initiator_name)


def _start_provider(c: LocalCluster, party: Party, policy: str | None = None,
                    approve: bool = True, node_settings: str = "") -> None:
    """As LocalCluster.start_provider, with a short long poll and extra [node] settings."""
    config = c.write_provider_config(party, policy, approve, poll_wait=POLL_WAIT,
                                     node_toml=node_settings)
    c._spawn(f"provider-{party.node}", "provider", "--config", str(config))


def _stop(c: LocalCluster) -> None:
    """Signal every process first, then wait for each: they shut down side by side."""
    for proc in c.processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    c.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of a test's own, for a test that kills or restarts one of its processes;
    every process it started is stopped, also when its start failed half way."""
    made: list[LocalCluster] = []

    def make() -> LocalCluster:
        made.append(LocalCluster(tmp_path / f"c{len(made)}"))
        return made[-1]

    yield make
    for c in made:
        _stop(c)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for every test that only submits tasks: each test's tasks, and so its
    checks, are its own. Providers:
    - alice, bob: training data; carol, dave: model parameters; each approves by rule;
    - erin: a policy that accepts no executor this tree can start;
    - frank approves by rule, grace has no rule (consent by hand)."""
    work = tmp_path_factory.mktemp("cluster")
    make_party_data(work / "alice.csv", 30_000, seed=11)
    make_party_data(work / "bob.parquet", 25_000, seed=12)
    for name, n, seed in (("carol", 50, 3), ("dave", 150, 4)):
        pq.write_table(pa.table({"name": ["w0", "w1", "b"], "value": [seed * 0.1, -1.0, 2.5 + seed],
                                 "n_samples": [n] * 3}), work / f"{name}.parquet")
    make_party_data(work / "erin.csv", 1000, seed=1)
    make_party_data(work / "frank.csv", 500, seed=1)
    make_party_data(work / "grace.csv", 500, seed=2)
    parties = [Party("alice", "train_party_1", work / "alice.csv"),
               Party("bob", "train_party_2", work / "bob.parquet"),
               Party("carol", "params_carol", work / "carol.parquet"),
               Party("dave", "params_dave", work / "dave.parquet")]
    refusing = Party("erin", "refused_d1", work / "erin.csv")
    by_rule = Party("frank", "consent_d1", work / "frank.csv")
    by_hand = Party("grace", "consent_d2", work / "grace.csv")
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        for p in [*parties, by_rule]:
            _start_provider(c, p)
        _start_provider(c, refusing, policy=policy_toml("ab" * 32))
        _start_provider(c, by_hand, approve=False)
        everyone = [*parties, refusing, by_rule, by_hand]
        c.wait_for_datasets([p.dataset for p in everyone])
        c.wait_for_executor(c.executor_address)
        c.parties = {p.dataset: p for p in everyone}
        try:
            yield c
        finally:
            _stop(c)


def test_logistic_regression_matches_plaintext(cluster, tmp_path):
    with _client(cluster) as client:
        task = client.submit(["train_party_1", "train_party_2"], None,
                             "logistic_regression", {"label": "y"})
        assert task["executor"] == cluster.executor_address  # picked by the spec's policy
        client.wait(task["id"], timeout=120)
        result = client.result(task["id"])
        history = wait_task_state(client, task["id"], {"released"})
    frames = [pd.read_csv(cluster.parties["train_party_1"].path),
              pd.read_parquet(cluster.parties["train_party_2"].path)]
    ref = reference.plaintext_logistic_regression(pd.concat(frames, ignore_index=True), "y")
    for name, value in ref["coefficients"].items():
        assert result.value["coefficients"][name] == pytest.approx(value, abs=1e-6)
    assert result.value["intercept"] == pytest.approx(ref["intercept"], abs=1e-6)
    assert result.value["n_samples"] == 55_000
    assert result.simulated and result.claims.simulated
    assert result.value["metrics"]["accuracy"] > 0.75  # the data has a real signal
    events = [e["event"] for e in history["events"]]
    assert events[:4] == ["submitted", "approved", "approved", "consented"]
    assert events[4] == "accept" and events[-1] == "close"
    assert events.count("attested") == 2 and events.count("received") == 2
    assert {"run", "computed", "wiped", "finish", "released"} <= set(events)
    with ExecutorClient(cluster.executor_address, None) as ex:
        status = ex.status(task["id"])
    assert status.status == "released" and status.inputs_held == []


def _cli(cluster, tmp_path, *args, policy: str | None = None) -> subprocess.CompletedProcess:
    pol = tmp_path / "policy.toml"
    pol.write_text(policy or policy_toml(code_measurement()))
    return run_cli(*args, env={"TEEFLOW_SCHEDULER": cluster.scheduler_url,
                               "TEEFLOW_KEY": str(cluster.initiator_key),
                               "TEEFLOW_POLICY": str(pol)}, columns=200)


def test_cli_seed_form_model_aggregation(cluster, tmp_path):
    out = tmp_path / "model.json"
    proc = _cli(cluster, tmp_path, "submit", "--task_lang=proto", "--task_type=6",
                f"--params=datasets:STRING:0:params_carol;params_dave,"
                f"server:STRING:0:{cluster.executor_address}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    body = json.loads(out.read_text())
    frames = [pd.read_parquet(cluster.parties[d].path) for d in ("params_carol", "params_dave")]
    ref = reference.plaintext_fedavg(frames)
    for name, value in ref["parameters"].items():
        assert body["result"]["parameters"][name] == pytest.approx(value, abs=1e-9)
    assert body["simulated"] is True and body["compute"] == "model_aggregation"
    task_id = body["task_id"]
    listing = _cli(cluster, tmp_path, "tasks")
    assert listing.returncode == 0 and task_id in listing.stdout
    status = _cli(cluster, tmp_path, "status", task_id)
    assert status.returncode == 0 and "released" in status.stdout
    again = _cli(cluster, tmp_path, "result", task_id, "--out", str(tmp_path / "again.json"))
    assert again.returncode != 0 and "no result" in again.stderr


def test_cli_failures_exit_nonzero(cluster, tmp_path):
    unknown = _cli(cluster, tmp_path, "submit", "--datasets", "train_party_1,nope",
                   "--executor", cluster.executor_address, "--compute", "logistic_regression",
                   "--param", "label=y")
    assert unknown.returncode != 0 and "unknown dataset 'nope'" in unknown.stderr
    closed = _cli(cluster, tmp_path, "submit", "--datasets", "train_party_1",
                  "--executor", "127.0.0.1:1", "--compute", "logistic_regression",
                  "--param", "label=y")
    assert closed.returncode != 0 and "unreachable" in closed.stderr
    bad_param = _cli(cluster, tmp_path, "submit", "--datasets", "train_party_1",
                     "--executor", cluster.executor_address, "--compute",
                     "logistic_regression", "--param", "label=nosuchcolumn")
    assert bad_param.returncode != 0 and "nosuchcolumn" in bad_param.stderr
    wrong_policy = policy_toml("11" * 32)
    refused = _cli(cluster, tmp_path, "result", "0123456789abcdef", "--out",
                   str(tmp_path / "x.json"), policy=wrong_policy)
    assert refused.returncode != 0


def test_provider_refuses_wrong_measurement(cluster):
    """A provider whose policy does not accept the executor sends nothing; the task fails."""
    c = cluster
    with _client(c) as client:
        task = client.submit(["refused_d1"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        with pytest.raises(TaskFailed, match="attestation refused: measurement"):
            client.wait(task["id"], timeout=60)
    with ExecutorClient(c.executor_address, None) as ex:
        status = ex.status(task["id"])
    assert status.received == {} and status.inputs_held == []
    assert status.status == "cancelled"


def _slow_cluster(c: LocalCluster, tmp_path: Path, rows: int) -> list[Party]:
    """Alice uploads at full speed, bob paced at one 64K-row batch a second."""
    make_party_data(tmp_path / "a.parquet", 2000, seed=1)
    make_party_data(tmp_path / "b.parquet", rows, seed=2)
    c.start_scheduler()
    c.start_executor()
    parties = [Party("alice", "d1", tmp_path / "a.parquet"),
               Party("bob", "d2", tmp_path / "b.parquet")]
    _start_provider(c, parties[0])
    _start_provider(c, parties[1], policy_toml(code_measurement()),
                    node_settings="upload_rows_per_second = 65536\n")
    c.wait_for_datasets(["d1", "d2"])
    return parties


def _wait_uploading(client: Client, task_id: str, node: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = client.task(task_id)
        if any(e["event"] == "upload" and e["detail"].get("node") == node
               and e["detail"].get("step") == "started" for e in task["events"]) and \
                any(e["event"] == "attested" for e in task["events"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"{node} never started uploading: {client.task(task_id)}")


def test_provider_killed_mid_upload_leaves_nothing(own_cluster, tmp_path):
    c = own_cluster()
    _slow_cluster(c, tmp_path, rows=6 * 65536)
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _wait_uploading(client, task["id"], "bob")
        time.sleep(1.5)  # a couple of paced batches are in the executor
        c.stop_process("provider-bob", signal.SIGKILL)
        final = wait_task_state(client, task["id"], {"failed"}, timeout=90)
        assert "d2" in (final["error"] or "")
        with ExecutorClient(c.executor_address, None) as ex:
            status = ex.status(task["id"])
        assert status.status == "failed"
        assert status.inputs_held == [] and status.receiving == []


def test_scheduler_restart_mid_task(own_cluster, tmp_path):
    c = own_cluster()
    rows = 5 * 65536  # bob uploads for ~5 s: longer than the scheduler's stop and start
    _slow_cluster(c, tmp_path, rows=rows)
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _wait_uploading(client, task["id"], "bob")
        port = c.scheduler_address.rsplit(":", 1)[1]
        c.stop_process("scheduler")
        c._spawn("scheduler", "scheduler", "--db", str(c.workdir / "scheduler.sqlite"),
                 "--listen", f"127.0.0.1:{port}", "--port-file", str(c.workdir / "s2.port"))
        c._wait_port("scheduler", c.workdir / "s2.port")
        known = client.task(task["id"])  # the restarted scheduler knows it
        assert known["state"] == "uploading"
        client.wait(task["id"], timeout=120)
        result = client.result(task["id"])
        assert result.value["n_samples"] == 2000 + rows
        events = [e["event"] for e in client.task(task["id"])["events"]]
        assert events[0] == "submitted" and "run" in events


def test_consent_by_hand_reject_and_audit(cluster, tmp_path):
    """No approval rule: the task waits for `teeflow approve`; a rejected task never runs;
    the audit log of the whole run verifies offline, and an edited row is caught."""
    c = cluster  # frank (consent_d1) approves by rule; grace (consent_d2) has no rule
    env = {"TEEFLOW_SCHEDULER": c.scheduler_url, "TEEFLOW_KEY": str(c.workdir / "grace.key")}

    def grace_cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, env=env, columns=200, timeout=120)

    datasets = ["consent_d1", "consent_d2"]
    with _client(c) as client:
        task = client.submit(datasets, None, "logistic_regression", {"label": "y"})
        waiting = wait_task_state(client, task["id"], {"submitted"})
        time.sleep(1.0)  # frank's rule signs; grace has none
        waiting = client.task(task["id"])
        assert waiting["state"] == "submitted"
        assert [a["decision"] for a in waiting["approvals"]] == ["approved"]
        approved = grace_cli("approve", task["id"], "--yes")
        assert approved.returncode == 0, approved.stderr
        client.wait(task["id"], timeout=120)
        assert client.result(task["id"]).value["n_samples"] == 1000

        second = client.submit(datasets, None, "logistic_regression", {"label": "y"})
        rejected = grace_cli("reject", second["id"], "--yes")
        assert rejected.returncode == 0, rejected.stderr
        with pytest.raises(TaskFailed, match="rejected"):
            client.wait(second["id"], timeout=30)
        with ExecutorClient(c.executor_address, None) as ex, pytest.raises(UnknownTask):
            ex.status(second["id"])  # the executor never heard of it
        wait_task_state(client, task["id"], {"released"})
        listing = run_cli("executors", env={**env, "TEEFLOW_KEY": str(c.initiator_key),
                                            "TEEFLOW_POLICY": str(c.workdir / "frank.toml")},
                          columns=200, timeout=60)
        assert listing.returncode == 0 and "accepted" in listing.stdout
    db = c.workdir / "scheduler.sqlite"
    ok = grace_cli("audit", "verify", "--db", str(db))
    assert ok.returncode == 0 and "audit log OK" in ok.stdout

    edited = tmp_path / "edited.sqlite"
    src = sqlite3.connect(db)
    src.backup(dst := sqlite3.connect(edited))
    src.close()
    # this task's first received entry: 500 rows, whichever test's tasks come before it
    seq, body = dst.execute("SELECT seq, body FROM audit WHERE kind='received' AND task_id=? "
                            "ORDER BY seq LIMIT 1", (task["id"],)).fetchone()
    assert "500" in body  # so the edit below changes the row
    dst.execute("UPDATE audit SET body = replace(body, '500', '501') WHERE seq=?", (seq,))
    dst.commit()
    dst.close()
    caught = grace_cli("audit", "verify", "--db", str(edited))
    assert caught.returncode != 0 and f"entry {seq}:" in caught.stderr
