"""How many times the scheduler asks an executor when it ends a task there: the status it
just read is not asked again, and the status after is asked only when an abort went
(it carries the executor's signed `aborted` and `wiped`). The fake executor of
test_scheduler_api, answering aborts as a real one does."""

from __future__ import annotations

import dataclasses
import json

import pytest

from teeflow.core import audit
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store
from tests.factories import scheduler_app, sign_entry
from tests.test_scheduler_api import (
    EXECUTOR,
    EXECUTOR_SIGNER,
    FakeExecutor,
    World,
    executor_entry,
)


class AbortingExecutor(FakeExecutor):
    """Takes the scheduler's abort: fails the task, drops its inputs, signs both."""

    def action(self, kind: str, body: bytes = b"") -> bytes:
        if kind != "abort":
            return super().action(kind, body)
        with self._lock:
            self.calls.append((kind, body))
        task_id = json.loads(body)["task_id"]
        self.status = {**self.status, "status": "failed", "inputs_held": [], "audit": [
            *self.status.get("audit", []),
            executor_entry(task_id, "aborted", {"run": json.loads(body)["run"]}),
            executor_entry(task_id, "wiped", {"inputs": ["a_data"]})]}
        return b'{"status": "failed"}'


@pytest.fixture
def world():
    store = Store(":memory:")
    fake = AbortingExecutor()
    scheduler = Scheduler(store, connect=fake.connect, probe=fake.probe)
    with scheduler_app(store, scheduler) as api:
        yield World(api, store, scheduler, fake)
    store.close()


def _uploading(world: World) -> str:
    """A task whose spec names this scheduler, alice's upload attested and under way."""
    world.register()
    spec = dataclasses.replace(world.spec(), scheduler_key=world.store.log_signer.public_key())
    assert world.submit(spec).status_code == 201
    world.decide("alice", spec)
    assert world.decide("bob", spec).json()["state"] == "accepted"
    assert world.report(spec.task_id, "a_data", "alice", state="started").status_code == 200
    attested = {"executor": EXECUTOR, "tls_key_sha256": audit.p256_key_hash(EXECUTOR_SIGNER),
                "spec_digest": spec.digest(), "claims": {"tee": "simulated"}}
    r = world.report(spec.task_id, "a_data", "alice", state="started", attested={
        "body": attested, "signature": sign_entry(world.alice, spec.task_id, "attested",
                                                  attested)})
    assert r.status_code == 200, r.text
    world.fake.calls.clear()
    return spec.task_id


def _kinds(world: World) -> list[str]:
    return [kind for kind, _ in world.fake.calls]


def test_an_executor_that_failed_but_holds_inputs_is_asked_once_then_told(world: World):
    task_id = _uploading(world)
    world.fake.status = {"status": "failed", "error": "schema mismatch",
                         "inputs_held": ["a_data"], "received": {}}
    world.scheduler.tick()
    assert world.state(task_id) == "failed"
    assert _kinds(world) == ["status", "abort", "status"]
    assert [e.kind for e in world.store.audit_log(task_id)][-3:] == ["fail", "aborted", "wiped"]
    assert world.store.notices() == []  # delivered: not told again
    world.fake.calls.clear()
    world.scheduler.tick()
    assert _kinds(world) == []


def test_an_executor_that_failed_and_holds_nothing_is_asked_once(world: World):
    task_id = _uploading(world)
    world.fake.status = {"status": "failed", "error": "schema mismatch", "received": {}}
    world.scheduler.tick()
    assert world.state(task_id) == "failed"
    assert _kinds(world) == ["status"]
    assert world.store.notices() == []


def test_a_task_ended_here_asks_before_the_abort_and_after(world: World):
    """Nothing read just now (the initiator cancels): the status before gives the run."""
    task_id = _uploading(world)
    world.fake.status = {"status": "waiting", "inputs_held": ["a_data"], "received": {}}
    r = world.cancel("carol", task_id)
    assert r.status_code == 200, r.text
    assert _kinds(world) == ["cancel", "status", "abort", "status"]
    assert [e.kind for e in world.store.audit_log(task_id)][-2:] == ["aborted", "wiped"]
