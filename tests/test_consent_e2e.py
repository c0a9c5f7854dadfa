"""Approval rules that bind parameters, through real scheduler, executor and provider
processes: a bound query auto-approves; a rule that matches by name but not by parameter, or
a receiver whose encryption key is not the pinned one, leaves the task waiting for a person
(not refused); a federated task with too few parties is refused."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import TeeflowError
from teeflow.sdk import Client
from tests.factories import appraisal_policy, wait_task_state

pytestmark = pytest.mark.e2e

QUERY = "SELECT ward, count(*) AS n FROM alice_ds GROUP BY ward"
BIND = {"sql": {"query_sha256": hashlib.sha256(QUERY.encode()).hexdigest(),
                "min_group_size": {"min": 10}}}


def _data(path, n, seed):
    rng = np.random.default_rng(seed)
    pd.DataFrame({"age": rng.uniform(20, 80, n).round(1),
                  "ward": rng.choice(["a", "b", "c"], n),
                  "y": rng.integers(0, 2, n)}).to_csv(path, index=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("consent")
    parties = [Party(n, f"{n}_ds", work / f"{n}.csv") for n in ("alice", "bob")]
    for i, p in enumerate(parties):
        _data(p.path, 300, i)
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor()
        for p in parties:
            c.start_provider(p, bind=BIND, poll_wait=1)
        c.wait_for_datasets([p.dataset for p in parties])
        c.wait_for_executor(c.executor_address)
        yield c
    finally:
        for proc in c.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        c.stop()


def _client(c: LocalCluster, key=None, name=None) -> Client:
    return Client(c.scheduler_url, key=key or c.initiator_key, policy=appraisal_policy(),
                  name=name or c.initiator_name)


def _considered(c: LocalCluster, node: str, task_id: str, timeout: float = 60) -> str:
    """Until `node`'s provider has decided about the task; its log line."""
    log = c.workdir / "logs" / f"provider-{node}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f"task {task_id}:" in line and ("approved by rule" in line
                                                or "waiting for" in line
                                                or "rejected" in line):
                return line
        time.sleep(0.1)
    raise AssertionError(f"{node} never considered task {task_id}")


def _waits_for_a_person(c: LocalCluster, client: Client, task_id: str) -> None:
    for node in ("alice", "bob"):
        assert "no rule approves it; waiting for `teeflow approve`" in _considered(
            c, node, task_id)
    task = client.task(task_id)
    assert task["state"] == "submitted" and task["approvals"] == []


def test_a_query_bound_by_digest_is_approved_by_rule(cluster):
    with _client(cluster) as client:
        task = client.submit(["alice_ds"], None, "sql", {"query": QUERY})
        client.wait(task["id"], timeout=120)
        assert "approved by rule" in _considered(cluster, "alice", task["id"])
        value = client.result(task["id"]).value
        assert value  # three wards of about 100 rows each


def test_another_query_or_a_lower_floor_waits_for_a_person(cluster):
    other = "SELECT ward, avg(age) AS mean_age FROM alice_ds GROUP BY ward"
    with _client(cluster) as client:
        changed = client.submit(["alice_ds", "bob_ds"], None, "sql", {"query": other})
        floor = client.submit(["alice_ds", "bob_ds"], None, "sql",
                              {"query": QUERY, "min_group_size": "1"})
        for task in (changed, floor):
            _waits_for_a_person(cluster, client, task["id"])
        # a person signs: the owners' consent by hand still works
        for node in ("alice", "bob"):
            with _client(cluster, key=cluster.workdir / f"{node}.key", name=node) as owner:
                owner.decide(changed["id"], "approved")
        client.wait(changed["id"], timeout=120)
        assert client.task(floor["id"])["state"] == "submitted"


def test_a_receiver_whose_encryption_key_is_not_pinned_waits(cluster):
    me = KeySigner.generate()
    swapped = wire.Receiver(cluster.receiver[0], me.encryption_public_key())
    with _client(cluster) as client:
        task = client.submit(["alice_ds", "bob_ds"], None, "logistic_regression",
                             {"label": "y"}, receivers=[swapped])
        _waits_for_a_person(cluster, client, task["id"])
        fine = client.submit(["alice_ds", "bob_ds"], None, "logistic_regression",
                             {"label": "y"})
        client.wait(fine["id"], timeout=120)


def test_generated_rules_never_approve_user_code(cluster):
    code = "def run(tables):\n    return tables['alice_ds']\n"
    with _client(cluster) as client:
        try:
            task = client.submit(["alice_ds"], None, "user_code",
                                 {"code": code,
                                  "code_sha256": hashlib.sha256(code.encode()).hexdigest()})
        except TeeflowError as exc:  # no sandbox on this host: refused before any consent
            pytest.skip(f"user_code not offered here: {exc}")
        assert "waiting for" in _considered(cluster, "alice", task["id"])
        assert client.task(task["id"])["approvals"] == []


def test_federated_with_too_few_parties_is_refused(cluster):
    with _client(cluster) as client:
        with pytest.raises(TeeflowError, match="fewer parties than the owners' minimum of 3"):
            client.submit(["alice_ds", "bob_ds"], None, "federated_logistic_regression",
                          {"label": "y", "features": "age"})
        # an initiator that skips the SDK's check: the scheduler refuses the spec itself
        address = client.choose_executor()
        digest = client.executor_catalog(address)["federated_logistic_regression"].code_digest
        three = client.build_spec(["alice_ds", "bob_ds"], "federated_logistic_regression",
                                  {"label": "y", "features": "age", "min_parties": "2"},
                                  code_digest=digest)
        spec = wire.TaskSpec(**{**three.__dict__, "params": {"label": "y", "features": "age"}})
        body = {"spec": spec.to_dict(), "spec_digest": spec.digest()}
        signature = base64.b64encode(cluster.initiator.sign(
            audit.signed_payload(spec.task_id, "submitted", body))).decode()
        with pytest.raises(TeeflowError, match="fewer parties than the owners' minimum of 3"):
            client.scheduler.submit(spec.to_dict(), signature, address)
        # asking for two parties is the owners' call: their rules hold min_parties to its
        # default, so the task waits for a person
        task = client.submit(["alice_ds", "bob_ds"], None, "federated_logistic_regression",
                             {"label": "y", "features": "age", "min_parties": "2"})
        _waits_for_a_person(cluster, client, task["id"])
        wait_task_state(client, task["id"], {"submitted"})
