"""The executor's logic without network: consent, uploads, signatures, schemas, runs, sealed
results, wiping, and the audit entries it signs."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import inspect
import json

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import bind_report_data
from teeflow.attestation.policy import appraise
from teeflow.attestation.simulated import SimulatedBackend, SimulatedVerifier
from teeflow.core import audit, seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import (
    AuthError,
    InputError,
    ParameterError,
    SchemaMismatch,
    StateError,
    UnknownTask,
)
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.service import Executor, UploadRequest
from tests.factories import (
    appraisal_policy,
    approval,
    challenge_for,
    make_spec,
    sign_entry,
    submit_signature,
)

TASK = "task0001"
SCHEMA = pa.schema([("name", pa.string()), ("value", pa.float64()), ("n_samples", pa.int64())])
ALICE_TABLE = pa.table({"name": ["w1", "w2"], "value": [1.0, 2.0], "n_samples": [10, 10]},
                       schema=SCHEMA)
BOB_TABLE = pa.table({"name": ["w2", "w1"], "value": [-2.0, 3.0], "n_samples": [30, 30]},
                     schema=SCHEMA)
EXPECTED = {"w1": (10 * 1.0 + 30 * 3.0) / 40, "w2": (10 * 2.0 + 30 * -2.0) / 40}
TLS_KEY = ec.generate_private_key(ec.SECP256R1())
TLS_SPKI = TLS_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
SPKI = hashlib.sha256(TLS_SPKI).digest()


class Parties:
    def __init__(self, scheduler_key: str | None = None) -> None:
        """`scheduler_key`: the scheduler the spec names (none by default)."""
        self.alice = KeySigner.generate()
        self.bob = KeySigner.generate()
        self.initiator = KeySigner.generate()
        self.mallory = KeySigner.generate()
        fp = schema_fingerprint(SCHEMA)
        # two receivers: the initiator and bob
        self.spec = make_spec([("a_data", "alice", self.alice, fp),
                               ("b_data", "bob", self.bob, fp)], self.initiator,
                              task_id=TASK, receivers=[self.initiator, self.bob],
                              scheduler_key=scheduler_key)
        self.approvals = [approval(self.spec, self.alice), approval(self.spec, self.bob)]
        self.tables = {"a_data": ALICE_TABLE, "b_data": BOB_TABLE}
        self.owners = {"a_data": self.alice, "b_data": self.bob}


@pytest.fixture
def p() -> Parties:
    return Parties()


@pytest.fixture
def ex(p: Parties) -> Executor:
    executor = Executor(SimulatedBackend(), TLS_KEY)
    executor.create_task(p.spec, p.approvals)
    return executor


def _request(ex: Executor, p: Parties, dataset: str, signer: KeySigner | None = None,
             challenge: bytes | None = None) -> UploadRequest:
    signer = signer or p.owners[dataset]
    owner = p.owners.get(dataset, signer)
    challenge = challenge_for(ex, TASK, owner) if challenge is None else challenge
    sig = signer.sign(wire.upload_message(p.spec.task_id, dataset, challenge, SPKI))
    return UploadRequest(p.spec.task_id, dataset, challenge, sig)


def _messages(batches: list[pa.RecordBatch], end: bool = True):
    """(batch, app_metadata) pairs as Flight delivers them, closed by the sender's end marker."""
    for batch in batches:
        yield batch, None
    if end:
        yield None, wire.end_marker(sum(b.num_rows for b in batches), len(batches))


def _upload(ex: Executor, p: Parties, dataset: str, **kw) -> dict[str, int]:
    table = p.tables[dataset]
    return ex.receive(_request(ex, p, dataset, **kw), table.schema,
                      _messages(table.to_batches(max_chunksize=1)))


def _take(ex: Executor, p: Parties, signer: KeySigner, as_key: str | None = None) -> dict:
    """The envelope `signer` takes (claiming `as_key`, by default its own key)."""
    challenge = challenge_for(ex, TASK, signer, as_key)
    sig = signer.sign(wire.result_message(p.spec.task_id, challenge, SPKI))
    return json.loads(ex.take_result(p.spec.task_id, as_key or signer.public_key(), challenge,
                                     sig))


def _open(envelope: dict, key: KeySigner, digest: str) -> dict:
    return json.loads(seal.open_sealed(base64.b64decode(envelope["sealed"]),
                                       key.encryption_private_key(), digest))


def _done(ex: Executor, p: Parties) -> None:
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    assert ex.run(TASK, background=False) == "running"
    assert ex.status(TASK)["status"] == "done"


def _audit(ex: Executor) -> list[dict]:
    return ex.status(TASK)["audit"]


# -- consent: the executor runs only what every owner signed ---------------------------------


def test_create_task_with_every_owners_approval(p):
    ex = Executor(SimulatedBackend(), TLS_KEY)
    ex.create_task(p.spec, list(reversed(p.approvals)))  # order does not matter
    status = ex.status(TASK)
    assert status["status"] == "waiting" and status["expected"] == ["a_data", "b_data"]
    assert [(e["kind"], e["body"]["run"]) for e in status["audit"]] == [("admitted", 1)]
    ex.create_task(p.spec, p.approvals)  # a retry of the same spec is harmless


def _refused(p: Parties, approvals: list[dict], *owners: str) -> None:
    ex = Executor(SimulatedBackend(), TLS_KEY)
    with pytest.raises(AuthError, match="no valid approval") as err:
        ex.create_task(p.spec, approvals)
    assert str(sorted(owners)) in str(err.value)
    with pytest.raises(UnknownTask):
        ex.status(TASK)


def test_create_task_missing_approval_names_the_owner(p):
    _refused(p, [], "alice", "bob")
    _refused(p, [approval(p.spec, p.alice)], "bob")
    _refused(p, [approval(p.spec, p.bob)], "alice")


def test_create_task_forged_approval(p):
    forged = {"signer": audit.ed25519_signer(p.bob.public_key()),
              "signature": sign_entry(p.mallory, TASK, "approved",
                                      {"spec_digest": p.spec.digest()})}
    _refused(p, [approval(p.spec, p.alice), forged], "bob")
    # a valid signature by a key that owns nothing does not stand in for an owner
    _refused(p, [approval(p.spec, p.alice), approval(p.spec, p.mallory)], "bob")
    _refused(p, [approval(p.spec, p.alice), approval(p.spec, p.initiator)], "bob")
    broken = [{**a, "signature": "not base64!"} for a in p.approvals]
    _refused(p, broken, "alice", "bob")
    _refused(p, [{"signer": p.alice.public_key(), "signature": p.approvals[0]["signature"]},
                 p.approvals[1]], "alice")  # a bare key is not a signer name


def test_create_task_rejection_is_not_an_approval(p):
    _refused(p, [approval(p.spec, p.alice, "rejected"), approval(p.spec, p.bob)], "alice")


def test_create_task_approval_of_another_spec(p):
    other = dataclasses.replace(p.spec, params={"min_parties": "2"})
    assert other.task_id == p.spec.task_id and other.digest() != p.spec.digest()
    _refused(p, [approval(other, p.alice), approval(p.spec, p.bob)], "alice")
    other_task = dataclasses.replace(p.spec, task_id="task0002")
    _refused(p, [approval(p.spec, p.alice), approval(other_task, p.bob)], "bob")
    # the initiator's submission signature is not an approval either
    _refused(p, [{"signer": audit.ed25519_signer(p.initiator.public_key()),
                  "signature": submit_signature(p.spec, p.initiator)}, p.approvals[1]], "alice")


def test_create_task_code_digest_mismatch(p):
    spec = dataclasses.replace(p.spec, code_digest="ab" * 32)
    ex = Executor(SimulatedBackend(), TLS_KEY)
    with pytest.raises(AuthError, match="model_aggregation.*abababab"):
        ex.create_task(spec, [approval(spec, p.alice), approval(spec, p.bob)])
    with pytest.raises(UnknownTask):
        ex.status(TASK)


def test_create_task_conflicts_and_unknown_compute(ex, p):
    # Another spec under the same id is another task (held under its digest); it neither
    # replaces nor blocks the first, and the bare id no longer names either.
    other = dataclasses.replace(p.spec, datasets=p.spec.datasets[:1])
    ex.create_task(other, [approval(other, p.alice)])
    assert ex.status(p.spec.digest())["expected"] == ["a_data", "b_data"]
    assert ex.status(other.digest())["expected"] == ["a_data"]
    with pytest.raises(UnknownTask, match="spec digest"):
        ex.status(TASK)
    bad = dataclasses.replace(p.spec, task_id="task0002", compute="nope")
    with pytest.raises(ParameterError):
        ex.create_task(bad, [approval(bad, p.alice), approval(bad, p.bob)])
    with pytest.raises(UnknownTask):
        ex.status("task0002")


# -- uploads ---------------------------------------------------------------------------------


def test_upload_signed_by_owner_is_accepted(ex, p):
    receipt = _upload(ex, p, "a_data")
    assert receipt["rows"] == 2 and receipt["bytes"] > 0
    assert ex.held_bytes(TASK) == receipt["bytes"]
    status = ex.status(TASK)
    assert status["status"] == "waiting"
    assert status["received"] == {"a_data": receipt}
    assert status["inputs_held"] == ["a_data"] and status["receiving"] == []
    assert status["simulated"] is True


def test_upload_signed_by_another_key(ex, p):
    for signer in (p.mallory, p.bob, p.initiator):
        with pytest.raises(AuthError, match="signature"):
            _upload(ex, p, "a_data", signer=signer)
    assert ex.held_bytes(TASK) == 0
    status = ex.status(TASK)
    assert status["inputs_held"] == [] and status["received"] == {}
    assert status["status"] == "waiting"  # a forged upload cannot fail someone else's task
    _upload(ex, p, "a_data")


def test_challenge_reused(ex, p):
    challenge = challenge_for(ex, TASK, p.alice)
    _upload(ex, p, "a_data", challenge=challenge)
    held = ex.held_bytes(TASK)
    with pytest.raises(AuthError, match="challenge"):
        _upload(ex, p, "b_data", challenge=challenge)
    assert ex.held_bytes(TASK) == held
    assert ex.status(TASK)["inputs_held"] == ["a_data"]


def test_unknown_challenge(ex, p):
    with pytest.raises(AuthError, match="challenge"):
        _upload(ex, p, "a_data", challenge=b"\x00" * 32)
    assert ex.held_bytes(TASK) == 0


def test_expired_challenge(p):
    now = [1000.0]
    ex = Executor(SimulatedBackend(), TLS_KEY, clock=lambda: now[0])
    ex.create_task(p.spec, p.approvals)
    challenge = challenge_for(ex, TASK, p.alice)
    now[0] += 10_000
    with pytest.raises(AuthError, match="expired"):
        _upload(ex, p, "a_data", challenge=challenge)


def test_upload_for_unknown_dataset_or_task(ex, p):
    with pytest.raises(InputError, match="c_data"):
        ex.receive(_request(ex, p, "c_data", signer=p.alice), SCHEMA, [])
    bad = _request(ex, p, "a_data")
    with pytest.raises(UnknownTask):
        ex.receive(UploadRequest("nope", "a_data", bad.challenge, bad.signature), SCHEMA, [])


def test_same_dataset_twice(ex, p):
    _upload(ex, p, "a_data")
    held = ex.held_bytes(TASK)
    with pytest.raises(StateError, match="already uploaded"):
        _upload(ex, p, "a_data")
    assert ex.held_bytes(TASK) == held


def test_wrong_schema_fails_the_task(ex, p):
    _upload(ex, p, "b_data")
    wrong = ALICE_TABLE.cast(pa.schema([("name", pa.string()), ("value", pa.float32()),
                                        ("n_samples", pa.int64())]))
    with pytest.raises(SchemaMismatch, match="a_data"):
        ex.receive(_request(ex, p, "a_data"), wrong.schema, _messages(wrong.to_batches()))
    assert ex.held_bytes(TASK) == 0
    status = ex.status(TASK)
    assert status["status"] == "failed" and "a_data" in status["error"]
    assert status["inputs_held"] == [] and status["receiving"] == []


def test_batch_that_changes_schema_fails_the_task(ex, p):
    other = pa.table({"name": ["w1"], "value": [1], "n_samples": [10]})  # value: int64
    batches = [*ALICE_TABLE.to_batches(), *other.to_batches()]
    with pytest.raises(SchemaMismatch, match="changed schema"):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, _messages(batches))
    assert ex.held_bytes(TASK) == 0
    assert ex.status(TASK)["status"] == "failed"


def test_broken_stream_fails_the_task_and_wipes_everything(ex, p):
    _upload(ex, p, "b_data")  # the other party's upload is complete
    assert ex.held_bytes(TASK) > 0

    def broken():
        yield ALICE_TABLE.to_batches(max_chunksize=1)[0], None
        raise RuntimeError("connection reset by secret-host-name")

    with pytest.raises(RuntimeError):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, broken())
    assert ex.held_bytes(TASK) == 0
    status = ex.status(TASK)
    assert status["status"] == "failed"
    assert status["inputs_held"] == [] and status["receiving"] == []
    assert "secret-host-name" not in status["error"]  # inner messages stay inside
    with pytest.raises(StateError):
        _upload(ex, p, "a_data")
    assert ex.run(TASK, background=False) == "failed"


def _assert_failed_and_wiped(ex: Executor, match: str) -> None:
    assert ex.held_bytes(TASK) == 0
    status = ex.status(TASK)
    assert status["status"] == "failed" and match in status["error"]
    assert status["inputs_held"] == [] and status["receiving"] == []


def test_stream_cut_without_end_marker_fails_the_task(ex, p):
    _upload(ex, p, "b_data")
    batches = ALICE_TABLE.to_batches(max_chunksize=1)[:1]  # the sender died after one batch
    with pytest.raises(InputError, match="without its end marker"):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, _messages(batches, end=False))
    _assert_failed_and_wiped(ex, "end marker")


@pytest.mark.parametrize("rows,count", [(1, 2), (2, 1), (3, 2), (0, 0)])
def test_end_marker_that_disagrees_fails_the_task(ex, p, rows, count):
    _upload(ex, p, "b_data")
    messages = [(b, None) for b in ALICE_TABLE.to_batches(max_chunksize=1)]
    messages.append((None, wire.end_marker(rows, count)))
    assert (rows, count) != (2, 2)
    with pytest.raises(InputError, match="end marker says"):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, messages)
    _assert_failed_and_wiped(ex, "end marker says")


def test_data_after_end_marker_fails_the_task(ex, p):
    batches = ALICE_TABLE.to_batches(max_chunksize=1)
    messages = [*_messages(batches), (batches[0], None)]
    with pytest.raises(InputError, match="after the end marker"):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, messages)
    _assert_failed_and_wiped(ex, "after the end marker")


def test_end_marker_not_json_fails_the_task(ex, p):
    batches = ALICE_TABLE.to_batches()
    with pytest.raises(InputError):
        ex.receive(_request(ex, p, "a_data"), SCHEMA,
                   [*((b, None) for b in batches), (None, b"\xff not json")])
    _assert_failed_and_wiped(ex, "end marker")


# -- running and sealed results --------------------------------------------------------------


def test_run_before_all_inputs(ex, p):
    with pytest.raises(StateError, match="waiting for"):
        ex.run(TASK, background=False)
    _upload(ex, p, "a_data")
    with pytest.raises(StateError, match="b_data"):
        ex.run(TASK, background=False)
    assert ex.status(TASK)["status"] == "waiting"


def test_run_and_take_sealed_results(ex, p):
    _done(ex, p)
    status = ex.status(TASK)
    assert status["inputs_held"] == [] and status["taken_by"] == []
    assert ex.held_bytes(TASK) == 0
    assert ex.run(TASK, background=False) == "done"

    envelope = _take(ex, p, p.initiator)
    assert envelope["task_id"] == TASK and envelope["spec_digest"] == p.spec.digest()
    assert envelope["receiver"] == p.initiator.public_key()
    assert envelope["simulated"] is True and envelope["tee"] == "simulated"
    assert envelope["suite"] == seal.SUITE_NAME
    sealed = base64.b64decode(envelope["sealed"])
    assert envelope["sealed_sha256"] == hashlib.sha256(sealed).hexdigest()
    assert envelope["signer"] == ex.signer == audit.p256_signer(TLS_SPKI)
    audit.verify_entry_signature(TASK, "result", {k: envelope[k] for k in (
        "spec_digest", "receiver", "sealed_sha256")}, envelope["signer"], envelope["signature"])
    # the names as the plaintext JSON has them (a bare b"w1" turns up in random bytes ~1% of runs)
    assert b"\"w1\"" not in sealed and b"parameters" not in sealed

    result = _open(envelope, p.initiator, p.spec.digest())
    assert result["result"]["parameters"] == pytest.approx(EXPECTED)
    assert result["result"]["n_samples"] == 40 and result["result"]["parties"] == 2
    assert result["simulated"] is True and result["tee"] == "simulated"
    assert result["spec_digest"] == p.spec.digest()
    assert result["code_digest"] == p.spec.code_digest
    assert result["inputs"] == {"a_data": 2, "b_data": 2}
    status = ex.status(TASK)
    assert status["status"] == "done"  # bob has not taken his yet
    assert status["taken_by"] == [p.initiator.public_key()]

    with pytest.raises(StateError, match="no result"):  # once each
        _take(ex, p, p.initiator)
    bobs = _take(ex, p, p.bob)
    assert _open(bobs, p.bob, p.spec.digest()) == result
    assert bobs["sealed"] != envelope["sealed"]
    assert ex.status(TASK)["status"] == "released"
    for who in (p.initiator, p.bob):
        with pytest.raises(StateError, match="no result"):
            _take(ex, p, who)


def test_sealed_result_opens_only_with_the_receivers_key_and_digest(ex, p):
    _done(ex, p)
    envelope = _take(ex, p, p.initiator)
    for key in (p.bob, p.alice, p.mallory):  # bob is a receiver, but this one is not his
        with pytest.raises(AuthError, match="does not open"):
            _open(envelope, key, p.spec.digest())
    other = dataclasses.replace(p.spec, params={"min_parties": "2"})
    for digest in (other.digest(), "0" * 64, envelope["sealed_sha256"]):
        with pytest.raises(AuthError, match="does not open"):
            _open(envelope, p.initiator, digest)
    tampered = bytearray(base64.b64decode(envelope["sealed"]))
    tampered[-1] ^= 1
    with pytest.raises(AuthError):
        seal.open_sealed(bytes(tampered), p.initiator.encryption_private_key(), p.spec.digest())


def test_take_result_only_by_a_receiver(ex, p):
    _done(ex, p)
    for who in (p.mallory, p.alice):  # alice owns data but receives nothing
        with pytest.raises(AuthError, match="not a receiver"):
            _take(ex, p, who)
    with pytest.raises(AuthError, match="signature"):  # mallory claiming the initiator's key
        _take(ex, p, p.mallory, as_key=p.initiator.public_key())
    with pytest.raises(AuthError, match="signature"):  # bob claiming the initiator's key
        _take(ex, p, p.bob, as_key=p.initiator.public_key())
    assert ex.status(TASK)["taken_by"] == []
    assert [e["kind"] for e in _audit(ex)].count("released") == 0
    _take(ex, p, p.initiator)


def test_take_result_before_done(ex, p):
    with pytest.raises(StateError):
        _take(ex, p, p.initiator)
    _upload(ex, p, "a_data")
    with pytest.raises(StateError):
        _take(ex, p, p.initiator)


def test_take_result_needs_a_fresh_challenge(ex, p):
    _done(ex, p)
    challenge = challenge_for(ex, TASK, p.initiator)
    sig = p.initiator.sign(wire.result_message(TASK, challenge, SPKI))
    ex.take_result(TASK, p.initiator.public_key(), challenge, sig)
    with pytest.raises(AuthError, match="challenge"):
        ex.take_result(TASK, p.initiator.public_key(), challenge, sig)
    challenge = challenge_for(ex, TASK, p.bob)
    other_key = hashlib.sha256(b"another executor").digest()
    sig = p.bob.sign(wire.result_message(TASK, challenge, other_key))  # meant for another TEE
    with pytest.raises(AuthError, match="signature"):
        ex.take_result(TASK, p.bob.public_key(), challenge, sig)


def test_computation_error_fails_and_wipes(p):
    ex = Executor(SimulatedBackend(), TLS_KEY)
    ex.create_task(p.spec, p.approvals)
    p.tables["b_data"] = pa.table({"name": ["w1", "w9"], "value": [1.0, 1.0],
                                   "n_samples": [5, 5]}, schema=SCHEMA)
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    ex.run(TASK, background=False)
    status = ex.status(TASK)
    assert status["status"] == "failed" and "parameter names differ" in status["error"]
    assert ex.held_bytes(TASK) == 0
    assert [e["kind"] for e in status["audit"]] == ["admitted", "received", "received",
                                                   "wiped"]
    assert status["audit"][-1]["body"]["reason"] == "failed"
    with pytest.raises(StateError):
        _take(ex, p, p.initiator)


def test_cancel_wipes(ex, p):
    _upload(ex, p, "a_data")
    assert ex.held_bytes(TASK) > 0
    ex.cancel(TASK, p.initiator.public_key(),
              p.initiator.sign(wire.cancel_message(TASK)))
    assert ex.held_bytes(TASK) == 0
    assert ex.status(TASK)["status"] == "cancelled"
    with pytest.raises(StateError):
        _upload(ex, p, "b_data")
    assert ex.held_bytes(TASK) == 0
    assert ex.run(TASK, background=False) == "cancelled"
    wiped = _audit(ex)[-1]
    assert (wiped["kind"], wiped["body"]) == ("wiped", {"inputs": ["a_data"],
                                                        "reason": "cancelled"})


def test_cancel_needs_the_initiator_or_an_owner(ex, p):
    _upload(ex, p, "a_data")
    with pytest.raises(AuthError):
        ex.cancel(TASK, p.mallory.public_key(), p.mallory.sign(wire.cancel_message(TASK)))
    with pytest.raises(AuthError):  # an owner's key, someone else's signature
        ex.cancel(TASK, p.alice.public_key(), p.mallory.sign(wire.cancel_message(TASK)))
    assert ex.held_bytes(TASK) > 0
    ex.cancel(TASK, p.alice.public_key(), p.alice.sign(wire.cancel_message(TASK)))
    assert ex.held_bytes(TASK) == 0


def test_cancel_after_done_drops_the_results(ex, p):
    _done(ex, p)
    _take(ex, p, p.initiator)
    ex.cancel(TASK, p.initiator.public_key(),
              p.initiator.sign(wire.cancel_message(TASK)))
    with pytest.raises(StateError):
        _take(ex, p, p.bob)


# -- the audit entries the executor signs ----------------------------------------------------


def test_audit_entries_are_signed_by_the_attested_key(ex, p):
    _done(ex, p)
    _take(ex, p, p.initiator)
    _take(ex, p, p.bob)
    entries = _audit(ex)
    assert [e["kind"] for e in entries] == [
        "admitted", "received", "received", "wiped", "computed", "released", "released"]
    for e in entries:
        assert e["signer"] == audit.p256_signer(TLS_SPKI)
        assert audit.p256_key_hash(e["signer"]) == SPKI.hex() == ex.tls_spki_hash.hex()
        audit.verify_entry_signature(TASK, e["kind"], e["body"], e["signer"], e["signature"])
        with pytest.raises(AuthError):  # bound to its task, kind and body
            audit.verify_entry_signature("task0002", e["kind"], e["body"], e["signer"],
                                         e["signature"])
        with pytest.raises(AuthError):
            audit.verify_entry_signature(TASK, e["kind"], {**e["body"], "x": 1}, e["signer"],
                                         e["signature"])
    received = {e["body"]["dataset"]: e["body"] for e in entries[1:3]}
    assert {k: v["rows"] for k, v in received.items()} == {"a_data": 2, "b_data": 2}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in received.values())
    assert received["a_data"]["sha256"] != received["b_data"]["sha256"]
    assert entries[3]["body"] == {"inputs": ["a_data", "b_data"], "reason": "computed"}
    computed = entries[4]["body"]
    assert computed["spec_digest"] == p.spec.digest()
    assert computed["code_digest"] == p.spec.code_digest
    assert computed["receivers"] == sorted([p.initiator.public_key(), p.bob.public_key()])
    assert [e["body"]["to"] for e in entries[5:]] == [p.initiator.public_key(),
                                                      p.bob.public_key()]


def _guesses(ex: Executor, p: Parties, computed: dict, value: dict) -> list[str]:
    """What an auditor without the result can hash: the plaintext as the executor lays it
    out (every field but the result is public: spec, tee, row counts in `received`), with a
    guessed result, each as the SHA-256 an unsalted entry would carry."""
    doc = {"task_id": TASK, "compute": p.spec.compute, "code_digest": p.spec.code_digest,
           "spec_digest": p.spec.digest(), "tee": "simulated", "simulated": True,
           "inputs": {"a_data": 2, "b_data": 2}, "result": value}
    return [hashlib.sha256(wire.compact_json(doc)).hexdigest()]


def test_computed_entry_lets_nobody_test_a_guess_of_the_result(ex, p):
    """Attack: the audit log and the true result (the best guess there is) confirm nothing
    to someone who has not opened an envelope; an unsalted hash of the plaintext did."""
    _done(ex, p)
    computed = next(e for e in _audit(ex) if e["kind"] == "computed")["body"]
    value = _open(_take(ex, p, p.initiator), p.initiator, p.spec.digest())["result"]
    published = {v for v in computed.values() if isinstance(v, str)} | \
        {v for d in computed.values() if isinstance(d, dict) for v in d.values()}
    assert not published & set(_guesses(ex, p, computed, value))
    assert "result_sha256" not in computed


def test_computed_entry_commits_to_the_result_and_each_envelope(ex, p):
    """A receiver can check the commitment (its plaintext holds the salt); the entry also
    names each receiver's sealed ciphertext, which the envelope's signature covers."""
    _done(ex, p)
    computed = next(e for e in _audit(ex) if e["kind"] == "computed")["body"]
    for receiver in (p.initiator, p.bob):
        envelope = _take(ex, p, receiver)
        sealed = base64.b64decode(envelope["sealed"])
        plaintext = seal.open_sealed(sealed, receiver.encryption_private_key(), p.spec.digest())
        assert computed["result_commitment"] == hashlib.sha256(plaintext).hexdigest()
        assert len(bytes.fromhex(json.loads(plaintext)["salt"])) == 32
        assert computed["sealed_sha256"][receiver.public_key()] == \
            hashlib.sha256(sealed).hexdigest() == envelope["sealed_sha256"]


def test_audit_entries_verify_in_a_chain(ex, p):
    """With the owners' entries before them, the executor's entries form a valid log."""
    _done(ex, p)
    _take(ex, p, p.initiator)
    digest = p.spec.digest()
    entry = audit.chain([], TASK, "submitted", {"spec": p.spec.to_dict(),
                                                  "spec_digest": digest},
                        audit.ed25519_signer(p.initiator.public_key()),
                        submit_signature(p.spec, p.initiator))
    log = [entry]
    for a in p.approvals:
        log.append(audit.chain(log, TASK, "approved", {"spec_digest": digest},
                               a["signer"], a["signature"]))
    attested = {"tls_key_sha256": ex.tls_spki_hash.hex(), "spec_digest": digest}
    log.append(audit.chain(log, TASK, "attested", attested,
                           audit.ed25519_signer(p.alice.public_key()),
                           sign_entry(p.alice, TASK, "attested", attested)))
    for e in _audit(ex):
        log.append(audit.chain(log, TASK, e["kind"], e["body"], e["signer"],
                               e["signature"]))
    assert audit.verify_chain(log) == len(log) == 10


# -- evidence --------------------------------------------------------------------------------


def test_evidence_binds_the_tls_key_and_nonce():
    ex = Executor(SimulatedBackend(), TLS_KEY)
    assert ex.tls_spki_hash == SPKI
    nonce = b"z" * 32
    policy = appraisal_policy(ex.backend.measurement)
    claims = appraise(ex.evidence(nonce), policy, {"simulated": SimulatedVerifier()},
                      expected_report_data=bind_report_data(SPKI, nonce), at=0)
    assert claims.simulated
    for bad in (b"", b"x" * 15, b"x" * 65):
        with pytest.raises(InputError):
            ex.evidence(bad)


# -- no way to read inputs back --------------------------------------------------------------

# fl_model hands an owner the averaged global model only; fl_update takes an update in.
PUBLIC_METHODS = {"evidence", "challenge", "create_task", "status", "cancel",
                  "receive", "run", "take_result", "held_bytes", "abort", "grant_release",
                  "fl_model", "fl_update", "pool_evidence", "pool_join",
                  "close", "expire_results", "reap"}


def test_public_surface_is_exactly_known():
    methods = {name for name, _ in inspect.getmembers(Executor, inspect.isfunction)
               if not name.startswith("_")}
    assert methods == PUBLIC_METHODS
    properties = {name for name, v in vars(Executor).items()
                  if isinstance(v, property) and not name.startswith("_")}
    assert properties == {"simulated"}
    ex = Executor(SimulatedBackend(), TLS_KEY)
    public_attrs = {name for name in vars(ex) if not name.startswith("_")}
    assert public_attrs == {"backend", "tls_spki_hash", "signer", "memory_budget", "spill_dir",
                            "startup"}
    assert isinstance(ex.signer, str) and ex.signer.startswith("p256:")  # a public key only


def test_status_carries_no_data(ex, p):
    _done(ex, p)
    status = ex.status(TASK)
    # Signatures are random base64 and may spell anything; the bodies are what could leak.
    bodies = [e["body"] for e in status.pop("audit")]
    text = json.dumps(status) + json.dumps(bodies)
    # Public keys are random base64 too (receivers name who took what): not data.
    for key in {r.sign_key for r in p.spec.receivers} | set(p.spec.owner_keys()):
        text = text.replace(key, "<key>")
    assert "w1" not in text and "w2" not in text
    assert "parameters" not in text
