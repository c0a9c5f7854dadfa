"""The scheduler's HTTP API through TestClient, with a fake executor link that records calls.

Every call is signed (core/auth.py) by the node making it; tasks are signed specs that
reach the executor only with every owner's signature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.simulated import SimulatedBackend, code_measurement
from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner, verify_signature
from teeflow.core.errors import Unreachable
from teeflow.core.schemas import schema_fingerprint, schema_to_b64
from teeflow.executor.service import Executor
from teeflow.scheduler.app import MAX_BODY
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store
from tests import factories
from tests.factories import (
    MEMBER,
    SignedClient,
    make_spec,
    p256_signer,
    scheduler_app,
    sign_entry,
    submit_signature,
)

EXECUTOR = "127.0.0.1:9999"
SCHEMA = pa.schema([("name", pa.string()), ("value", pa.float64()), ("n_samples", pa.int64())])
FP = schema_fingerprint(SCHEMA)
EXECUTOR_KEY = ec.generate_private_key(ec.SECP256R1())
EXECUTOR_SIGNER = p256_signer(EXECUTOR_KEY)


# what a real executor's status carries besides what a test sets (core.answers.TaskStatus)
STATUS_FIELDS = {"error": None, "expected": [], "received": {}, "receiving": [],
                 "inputs_held": [], "spilled": {}, "digesting": [], "simulated": True,
                 "taken_by": [], "audit": []}


class FakeExecutor:
    """Stands in for every executor: records actions, answers with canned JSON."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.unreachable = False
        self.status: dict = {"status": "waiting", "received": {}}
        self._lock = threading.Lock()

    def probe(self, address: str) -> None:
        """Automatic choice's probe: answers, unless told it is down."""
        if self.unreachable:
            raise Unreachable(f"executor {address} unreachable: connection refused")

    def connect(self, address: str) -> FakeExecutor:
        if self.unreachable:
            raise Unreachable(f"executor {address} unreachable: connection refused")
        return self

    def action(self, kind: str, body: bytes = b"") -> bytes:
        with self._lock:
            self.calls.append((kind, body))
        if kind == "status":
            return json.dumps({**STATUS_FIELDS, "task_id": body.decode(),
                               **self.status}).encode()
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


def executor_entry(task_id: str, kind: str, body: dict,
                   key: ec.EllipticCurvePrivateKey = EXECUTOR_KEY) -> dict:
    """An audit entry as the executor's status carries it."""
    return factories.executor_entry(key, task_id, kind, body)


class World:
    def __init__(self, api: SignedClient, store: Store, scheduler: Scheduler,
                 fake: FakeExecutor) -> None:
        self.api, self.client = api, api.client
        self.store, self.scheduler, self.fake = store, scheduler, fake
        self.alice, self.bob, self.carol, self.dave, self.mallory = (
            KeySigner.generate() for _ in range(5))
        self.initiator = self.carol
        self.keys = {"alice": self.alice, "bob": self.bob, "carol": self.carol,
                     "dave": self.dave, "mallory": self.mallory}

    # -- signed requests -----------------------------------------------------------------
    def call(self, who: str | KeySigner, method: str, path: str, body: object = None,
             params: dict | None = None, raw: bytes | None = None):
        signer = self.keys[who] if isinstance(who, str) else who
        return self.api.call(signer, method, path, body, params=params, raw=raw)

    def register_node(self, name: str, signer: KeySigner | None = None, **overrides):
        return self.api.register_node(name, signer or self.keys[name], **overrides)

    def register(self) -> None:
        """alice and bob own data, carol initiates, dave audits (reads every task) and
        hosts the fake executor, registered as if it had proved its address."""
        for name in ("alice", "bob", "carol", "dave"):
            roles = (*MEMBER, "auditor") if name == "dave" else MEMBER
            r = self.register_node(name, roles=roles)
            assert r.status_code == 200, r.text
        self.store.register_executor(EXECUTOR, "pem", "simulated", {}, self.dave.public_key())
        for name, owner in (("a_data", "alice"), ("b_data", "bob")):
            r = self.call(owner, "POST", "/v1/datasets", {
                "name": name, "owner": owner, "schema": schema_to_b64(SCHEMA), "rows": 2})
            assert r.status_code == 200, r.text
            assert r.json()["fingerprint"] == FP

    # -- tasks -----------------------------------------------------------------------------
    def spec(self, **overrides) -> wire.TaskSpec:
        spec = make_spec([("a_data", "alice", self.alice, FP), ("b_data", "bob", self.bob, FP)],
                         self.initiator)
        return dataclasses.replace(spec, **overrides)

    def submit(self, spec: wire.TaskSpec | None = None, signature: str | None = None,
               executor: str | None = EXECUTOR, by: str = "carol"):
        spec = spec or self.spec()
        body = {"spec": spec.to_dict(),
                "signature": signature or submit_signature(spec, self.initiator),
                "executor": executor}
        return self.call(by, "POST", "/v1/tasks", body)

    def decide(self, who: str, spec: wire.TaskSpec, decision: str = "approved",
               signature: str | None = None):
        signature = signature or sign_entry(self.keys[who], spec.task_id, decision,
                                            {"spec_digest": spec.digest()})
        return self.call(who, "POST", f"/v1/tasks/{spec.task_id}/decision",
                         {"decision": decision, "signature": signature})

    def report(self, task_id: str, dataset: str, node: str, **body):
        return self.call(node, "POST", f"/v1/tasks/{task_id}/assignments/{dataset}", body)

    def cancel(self, who: str, task_id: str):
        """A cancel signed for the executor too, as the SDK sends it."""
        signature = self.keys[who].sign(wire.cancel_message(task_id)).hex()
        return self.call(who, "POST", f"/v1/tasks/{task_id}/cancel", {"signature": signature})

    def work(self, node: str, wait: float | str = 0, who: str | None = None):
        return self.call(who or node, "GET", f"/v1/nodes/{node}/work", params={"wait": wait})

    def state(self, task_id: str) -> str:
        return self.store.task(task_id).state

    def events(self, task_id: str) -> list[str]:
        r = self.call("carol", "GET", f"/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        return [e["event"] for e in r.json()["events"]]

    def audit_log(self, task_id: str | None = None) -> list[audit.Entry]:
        r = self.call("dave", "GET", "/v1/audit", params={"task": task_id} if task_id else None)
        assert r.status_code == 200, r.text
        return [audit.Entry(**e) for e in r.json()]


@pytest.fixture
def world():
    store = Store(":memory:")
    fake = FakeExecutor()
    scheduler = Scheduler(store, connect=fake.connect, probe=fake.probe)
    with scheduler_app(store, scheduler) as api:
        yield World(api, store, scheduler, fake)
    store.close()


def _error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    return err["message"]


# -- catalog ---------------------------------------------------------------------------------


def test_health_needs_no_signature(world: World):
    r = world.client.get("/v1/health")
    assert r.status_code == 200 and r.json() == {"ok": True}


def test_register_node_and_dataset(world: World):
    world.register()
    nodes = world.call("alice", "GET", "/v1/nodes").json()
    assert [n["name"] for n in nodes] == ["alice", "bob", "carol", "dave"]
    assert nodes[0]["enc_key"] == world.alice.encryption_public_key()
    datasets = world.call("bob", "GET", "/v1/datasets").json()
    assert [(d["name"], d["owner"], d["owner_key"], d["rows"]) for d in datasets] == [
        ("a_data", "alice", world.alice.public_key(), 2),
        ("b_data", "bob", world.bob.public_key(), 2)]
    again = world.register_node("alice", world.mallory)  # a name taken by another key
    _error(again, 403, "auth")
    _error(world.register_node("alice2", world.alice), 403, "auth")  # key taken under a name
    _error(world.register_node("erin", world.mallory, enc_key="nope"), 400, "input")
    _error(world.register_node("x" * 65, world.mallory), 400, "input")
    assert world.store.node_key("alice") == world.alice.public_key()
    assert world.store.node_by_key(world.mallory.public_key()) is None
    assert world.register_node("alice").status_code == 200  # re-registration is idempotent


def test_dataset_of_unregistered_or_other_owner(world: World):
    world.register()
    r = world.call("alice", "POST", "/v1/datasets", {
        "name": "x", "owner": "nobody", "schema": schema_to_b64(SCHEMA), "rows": 1})
    _error(r, 403, "auth")
    r = world.call("alice", "POST", "/v1/datasets", {
        "name": "x", "owner": "bob", "schema": schema_to_b64(SCHEMA), "rows": 1})
    assert "bob" in _error(r, 403, "auth")
    r = world.call("mallory", "POST", "/v1/datasets", {
        "name": "x", "owner": "mallory", "schema": schema_to_b64(SCHEMA), "rows": 1})
    _error(r, 401, "unauthenticated")
    assert [d["name"] for d in world.store.datasets()] == ["a_data", "b_data"]


# -- submit ----------------------------------------------------------------------------------


def _nothing_submitted(world: World) -> None:
    assert world.store.tasks() == []
    assert world.store.audit_log() == []
    assert world.fake.calls == []


def test_submit_unknown_dataset(world: World):
    world.register()
    spec = make_spec([("a_data", "alice", world.alice, FP), ("nope", "alice", world.alice, FP)],
                     world.carol)
    message = _error(world.submit(spec), 404, "unknown_dataset")
    assert "nope" in message
    _nothing_submitted(world)


def test_submit_unknown_compute(world: World):
    world.register()
    message = _error(world.submit(world.spec(compute="secret_sauce")), 400, "parameter")
    assert "secret_sauce" in message
    _nothing_submitted(world)


def test_submit_bad_executor_address(world: World):
    world.register()
    _error(world.submit(executor="no port here"), 400, "input")
    _nothing_submitted(world)


def test_submit_needs_the_initiators_signature(world: World):
    world.register()
    spec = world.spec()
    forged = sign_entry(world.mallory, spec.task_id, "submitted",
                        {"spec": spec.to_dict(), "spec_digest": spec.digest()})
    _error(world.submit(spec, signature=forged), 403, "auth")
    other = world.spec(params={"rounds": "2"})
    _error(world.submit(spec, signature=submit_signature(other, world.carol)), 403, "auth")
    _error(world.submit(spec, signature="not base64!"), 403, "auth")
    _nothing_submitted(world)


def test_submit_by_another_than_the_specs_initiator(world: World):
    world.register()
    r = world.submit(by="dave")  # carol's validly signed spec, sent by dave
    assert "initiator" in _error(r, 403, "auth")
    _nothing_submitted(world)


def test_submit_malformed_spec(world: World):
    world.register()
    spec = world.spec().to_dict()
    for bad in ({**spec, "extra": 1}, {**spec, "version": 2}, {**spec, "task_id": "t-1"},
                {**spec, "receivers": []}):
        r = world.call("carol", "POST", "/v1/tasks", {"spec": bad, "signature": "c2ln"})
        _error(r, 400, "input")
    _error(world.call("carol", "POST", "/v1/tasks", {"spec": spec}), 400, "input")
    _nothing_submitted(world)


def test_submit_spec_that_misstates_the_catalog(world: World):
    world.register()
    for datasets in ([("a_data", "alice", world.mallory, FP), ("b_data", "bob", world.bob, FP)],
                     [("a_data", "alice", world.alice, "0" * 64)],
                     [("a_data", "bob", world.alice, FP)]):
        r = world.submit(make_spec(datasets, world.carol))
        assert "a_data" in _error(r, 400, "input")
    _nothing_submitted(world)


def test_submit_bad_executor_policy(world: World):
    world.register()
    r = world.submit(world.spec(executor_policy={"tee_types": ["nonsense"]}))
    _error(r, 400, "input")
    _nothing_submitted(world)


def test_submit_malformed_receiver_key(world: World):
    world.register()
    spec = world.spec(receivers=(wire.Receiver("not a key", world.carol.encryption_public_key()),))
    assert "receiver" in _error(world.submit(spec), 400, "input")
    _nothing_submitted(world)


def test_submit_picks_an_executor_the_policy_accepts(world: World):
    world.register()
    r = world.submit(executor=None)
    assert "no registered executor" in _error(r, 400, "input")
    world.store.register_executor("127.0.0.1:7001", "pem", "simulated",
                                  {"measurement": "00" * 32})
    assert world.submit(executor=None).status_code == 400  # wrong measurement: not picked
    world.store.register_executor("127.0.0.1:7002", "pem", "simulated",
                                  {"measurement": code_measurement()})
    r = world.submit(executor=None)
    assert r.status_code == 201, r.text
    assert r.json()["executor"] == "127.0.0.1:7002"


def test_good_submit_waits_for_the_owners(world: World):
    world.register()
    spec = world.spec()
    r = world.submit(spec)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["id"], body["state"]) == (spec.task_id, "submitted")
    assert body["datasets"] == ["a_data", "b_data"]
    assert body["spec_digest"] == spec.digest()
    assert world.fake.calls == []  # nothing reaches an executor without consent
    detail = world.call("carol", "GET", f"/v1/tasks/{spec.task_id}").json()
    assert detail["spec"] == spec.to_dict()
    assert [e["event"] for e in detail["events"]] == ["submitted"]
    assert detail["approvals"] == []
    assert [a["state"] for a in detail["assignments"]] == ["pending", "pending"]
    _error(world.submit(spec), 409, "state")  # the same task id twice


# -- consent ---------------------------------------------------------------------------------


def _consented(world: World) -> wire.TaskSpec:
    world.register()
    spec = world.spec()
    assert world.submit(spec).status_code == 201
    assert world.decide("alice", spec).json()["state"] == "submitted"
    r = world.decide("bob", spec)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "accepted"
    return spec


def test_owners_approving_at_once_both_count(world: World, monkeypatch):
    """Two owners approve at the same moment: consent is complete, not lost between them
    (each used to read the others' approvals before either was written, and then neither
    completed consent: the task stayed submitted forever)."""
    world.register()
    spec = world.spec()
    assert world.submit(spec).status_code == 201
    both_read = threading.Barrier(2, timeout=5)
    approvals = world.store.approvals

    def read_together(task_id: str):
        rows = approvals(task_id)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()  # each decision has read the approvals before either writes
        return rows

    monkeypatch.setattr(world.store, "approvals", read_together)
    answers: list = []
    threads = [threading.Thread(target=lambda who=who: answers.append(world.decide(who, spec)))
               for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in answers) == [200, 200]
    assert world.store.task(spec.task_id).state == "accepted"


def test_owners_approve_then_the_executor_gets_the_signed_spec(world: World):
    world.register()
    spec = world.spec()
    world.submit(spec)
    (item,) = world.work("alice").json()
    assert item == {"kind": "approve", "task_id": spec.task_id, "spec": spec.to_dict(),
                    "spec_digest": spec.digest()}
    assert world.work("carol").json() == []  # the initiator owns no input

    r = world.decide("alice", spec)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "submitted"
    assert world.work("alice").json() == []
    assert [i["kind"] for i in world.work("bob").json()] == ["approve"]
    assert world.fake.calls == []

    assert world.decide("bob", spec).json()["state"] == "accepted"
    (created,) = world.fake.kinds("create-task")
    sent = json.loads(created)
    assert sent["spec"] == spec.to_dict()
    assert sorted(a["signer"] for a in sent["approvals"]) == sorted(
        audit.ed25519_signer(k.public_key()) for k in (world.alice, world.bob))
    # what the scheduler relays is exactly what a real executor needs to accept the task
    executor = Executor(SimulatedBackend(), EXECUTOR_KEY)
    executor.create_task(wire.TaskSpec.from_dict(sent["spec"]), sent["approvals"])
    assert executor.status(spec.task_id)["status"] == "waiting"

    assert world.events(spec.task_id) == [
        "submitted", "approved", "approved", "consented", "accept"]
    assert audit.verify_chain(world.audit_log()) == 5


def test_one_rejection_ends_the_task(world: World):
    world.register()
    spec = world.spec()
    world.submit(spec)
    world.decide("alice", spec)
    r = world.decide("bob", spec, "rejected")
    assert r.status_code == 200 and r.json()["state"] == "rejected"
    assert world.fake.calls == []
    assert world.work("alice").json() == [] and world.work("bob").json() == []
    _error(world.decide("bob", spec), 409, "state")
    assert world.state(spec.task_id) == "rejected"
    audit.verify_chain(world.audit_log())


def test_decisions_that_do_not_count(world: World):
    world.register()
    spec = world.spec()
    world.submit(spec)
    _error(world.decide("carol", spec), 403, "auth")  # the initiator owns no input
    _error(world.decide("dave", spec), 403, "auth")
    other = world.spec(params={"rounds": "2"})
    wrong_digest = sign_entry(world.alice, spec.task_id, "approved",
                              {"spec_digest": other.digest()})
    _error(world.decide("alice", spec, signature=wrong_digest), 403, "auth")
    as_rejection = sign_entry(world.alice, spec.task_id, "rejected",
                              {"spec_digest": spec.digest()})
    _error(world.decide("alice", spec, signature=as_rejection), 403, "auth")
    _error(world.decide("alice", spec, decision="maybe"), 400, "input")
    assert world.store.approvals(spec.task_id) == []
    assert world.decide("alice", spec).status_code == 200
    _error(world.decide("alice", spec), 409, "state")  # once per owner
    _error(world.call("alice", "POST", "/v1/tasks/nope0000/decision",
                      {"decision": "approved", "signature": "c2ln"}), 404, "unknown_task")
    assert world.state(spec.task_id) == "submitted"
    assert world.events(spec.task_id) == ["submitted", "approved"]
    assert world.fake.calls == []


def test_executor_unreachable_at_dispatch(world: World):
    world.register()
    spec = world.spec()
    world.submit(spec)
    world.decide("alice", spec)
    world.fake.unreachable = True
    r = world.decide("bob", spec)
    assert r.status_code == 200 and r.json()["state"] == "failed"
    task = world.store.task(spec.task_id)
    assert task.state == "failed" and "unreachable" in task.error
    assert world.events(spec.task_id) == [
        "submitted", "approved", "approved", "consented", "fail"]
    assert world.store.pending_for("alice") == []


# -- assignments and progress ----------------------------------------------------------------


def test_long_poll_returns_the_assignment(world: World):
    spec = _consented(world)
    r = world.work("alice", 0.2)
    assert r.status_code == 200
    (work,) = r.json()
    assert (work["kind"], work["task_id"], work["dataset"], work["executor"]) == (
        "upload", spec.task_id, "a_data", EXECUTOR)
    assert work["spec"] == spec.to_dict() and work["spec_digest"] == spec.digest()
    assert {a["owner_key"] for a in work["approvals"]} == {
        world.alice.public_key(), world.bob.public_key()}


def test_long_poll_without_work_waits_then_returns_empty(world: World):
    world.register()
    start = time.monotonic()
    r = world.work("alice", 0.2)
    assert r.status_code == 200 and r.json() == []
    assert time.monotonic() - start >= 0.2


def test_polling_work_of_another_node(world: World):
    world.register()
    _error(world.work("alice", who="bob"), 403, "auth")
    _error(world.work("mallory", who="bob"), 403, "auth")  # not a registered node
    _error(world.work("mallory"), 401, "unauthenticated")  # not a registered key


def test_upload_progress_then_run(world: World):
    spec = _consented(world)
    task_id = spec.task_id
    assert world.report(task_id, "a_data", "alice", state="started").status_code == 200
    assert world.state(task_id) == "uploading"
    attested = {"executor": EXECUTOR, "tls_key_sha256": audit.p256_key_hash(EXECUTOR_SIGNER),
                "spec_digest": spec.digest(), "claims": {"tee": "simulated"}}
    r = world.report(task_id, "a_data", "alice", state="started", attested={
        "body": attested, "signature": sign_entry(world.alice, task_id, "attested", attested)})
    assert r.status_code == 200, r.text
    # a started upload stays in its node's work: restarted, the node takes it up again
    assert [i["dataset"] for i in world.work("alice").json()] == ["a_data"]
    assert [w["dataset"] for w in world.work("bob").json()] == ["b_data"]
    assert world.report(task_id, "b_data", "bob", state="started").status_code == 200
    assert world.report(task_id, "a_data", "alice", state="uploaded", rows=2).status_code == 200

    # one upload still missing: the executor is not told to run
    received = [executor_entry(task_id, "received", {"dataset": "a_data", "rows": 2})]
    world.fake.status = {"status": "waiting", "received": {"a_data": {"rows": 2, "bytes": 9}},
                         "audit": received}
    world.scheduler.tick()
    assert world.fake.kinds("run") == []
    assert world.state(task_id) == "uploading"

    assert world.report(task_id, "b_data", "bob", state="uploaded", rows=2).status_code == 200
    assert world.state(task_id) == "uploading"
    received.append(executor_entry(task_id, "received", {"dataset": "b_data", "rows": 2}))
    world.fake.status = {"status": "waiting", "audit": received, "received": {
        "a_data": {"rows": 2, "bytes": 9}, "b_data": {"rows": 2, "bytes": 9}}}
    world.scheduler.tick()
    # the executor's id for the task: its spec digest (a task id alone may be squatted)
    assert world.fake.kinds("run") == [world.store.task(task_id).spec_digest.encode()]
    assert world.state(task_id) == "running"

    done = [*received, executor_entry(task_id, "wiped", {"inputs": ["a_data", "b_data"]}),
            executor_entry(task_id, "computed", {"spec_digest": spec.digest()})]
    world.fake.status = {**world.fake.status, "status": "done", "audit": done}
    world.scheduler.tick()
    assert world.state(task_id) == "done"
    released = [*done, executor_entry(task_id, "released", {"to": world.carol.public_key()})]
    world.fake.status = {**world.fake.status, "status": "released", "audit": released}
    world.scheduler.tick()
    world.scheduler.tick()  # nothing new: each executor entry is recorded once
    assert world.state(task_id) == "released"
    assert world.events(task_id) == [
        "submitted", "approved", "approved", "consented", "accept", "upload", "attested",
        "upload", "upload", "received", "upload", "received", "run", "wiped", "computed",
        "finish", "release-granted", "released", "close"]
    log = world.audit_log(task_id)
    assert [e.signer for e in log if e.kind == "received"] == [EXECUTOR_SIGNER] * 2
    assert audit.verify_chain(world.audit_log()) == len(log)


def test_attested_report_must_be_signed_by_the_reporter(world: World):
    spec = _consented(world)
    world.report(spec.task_id, "a_data", "alice", state="started")
    body = {"executor": EXECUTOR, "tls_key_sha256": "00" * 32, "spec_digest": spec.digest()}
    r = world.report(spec.task_id, "a_data", "alice", state="started", attested={
        "body": body, "signature": sign_entry(world.bob, spec.task_id, "attested", body)})
    _error(r, 403, "auth")
    r = world.report(spec.task_id, "a_data", "alice", state="started",
                     attested={"body": "x", "signature": 1})
    _error(r, 400, "input")
    assert "attested" not in world.events(spec.task_id)


def test_attested_log_anchor_must_be_a_head_of_this_log(world: World):
    """A provider's signed `log` (the head it saw) must be a prefix of the log, else it
    would make every later check of the whole log fail: refused, nothing recorded."""
    spec = _consented(world)
    world.report(spec.task_id, "a_data", "alice", state="started")
    size = len(world.audit_log())
    for log in ({"size": size + 5, "root": "00" * 32}, {"size": 1, "root": "00" * 32},
                {"size": 1, "root": "zz"}):
        body = {"executor": EXECUTOR, "tls_key_sha256": "00" * 32,
                "spec_digest": spec.digest(), "log": log}
        r = world.report(spec.task_id, "a_data", "alice", state="started", attested={
            "body": body, "signature": sign_entry(world.alice, spec.task_id, "attested",
                                                  body)})
        _error(r, 400, "input")
    assert "attested" not in world.events(spec.task_id)
    good = {"size": size, "root": audit.tree_of(world.audit_log()).root().hex()}
    body = {"executor": EXECUTOR, "tls_key_sha256": "00" * 32, "spec_digest": spec.digest(),
            "log": good}
    r = world.report(spec.task_id, "a_data", "alice", state="started", attested={
        "body": body, "signature": sign_entry(world.alice, spec.task_id, "attested", body)})
    assert r.status_code == 200, r.text
    assert audit.verify_chain(world.audit_log()) == size + 1


def test_executor_entries_with_bad_signatures_are_dropped(world: World):
    spec = _consented(world)
    world.report(spec.task_id, "a_data", "alice", state="started")
    good = executor_entry(spec.task_id, "received", {"dataset": "a_data", "rows": 2})
    world.fake.status = {"status": "waiting", "received": {}, "audit": [
        {**good, "body": {"dataset": "a_data", "rows": 3}},  # altered after signing
        {**good, "kind": "computed"},  # not what was signed
        {**good, "kind": "submitted"},  # not a kind the executor may record
        {**good, "signature": ""}]}
    world.scheduler.tick()
    assert world.events(spec.task_id)[-1] == "upload"
    audit.verify_chain(world.audit_log())


def test_executor_entries_from_an_unattested_key_are_dropped(world: World):
    spec = _consented(world)
    world.report(spec.task_id, "a_data", "alice", state="started")
    rogue = ec.generate_private_key(ec.SECP256R1())
    world.fake.status = {"status": "waiting", "received": {}, "audit": [
        executor_entry(spec.task_id, "received", {"dataset": "a_data", "rows": 2}, rogue)]}
    world.scheduler.tick()
    assert world.events(spec.task_id)[-1] == "upload"
    audit.verify_chain(world.audit_log())


def test_report_by_the_wrong_node(world: World):
    spec = _consented(world)
    r = world.report(spec.task_id, "a_data", "bob", state="uploaded", rows=2)
    assert "alice" in _error(r, 403, "auth")
    assert world.store.assignments(spec.task_id)[0]["state"] == "pending"
    assert world.state(spec.task_id) == "accepted"
    _error(world.report(spec.task_id, "a_data", "mallory", state="uploaded", rows=2),
           401, "unauthenticated")


def test_failed_upload_fails_the_task_and_cancels_on_the_executor(world: World):
    spec = _consented(world)
    task_id = spec.task_id
    world.report(task_id, "a_data", "alice", state="started")
    alice_cancel = world.alice.sign(wire.cancel_message(task_id)).hex()
    r = world.report(task_id, "a_data", "alice", state="failed", error="disk on fire",
                     cancel_signature=alice_cancel)
    assert r.status_code == 200
    task = world.store.task(task_id)
    assert task.state == "failed" and "disk on fire" in task.error
    assert [json.loads(b) for b in world.fake.kinds("cancel")] == [
        {"task_id": task_id, "key": world.alice.public_key(), "signature": alice_cancel,
         "spec_digest": task.spec_digest}]


def test_executor_reports_failure(world: World):
    spec = _consented(world)
    world.fake.status = {"status": "failed", "error": "schema mismatch", "received": {}}
    world.scheduler.tick()
    task = world.store.task(spec.task_id)
    assert task.state == "failed" and task.error == "schema mismatch"


@pytest.mark.parametrize("status", [
    {"status": "exploded"},                              # a state no executor has
    {"status": "done", "received": ["a_data"]},          # a list where a map belongs
    {"status": "waiting", "audit": [{"kind": "wiped"}]},  # an entry without its signature
    {"status": "waiting", "surprise": 1},                # a field no executor sends
    {"received": {}},                                    # no status at all (was a KeyError)
    {"status": "waiting", "audit": "entries"},           # was an AttributeError
])
def test_a_malformed_executor_status_changes_nothing(world: World, status):
    """A broken or hostile executor's answer is a named PeerError at the edge: the task
    keeps its state (until the executor is given up on), nothing is recorded from it."""
    spec = _consented(world)
    before = world.store.task(spec.task_id)
    entries = len(world.store.audit_log(spec.task_id))
    world.fake.status = status
    world.scheduler.tick()
    task = world.store.task(spec.task_id)
    assert task.state == before.state and task.error is None
    assert len(world.store.audit_log(spec.task_id)) == entries


# -- cancel and the audit log ----------------------------------------------------------------


def test_cancel_before_consent_tells_no_executor(world: World):
    world.register()
    spec = world.spec()
    world.submit(spec)
    _error(world.cancel("dave", spec.task_id), 403, "auth")
    assert world.state(spec.task_id) == "submitted"
    r = world.cancel("carol", spec.task_id)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert world.fake.calls == []
    assert world.work("alice").json() == []
    _error(world.cancel("carol", spec.task_id), 409, "state")


def test_owner_cancels_a_running_task(world: World):
    spec = _consented(world)
    r = world.cancel("bob", spec.task_id)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    [sent] = [json.loads(b) for b in world.fake.kinds("cancel")]
    assert sent["key"] == world.bob.public_key() and sent["task_id"] == spec.task_id
    verify_signature(sent["key"], bytes.fromhex(sent["signature"]),
                     wire.cancel_message(spec.task_id))
    assert world.events(spec.task_id)[-1] == "cancel"
    assert world.store.pending_for("alice") == []


def test_audit_endpoint(world: World):
    one = _consented(world)
    two = world.spec(task_id="task0002")
    assert world.submit(two).status_code == 201
    log = world.audit_log()
    assert [e.task_id for e in log] == [one.task_id] * 5 + [two.task_id]
    assert audit.verify_chain(log) == 6
    assert [e.seq for e in world.audit_log(two.task_id)] == [6]
    submitted = log[0]
    assert submitted.kind == "submitted"
    assert submitted.body == {"spec": one.to_dict(), "spec_digest": one.digest()}
    assert submitted.signer == audit.ed25519_signer(world.carol.public_key())


# -- request limits --------------------------------------------------------------------------


def test_body_over_one_mib(world: World):
    padding = " " * MAX_BODY
    raw = ('{"name": "alice", "public_key": "x"' + padding + "}").encode()
    r = world.call("alice", "POST", "/v1/nodes", raw=raw)
    assert "larger than" in _error(r, 400, "input")
    assert world.store.nodes() == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"alice"'])
def test_body_not_a_json_object(world: World, raw):
    _error(world.call("alice", "POST", "/v1/nodes", raw=raw), 400, "input")
    assert world.store.nodes() == []


def test_report_with_non_numeric_rows(world: World):
    spec = _consented(world)
    r = world.report(spec.task_id, "a_data", "alice", state="started", rows="many")
    _error(r, 400, "input")


def test_long_poll_with_nan_wait_returns(world: World):
    world.register()
    answers: list = []
    poll = threading.Thread(target=lambda: answers.append(world.work("alice", "nan")))
    poll.start()
    poll.join(timeout=1.5)
    returned_in_time = not poll.is_alive()
    if not returned_in_time:  # give the stuck poll some work so it ends and the test can finish
        world.submit()
        poll.join(timeout=5)
    assert not poll.is_alive()
    assert returned_in_time
    assert answers[0].status_code in (200, 400, 422)
