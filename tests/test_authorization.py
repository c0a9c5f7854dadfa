"""Who may do what: every actor against every action, through the real scheduler API and a
real executor on loopback. Exactly the cells in ALLOWED may succeed.

The scheduler's operator holds the database file but no party's key: what it can do is
edit rows, which the executor and `audit verify` must not be fooled by.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl
import pytest

from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import TeeflowError
from teeflow.core.schemas import schema_fingerprint, schema_to_b64
from teeflow.core.seal import open_sealed
from teeflow.net.executor_client import ExecutorClient
from teeflow.scheduler.app import create_app
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store
from tests.factories import (
    Serving,
    SignedClient,
    TestClient,
    attested_client,
    executor_registration,
    make_spec,
    submit_signature,
)

TABLE = pa.table({"name": ["w", "b"], "value": [1.0, 2.0], "n_samples": [10, 10]})
FP = schema_fingerprint(TABLE.schema)
ACTORS = ("initiator", "owner_a", "owner_b", "outsider", "auditor", "unregistered",
          "operator")
# each joined by the operator's invitation for its roles; the outsider is a member (an
# initiator) who is party to none of the tasks here
ROLES = {"initiator": ("initiator",), "owner_a": ("owner",), "owner_b": ("owner",),
         "outsider": ("initiator",), "auditor": ("auditor",)}
ACTIONS = ("submit", "approve_for_a", "upload_a", "read_a", "fetch_result", "read_audit",
           "cancel")
ALLOWED = {
    "submit": {"initiator", "outsider"},  # members invited as initiators
    "approve_for_a": {"owner_a"},
    "upload_a": {"owner_a"},
    "read_a": set(),
    "fetch_result": {"initiator"},
    "read_audit": {"initiator", "owner_a", "owner_b", "auditor", "operator"},  # parties
    "cancel": {"initiator", "owner_a", "owner_b"},
}


class World:
    def __init__(self, tmp: Path, executor: Serving) -> None:
        self.server = executor.server
        self.address = executor.address
        self.db = tmp / "scheduler.sqlite"
        self.store = Store(self.db)
        self.scheduler = Scheduler(self.store, lambda a: ExecutorClient(a, None))
        # not entered: no lifespan, so no monitor thread
        self.api = SignedClient(TestClient(create_app(self.store, self.scheduler)))
        self.client = self.api.client
        self.keys = {a: KeySigner.generate() for a in ACTORS}
        for actor, name in (("initiator", "carol"), ("owner_a", "alice"), ("owner_b", "bob"),
                            ("outsider", "mallory"), ("auditor", "ann")):
            key = self.keys[actor]
            self.ok(self.call(actor, "POST", "/v1/nodes", {
                "name": name, "public_key": key.public_key(),
                "enc_key": key.encryption_public_key(),
                "invite": self.store.invite(ROLES[actor], name)}))
        # the executor, registered by its host with its own signed proof of its address
        self.host = KeySigner.generate()
        self.ok(self.api.register_node("host", self.host,
                                       invite=self.store.invite(["executor_host"], "host")))
        self.ok(self.api.call(self.host, "POST", "/v1/executors",
                              executor_registration(self.server, self.address, self.host)))
        for dataset, actor, owner in (("a_data", "owner_a", "alice"),
                                      ("b_data", "owner_b", "bob")):
            self.ok(self.call(actor, "POST", "/v1/datasets", {
                "name": dataset, "owner": owner, "schema": schema_to_b64(TABLE.schema),
                "rows": 2}))

    def close(self) -> None:
        self.client.close()
        self.store.close()

    @staticmethod
    def ok(response) -> dict:
        assert response.status_code < 300, response.text
        return response.json()

    def call(self, actor: str, method: str, path: str, body: object = None):
        return self.api.call(self.keys[actor], method, path, body)

    # -- stages of one task ------------------------------------------------------------------
    def spec(self, initiator: str = "initiator") -> wire.TaskSpec:
        k = self.keys
        return make_spec([("a_data", "alice", k["owner_a"], FP),
                          ("b_data", "bob", k["owner_b"], FP)], k[initiator],
                         task_id=f"task{time.monotonic_ns() % 10**12:012d}")

    def submit(self, actor: str = "initiator") -> tuple[wire.TaskSpec, object]:
        spec = self.spec(actor)
        r = self.call(actor, "POST", "/v1/tasks", {
            "spec": spec.to_dict(), "signature": submit_signature(spec, self.keys[actor]),
            "executor": self.address})
        return spec, r

    def approve(self, spec: wire.TaskSpec, actor: str):
        signature = self.keys[actor].sign(audit.signed_payload(
            spec.task_id, "approved", {"spec_digest": spec.digest()}))
        return self.call(actor, "POST", f"/v1/tasks/{spec.task_id}/decision", {
            "decision": "approved", "signature": base64.b64encode(signature).decode()})

    def consented(self) -> wire.TaskSpec:
        spec, r = self.submit()
        self.ok(r)
        for owner in ("owner_a", "owner_b"):
            self.ok(self.approve(spec, owner))
        assert self.store.task(spec.task_id).state == "accepted"
        return spec

    def executor_client(self) -> ExecutorClient:
        return attested_client(self.address)

    def upload(self, spec: wire.TaskSpec, dataset: str, actor: str) -> None:
        with self.executor_client() as client:
            client.upload(spec.task_id, dataset, self.keys[actor], TABLE.schema,
                          TABLE.to_batches())

    def computed(self) -> wire.TaskSpec:
        spec = self.consented()
        self.upload(spec, "a_data", "owner_a")
        self.upload(spec, "b_data", "owner_b")
        assert self.server.executor.run(spec.task_id, background=False) == "running"
        assert self.server.executor.status(spec.task_id)["status"] == "done"
        return spec


def _attempt(func: Callable[[], bool]) -> bool:
    try:
        return func()
    except (TeeflowError, fl.FlightError):
        return False


# -- each action, for one actor: True when it succeeded ------------------------------------
def submit(w: World, actor: str) -> bool:
    if actor == "operator":  # writes a task row; it cannot sign it as anyone
        spec = w.spec()
        w.store.create_task(spec.to_dict(), spec.digest(), w.address, "AAAA")
        return _verifies(w.store)
    _, r = w.submit(actor)
    return r.status_code == 201


def approve_for_a(w: World, actor: str) -> bool:
    spec, r = w.submit()
    w.ok(r)
    if actor == "operator":  # records a made-up approval of A's, then tries to dispatch it
        w.store.approve(spec.task_id, w.keys["owner_a"].public_key(), "approved", "AAAA",
                        "approved", all_in=False)
    else:
        w.approve(spec, actor)
    w.approve(spec, "owner_b")  # B consents, so A's signature is all that is missing
    return w.store.task(spec.task_id).state == "accepted"  # the executor took the spec


def upload_a(w: World, actor: str) -> bool:
    spec = w.consented()
    return _attempt(lambda: (w.upload(spec, "a_data", actor), True)[1])


def read_a(w: World, actor: str) -> bool:
    spec = w.consented()
    w.upload(spec, "a_data", "owner_a")
    raw = fl.FlightClient(f"grpc+tls://{w.address}", disable_server_verification=True)
    try:
        for ticket in (spec.task_id.encode(), b"a_data", spec.task_id.encode() + b"/a_data"):
            if _attempt(lambda t=ticket: raw.do_get(fl.Ticket(t)).read_all().num_rows > 0):
                return True
        if list(raw.list_flights()):
            return True
    finally:
        raw.close()
    status = json.dumps(w.server.executor.status(spec.task_id))
    rows = w.call(actor, "GET", f"/v1/tasks/{spec.task_id}") if actor != "operator" else None
    leaked = [status] + ([rows.text] if rows is not None else [])
    return any('"value"' in text and "1.0" in text for text in leaked)


def fetch_result(w: World, actor: str) -> bool:
    spec = w.computed()
    key = w.keys[actor]

    def take() -> bool:
        with w.executor_client() as client:
            envelope = client.take_result(spec.task_id, key)
        opened = open_sealed(base64.b64decode(envelope.sealed),
                             key.encryption_private_key(), spec.digest())
        return b"parameters" in opened

    return _attempt(take)


def read_audit(w: World, actor: str) -> bool:
    w.consented()
    if actor == "operator":
        return len(Store(w.db).audit_log()) > 0
    r = w.call(actor, "GET", "/v1/audit")
    return r.status_code == 200 and len(r.json()) > 0


def cancel(w: World, actor: str) -> bool:
    spec = w.consented()
    w.upload(spec, "a_data", "owner_a")
    key = w.keys[actor]
    signature = key.sign(wire.cancel_message(spec.task_id)).hex()
    if actor == "operator":  # marks the row and asks the executor with a key of its own
        w.store.transition(spec.task_id, "cancel", {"by": "operator"})
        _attempt(lambda: (ExecutorClient(w.address, None).action("cancel", wire.canonical({
            "task_id": spec.task_id, "key": w.keys["owner_a"].public_key(),
            "signature": signature})), True)[1])
    else:
        w.call(actor, "POST", f"/v1/tasks/{spec.task_id}/cancel", {"signature": signature})
    return w.server.executor.status(spec.task_id)["status"] == "cancelled"


def _verifies(store: Store) -> bool:
    try:
        audit.verify_chain(store.audit_log())
        return True
    except audit.AuditError:
        return False


@pytest.fixture
def world(tmp_path, executor_server):
    w = World(tmp_path, executor_server)
    yield w
    w.close()


@pytest.mark.parametrize("action", ACTIONS)
def test_exactly_the_intended_cells_are_allowed(world, action):
    func = globals()[action]
    seen = {actor: func(world, actor) for actor in ACTORS}
    allowed = {actor for actor, ok in seen.items() if ok}
    assert allowed == ALLOWED[action], seen
