"""`vertical` releases nothing unless the datasets share at least the owners' minimum of IDs,
through real scheduler, executor and provider processes. The attack: a party holding one ID
asks whether it is in the other party's table. Below the minimum both answers are the same
fixed error, which names no ID, no value and no count; nothing is sealed."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pandas as pd
import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.core.errors import TaskFailed, TeeflowError
from teeflow.sdk import Client
from tests.factories import appraisal_policy, wait_task_state

pytestmark = pytest.mark.e2e

BOB_IDS = [f"QZXpid{i:03d}MRK" for i in range(40)]
STRANGER_ID = "QZXnotbobs777MRK"
PARAMS = {"id": "pid", "model": "logistic_regression", "label": "y"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("vertical")
    pd.DataFrame({"pid": BOB_IDS, "y": [i % 2 for i in range(40)]}).to_csv(
        work / "bob.csv", index=False)
    # alice shares 20 of bob's IDs and holds 10 of her own
    alice = BOB_IDS[:20] + [f"QZXalice{i:02d}MRK" for i in range(10)]
    pd.DataFrame({"pid": alice, "x1": [7777.25 + i for i in range(30)]}).to_csv(
        work / "alice.csv", index=False)
    # the probers: carol holds one of bob's IDs, dave one that is not bob's
    pd.DataFrame({"pid": [BOB_IDS[33]], "x2": [8888.5]}).to_csv(work / "carol.csv", index=False)
    pd.DataFrame({"pid": [STRANGER_ID], "x2": [8888.5]}).to_csv(work / "dave.csv", index=False)
    parties = [Party(n, f"{n}_ds", work / f"{n}.csv") for n in ("alice", "bob", "carol", "dave")]
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor()
        for p in parties:  # the generated rules: min_intersection held to its default, 10
            c.start_provider(p, poll_wait=1)
        c.wait_for_datasets([p.dataset for p in parties])
        c.wait_for_executor(c.executor_address)
        yield c
    finally:
        for proc in c.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        c.stop()


def _client(c: LocalCluster) -> Client:
    return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                  name=c.initiator_name)


def test_an_intersection_at_the_minimum_trains(cluster):
    with _client(cluster) as client:
        task = client.submit(["alice_ds", "bob_ds"], None, "vertical", PARAMS)
        client.wait(task["id"], timeout=120)
        value = client.result(task["id"]).value
        assert value["intersection_size"] == 20 and value["model_name"] == "logistic_regression"


def test_a_one_id_probe_learns_nothing_and_no_error_names_a_value(cluster):
    errors = []
    with _client(cluster) as client:
        for prober in ("carol_ds", "dave_ds"):
            task = client.submit([prober, "bob_ds"], None, "vertical", PARAMS)
            with pytest.raises(TaskFailed) as failed:
                client.wait(task["id"], timeout=120)
            done = wait_task_state(client, task["id"], {"failed"})
            errors.append(done["error"])
            assert "fewer IDs than the owners' minimum of 10; nothing is released" in str(
                failed.value)
            with pytest.raises(TeeflowError):
                client.result(task["id"])
    # in bob's table or not: the same answer
    assert errors[0] == errors[1]
    seen = "\n".join(errors)
    for path in (cluster.workdir / "logs").iterdir():
        seen += path.read_text(errors="replace")
    seen += cluster.db.read_bytes().decode(errors="replace")
    for marker in (*BOB_IDS, STRANGER_ID, "8888.5", "7777.25"):
        assert marker not in seen
    assert "intersection" not in errors[0].replace("fewer IDs", "")  # no size either


def test_a_lower_minimum_is_the_owners_call(cluster):
    with _client(cluster) as client:
        task = client.submit(["carol_ds", "bob_ds"], None, "vertical",
                             {**PARAMS, "min_intersection": "1"})
        # the owners' rules hold min_intersection to its default: nobody signs by rule
        for node in ("carol", "bob"):
            log = cluster.workdir / "logs" / f"provider-{node}.log"
            line = f"task {task['id']}: no rule approves it; waiting for `teeflow approve`"
            deadline = time.monotonic() + 60
            while line not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert line in log.read_text()
        waiting = client.task(task["id"])
        assert waiting["state"] == "submitted" and waiting["approvals"] == []
