"""The scheduler store: one contract (StoreContract) run against every backend.

Each backend is a subclass that provides the `store` fixture, as Flower's LinkState tests
do; a backend's own behaviour (a file store survives a reopen) lives in its subclass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.core import audit, tlog, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, StateError, UnknownDataset, UnknownTask
from teeflow.scheduler.store import Store
from tests.factories import MEMBER, make_spec, p256_signer, sign_entry, submit_signature

ALICE, BOB, INITIATOR, MALLORY = (KeySigner.generate() for _ in range(4))
EXECUTOR_KEY = ec.generate_private_key(ec.SECP256R1())
EXECUTOR_SIGNER = p256_signer(EXECUTOR_KEY)
ADDRESS = "127.0.0.1:9"


def _spec(task_id: str = "task0001") -> wire.TaskSpec:
    return make_spec([("a_data", "alice", ALICE, "fa"), ("b_data", "bob", BOB, "fb")],
                     INITIATOR, task_id=task_id)


def _create(store: Store, task_id: str = "task0001") -> wire.TaskSpec:
    spec = _spec(task_id)
    store.create_task(spec.to_dict(), spec.digest(), ADDRESS, submit_signature(spec, INITIATOR))
    return spec


def _decide(store: Store, spec: wire.TaskSpec, owner: KeySigner, all_in: bool = False,
            decision: str = "approved") -> str:
    signature = sign_entry(owner, spec.task_id, decision, {"spec_digest": spec.digest()})
    return store.approve(spec.task_id, owner.public_key(), decision, signature, decision,
                         all_in)


def _consented(store: Store, task_id: str = "task0001") -> wire.TaskSpec:
    spec = _create(store, task_id)
    assert _decide(store, spec, ALICE) == "submitted"
    assert _decide(store, spec, BOB, all_in=True) == "approved"
    return spec


def _attest(store: Store, spec: wire.TaskSpec, owner: KeySigner = ALICE) -> None:
    body = {"executor": ADDRESS, "tls_key_sha256": audit.p256_key_hash(EXECUTOR_SIGNER),
            "spec_digest": spec.digest()}
    store.transition(spec.task_id, "attested", body, signer=audit.ed25519_signer(
        owner.public_key()), signature=sign_entry(owner, spec.task_id, "attested", body))


def _executor_entry(store: Store, spec: wire.TaskSpec, kind: str, body: dict) -> str:
    signature = audit.sign_p256(EXECUTOR_KEY, audit.signed_payload(spec.task_id, kind, body))
    store.append(spec.task_id, kind, body, EXECUTOR_SIGNER, signature)
    return signature


def _register(store: Store, name: str, key: KeySigner) -> None:
    store.register_node(name, key.public_key(), key.encryption_public_key(),
                        store.invite(MEMBER, name))


class StoreContract:
    """What every store backend must do. A subclass provides `store`, a fresh, empty one."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        raise NotImplementedError("a backend's subclass provides the store")

    @pytest.fixture
    def catalog(self, store: Store) -> Store:
        _register(store, "alice", ALICE)
        _register(store, "bob", BOB)
        store.add_dataset("alice", "a_data", "c2NoZW1h", "fa", 10)
        store.add_dataset("bob", "b_data", "c2NoZW1h", "fb", 20)
        return store

    # -- nodes ---------------------------------------------------------------------------------
    def test_register_node_idempotent_with_same_key(self, store: Store):
        _register(store, "alice", ALICE)
        _register(store, "alice", ALICE)
        assert store.node_key("alice") == ALICE.public_key()
        assert [n["name"] for n in store.nodes()] == ["alice"]
        node = store.node_by_key(ALICE.public_key())
        assert node is not None and node["name"] == "alice"
        assert node["enc_key"] == ALICE.encryption_public_key()
        assert store.node_by_key(BOB.public_key()) is None

    def test_register_node_other_key_refused(self, store: Store):
        _register(store, "alice", ALICE)
        with pytest.raises(AuthError, match="another key"):
            _register(store, "alice", MALLORY)
        assert store.node_key("alice") == ALICE.public_key()
        assert store.node_by_key(MALLORY.public_key()) is None

    def test_register_key_under_second_name_refused(self, store: Store):
        _register(store, "alice", ALICE)
        with pytest.raises(AuthError, match="key of 'alice'"):
            _register(store, "alice2", ALICE)
        assert [n["name"] for n in store.nodes()] == ["alice"]

    def test_unknown_node_key(self, store: Store):
        with pytest.raises(AuthError, match="not registered"):
            store.node_key("nobody")

    # -- request nonces ------------------------------------------------------------------------
    def test_nonce_is_fresh_once_per_key(self, store: Store):
        later = int(time.time()) + 600
        assert store.fresh_nonce("K1", "ab" * 8, later) is True
        assert store.fresh_nonce("K1", "ab" * 8, later) is False
        assert store.fresh_nonce("K2", "ab" * 8, later) is True  # nonces are per key
        assert store.fresh_nonce("K1", "cd" * 8, later) is True

    def test_expired_nonces_are_forgotten(self, store: Store):
        past = int(time.time()) - 1  # the request's time window has closed anyway
        assert store.fresh_nonce("K1", "ab" * 8, past) is True
        assert store.fresh_nonce("K1", "ab" * 8, past) is True

    # -- datasets ------------------------------------------------------------------------------
    def test_datasets(self, catalog: Store):
        d = catalog.dataset("a_data")
        assert (d["owner"], d["fingerprint"], d["rows"]) == ("alice", "fa", 10)
        assert d["owner_key"] == ALICE.public_key()
        assert [d["name"] for d in catalog.datasets()] == ["a_data", "b_data"]
        catalog.add_dataset("alice", "a_data", "c2NoZW1h", "fa2", 11)  # owner may update
        assert catalog.dataset("a_data")["fingerprint"] == "fa2"

    def test_dataset_of_unknown_owner(self, store: Store):
        with pytest.raises(AuthError, match="not registered"):
            store.add_dataset("mallory", "m_data", "x", "f", 1)
        assert store.datasets() == []

    def test_dataset_of_other_owner(self, catalog: Store):
        with pytest.raises(AuthError, match="belongs to 'alice'"):
            catalog.add_dataset("bob", "a_data", "x", "evil", 1)
        assert catalog.dataset("a_data")["owner"] == "alice"
        assert catalog.dataset("a_data")["fingerprint"] == "fa"

    def test_unknown_dataset(self, store: Store):
        with pytest.raises(UnknownDataset, match="nope"):
            store.dataset("nope")

    # -- tasks ---------------------------------------------------------------------------------
    def test_create_task(self, catalog: Store):
        spec = _create(catalog)
        task = catalog.task("task0001")
        assert task.state == "submitted"
        assert task.spec == spec.to_dict()
        assert task.spec_digest == spec.digest()
        assert (task.compute, task.executor) == ("model_aggregation", ADDRESS)
        assert task.initiator_key == INITIATOR.public_key()
        assert task.to_dict()["datasets"] == ["a_data", "b_data"]
        assert task.to_dict()["spec_digest"] == spec.digest()
        assert [(a["dataset"], a["node"], a["state"]) for a in catalog.assignments("task0001")] \
            == [("a_data", "alice", "pending"), ("b_data", "bob", "pending")]
        (event,) = catalog.events("task0001")
        assert (event["event"], event["signer"]) == ("submitted", "ed25519")
        assert event["detail"] == {"spec": spec.to_dict(), "spec_digest": spec.digest()}
        (entry,) = catalog.audit_log()
        assert entry.signer == audit.ed25519_signer(INITIATOR.public_key())
        assert entry.signature == submit_signature(spec, INITIATOR)
        assert audit.verify_chain(catalog.audit_log()) == 1

    def test_create_task_twice(self, catalog: Store):
        _create(catalog)
        log = catalog.audit_log()
        with pytest.raises(StateError, match="already exists"):
            _create(catalog)
        assert catalog.audit_log() == log
        assert len(catalog.assignments("task0001")) == 2

    def test_unknown_task(self, store: Store):
        with pytest.raises(UnknownTask):
            store.task("nope")
        with pytest.raises(UnknownTask):
            store.transition("nope", "accept")
        with pytest.raises(UnknownTask):
            store.approve("nope", ALICE.public_key(), "approved", "c2ln", "approved", True)
        assert store.audit_log() == []

    # -- approvals -----------------------------------------------------------------------------
    def test_approvals_collect_to_consent(self, catalog: Store):
        spec = _create(catalog)
        assert [r["task_id"] for r in catalog.approval_requests(ALICE.public_key())] == [
            "task0001"]
        (request,) = catalog.approval_requests(BOB.public_key())
        assert request == {"kind": "approve", "task_id": "task0001", "spec": spec.to_dict(),
                           "spec_digest": spec.digest()}
        assert catalog.approval_requests(MALLORY.public_key()) == []

        assert _decide(catalog, spec, ALICE) == "submitted"
        assert catalog.task("task0001").state == "submitted"
        assert catalog.approval_requests(ALICE.public_key()) == []  # alice decided
        assert len(catalog.approval_requests(BOB.public_key())) == 1
        assert catalog.pending_for("alice") == []  # no upload before every owner signed

        assert _decide(catalog, spec, BOB, all_in=True) == "approved"
        assert catalog.task("task0001").state == "approved"
        assert catalog.approval_requests(BOB.public_key()) == []
        approvals = catalog.approvals("task0001")
        assert [(a["owner_key"], a["decision"]) for a in approvals] == [
            (ALICE.public_key(), "approved"), (BOB.public_key(), "approved")]
        events = catalog.events("task0001")
        assert [(e["event"], e["signer"]) for e in events] == [
            ("submitted", "ed25519"), ("approved", "ed25519"), ("approved", "ed25519"),
            ("consented", "scheduler")]
        assert events[1]["detail"] == {"spec_digest": spec.digest()}
        assert audit.verify_chain(catalog.audit_log()) == 4

    def test_same_owner_decides_once(self, catalog: Store):
        spec = _create(catalog)
        _decide(catalog, spec, ALICE)
        log, approvals = catalog.audit_log(), catalog.approvals("task0001")
        for decision in ("approved", "rejected"):
            with pytest.raises(StateError, match="already decided"):
                _decide(catalog, spec, ALICE, all_in=True, decision=decision)
        assert catalog.task("task0001").state == "submitted"
        assert catalog.audit_log() == log
        assert catalog.approvals("task0001") == approvals

    def test_rejection_ends_the_task(self, catalog: Store):
        spec = _create(catalog)
        _decide(catalog, spec, ALICE)
        assert _decide(catalog, spec, BOB, decision="rejected") == "rejected"
        task = catalog.task("task0001")
        assert task.state == "rejected"
        assert catalog.tasks(active_only=True) == []
        assert catalog.approval_requests(BOB.public_key()) == []
        assert [e["event"] for e in catalog.events("task0001")][-1] == "rejected"
        audit.verify_chain(catalog.audit_log())

    def test_decision_after_consent_changes_nothing(self, catalog: Store):
        spec = _consented(catalog)
        log = catalog.audit_log()
        with pytest.raises(StateError):
            _decide(catalog, spec, MALLORY, all_in=True)
        assert catalog.approvals("task0001")[-1]["owner_key"] == BOB.public_key()
        assert len(catalog.approvals("task0001")) == 2
        assert catalog.audit_log() == log

    # -- transitions ---------------------------------------------------------------------------
    def test_transition_follows_the_table(self, catalog: Store):
        spec = _consented(catalog)
        assert catalog.transition("task0001", "accept", {"executor": "x"}) == "accepted"
        assert catalog.transition("task0001", "upload") == "uploading"
        _attest(catalog, spec)
        assert catalog.task("task0001").state == "uploading"
        assert catalog.transition("task0001", "run") == "running"
        assert catalog.transition("task0001", "finish") == "done"
        assert catalog.transition("task0001", "close") == "released"
        assert catalog.task("task0001").state == "released"
        events = catalog.events("task0001")
        assert [e["event"] for e in events] == [
            "submitted", "approved", "approved", "consented", "accept", "upload", "attested",
            "run", "finish", "close"]
        assert events[4]["detail"] == {"executor": "x"}
        assert events[6]["signer"] == "ed25519"
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert catalog.tasks(active_only=True) == []
        assert audit.verify_chain(catalog.audit_log()) == len(events)

    def test_illegal_transition_changes_nothing(self, catalog: Store):
        _consented(catalog)
        catalog.transition("task0001", "accept")
        before, log = catalog.task("task0001"), catalog.audit_log()
        for event in ("finish", "close", "accept", "run", "attested", "consented", "bogus"):
            with pytest.raises(StateError):
                catalog.transition("task0001", event, error="should not stick")
        assert catalog.task("task0001") == before
        assert catalog.audit_log() == log

    def test_final_state_takes_no_event(self, catalog: Store):
        _create(catalog)
        catalog.transition("task0001", "fail", {"reason": "r"}, error="boom")
        assert catalog.task("task0001").error == "boom"
        log = catalog.audit_log()
        for event in ("cancel", "fail", "accept", "approved"):
            with pytest.raises(StateError):
                catalog.transition("task0001", event)
        assert catalog.task("task0001").state == "failed"
        assert catalog.audit_log() == log

    def test_tasks_active_only(self, catalog: Store):
        _create(catalog, "task0001")
        _create(catalog, "task0002")
        catalog.transition("task0002", "cancel")
        assert [t.id for t in catalog.tasks()] == ["task0001", "task0002"]
        assert [t.id for t in catalog.tasks(active_only=True)] == ["task0001"]

    # -- the audit log -------------------------------------------------------------------------
    def test_one_chain_over_all_tasks(self, catalog: Store):
        one = _create(catalog, "task0001")
        two = _create(catalog, "task0002")
        _decide(catalog, one, ALICE)
        _decide(catalog, two, BOB)
        catalog.transition("task0001", "cancel")
        log = catalog.audit_log()
        assert [(e.seq, e.task_id) for e in log] == [
            (1, "task0001"), (2, "task0002"), (3, "task0001"), (4, "task0002"),
            (5, "task0001")]
        assert all(e.prev_root == audit.tree_of(log[:n]).root().hex()
                   for n, e in enumerate(log))
        assert log[0].prev_root == tlog.EMPTY_ROOT.hex()
        assert [e.seq for e in catalog.audit_log("task0002")] == [2, 4]
        assert [e["seq"] for e in catalog.events("task0001")] == [1, 3, 5]
        assert audit.verify_chain(log) == 5

    def test_executor_entries_append_to_the_chain(self, catalog: Store):
        spec = _consented(catalog)
        catalog.transition("task0001", "accept")
        catalog.transition("task0001", "upload")
        _attest(catalog, spec)
        state = catalog.task("task0001")
        signature = _executor_entry(catalog, spec, "received",
                                    {"dataset": "a_data", "rows": 10, "bytes": 80})
        assert catalog.task("task0001") == state  # an appended entry changes no state
        assert catalog.has_signature(signature)
        assert not catalog.has_signature("bm90IGEgc2lnbmF0dXJl")
        last = catalog.audit_log()[-1]
        assert (last.kind, last.signer, last.signature) == ("received", EXECUTOR_SIGNER,
                                                            signature)
        assert catalog.events("task0001")[-1]["signer"] == "p256"
        assert audit.verify_chain(catalog.audit_log()) == len(catalog.audit_log())

    # -- assignments ---------------------------------------------------------------------------
    def test_pending_for(self, catalog: Store):
        spec = _create(catalog)
        assert catalog.pending_for("alice") == []  # submitted: not yet consented
        _decide(catalog, spec, ALICE)
        _decide(catalog, spec, BOB, all_in=True)
        assert catalog.pending_for("alice") == []  # approved: not yet at the executor
        catalog.transition("task0001", "accept")
        work = catalog.pending_for("alice")
        assert [(w["kind"], w["task_id"], w["dataset"], w["executor"]) for w in work] == [
            ("upload", "task0001", "a_data", ADDRESS)]
        assert work[0]["spec"] == spec.to_dict()
        assert work[0]["spec_digest"] == spec.digest()
        assert [a["owner_key"] for a in work[0]["approvals"]] == [
            ALICE.public_key(), BOB.public_key()]
        catalog.update_assignment("task0001", "a_data", "alice", "started")
        # started, not uploaded: still alice's work (a restarted node takes it up again)
        assert [w["dataset"] for w in catalog.pending_for("alice")] == ["a_data"]
        catalog.update_assignment("task0001", "a_data", "alice", "uploaded")
        assert catalog.pending_for("alice") == []
        assert [w["dataset"] for w in catalog.pending_for("bob")] == ["b_data"]
        catalog.transition("task0001", "upload")
        assert [w["dataset"] for w in catalog.pending_for("bob")] == ["b_data"]
        catalog.transition("task0001", "cancel")
        assert catalog.pending_for("bob") == []
        assert catalog.pending_for("nobody") == []

    def test_update_assignment(self, catalog: Store):
        _create(catalog)
        catalog.update_assignment("task0001", "a_data", "alice", "started")
        catalog.update_assignment("task0001", "a_data", "alice", "uploaded", rows=10)
        a = catalog.assignments("task0001")[0]
        assert (a["dataset"], a["state"], a["rows"], a["error"]) == ("a_data", "uploaded", 10, None)

    def test_update_assignment_wrong_node(self, catalog: Store):
        _create(catalog)
        with pytest.raises(AuthError, match="belongs to 'alice'"):
            catalog.update_assignment("task0001", "a_data", "bob", "uploaded", rows=1)
        assert catalog.assignments("task0001")[0]["state"] == "pending"

    def test_update_assignment_after_uploaded(self, catalog: Store):
        _create(catalog)
        catalog.update_assignment("task0001", "a_data", "alice", "uploaded", rows=10)
        for state in ("started", "failed", "uploaded"):
            with pytest.raises(StateError, match="already uploaded"):
                catalog.update_assignment("task0001", "a_data", "alice", state, rows=99)
        a = catalog.assignments("task0001")[0]
        assert (a["state"], a["rows"]) == ("uploaded", 10)

    def test_update_assignment_bad_state_and_unknown(self, catalog: Store):
        _create(catalog)
        with pytest.raises(StateError, match="unknown assignment state"):
            catalog.update_assignment("task0001", "a_data", "alice", "done")
        with pytest.raises(UnknownTask):
            catalog.update_assignment("task0001", "zzz", "alice", "started")
        with pytest.raises(UnknownTask):
            catalog.update_assignment("nope", "a_data", "alice", "started")


class TestMemoryStore(StoreContract):
    """SQLite in memory: the scheduler's store for tests and one-off runs."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        s = Store(":memory:")
        yield s
        s.close()


class TestFileStore(StoreContract):
    """SQLite in a file: the scheduler's default, which must survive a restart."""

    @pytest.fixture
    def store(self, tmp_path) -> Iterator[Store]:
        s = Store(tmp_path / "s.sqlite")
        yield s
        s.close()

    def test_survives_reopen(self, tmp_path):
        path = tmp_path / "s.sqlite"
        store = Store(path)
        _register(store, "alice", ALICE)
        _register(store, "bob", BOB)
        store.add_dataset("alice", "a_data", "c2NoZW1h", "fa", 10)
        spec = _consented(store)
        store.transition("task0001", "accept", {"executor": "x"})
        store.transition("task0001", "upload")
        store.update_assignment("task0001", "a_data", "alice", "uploaded", rows=10)
        assert store.fresh_nonce("K1", "ab" * 8, int(time.time()) + 600)
        task, events, log = store.task("task0001"), store.events("task0001"), store.audit_log()
        approvals = store.approvals("task0001")
        store.close()

        again = Store(path)
        try:
            assert again.task("task0001") == task
            assert again.task("task0001").state == "uploading"
            assert again.task("task0001").spec_digest == spec.digest()
            assert again.events("task0001") == events
            assert [e["event"] for e in events] == [
                "submitted", "approved", "approved", "consented", "accept", "upload"]
            assert again.audit_log() == log
            assert again.approvals("task0001") == approvals
            assert again.assignments("task0001")[0]["state"] == "uploaded"
            assert again.node_key("alice") == ALICE.public_key()
            assert again.node("alice")["enc_key"] == ALICE.encryption_public_key()
            assert again.dataset("a_data")["rows"] == 10
            assert again.fresh_nonce("K1", "ab" * 8, int(time.time()) + 600) is False  # a replay
            assert again.transition("task0001", "run") == "running"
            assert again.audit_log()[-1].prev_root == audit.tree_of(log).root().hex()
            assert audit.verify_chain(again.audit_log()) == len(log) + 1
        finally:
            again.close()
