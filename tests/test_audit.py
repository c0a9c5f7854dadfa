"""The audit log as a Merkle log (core/audit.py) and the canonical task spec it records
(core/wire.py TaskSpec): a realistic chain verifies; every kind of tampering is caught at
the first entry it breaks, also in a real store file edited behind the store's back."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow.core import audit, tlog, wire
from teeflow.core.audit import AuditError, Entry
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import InputError
from teeflow.scheduler.store import Store
from tests.factories import (
    MEMBER,
    approval,
    make_spec,
    p256_signer,
    sign_entry,
    submit_signature,
)

INITIATOR, ALICE, BOB, MALLORY = (KeySigner.generate() for _ in range(4))
EXECUTOR_KEY = ec.generate_private_key(ec.SECP256R1())
ROGUE_KEY = ec.generate_private_key(ec.SECP256R1())


EXECUTOR = p256_signer(EXECUTOR_KEY)
ROGUE = p256_signer(ROGUE_KEY)
SPEC = make_spec([("a_data", "alice", ALICE, "fa"), ("b_data", "bob", BOB, "fb")], INITIATOR,
                 task_id="task0001", receivers=[INITIATOR, ALICE])
# mallory's own task: she owns its data, which makes her no owner of task0001's
OTHER = make_spec([("m_data", "mallory", MALLORY, "fm")], MALLORY, task_id="task0002")


# One step of the log: (task_id, kind, body, signer, signature).
Step = tuple[str, str, dict, str, str]


def _ed(key: KeySigner) -> str:
    return audit.ed25519_signer(key.public_key())


def submitted(spec: wire.TaskSpec, by: KeySigner) -> Step:
    body = {"spec": spec.to_dict(), "spec_digest": spec.digest()}
    return spec.task_id, "submitted", body, _ed(by), sign_entry(by, spec.task_id, "submitted",
                                                                body)


def decided(spec: wire.TaskSpec, by: KeySigner, decision: str = "approved") -> Step:
    a = approval(spec, by, decision)
    return spec.task_id, decision, {"spec_digest": spec.digest()}, a["signer"], a["signature"]


def attested(spec: wire.TaskSpec, by: KeySigner, executor: str = EXECUTOR) -> Step:
    body = {"executor": "127.0.0.1:9", "tls_key_sha256": audit.p256_key_hash(executor),
            "spec_digest": spec.digest(), "claims": {"tee": "simulated", "simulated": True}}
    return spec.task_id, "attested", body, _ed(by), sign_entry(by, spec.task_id, "attested",
                                                               body)


def by_executor(spec: wire.TaskSpec, kind: str, body: dict,
                key: ec.EllipticCurvePrivateKey = EXECUTOR_KEY) -> Step:
    return spec.task_id, kind, body, p256_signer(key), audit.sign_p256(
        key, audit.signed_payload(spec.task_id, kind, body))


def scheduler(spec: wire.TaskSpec, kind: str, body: dict | None = None) -> Step:
    return spec.task_id, kind, body or {}, audit.SCHEDULER, ""


def realistic() -> list[Step]:
    """Two tasks interleaved, the first from submission to release."""
    d = SPEC.digest()
    return [
        submitted(SPEC, INITIATOR),                                               # 1
        decided(SPEC, ALICE),                                                     # 2
        submitted(OTHER, MALLORY),                                                # 3
        decided(SPEC, BOB),                                                       # 4
        scheduler(SPEC, "consented"),                                             # 5
        scheduler(SPEC, "accept", {"executor": "127.0.0.1:9"}),                   # 6
        decided(OTHER, MALLORY),                                                  # 7
        scheduler(SPEC, "upload", {"dataset": "a_data", "step": "started"}),      # 8
        attested(SPEC, ALICE),                                                    # 9
        attested(SPEC, BOB),                                                      # 10
        by_executor(SPEC, "received", {"dataset": "a_data", "rows": 2}),          # 11
        by_executor(SPEC, "received", {"dataset": "b_data", "rows": 2}),          # 12
        scheduler(SPEC, "run", {"inputs": {"a_data": 2, "b_data": 2}}),           # 13
        by_executor(SPEC, "wiped", {"inputs": ["a_data", "b_data"],
                                    "reason": "computed"}),                       # 14
        by_executor(SPEC, "computed", {"spec_digest": d, "result_sha256": "ab" * 32}),  # 15
        scheduler(SPEC, "finish"),                                                # 16
        by_executor(SPEC, "released", {"to": INITIATOR.public_key()}),            # 17
        by_executor(SPEC, "released", {"to": ALICE.public_key()}),                # 18
        scheduler(SPEC, "close"),                                                 # 19
        scheduler(OTHER, "cancel", {"by": _ed(MALLORY)}),                         # 20
    ]


def link(steps: list[Step]) -> list[Entry]:
    """Chain steps as the scheduler does: what an attacker who rewrites the log can do."""
    entries: list[Entry] = []
    for step in steps:
        entries.append(audit.chain(entries, *step))
    return entries


def _first_broken(entries: list[Entry]) -> AuditError:
    with pytest.raises(AuditError) as err:
        audit.verify_chain(entries)
    return err.value


def test_realistic_chain_verifies():
    entries = link(realistic())
    assert audit.verify_chain(entries) == len(entries) == 20
    assert [e.seq for e in entries] == list(range(1, 21))
    assert entries[0].prev_root == tlog.EMPTY_ROOT.hex()
    assert all(e.prev_root == audit.tree_of(entries[:n]).root().hex()
               for n, e in enumerate(entries))
    assert audit.verify_chain([]) == 0
    assert audit.verify_chain(entries[:7]) == 7  # every prefix is a valid log


def test_entry_round_trips_through_its_dict():
    entries = link(realistic())
    again = [Entry(**json.loads(json.dumps(e.to_dict()))) for e in entries]
    assert again == entries
    assert audit.verify_chain(again) == 20


# -- tampering without re-chaining: the hash catches it ---------------------------------------


def _edit(entries: list[Entry], n: int, **change) -> list[Entry]:
    out = list(entries)
    out[n - 1] = dataclasses.replace(out[n - 1], **change)
    return out


@pytest.mark.parametrize("seq", [1, 5, 11, 20])
def test_edited_body(seq):
    entries = link(realistic())
    body = {**entries[seq - 1].body, "rows": 999}
    err = _first_broken(_edit(entries, seq, body=body))
    assert err.seq == seq and "edited" in str(err)


def test_edited_kind_task_or_signer_field():
    entries = link(realistic())
    for change in ({"kind": "rejected"}, {"task_id": "task0002"}, {"signer": _ed(MALLORY)},
                   {"signature": entries[3].signature}):
        assert _first_broken(_edit(entries, 2, **change)).seq == 2


@pytest.mark.parametrize("seq", [1, 2, 9, 13, 19])
def test_deleted_entry(seq):
    entries = link(realistic())
    del entries[seq - 1]
    err = _first_broken(entries)
    assert err.seq == seq + 1 and "missing" in str(err)


def test_deleted_entry_at_the_end_is_a_shorter_log():
    """Dropping the newest entries leaves a valid prefix: the head hash must be published."""
    entries = link(realistic())
    assert audit.verify_chain(entries[:-1]) == 19


@pytest.mark.parametrize("seq", [1, 4, 11, 18])
def test_reordered_entries(seq):
    entries = link(realistic())
    entries[seq - 1], entries[seq] = entries[seq], entries[seq - 1]
    assert _first_broken(entries).seq == seq + 1  # found where entry `seq` should be


def test_renumbered_entry_breaks_the_chain():
    entries = link(realistic())
    err = _first_broken(_edit(entries, 4, seq=40))
    assert err.seq == 40


def test_first_of_several_breaks_is_named():
    entries = link(realistic())
    entries = _edit(entries, 15, body={})
    entries = _edit(entries, 6, body={"executor": "10.0.0.1:9"})
    del entries[17]
    assert _first_broken(entries).seq == 6


# -- tampering with re-chaining: the signatures and who signed catch it -----------------------


def _rechained(change: Callable[[list[Step]], None]) -> list[Entry]:
    steps = realistic()
    change(steps)
    return link(steps)


def _replace(i: int, step: Step) -> Callable[[list[Step]], None]:
    def change(steps: list[Step]) -> None:
        steps[i - 1] = step
    return change


def _insert(i: int, step: Step) -> Callable[[list[Step]], None]:
    def change(steps: list[Step]) -> None:
        steps.insert(i - 1, step)
    return change


def test_rechained_body_edit_of_a_signed_entry():
    t, kind, body, signer, sig = realistic()[10]
    err = _first_broken(_rechained(_replace(11, (t, kind, {**body, "rows": 3}, signer, sig))))
    assert err.seq == 11 and "signature" in str(err)


def test_swapped_signature():
    steps = realistic()
    t, kind, body, signer, _ = steps[1]
    err = _first_broken(_rechained(_replace(2, (t, kind, body, signer, steps[3][4]))))
    assert err.seq == 2 and "signature" in str(err)
    t, kind, body, signer, _ = steps[10]  # the two `received` entries swap signatures
    assert _first_broken(_rechained(_replace(11, (t, kind, body, signer,
                                                  steps[11][4])))).seq == 11


def test_reordered_and_rechained_approval_before_submission():
    def change(steps: list[Step]) -> None:
        steps[0], steps[1] = steps[1], steps[0]
    err = _first_broken(_rechained(change))
    assert err.seq == 1 and "owns no dataset" in str(err)


def test_approval_signed_by_a_non_owner():
    err = _first_broken(_rechained(_insert(5, decided(SPEC, MALLORY))))
    assert err.seq == 5 and "owns no dataset" in str(err)
    assert _first_broken(_rechained(_insert(3, decided(SPEC, INITIATOR)))).seq == 3
    # an owner's approval of the other task is still no approval of this one
    t, kind, body, _, _ = decided(SPEC, ALICE)
    forged = (t, kind, body, _ed(MALLORY), sign_entry(MALLORY, t, kind, body))
    assert _first_broken(_rechained(_replace(2, forged))).seq == 2


def test_rejection_and_attestation_signed_by_a_non_owner():
    assert _first_broken(_rechained(_insert(5, decided(SPEC, MALLORY, "rejected")))).seq == 5
    assert _first_broken(_rechained(_replace(9, attested(SPEC, MALLORY)))).seq == 9


def test_executor_entry_signed_by_an_unattested_key():
    err = _first_broken(_rechained(_replace(12, by_executor(
        SPEC, "received", {"dataset": "b_data", "rows": 2}, ROGUE_KEY))))
    assert err.seq == 12 and "no owner attested" in str(err)
    # before any attestation even the real executor's key is vouched for by no one
    early = by_executor(SPEC, "received", {"dataset": "a_data", "rows": 2})
    assert _first_broken(_rechained(_insert(8, early))).seq == 8
    # an attestation vouches for a key within its own task only
    assert _first_broken(_rechained(_insert(
        8, by_executor(OTHER, "received", {"dataset": "m_data", "rows": 1})))).seq == 8


def test_executor_entry_attested_only_for_the_rogue_key():
    def change(steps: list[Step]) -> None:
        steps[8] = attested(SPEC, ALICE, ROGUE)
        steps[9] = attested(SPEC, BOB, ROGUE)
    assert _first_broken(_rechained(change)).seq == 11  # the real key is now unvouched


def test_submitted_by_another_key_than_the_initiator():
    err = _first_broken(_rechained(_replace(1, submitted(SPEC, MALLORY))))
    assert err.seq == 1 and "initiator" in str(err)


def test_party_entries_cannot_be_scheduler_entries():
    for i, kind in ((1, "submitted"), (2, "approved"), (9, "attested"), (11, "received"),
                    (17, "released")):
        t, _, body, _, _ = realistic()[i - 1]
        err = _first_broken(_rechained(_replace(i, (t, kind, body, audit.SCHEDULER, ""))))
        assert err.seq == i and "signed by a party" in str(err)


def test_unknown_signer_type():
    t, kind, body, _, sig = realistic()[1]
    err = _first_broken(_rechained(_replace(2, (t, kind, body, "rsa:abc", sig))))
    assert err.seq == 2 and "unknown signer" in str(err)


# -- the same through a real store file -------------------------------------------------------


def _store_flow(path) -> Store:
    store = Store(path)
    for name, key in (("alice", ALICE), ("bob", BOB)):
        store.register_node(name, key.public_key(), key.encryption_public_key(),
                            store.invite(MEMBER, name))
    store.create_task(SPEC.to_dict(), SPEC.digest(), "127.0.0.1:9",
                      submit_signature(SPEC, INITIATOR))                           # 1
    for owner, last in ((ALICE, False), (BOB, True)):                               # 2, 3 (+4)
        _, kind, _, _, sig = decided(SPEC, owner)
        store.approve(SPEC.task_id, owner.public_key(), kind, sig, kind, last)
    store.transition(SPEC.task_id, "accept", {"executor": "127.0.0.1:9"})         # 5
    store.transition(SPEC.task_id, "upload", {"dataset": "a_data"})               # 6
    _, kind, body, signer, sig = attested(SPEC, ALICE)
    store.transition(SPEC.task_id, kind, body, signer=signer, signature=sig)       # 7
    for _, kind, body, signer, sig in (
            by_executor(SPEC, "received", {"dataset": "a_data", "rows": 2}),       # 8
            by_executor(SPEC, "received", {"dataset": "b_data", "rows": 2})):      # 9
        store.append(SPEC.task_id, kind, body, signer, sig)
    store.transition(SPEC.task_id, "run", {})                                      # 10
    return store


def test_store_log_verifies(tmp_path):
    store = _store_flow(tmp_path / "s.sqlite")
    try:
        log = store.audit_log()
        assert [e.kind for e in log] == [
            "submitted", "approved", "approved", "consented", "accept", "upload", "attested",
            "received", "received", "run"]
        assert audit.verify_chain(log) == 10
    finally:
        store.close()


@pytest.mark.parametrize("seq,sql,args", [
    (3, "UPDATE audit SET body=? WHERE seq=?", ('{"spec_digest": "00"}',)),
    (5, "UPDATE audit SET body=? WHERE seq=?", ('{"executor": "10.6.6.6:9"}',)),
    (8, "UPDATE audit SET body=? WHERE seq=?", ('{"dataset": "a_data", "rows": 20}',)),
    (6, "UPDATE audit SET kind=? WHERE seq=?", ("cancel",)),
    (2, "UPDATE audit SET signer=? WHERE seq=?", (audit.ed25519_signer(MALLORY.public_key()),)),
    (4, "DELETE FROM audit WHERE seq=?", ()),
])
def test_store_row_edited_behind_its_back(tmp_path, seq, sql, args):
    path = tmp_path / "s.sqlite"
    _store_flow(path).close()
    db = sqlite3.connect(path)
    with db:
        assert db.execute(sql, (*args, seq)).rowcount == 1
    db.close()
    store = Store(path)
    try:
        err = _first_broken(store.audit_log())
        assert err.seq == (seq + 1 if sql.startswith("DELETE") else seq)
    finally:
        store.close()


def test_store_row_edited_while_the_store_is_open(tmp_path):
    path = tmp_path / "s.sqlite"
    store = _store_flow(path)
    try:
        db = sqlite3.connect(path)
        with db:
            db.execute("UPDATE audit SET body=? WHERE seq=7",
                       (json.dumps({"tls_key_sha256": audit.p256_key_hash(ROGUE)}),))
        db.close()
        assert _first_broken(store.audit_log()).seq == 7
    finally:
        store.close()


# -- canonical task spec encoding -------------------------------------------------------------


def _fixed_key(seed: int) -> KeySigner:
    return KeySigner(ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def _fixed_spec() -> wire.TaskSpec:
    alice, bob, initiator = _fixed_key(1), _fixed_key(2), _fixed_key(3)
    return wire.TaskSpec(
        task_id="task0001", compute="model_aggregation", code_digest="ab" * 32,
        params={"rounds": "3", "label": "größe"},
        datasets=(wire.DatasetRef("a_data", "alice", alice.public_key(), "fa" * 32),
                  wire.DatasetRef("b_data", "bob", bob.public_key(), "fb" * 32)),
        executor_policy={"tee_types": ["simulated"], "allow_simulated": True,
                         "simulated": {"measurement": ["00" * 32]}},
        receivers=(wire.Receiver(initiator.public_key(), initiator.encryption_public_key()),),
        initiator_key=initiator.public_key())


# Computed once from _fixed_spec(); a change here means the signed encoding changed, which
# invalidates every signature ever made. Change it only together with SPEC_VERSION.
FIXED_DIGEST = "8f5baf199356c3235839dca00e302ac5c59836735292aa3793fad46262affb72"


def test_spec_digest_is_a_fixed_vector():
    spec = _fixed_spec()
    assert spec.digest() == FIXED_DIGEST
    assert spec.encode().startswith(b'{"code_digest":"abab')  # sorted keys, compact
    assert b" " not in spec.encode().replace("größe".encode(), b"")
    assert "größe".encode() in spec.encode()  # UTF-8, not \\u escapes


def test_spec_digest_is_stable():
    spec = _fixed_spec()
    assert _fixed_spec().digest() == spec.digest()
    assert wire.TaskSpec.from_dict(spec.to_dict()).digest() == spec.digest()
    assert wire.TaskSpec.decode(spec.encode()) == spec
    # key order of the input does not matter; the encoding sorts
    shuffled = json.loads(json.dumps(dict(reversed(list(spec.to_dict().items())))))
    assert wire.TaskSpec.from_dict(shuffled).digest() == spec.digest()
    for change in ({"task_id": "task0002"}, {"params": {"rounds": "4", "label": "größe"}},
                   {"code_digest": "cd" * 32}, {"datasets": spec.datasets[:1]},
                   {"receivers": ()}, {"executor_policy": {}}, {"initiator_key": "x"}):
        assert dataclasses.replace(spec, **change).digest() != spec.digest()


def _bad(**change) -> dict:
    body = _fixed_spec().to_dict()
    for key, value in change.items():
        if value is _DROP:
            del body[key]
        else:
            body[key] = value
    return body


_DROP = object()


@pytest.mark.parametrize("body,match", [
    (_bad(extra=1), "extra"),
    (_bad(signature="x"), "extra"),
    (_bad(version=2), "version"),
    (_bad(version=0), "version"),
    (_bad(version="1"), "version"),
    (_bad(version=_DROP), "version"),
    (_bad(task_id="task-0001"), "task_id"),
    (_bad(task_id="t1"), "task_id"),
    (_bad(task_id="t" * 65), "task_id"),
    (_bad(task_id="task 001"), "task_id"),
    (_bad(task_id=12345678), "task_id"),
    (_bad(task_id=_DROP), "task_id"),
    (_bad(params={"rounds": 3}), "params"),
    (_bad(datasets=[]), "datasets"),
    (_bad(receivers=[]), "receivers"),
    (_bad(code_digest=_DROP), "code_digest"),
    (_bad(executor_policy=[]), "executor_policy"),
])
def test_from_dict_rejects(body, match):
    with pytest.raises(InputError, match=match):
        wire.TaskSpec.from_dict(body)


def test_from_dict_rejects_extra_fields_inside():
    body = _fixed_spec().to_dict()
    body["datasets"][0]["rows"] = 10
    with pytest.raises(InputError, match="extra"):
        wire.TaskSpec.from_dict(body)
    body = _fixed_spec().to_dict()
    body["receivers"][0]["name"] = "carol"
    with pytest.raises(InputError, match="extra"):
        wire.TaskSpec.from_dict(body)
    body = _fixed_spec().to_dict()
    body["datasets"].append(dict(body["datasets"][0]))
    with pytest.raises(InputError, match="named twice"):
        wire.TaskSpec.from_dict(body)


@pytest.mark.parametrize("version", [True, 1.0])
def test_from_dict_rejects_a_version_that_only_equals_one(version):
    with pytest.raises(InputError, match="version"):
        wire.TaskSpec.from_dict(_bad(version=version))


_text = st.text(max_size=12)
_json = st.recursive(
    # RFC 8785 (I-JSON) integers: what a double holds exactly, +/-(2**53 - 1)
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8)
_refs = st.lists(st.builds(wire.DatasetRef, _text, _text, _text, _text), min_size=1,
                 max_size=4, unique_by=lambda d: d.name)
_specs = st.builds(
    wire.TaskSpec,
    task_id=st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
                    min_size=8, max_size=64),
    compute=_text, code_digest=_text,
    params=st.dictionaries(_text, _text, max_size=4),
    datasets=_refs.map(tuple),
    executor_policy=st.dictionaries(_text, _json, max_size=4),
    receivers=st.lists(st.builds(wire.Receiver, _text, _text), min_size=1,
                       max_size=3).map(tuple),
    initiator_key=_text)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(_specs)
def test_spec_round_trips(spec):
    again = wire.TaskSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.digest() == spec.digest()
    decoded = wire.TaskSpec.decode(spec.encode())
    assert decoded == spec
    assert decoded.encode() == spec.encode()


# -- a party's own signature pins its entry after the log head it saw ------------------------


def _anchored(n: int) -> list[Step]:
    """realistic(), with Alice's `attested` (step 9) signing the head of the first n."""
    steps = realistic()
    head = audit.tree_of(link(steps[:n]))
    t, kind, body, signer, _ = attested(SPEC, ALICE)
    body = {**body, "log": {"size": n, "root": head.root().hex()}}
    steps[8] = (t, kind, body, signer, sign_entry(ALICE, t, kind, body))
    return steps


def test_an_anchored_entry_verifies():
    assert audit.verify_chain(link(_anchored(8))) == 20
    assert audit.verify_chain(link(_anchored(0))) == 20


def test_removing_an_entry_before_an_anchor_is_caught_even_re_signed():
    """The operator drops entry 7 (the other task's approval) and re-chains, re-signing
    with its own key: Alice's signature still names the head of 8 entries she saw, which
    the new log lacks."""
    steps = _anchored(8)
    del steps[6]
    err = _first_broken(link(steps))
    assert "not this log's prefix" in str(err)


def test_an_anchor_past_its_own_entry_or_malformed_is_refused():
    for log in ({"size": 30, "root": "00" * 32}, {"size": 2, "root": "zz"}, {"size": "2"}):
        steps = realistic()
        t, kind, body, signer, _ = attested(SPEC, ALICE)
        body = {**body, "log": log}
        steps[8] = (t, kind, body, signer, sign_entry(ALICE, t, kind, body))
        assert _first_broken(link(steps)).seq == 9
