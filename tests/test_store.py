"""The scheduler store, one suite run against both backends (in-memory and SQLite file)."""

from __future__ import annotations

import pytest

from teeflow.core.errors import AuthError, StateError, UnknownDataset, UnknownTask
from teeflow.scheduler.store import Store


def _spec(task_id: str = "t1") -> dict:
    return {
        "task_id": task_id,
        "compute": "model_aggregation",
        "params": {},
        "datasets": [
            {"name": "a_data", "owner": "alice", "owner_key": "KA", "fingerprint": "fa"},
            {"name": "b_data", "owner": "bob", "owner_key": "KB", "fingerprint": "fb"},
        ],
        "initiator_key": "KI",
    }


def _create(store: Store, task_id: str = "t1") -> None:
    store.create_task(task_id, "model_aggregation", {}, "127.0.0.1:9", "KI", _spec(task_id))


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    s = Store(":memory:") if request.param == "memory" else Store(tmp_path / "s.sqlite")
    yield s
    s.close()


@pytest.fixture
def catalog(store: Store) -> Store:
    store.register_node("alice", "KA")
    store.register_node("bob", "KB")
    store.add_dataset("alice", "a_data", "c2NoZW1h", "fa", 10)
    store.add_dataset("bob", "b_data", "c2NoZW1h", "fb", 20)
    return store


class TestStore:
    # -- nodes ---------------------------------------------------------------------------------
    def test_register_node_idempotent_with_same_key(self, store: Store):
        store.register_node("alice", "KA")
        store.register_node("alice", "KA")
        assert store.node_key("alice") == "KA"
        assert [n["name"] for n in store.nodes()] == ["alice"]

    def test_register_node_other_key_refused(self, store: Store):
        store.register_node("alice", "KA")
        with pytest.raises(AuthError, match="another key"):
            store.register_node("alice", "KX")
        assert store.node_key("alice") == "KA"

    def test_unknown_node_key(self, store: Store):
        with pytest.raises(AuthError, match="not registered"):
            store.node_key("nobody")

    # -- datasets ------------------------------------------------------------------------------
    def test_datasets(self, catalog: Store):
        d = catalog.dataset("a_data")
        assert (d["owner"], d["fingerprint"], d["rows"]) == ("alice", "fa", 10)
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
        _create(catalog)
        task = catalog.task("t1")
        assert task.state == "submitted"
        assert task.spec == _spec()
        assert task.to_dict()["datasets"] == ["a_data", "b_data"]
        assert [(a["dataset"], a["node"], a["state"]) for a in catalog.assignments("t1")] == [
            ("a_data", "alice", "pending"), ("b_data", "bob", "pending")]
        events = catalog.events("t1")
        assert [(e["event"], e["state"]) for e in events] == [("submit", "submitted")]
        assert events[0]["detail"] == {"compute": "model_aggregation"}

    def test_unknown_task(self, store: Store):
        with pytest.raises(UnknownTask):
            store.task("nope")
        with pytest.raises(UnknownTask):
            store.transition("nope", "accept")

    def test_transition_follows_the_table(self, catalog: Store):
        _create(catalog)
        assert catalog.transition("t1", "accept", {"executor": "x"}) == "accepted"
        assert catalog.transition("t1", "upload") == "uploading"
        assert catalog.transition("t1", "run") == "running"
        assert catalog.transition("t1", "finish") == "done"
        assert catalog.transition("t1", "release") == "released"
        assert catalog.task("t1").state == "released"
        events = catalog.events("t1")
        assert [e["state"] for e in events] == [
            "submitted", "accepted", "uploading", "running", "done", "released"]
        assert events[1]["detail"] == {"executor": "x"}
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert catalog.tasks(active_only=True) == []

    def test_illegal_transition_changes_nothing(self, catalog: Store):
        _create(catalog)
        catalog.transition("t1", "accept")
        before, events = catalog.task("t1"), catalog.events("t1")
        for event in ("finish", "release", "accept", "run", "bogus"):
            with pytest.raises(StateError):
                catalog.transition("t1", event, error="should not stick")
        assert catalog.task("t1") == before
        assert catalog.events("t1") == events

    def test_final_state_takes_no_event(self, catalog: Store):
        _create(catalog)
        catalog.transition("t1", "fail", {"reason": "r"}, error="boom")
        assert catalog.task("t1").error == "boom"
        events = catalog.events("t1")
        for event in ("cancel", "fail", "accept"):
            with pytest.raises(StateError):
                catalog.transition("t1", event)
        assert catalog.task("t1").state == "failed"
        assert catalog.events("t1") == events

    def test_tasks_active_only(self, catalog: Store):
        _create(catalog, "t1")
        _create(catalog, "t2")
        catalog.transition("t2", "cancel")
        assert [t.id for t in catalog.tasks()] == ["t1", "t2"]
        assert [t.id for t in catalog.tasks(active_only=True)] == ["t1"]

    # -- assignments ---------------------------------------------------------------------------
    def test_pending_for(self, catalog: Store):
        _create(catalog)
        assert catalog.pending_for("alice") == []  # submitted: not yet routed
        catalog.transition("t1", "accept")
        work = catalog.pending_for("alice")
        assert [(w["task_id"], w["dataset"], w["executor"]) for w in work] == [
            ("t1", "a_data", "127.0.0.1:9")]
        assert work[0]["spec"] == _spec()
        catalog.update_assignment("t1", "a_data", "alice", "started")
        assert catalog.pending_for("alice") == []
        assert [w["dataset"] for w in catalog.pending_for("bob")] == ["b_data"]
        catalog.transition("t1", "upload")
        assert [w["dataset"] for w in catalog.pending_for("bob")] == ["b_data"]
        catalog.transition("t1", "cancel")
        assert catalog.pending_for("bob") == []
        assert catalog.pending_for("nobody") == []

    def test_update_assignment(self, catalog: Store):
        _create(catalog)
        catalog.update_assignment("t1", "a_data", "alice", "started")
        catalog.update_assignment("t1", "a_data", "alice", "uploaded", rows=10)
        a = catalog.assignments("t1")[0]
        assert (a["dataset"], a["state"], a["rows"], a["error"]) == ("a_data", "uploaded", 10, None)

    def test_update_assignment_wrong_node(self, catalog: Store):
        _create(catalog)
        with pytest.raises(AuthError, match="belongs to 'alice'"):
            catalog.update_assignment("t1", "a_data", "bob", "uploaded", rows=1)
        assert catalog.assignments("t1")[0]["state"] == "pending"

    def test_update_assignment_after_uploaded(self, catalog: Store):
        _create(catalog)
        catalog.update_assignment("t1", "a_data", "alice", "uploaded", rows=10)
        for state in ("started", "failed", "uploaded"):
            with pytest.raises(StateError, match="already uploaded"):
                catalog.update_assignment("t1", "a_data", "alice", state, rows=99)
        a = catalog.assignments("t1")[0]
        assert (a["state"], a["rows"]) == ("uploaded", 10)

    def test_update_assignment_bad_state_and_unknown(self, catalog: Store):
        _create(catalog)
        with pytest.raises(StateError, match="unknown assignment state"):
            catalog.update_assignment("t1", "a_data", "alice", "done")
        with pytest.raises(UnknownTask):
            catalog.update_assignment("t1", "zzz", "alice", "started")
        with pytest.raises(UnknownTask):
            catalog.update_assignment("nope", "a_data", "alice", "started")


def test_file_store_survives_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.register_node("alice", "KA")
    store.register_node("bob", "KB")
    store.add_dataset("alice", "a_data", "c2NoZW1h", "fa", 10)
    _create(store)
    store.transition("t1", "accept", {"executor": "x"})
    store.transition("t1", "upload")
    store.update_assignment("t1", "a_data", "alice", "uploaded", rows=10)
    task, events = store.task("t1"), store.events("t1")
    store.close()

    again = Store(path)
    try:
        assert again.task("t1") == task
        assert again.task("t1").state == "uploading"
        assert again.events("t1") == events
        assert [e["event"] for e in events] == ["submit", "accept", "upload"]
        assert again.assignments("t1")[0]["state"] == "uploaded"
        assert again.node_key("alice") == "KA"
        assert again.dataset("a_data")["rows"] == 10
        assert again.transition("t1", "run") == "running"
    finally:
        again.close()
