"""The executor's logic without network: uploads, signatures, schemas, runs, results, wiping."""

from __future__ import annotations

import hashlib
import inspect
import json

import pyarrow as pa
import pytest

from teeflow.attestation.evidence import bind_report_data
from teeflow.attestation.policy import appraise, load_policy
from teeflow.attestation.simulated import SimulatedBackend, SimulatedVerifier
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.datasets import schema_fingerprint
from teeflow.core.errors import (
    AuthError,
    InputError,
    ParameterError,
    SchemaMismatch,
    StateError,
    UnknownTask,
)
from teeflow.executor.service import Executor, UploadRequest

SPKI = hashlib.sha256(b"fake executor TLS key").digest()
SCHEMA = pa.schema([("name", pa.string()), ("value", pa.float64()), ("n_samples", pa.int64())])
ALICE_TABLE = pa.table({"name": ["w1", "w2"], "value": [1.0, 2.0], "n_samples": [10, 10]},
                       schema=SCHEMA)
BOB_TABLE = pa.table({"name": ["w2", "w1"], "value": [-2.0, 3.0], "n_samples": [30, 30]},
                     schema=SCHEMA)
EXPECTED = {"w1": (10 * 1.0 + 30 * 3.0) / 40, "w2": (10 * 2.0 + 30 * -2.0) / 40}


class Parties:
    def __init__(self) -> None:
        self.alice = KeySigner.generate()
        self.bob = KeySigner.generate()
        self.initiator = KeySigner.generate()
        self.mallory = KeySigner.generate()
        fp = schema_fingerprint(SCHEMA)
        self.spec = wire.TaskSpec(
            task_id="task-1", compute="model_aggregation", params={},
            datasets=(wire.DatasetRef("a_data", "alice", self.alice.public_key(), fp),
                      wire.DatasetRef("b_data", "bob", self.bob.public_key(), fp)),
            initiator_key=self.initiator.public_key())
        self.tables = {"a_data": ALICE_TABLE, "b_data": BOB_TABLE}
        self.owners = {"a_data": self.alice, "b_data": self.bob}


@pytest.fixture
def p() -> Parties:
    return Parties()


@pytest.fixture
def ex(p: Parties) -> Executor:
    executor = Executor(SimulatedBackend(), SPKI)
    executor.create_task(p.spec)
    return executor


def _request(ex: Executor, p: Parties, dataset: str, signer: KeySigner | None = None,
             challenge: bytes | None = None) -> UploadRequest:
    challenge = ex.challenge() if challenge is None else challenge
    signer = signer or p.owners[dataset]
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


def _take(ex: Executor, p: Parties, signer: KeySigner) -> bytes:
    challenge = ex.challenge()
    sig = signer.sign(wire.result_message(p.spec.task_id, challenge, SPKI))
    return ex.take_result(p.spec.task_id, challenge, sig)


# -- uploads ---------------------------------------------------------------------------------


def test_upload_signed_by_owner_is_accepted(ex, p):
    receipt = _upload(ex, p, "a_data")
    assert receipt["rows"] == 2 and receipt["bytes"] > 0
    assert ex.held_bytes("task-1") == receipt["bytes"]
    status = ex.status("task-1")
    assert status["status"] == "waiting"
    assert status["received"] == {"a_data": receipt}
    assert status["inputs_held"] == ["a_data"] and status["receiving"] == []
    assert status["simulated"] is True


def test_upload_signed_by_another_key(ex, p):
    for signer in (p.mallory, p.bob, p.initiator):
        with pytest.raises(AuthError, match="signature"):
            _upload(ex, p, "a_data", signer=signer)
    assert ex.held_bytes("task-1") == 0
    status = ex.status("task-1")
    assert status["inputs_held"] == [] and status["received"] == {}
    assert status["status"] == "waiting"  # a forged upload cannot fail someone else's task
    _upload(ex, p, "a_data")


def test_challenge_reused(ex, p):
    challenge = ex.challenge()
    _upload(ex, p, "a_data", challenge=challenge)
    held = ex.held_bytes("task-1")
    with pytest.raises(AuthError, match="challenge"):
        _upload(ex, p, "b_data", challenge=challenge)
    assert ex.held_bytes("task-1") == held
    assert ex.status("task-1")["inputs_held"] == ["a_data"]


def test_unknown_challenge(ex, p):
    with pytest.raises(AuthError, match="challenge"):
        _upload(ex, p, "a_data", challenge=b"\x00" * 32)
    assert ex.held_bytes("task-1") == 0


def test_expired_challenge(p):
    now = [1000.0]
    ex = Executor(SimulatedBackend(), SPKI, clock=lambda: now[0])
    ex.create_task(p.spec)
    challenge = ex.challenge()
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
    held = ex.held_bytes("task-1")
    with pytest.raises(StateError, match="already uploaded"):
        _upload(ex, p, "a_data")
    assert ex.held_bytes("task-1") == held


def test_wrong_schema_fails_the_task(ex, p):
    _upload(ex, p, "b_data")
    wrong = ALICE_TABLE.cast(pa.schema([("name", pa.string()), ("value", pa.float32()),
                                        ("n_samples", pa.int64())]))
    with pytest.raises(SchemaMismatch, match="a_data"):
        ex.receive(_request(ex, p, "a_data"), wrong.schema, _messages(wrong.to_batches()))
    assert ex.held_bytes("task-1") == 0
    status = ex.status("task-1")
    assert status["status"] == "failed" and "a_data" in status["error"]
    assert status["inputs_held"] == [] and status["receiving"] == []


def test_batch_that_changes_schema_fails_the_task(ex, p):
    other = pa.table({"name": ["w1"], "value": [1], "n_samples": [10]})  # value: int64
    batches = [*ALICE_TABLE.to_batches(), *other.to_batches()]
    with pytest.raises(SchemaMismatch, match="changed schema"):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, _messages(batches))
    assert ex.held_bytes("task-1") == 0
    assert ex.status("task-1")["status"] == "failed"


def test_broken_stream_fails_the_task_and_wipes_everything(ex, p):
    _upload(ex, p, "b_data")  # the other party's upload is complete
    assert ex.held_bytes("task-1") > 0

    def broken():
        yield ALICE_TABLE.to_batches(max_chunksize=1)[0], None
        raise RuntimeError("connection reset by secret-host-name")

    with pytest.raises(RuntimeError):
        ex.receive(_request(ex, p, "a_data"), SCHEMA, broken())
    assert ex.held_bytes("task-1") == 0
    status = ex.status("task-1")
    assert status["status"] == "failed"
    assert status["inputs_held"] == [] and status["receiving"] == []
    assert "secret-host-name" not in status["error"]  # inner messages stay inside
    with pytest.raises(StateError):
        _upload(ex, p, "a_data")
    assert ex.run("task-1", background=False) == "failed"


def _assert_failed_and_wiped(ex: Executor, match: str) -> None:
    assert ex.held_bytes("task-1") == 0
    status = ex.status("task-1")
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


# -- running and results ---------------------------------------------------------------------


def test_run_before_all_inputs(ex, p):
    with pytest.raises(StateError, match="waiting for"):
        ex.run("task-1", background=False)
    _upload(ex, p, "a_data")
    with pytest.raises(StateError, match="b_data"):
        ex.run("task-1", background=False)
    assert ex.status("task-1")["status"] == "waiting"


def test_run_and_take_result(ex, p):
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    assert ex.run("task-1", background=False) == "running"
    status = ex.status("task-1")
    assert status["status"] == "done"
    assert status["inputs_held"] == []
    assert ex.held_bytes("task-1") == 0
    assert ex.run("task-1", background=False) == "done"

    with pytest.raises(AuthError):
        _take(ex, p, p.mallory)
    with pytest.raises(AuthError):
        _take(ex, p, p.alice)
    result = json.loads(_take(ex, p, p.initiator))
    assert result["result"]["parameters"] == pytest.approx(EXPECTED)
    assert result["result"]["n_samples"] == 40 and result["result"]["parties"] == 2
    assert result["simulated"] is True and result["tee"] == "simulated"
    assert result["spec_digest"] == p.spec.digest()
    assert result["inputs"] == {"a_data": 2, "b_data": 2}
    assert ex.status("task-1")["status"] == "released"

    with pytest.raises(StateError, match="no result"):
        _take(ex, p, p.initiator)


def test_take_result_before_done(ex, p):
    with pytest.raises(StateError):
        _take(ex, p, p.initiator)


def test_take_result_needs_a_fresh_challenge(ex, p):
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    ex.run("task-1", background=False)
    challenge = ex.challenge()
    sig = p.initiator.sign(wire.result_message("task-1", challenge, SPKI))
    ex.take_result("task-1", challenge, sig)
    with pytest.raises(AuthError, match="challenge"):
        ex.take_result("task-1", challenge, sig)


def test_computation_error_fails_and_wipes(p):
    ex = Executor(SimulatedBackend(), SPKI)
    ex.create_task(p.spec)
    p.tables["b_data"] = pa.table({"name": ["w1", "w9"], "value": [1.0, 1.0],
                                   "n_samples": [5, 5]}, schema=SCHEMA)
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    ex.run("task-1", background=False)
    status = ex.status("task-1")
    assert status["status"] == "failed" and "parameter names differ" in status["error"]
    assert ex.held_bytes("task-1") == 0


def test_cancel_wipes(ex, p):
    _upload(ex, p, "a_data")
    assert ex.held_bytes("task-1") > 0
    ex.cancel("task-1")
    assert ex.held_bytes("task-1") == 0
    assert ex.status("task-1")["status"] == "cancelled"
    with pytest.raises(StateError):
        _upload(ex, p, "b_data")
    assert ex.held_bytes("task-1") == 0
    assert ex.run("task-1", background=False) == "cancelled"


def test_cancel_after_done_drops_the_result(ex, p):
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    ex.run("task-1", background=False)
    ex.cancel("task-1")
    with pytest.raises(StateError):
        _take(ex, p, p.initiator)


# -- tasks and evidence ----------------------------------------------------------------------


def test_create_task(ex, p):
    ex.create_task(p.spec)  # a retry of the same spec is harmless
    other = wire.TaskSpec(p.spec.task_id, p.spec.compute, p.spec.params, p.spec.datasets[:1],
                          p.spec.initiator_key)
    with pytest.raises(StateError, match="another spec"):
        ex.create_task(other)
    bad = wire.TaskSpec("task-2", "nope", {}, p.spec.datasets, p.spec.initiator_key)
    with pytest.raises(ParameterError):
        ex.create_task(bad)
    with pytest.raises(UnknownTask):
        ex.status("task-2")


def test_evidence_binds_the_tls_key_and_nonce():
    ex = Executor(SimulatedBackend(), SPKI)
    nonce = b"z" * 32
    policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                          "simulated": {"measurement": [ex.backend.measurement]}})
    claims = appraise(ex.evidence(nonce), policy, {"simulated": SimulatedVerifier()},
                      expected_report_data=bind_report_data(SPKI, nonce), at=0)
    assert claims.simulated
    for bad in (b"", b"x" * 15, b"x" * 65):
        with pytest.raises(InputError):
            ex.evidence(bad)


# -- no way to read inputs back --------------------------------------------------------------

PUBLIC_METHODS = {"evidence", "challenge", "create_task", "status", "cancel",
                  "receive", "run", "take_result", "held_bytes"}


def test_public_surface_is_exactly_known():
    methods = {name for name, _ in inspect.getmembers(Executor, inspect.isfunction)
               if not name.startswith("_")}
    assert methods == PUBLIC_METHODS
    properties = {name for name, v in vars(Executor).items()
                  if isinstance(v, property) and not name.startswith("_")}
    assert properties == {"simulated"}
    public_attrs = {name for name in vars(Executor(SimulatedBackend(), SPKI))
                    if not name.startswith("_")}
    assert public_attrs == {"backend", "tls_spki_hash"}


def test_status_carries_no_data(ex, p):
    _upload(ex, p, "a_data")
    text = json.dumps(ex.status("task-1"))
    assert "w1" not in text and "w2" not in text


