"""The scheduler a spec names (`scheduler_key`) is the only one whose signed word ends the
task on the executor and lets its result out (executor/verdicts.py). So a provider signs
and uploads only for a spec that names its own scheduler, the key it pinned.

Attacker: the scheduler's operator, with its hands on the scheduler's SQLite file
(tests/rogue.py). It rewrites a submitted spec to name a scheduler key of its own (one
whose abort and release no log records), with the digest to match, and lets the real
scheduler relay it: to a provider that approves by rule, and, signed by an owner who
approved it by hand, to that owner's provider as an upload. Real processes, port 0.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import UnknownTask
from teeflow.files.keys import load_key
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli
from tests.rogue import Operator

pytestmark = pytest.mark.e2e

ROGUE = KeySigner.generate()  # the operator's own "scheduler": no log records its word
REFUSAL = "the spec's scheduler_key is not the key of this node's scheduler"


def _alice(c: LocalCluster) -> Party:
    return Party("alice", "sk_alice", c.workdir / "alice.csv")


def _bob(c: LocalCluster) -> Party:
    return Party("bob", "sk_bob", c.workdir / "bob.csv")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """alice approves by rule; bob has no rule and signs by hand."""
    work = tmp_path_factory.mktemp("scheduler_key")
    make_party_data(work / "alice.csv", 300, seed=1)
    make_party_data(work / "bob.csv", 200, seed=2)
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        c.start_provider(_alice(c), poll_wait=1)
        c.start_provider(_bob(c), approve=False, poll_wait=1)
        c.wait_for_datasets(["sk_alice", "sk_bob"])
        c.wait_for_executor(c.executor_address)
        c.operator = Operator(c.db)
        yield c


def _submit(c: LocalCluster, dataset: str) -> str:
    """An honest task, naming the real scheduler (the SDK puts in the key it pinned)."""
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()) as client:
        task = client.submit([dataset], c.executor_address, "logistic_regression",
                             {"label": "y"})
    return str(task["id"])


def _rename_scheduler(op: Operator, task_id: str) -> str:
    """The operator's edit: the spec names its key, the digest follows. The new digest."""
    spec = json.loads(op.task_row(task_id)["spec"])
    assert spec["scheduler_key"] != ROGUE.public_key()
    spec["scheduler_key"] = ROGUE.public_key()
    digest = wire.TaskSpec.from_dict(spec).digest()
    op.point(task_id, spec=spec, spec_digest=digest)
    return digest


def _settled(op: Operator, task_id: str, states: set[str], timeout: float = 90) -> dict:
    """The task row once in one of `states` (a bound, not a timed assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = op.task_row(task_id)
        if row["state"] in states:
            return row
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} never reached {states}: {op.task_row(task_id)}")


def _decisions(c: LocalCluster, task_id: str) -> list[tuple[str, str]]:
    db = c.operator._connect()
    try:
        return [(r["owner_key"], r["decision"]) for r in db.execute(
            "SELECT owner_key, decision FROM approvals WHERE task_id=?", (task_id,))]
    finally:
        db.close()


def _executor_view(c: LocalCluster, digest: str) -> Any:
    with ExecutorClient(c.executor_address, None) as ex:
        return ex.status(digest)


def _sign_without_the_check(c: LocalCluster, task_id: str) -> None:
    """What `Client.decide` does, minus its scheduler_key check."""
    with Client(c.scheduler_url, key=c.workdir / "bob.key", policy=appraisal_policy()) as bob:
        task = bob.scheduler.task(task_id)
        spec = wire.TaskSpec.from_dict(task["spec"])
        bob.signed.record(spec, "owner")
        payload = audit.signed_payload(task_id, "approved", {"spec_digest": spec.digest()})
        bob.scheduler.decide(task_id, "approved",
                             base64.b64encode(bob.identity.sign(payload)).decode())


def test_a_provider_refuses_to_sign_a_spec_that_names_another_scheduler(cluster):
    c = cluster
    c.stop_process("provider-alice")  # so it first sees the task as the operator left it
    task_id = _submit(c, "sk_alice")
    digest = _rename_scheduler(c.operator, task_id)
    c.start_provider(_alice(c), poll_wait=1)
    _settled(c.operator, task_id, {"rejected", "approved", "accepted", "uploading"})
    alice = load_key(c.workdir / "alice.key").public_key()
    assert _decisions(c, task_id) == [(alice, "rejected")]  # its only word: a refusal
    log_file = c.workdir / "logs" / "provider-alice.log"
    deadline = time.monotonic() + 30  # its line may land just after its decision
    while REFUSAL not in " ".join(log_file.read_text().split()):  # (lines may wrap)
        assert time.monotonic() < deadline, log_file.read_text()[-2000:]
        time.sleep(0.2)
    with pytest.raises(UnknownTask):  # never handed to the executor
        _executor_view(c, digest)


def test_a_provider_sends_no_data_for_a_spec_that_names_another_scheduler(cluster):
    """bob signs the rewritten spec by hand, while his provider is down (up, it would have
    refused it first, as alice's does); the real scheduler relays it to the executor and
    asks bob's provider to upload. It refuses before it connects, naming why."""
    c = cluster
    c.stop_process("provider-bob")
    task_id = _submit(c, "sk_bob")
    digest = _rename_scheduler(c.operator, task_id)
    refused = run_cli("approve", task_id, "--yes", env={
        "TEEFLOW_SCHEDULER": c.scheduler_url, "TEEFLOW_KEY": str(c.workdir / "bob.key")},
        columns=200)  # teeflow's own approve checks the key before it signs
    assert refused.returncode != 0 and "scheduler_key" in refused.stderr, refused.stderr
    assert _decisions(c, task_id) == []
    _sign_without_the_check(c, task_id)  # bob's tool is not teeflow's, or an old one
    _settled(c.operator, task_id, {"accepted"})  # handed to the executor, bob's upload due
    c.start_provider(_bob(c), approve=False, poll_wait=1)
    row = _settled(c.operator, task_id, {"failed", "cancelled", "done", "released"})
    assert row["state"] == "failed", row
    assert REFUSAL in row["error"] and "bob" in row["error"], row["error"]
    there = _executor_view(c, digest)  # the scheduler did hand it over: bob sent nothing
    assert there.received == {} and there.inputs_held == [], there
    assert "received" not in [e.kind for e in there.audit]
