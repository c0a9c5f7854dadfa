"""Attacks by a stranger who reaches the executor's port: squatting a task id, flooding
challenges and uploads from one key, and a task whose second owner never uploads. Real
Flight servers on port 0 (the deadline test drives the executor's clock without network)."""

from __future__ import annotations

import base64
import json
import threading
import time

import pyarrow as pa
import pyarrow.flight as fl
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, OverBudget
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import open_sealed
from teeflow.executor.service import Executor, UploadRequest
from teeflow.executor.tasks import Budgets
from tests.factories import approval, attested_client, challenge_for, make_spec, submit_signature

TASK = "task0001"
TABLE = pa.table({"name": ["w", "b"], "value": [1.0, 2.0], "n_samples": [10, 10]})
FP = schema_fingerprint(TABLE.schema)


def _create(client, spec: wire.TaskSpec, *owners: KeySigner) -> None:
    client.action("create-task", wire.canonical({
        "spec": spec.to_dict(), "approvals": [approval(spec, o) for o in owners]}))


def _finish(client, spec: wire.TaskSpec, initiator: KeySigner) -> dict:
    digest = spec.digest()
    assert client.action_json("run", digest.encode())["status"] == "running"
    for _ in range(400):
        if client.status(digest).status == "done":
            break
        time.sleep(0.05)
    envelope = client.take_result(spec.task_id, initiator, spec_digest=digest)
    opened = open_sealed(base64.b64decode(envelope.sealed), initiator.encryption_private_key(),
                         digest)
    return json.loads(opened)["result"]


def test_a_squatted_task_id_neither_replaces_nor_blocks_the_honest_task(executor_server):
    owner, initiator, stranger = (KeySigner.generate() for _ in range(3))
    honest = make_spec([("d1", "owner", owner, FP)], initiator, task_id=TASK)
    # The stranger learns the id first and creates a task of its own under it, over a
    # dataset it owns, approved by itself, even naming the honest initiator.
    squat = make_spec([("d1", "stranger", stranger, FP)], initiator, task_id=TASK)
    with attested_client(executor_server.address) as client:
        _create(client, squat, stranger)
        _create(client, honest, owner)  # before: StateError "exists with another spec"
        with pytest.raises(AuthError, match="only the initiator or an owner"):  # nor cancel it
            client.action("cancel", wire.canonical({
                "task_id": TASK, "key": stranger.public_key(), "spec_digest": honest.digest(),
                "signature": stranger.sign(wire.cancel_message(TASK)).hex()}))
        client.upload(TASK, "d1", owner, TABLE.schema, TABLE.to_batches(),
                      spec_digest=honest.digest())
        result = _finish(client, honest, initiator)
        assert client.status(squat.digest()).status == "waiting"  # its own, untouched
    assert result  # the honest task completed and its receiver opened the result


def test_a_challenge_flood_from_one_key_leaves_others_served(executor_server):
    owner, initiator, stranger = (KeySigner.generate() for _ in range(3))
    honest = make_spec([("d1", "owner", owner, FP)], initiator, task_id=TASK)
    own = make_spec([("s1", "stranger", stranger, FP)], stranger, task_id="task0002")
    with attested_client(executor_server.address) as client:
        _create(client, honest, owner)
        _create(client, own, stranger)
        refused = 0
        for _ in range(50):  # its own key, its own task: capped
            try:
                client.challenge(own.task_id, stranger)
            except OverBudget:
                refused += 1
        assert refused == 50 - 8
        for _ in range(20):  # another's key: it cannot sign for it, so spends nothing
            with pytest.raises(Exception, match="signature|not an owner"):
                client.action("challenge", wire.canonical({
                    "task_id": TASK, "key": owner.public_key(), "at": int(time.time()),
                    "signature": stranger.sign(wire.challenge_message(
                        TASK, client.tls_key_hash, int(time.time()))).hex()}))
        client.upload(TASK, "d1", owner, TABLE.schema, TABLE.to_batches(),
                      spec_digest=honest.digest())
        assert _finish(client, honest, initiator)


def _stalled_upload(address: str, spec: wire.TaskSpec, dataset: str, signer: KeySigner,
                    release: threading.Event, outcome: list) -> None:
    """Open an upload, send one batch, then stall until `release`."""
    client = attested_client(address)
    try:
        challenge = client.challenge(spec.task_id, signer, spec.digest())
        signature = signer.sign(wire.upload_message(spec.task_id, dataset, challenge,
                                                    client.tls_key_hash))
        command = wire.canonical({"task_id": spec.task_id, "dataset": dataset,
                                  "challenge": challenge.hex(), "signature": signature.hex(),
                                  "spec_digest": spec.digest()})
        writer, reader = client._client.do_put(fl.FlightDescriptor.for_command(command),
                                               TABLE.schema)
        writer.write_batch(TABLE.to_batches()[0])
        release.wait(30)
        writer.close()
        outcome.append("closed")
    except Exception as exc:  # refused at once, or cut
        outcome.append(type(exc).__name__ + ": " + str(exc))
    finally:
        client.close()


def test_an_upload_flood_from_one_key_leaves_an_honest_upload_through(executor_server):
    owner, initiator, stranger = (KeySigner.generate() for _ in range(3))
    honest = make_spec([("d1", "owner", owner, FP)], initiator, task_id=TASK)
    flood = 4 * Budgets().uploads_per_key  # one key: its cap is what bites, far below 32
    own = make_spec([(f"s{i}", "stranger", stranger, FP) for i in range(flood)], stranger,
                    task_id="task0002")
    release = threading.Event()
    outcomes: list[list] = [[] for _ in range(flood)]
    with attested_client(executor_server.address) as client:
        _create(client, honest, owner)
        _create(client, own, stranger)
        threads = [threading.Thread(target=_stalled_upload, daemon=True, args=(
            executor_server.address, own, f"s{i}", stranger, release, outcomes[i]))
            for i in range(flood)]
        try:
            for t in threads:
                t.start()
            for _ in range(400):  # wait until the flood holds what it may (a refusal reaches
                status = client.status(own.digest())  # its sender only when it closes)
                if len(status.receiving) >= Budgets().uploads_per_key:
                    break
                time.sleep(0.05)
            assert len(client.status(own.digest()).receiving) == Budgets().uploads_per_key
            client.upload(TASK, "d1", owner, TABLE.schema, TABLE.to_batches(),
                          spec_digest=honest.digest())
            assert _finish(client, honest, initiator)
        finally:
            release.set()
            for t in threads:
                t.join(30)
    refused = [o[0] for o in outcomes if o and "over" in o[0].lower()]
    assert len(refused) >= flood - Budgets().uploads_per_key


def test_a_task_whose_second_owner_never_uploads_is_wiped_at_its_deadline():
    alice, bob, initiator = (KeySigner.generate() for _ in range(3))
    now = [1_800_000_000.0]
    ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()),
                  now=lambda: now[0])
    spec = make_spec([("a_data", "alice", alice, FP), ("b_data", "bob", bob, FP)], initiator,
                     task_id=TASK)
    spec = wire.TaskSpec(**{**spec.__dict__, "deadline": int(now[0]) + 3600})
    ex.create_task(spec, [approval(spec, alice), approval(spec, bob)])
    challenge = challenge_for(ex, TASK, alice, at=int(now[0]))
    signature = alice.sign(wire.upload_message(TASK, "a_data", challenge, ex.tls_spki_hash))
    batches = TABLE.to_batches()
    ex.receive(UploadRequest(TASK, "a_data", challenge, signature), TABLE.schema,
               [(b, None) for b in batches] + [(None, wire.end_marker(2, len(batches)))])
    assert ex.held_bytes(TASK) > 0
    now[0] += 3599
    assert ex.reap() == []
    now[0] += 2
    assert ex.reap() == [spec.digest()]
    status = ex.status(TASK)
    assert ex.held_bytes(TASK) == 0 and status["inputs_held"] == []
    assert status["status"] == "failed" and "deadline" in status["error"]
    assert [e["kind"] for e in status["audit"]][-1] == "wiped"


def test_a_task_without_a_deadline_gets_the_default():
    alice, initiator = KeySigner.generate(), KeySigner.generate()
    now = [1_800_000_000.0]
    ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()),
                  now=lambda: now[0])
    spec = make_spec([("a_data", "alice", alice, FP)], initiator, task_id=TASK)
    assert "deadline" not in spec.to_dict()  # the encoding of older specs is unchanged
    ex.create_task(spec, [approval(spec, alice)])
    now[0] += 24 * 3600 - 1
    assert ex.reap() == []
    now[0] += 2
    assert ex.reap() == [spec.digest()]


def test_live_tasks_per_initiator_are_capped():
    alice, initiator = KeySigner.generate(), KeySigner.generate()
    ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()),
                  budgets=Budgets(initiator_tasks=2))
    specs = [make_spec([("a_data", "alice", alice, FP)], initiator, task_id=f"task000{i}")
             for i in range(3)]
    for spec in specs[:2]:
        ex.create_task(spec, [approval(spec, alice)])
    with pytest.raises(OverBudget, match="live tasks"):
        ex.create_task(specs[2], [approval(specs[2], alice)])


def test_a_stranger_cannot_spend_an_initiators_budget_by_naming_its_key():
    """Specs of a stranger's own that name an honest initiator's key (without its signature)
    count against the stranger's owner key, not the initiator's: the initiator's own task,
    signed by it, is still accepted."""
    stranger, alice, initiator = (KeySigner.generate() for _ in range(3))
    ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()),
                  budgets=Budgets(initiator_tasks=2))
    fakes = [make_spec([("s_data", "stranger", stranger, FP)], initiator, task_id=f"fake000{i}")
             for i in range(3)]
    for spec in fakes[:2]:
        ex.create_task(spec, [approval(spec, stranger)], initiator_signature="AAAA")
    with pytest.raises(OverBudget, match="live tasks"):  # the stranger's own budget is spent
        ex.create_task(fakes[2], [approval(fakes[2], stranger)])
    honest = make_spec([("a_data", "alice", alice, FP)], initiator, task_id=TASK)
    ex.create_task(honest, [approval(honest, alice)],
                   initiator_signature=submit_signature(honest, initiator))
    assert ex.status(TASK)["status"] == "waiting"


def test_held_bytes_per_task_are_capped():
    alice, initiator = KeySigner.generate(), KeySigner.generate()
    ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()),
                  budgets=Budgets(task_bytes=TABLE.nbytes - 1))
    spec = make_spec([("a_data", "alice", alice, FP)], initiator, task_id=TASK)
    ex.create_task(spec, [approval(spec, alice)])
    challenge = challenge_for(ex, TASK, alice)
    signature = alice.sign(wire.upload_message(TASK, "a_data", challenge, ex.tls_spki_hash))
    batches = TABLE.to_batches()
    with pytest.raises(OverBudget, match="budget"):
        ex.receive(UploadRequest(TASK, "a_data", challenge, signature), TABLE.schema,
                   [(b, None) for b in batches] + [(None, wire.end_marker(2, len(batches)))])
    assert ex.held_bytes(TASK) == 0 and ex.status(TASK)["status"] == "failed"
