"""The log routes and headers of the scheduler's app, and a node's LogView against them,
in process: proofs that verify, cosignatures only under the member's own name and key,
strangers refused, a log key swapped under a node refused, and a pre-Merkle database
re-entered as a tree."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path

import pytest

from teeflow.core import audit, auth, tlog
from teeflow.core import checkpoint as ck
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, InputError, LogInconsistent
from teeflow.net.logview import LogView
from teeflow.net.scheduler_client import SchedulerClient, _Signed
from teeflow.scheduler.app import create_app
from teeflow.scheduler.store import Store
from tests.factories import TestClient, join

ALICE, MALLORY = KeySigner.generate(), KeySigner.generate()


def _client(app, key: KeySigner, log: LogView | None = None,
            checkpoints: Path | None = None) -> SchedulerClient:
    sc = SchedulerClient("https://testserver#sha256:" + "0" * 64, key, log=log,
                         checkpoints=checkpoints)
    sc._http = TestClient(app, base_url="http://testserver")  # in process, no TLS
    sc._http.auth = _Signed(key)
    return sc


def _grow(store: Store, n: int) -> None:
    for i in range(n):
        store.append(f"task{i:04d}", "note", {"i": i}, audit.SCHEDULER, "")


@pytest.fixture
def world():
    store = Store(":memory:")
    join(store, "alice", ALICE)
    app = create_app(store, tick=3600)
    with TestClient(app):
        yield app, store
    store.close()


def test_every_answer_carries_a_checkpoint_and_proof(world, tmp_path):
    app, store = world
    _grow(store, 5)
    sc = _client(app, ALICE, checkpoints=tmp_path / "a.json")
    sc.nodes()
    held = sc.log.snapshot()
    assert held is not None and held.size == 5 and held.root == store.log_root(5)
    _grow(store, 6)
    sc.nodes()  # consistency 5 -> 11 checked on the way
    assert sc.log.snapshot().size == 11
    # a member's request naming a size gets the proof from it; a stranger gets nothing
    raw = b""
    headers = {**auth.sign_request(ALICE, "GET", "/v1/nodes", raw, int(time.time())),
               ck.SIZE_HEADER: "3"}
    resp = TestClient(app).get("/v1/nodes", headers=headers)
    note = base64.b64decode(resp.headers[ck.CHECKPOINT_HEADER]).decode()
    cp = ck.open_checkpoint(note, ck.origin_of(resp.headers[ck.KEY_HEADER]),
                            resp.headers[ck.KEY_HEADER])
    tlog.verify_consistency(3, cp.size, store.log_root(3), cp.root,
                            ck.decode_proof(resp.headers[ck.PROOF_HEADER]))
    for stranger in (TestClient(app).get("/v1/health"), TestClient(app).get(
            "/v1/nodes", headers=auth.sign_request(MALLORY, "GET", "/v1/nodes", raw,
                                                   int(time.time())))):
        assert ck.CHECKPOINT_HEADER not in stranger.headers
    with pytest.raises(AuthError):
        _client(app, MALLORY).nodes()  # the refusal itself, not a log error
    # the held checkpoint survives a restart of the node
    assert LogView(sc.log.file).snapshot() == sc.log.snapshot()


def test_proof_routes_verify(world):
    app, store = world
    _grow(store, 9)
    sc = _client(app, ALICE)
    sc.checkpoint()
    held = sc.log.snapshot()
    for e in store.audit_log():
        tlog.verify_inclusion(e.seq - 1, held.size, bytes.fromhex(e.hash),
                              sc.inclusion(e.seq - 1, held.size), held.root)
        tlog.verify_consistency(e.seq - 1, held.size, bytes.fromhex(e.prev_root), held.root,
                                sc.consistency(e.seq - 1, held.size))
    leaves = sc.log_entries(1)
    assert [leaf["seq"] for leaf in leaves] == list(range(1, 10))
    assert all(leaf["entry"] is None for leaf in leaves)  # not alice's tasks: hashes only
    assert tlog.Tree([bytes.fromhex(x["hash"]) for x in leaves]).root() == held.root
    with pytest.raises(LogInconsistent):
        sc.log.compare("not a note", sc.consistency)


def test_cosignatures(world):
    app, store = world
    _grow(store, 3)
    sc = _client(app, ALICE)
    cp = sc.cosign("alice")
    note = sc.checkpoint()["note"]
    _, sigs = ck.parse_note(note)
    assert ck.verify_cosignature(cp, sigs[-1], ALICE.public_key()) > 0
    with pytest.raises(InputError, match="name"):  # only under its own name
        sc._call("POST", "/v1/log/cosignatures", body=ck_body(cp, "bob", ALICE))
    with pytest.raises(InputError, match="cosignature"):  # by its own key
        sc._call("POST", "/v1/log/cosignatures", body=ck_body(cp, "alice", MALLORY))
    with pytest.raises(InputError, match="size"):
        sc._call("POST", "/v1/log/cosignatures", body=ck_body(
            ck.Checkpoint(cp.origin, 99, cp.root), "alice", ALICE))
    stranger = _client(app, MALLORY)
    with pytest.raises(AuthError):
        stranger._call("POST", "/v1/log/cosignatures", body=ck_body(cp, "m", MALLORY))
    with pytest.raises(AuthError):
        stranger.checkpoint()


def ck_body(cp: ck.Checkpoint, name: str, key: KeySigner):
    from teeflow.core import api

    return api.Cosign(size=cp.size, line=ck.cosign(cp, name, key, int(time.time())).line())


def test_a_swapped_log_key_is_refused(world, tmp_path):
    app, store = world
    _grow(store, 2)
    _client(app, ALICE, checkpoints=tmp_path / "a.json").nodes()
    other = Store(":memory:")  # the same members, another log key (and log)
    join(other, "alice", ALICE)
    _grow(other, 2)
    app2 = create_app(other, tick=3600)
    with TestClient(app2):
        sc = _client(app2, ALICE, checkpoints=tmp_path / "a.json")
        with pytest.raises(LogInconsistent, match="another log key"):
            sc.nodes()
    other.close()


def test_a_pre_merkle_database_is_re_entered(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, "
                "at REAL NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, signer TEXT NOT "
                "NULL, signature TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)")
    for i in range(1, 4):
        con.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?)",
                    (i, "task0001", 1.0, "note", json.dumps({"i": i}), "scheduler", "",
                     "00" * 32, "11" * 32))
    con.commit()
    con.close()
    key = KeySigner.generate()
    store = Store(db, log_signer=key)
    try:
        log = store.audit_log()
        assert [e.body["i"] for e in log] == [1, 2, 3]
        assert audit.verify_chain(log, key.public_key()) == 3
        assert store.log_head()[1] == audit.tree_of(log).root()
    finally:
        store.close()
