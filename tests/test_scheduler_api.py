"""The scheduler's HTTP API through TestClient, with a fake executor link that records calls."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pyarrow as pa
import pytest

from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.datasets import schema_fingerprint, schema_to_b64
from teeflow.core.errors import Unreachable
from teeflow.scheduler.app import MAX_BODY, create_app
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store

with warnings.catch_warnings():
    # starlette warns at import when it finds httpx rather than httpx2; nothing we can act on
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

EXECUTOR = "127.0.0.1:9999"
SCHEMA = pa.schema([("name", pa.string()), ("value", pa.float64()), ("n_samples", pa.int64())])


class FakeExecutor:
    """Stands in for every executor: records actions, answers with canned JSON."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.unreachable = False
        self.status: dict = {"status": "waiting", "received": {}}
        self._lock = threading.Lock()

    def connect(self, address: str) -> FakeExecutor:
        if self.unreachable:
            raise Unreachable(f"executor {address} unreachable: connection refused")
        return self

    def action(self, kind: str, body: bytes = b"") -> bytes:
        with self._lock:
            self.calls.append((kind, body))
        if kind == "status":
            return json.dumps({"task_id": body.decode(), **self.status}).encode()
        if kind == "run":
            return b'{"status": "running"}'
        if kind == "cancel":
            return b'{"cancelled": true}'
        if kind == "create-task":
            return b'{"accepted": true}'
        raise AssertionError(f"unexpected action {kind}")

    def action_json(self, kind: str, body: bytes = b"") -> object:
        return json.loads(self.action(kind, body))

    def close(self) -> None:
        pass

    def kinds(self, kind: str) -> list[bytes]:
        with self._lock:
            return [body for k, body in self.calls if k == kind]


class World:
    def __init__(self, client: TestClient, store: Store, scheduler: Scheduler,
                 fake: FakeExecutor) -> None:
        self.client, self.store, self.scheduler, self.fake = client, store, scheduler, fake
        self.alice, self.bob, self.initiator = (KeySigner.generate() for _ in range(3))

    def register(self) -> None:
        for name, signer in (("alice", self.alice), ("bob", self.bob)):
            r = self.client.post("/v1/nodes", json={"name": name,
                                                    "public_key": signer.public_key()})
            assert r.status_code == 200, r.text
        for name, owner in (("a_data", "alice"), ("b_data", "bob")):
            r = self.client.post("/v1/datasets", json={
                "name": name, "owner": owner, "schema": schema_to_b64(SCHEMA), "rows": 2})
            assert r.status_code == 200, r.text
            assert r.json()["fingerprint"] == schema_fingerprint(SCHEMA)

    def submit(self, **overrides):
        body = {"compute": "model_aggregation", "datasets": ["a_data", "b_data"],
                "executor": EXECUTOR, "initiator_key": self.initiator.public_key(),
                "params": {}, **overrides}
        return self.client.post("/v1/tasks", json=body)

    def report(self, task_id: str, dataset: str, node: str, **body):
        return self.client.post(f"/v1/tasks/{task_id}/assignments/{dataset}",
                                json={"node": node, **body})

    def state(self, task_id: str) -> str:
        return self.store.task(task_id).state


@pytest.fixture
def world():
    store = Store(":memory:")
    fake = FakeExecutor()
    scheduler = Scheduler(store, connect=fake.connect)
    # a long tick: the lifespan's monitor runs once at start; the tests call tick() themselves
    with TestClient(create_app(store, scheduler, tick=3600)) as client:
        yield World(client, store, scheduler, fake)
    store.close()


def _error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    return err["message"]


# -- catalog ---------------------------------------------------------------------------------


def test_register_node_and_dataset(world: World):
    world.register()
    assert [n["name"] for n in world.client.get("/v1/nodes").json()] == ["alice", "bob"]
    datasets = world.client.get("/v1/datasets").json()
    assert [(d["name"], d["owner"], d["rows"]) for d in datasets] == [
        ("a_data", "alice", 2), ("b_data", "bob", 2)]
    again = world.client.post("/v1/nodes", json={"name": "alice",
                                                  "public_key": world.bob.public_key()})
    _error(again, 409, "auth")
    bad_key = world.client.post("/v1/nodes", json={"name": "carol", "public_key": "nope"})
    _error(bad_key, 400, "input")

def test_dataset_of_unregistered_owner(world: World):
    r = world.client.post("/v1/datasets", json={"name": "x", "owner": "nobody",
                                                "schema": schema_to_b64(SCHEMA), "rows": 1})
    _error(r, 401, "auth")
    assert world.client.get("/v1/datasets").json() == []


# -- submit ----------------------------------------------------------------------------------


def test_submit_unknown_dataset(world: World):
    world.register()
    message = _error(world.submit(datasets=["a_data", "nope"]), 404, "unknown_dataset")
    assert "nope" in message
    assert world.store.tasks() == []
    assert world.fake.kinds("create-task") == []


def test_submit_unknown_compute(world: World):
    world.register()
    message = _error(world.submit(compute="secret_sauce"), 400, "parameter")
    assert "secret_sauce" in message
    assert world.store.tasks() == []
    assert world.fake.kinds("create-task") == []


def test_submit_executor_unreachable(world: World):
    world.register()
    world.fake.unreachable = True
    _error(world.submit(), 502, "unreachable")
    (task,) = world.store.tasks()
    assert task.state == "failed"
    assert "unreachable" in task.error
    assert [e["event"] for e in world.store.events(task.id)] == ["submit", "fail"]
    assert world.store.pending_for("alice") == []


def test_submit_bad_executor_address(world: World):
    world.register()
    _error(world.submit(executor="no port here"), 400, "input")
    assert world.store.tasks() == []


def _submitted(world: World) -> str:
    world.register()
    r = world.submit()
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["state"] == "accepted"
    assert body["datasets"] == ["a_data", "b_data"]
    return body["id"]


def test_good_submit(world: World):
    task_id = _submitted(world)
    assert world.state(task_id) == "accepted"
    (created,) = world.fake.kinds("create-task")
    spec = wire.TaskSpec.decode(created)
    assert spec.task_id == task_id
    assert spec.compute == "model_aggregation"
    assert [(d.name, d.owner, d.owner_key, d.fingerprint) for d in spec.datasets] == [
        ("a_data", "alice", world.alice.public_key(), schema_fingerprint(SCHEMA)),
        ("b_data", "bob", world.bob.public_key(), schema_fingerprint(SCHEMA))]
    assert spec.initiator_key == world.initiator.public_key()
    detail = world.client.get(f"/v1/tasks/{task_id}").json()
    assert [e["event"] for e in detail["events"]] == ["submit", "accept"]
    assert [a["state"] for a in detail["assignments"]] == ["pending", "pending"]


# -- assignments and progress ----------------------------------------------------------------


def test_long_poll_returns_the_assignment(world: World):
    task_id = _submitted(world)
    r = world.client.get("/v1/nodes/alice/assignments", params={"wait": 0.2})
    assert r.status_code == 200
    (work,) = r.json()
    assert (work["task_id"], work["dataset"], work["executor"]) == (task_id, "a_data", EXECUTOR)
    assert work["spec"]["task_id"] == task_id


def test_long_poll_without_work_waits_then_returns_empty(world: World):
    world.register()
    start = time.monotonic()
    r = world.client.get("/v1/nodes/alice/assignments", params={"wait": 0.2})
    assert r.status_code == 200 and r.json() == []
    assert time.monotonic() - start >= 0.2


def test_unregistered_node_polling(world: World):
    r = world.client.get("/v1/nodes/mallory/assignments", params={"wait": 0.2})
    _error(r, 401, "auth")


def test_upload_progress_then_run(world: World):
    task_id = _submitted(world)
    assert world.report(task_id, "a_data", "alice", state="started").status_code == 200
    assert world.state(task_id) == "uploading"
    assert world.client.get("/v1/nodes/alice/assignments").json() == []
    assert [w["dataset"] for w in world.client.get("/v1/nodes/bob/assignments").json()] == [
        "b_data"]
    assert world.report(task_id, "b_data", "bob", state="started").status_code == 200
    assert world.report(task_id, "a_data", "alice", state="uploaded", rows=2).status_code == 200

    # one upload still missing: the executor is not told to run
    world.fake.status = {"status": "waiting", "received": {"a_data": {"rows": 2, "bytes": 9}}}
    world.scheduler.tick()
    assert world.fake.kinds("run") == []
    assert world.state(task_id) == "uploading"

    assert world.report(task_id, "b_data", "bob", state="uploaded", rows=2).status_code == 200
    assert world.state(task_id) == "uploading"
    world.fake.status = {"status": "waiting", "received": {
        "a_data": {"rows": 2, "bytes": 9}, "b_data": {"rows": 2, "bytes": 9}}}
    world.scheduler.tick()
    assert world.fake.kinds("run") == [task_id.encode()]
    assert world.state(task_id) == "running"

    world.fake.status = {"status": "done", "received": world.fake.status["received"]}
    world.scheduler.tick()
    assert world.state(task_id) == "done"
    world.fake.status = {**world.fake.status, "status": "released"}
    world.scheduler.tick()
    assert world.state(task_id) == "released"
    events = [e["event"] for e in world.client.get(f"/v1/tasks/{task_id}").json()["events"]]
    assert events[:2] == ["submit", "accept"] and events[-3:] == ["run", "finish", "release"]


def test_report_by_the_wrong_node(world: World):
    task_id = _submitted(world)
    _error(world.report(task_id, "a_data", "bob", state="uploaded", rows=2), 409, "auth")
    assert world.store.assignments(task_id)[0]["state"] == "pending"
    assert world.state(task_id) == "accepted"


def test_failed_upload_fails_the_task_and_cancels_on_the_executor(world: World):
    task_id = _submitted(world)
    world.report(task_id, "a_data", "alice", state="started")
    r = world.report(task_id, "a_data", "alice", state="failed", error="disk on fire")
    assert r.status_code == 200
    task = world.store.task(task_id)
    assert task.state == "failed" and "disk on fire" in task.error
    assert world.fake.kinds("cancel") == [task_id.encode()]


def test_executor_reports_failure(world: World):
    task_id = _submitted(world)
    world.fake.status = {"status": "failed", "error": "schema mismatch", "received": {}}
    world.scheduler.tick()
    task = world.store.task(task_id)
    assert task.state == "failed" and task.error == "schema mismatch"


# -- request limits --------------------------------------------------------------------------


def test_body_over_one_mib(world: World):
    padding = " " * MAX_BODY
    raw = ('{"name": "alice", "public_key": "x"' + padding + "}").encode()
    r = world.client.post("/v1/nodes", content=raw, headers={"content-type": "application/json"})
    assert "larger than" in _error(r, 400, "input")
    assert world.client.get("/v1/nodes").json() == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"alice"'])
def test_body_not_a_json_object(world: World, raw):
    r = world.client.post("/v1/nodes", content=raw, headers={"content-type": "application/json"})
    _error(r, 400, "input")


def test_report_with_non_numeric_rows(world: World):
    task_id = _submitted(world)
    _error(world.report(task_id, "a_data", "alice", state="started", rows="many"), 400, "input")


def test_long_poll_with_nan_wait_returns(world: World):
    world.register()
    answers: list = []
    poll = threading.Thread(target=lambda: answers.append(
        world.client.get("/v1/nodes/alice/assignments", params={"wait": "nan"})))
    poll.start()
    poll.join(timeout=1.5)
    returned_in_time = not poll.is_alive()
    if not returned_in_time:  # give the stuck poll some work so it ends and the test can finish
        world.submit()
        poll.join(timeout=5)
    assert not poll.is_alive()
    assert returned_in_time
    assert answers[0].status_code in (200, 400, 422)
