"""Results pinned to what the initiator signed: the SDK and the CLI record every spec they
sign, next to the key, and take a result only for that task, that digest and that executor;
owners upload only for a digest they signed themselves, to the executor the spec names."""

from __future__ import annotations

import base64
import subprocess

import pytest

from teeflow.attestation.evidence import Claims
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import InputError, ResultMismatch, from_code
from teeflow.files.signed_specs import SignedSpec, SignedSpecs, specs_path
from teeflow.sdk import Client, pin
from tests.factories import appraisal_policy, make_spec, run_cli, wait_task_state
from tests.rogue import Operator

OWNER, INITIATOR = KeySigner.generate(), KeySigner.generate()
SPEC = make_spec([("d1", "alice", OWNER, "ab" * 32)], INITIATOR, executor_key="ee" * 32)
MEASURED = {"measurement": "12" * 32}


def _record(**over) -> SignedSpec:
    return SignedSpec(**{"task_id": SPEC.task_id, "spec_digest": SPEC.digest(),
                         "role": "initiator", "executor": "10.0.0.1:1", "tee": "simulated",
                         "measurements": MEASURED, **over})


def _row(**over) -> dict:
    return {"spec": SPEC.to_dict(), "spec_digest": SPEC.digest(), "executor": "10.0.0.1:1",
            **over}


def _field(call) -> str:
    with pytest.raises(ResultMismatch) as caught:
        call()
    return caught.value.field


# -- the checks, each naming what differs ----------------------------------------------------
def test_each_mismatch_is_named():
    p = pin.pin_for(SPEC.task_id, [_record()])
    assert pin.check_task(p, _row()) == SPEC
    other = make_spec([("d1", "alice", OWNER, "ab" * 32)], INITIATOR, task_id="task0002")
    assert _field(lambda: pin.pin_for(SPEC.task_id, [])) == "task"
    assert _field(lambda: pin.pin_for(SPEC.task_id, [_record(), _record(spec_digest="0" * 64)])
                  ) == "task"
    assert _field(lambda: pin.check_task(p, _row(spec_digest=other.digest()))) == "spec digest"
    assert _field(lambda: pin.check_task(p, _row(spec=other.to_dict()))) == "spec digest"
    assert _field(lambda: pin.check_task(p, _row(executor="10.0.0.2:1"))) == "executor"
    renamed = pin.Pin(other.task_id, SPEC.digest())
    assert _field(lambda: pin.check_task(renamed, _row())) == "task"
    moved = Claims("simulated", {"measurement": "34" * 32}, False, b"")
    assert _field(lambda: pin.check_claims(p, moved)) == "executor evidence"
    pin.check_claims(p, Claims("simulated", dict(MEASURED), False, b""))
    assert _field(lambda: pin.check_envelope(p, "task0002", SPEC.digest())) == "task"
    assert _field(lambda: pin.check_envelope(p, SPEC.task_id, other.digest())) == "spec digest"
    pin.check_envelope(p, SPEC.task_id, SPEC.digest())
    assert _field(lambda: pin.check_executor_key(SPEC, ["ff" * 32])) == "executor key"
    pin.check_executor_key(SPEC, ["ff" * 32, "ee" * 32])
    # a peer's ResultMismatch keeps its field
    assert from_code("result_mismatch", "spec digest: differs").field == "spec digest"


def test_a_digest_given_by_hand_pins_without_a_record():
    p = pin.pin_for(SPEC.task_id, [], SPEC.digest())
    assert (p.spec_digest, p.executor) == (SPEC.digest(), "")
    assert pin.check_task(p, _row(executor="anywhere:1")) == SPEC  # the spec names the key
    assert pin.pin_for(SPEC.task_id, [_record()], SPEC.digest()).executor == "10.0.0.1:1"
    with pytest.raises(InputError, match="digest"):
        pin.pin_for(SPEC.task_id, [], "not-hex")


def test_the_record_survives_reopening(tmp_path):
    key = tmp_path / "k.pem"
    store = SignedSpecs(specs_path(key))
    store.record(SPEC, "initiator", "10.0.0.1:1", "simulated", MEASURED)
    store.record(SPEC, "owner")
    store.close()
    again = SignedSpecs(specs_path(key))
    (r,) = again.of_task(SPEC.task_id)
    assert (r.spec_digest, r.executor, r.executor_key, r.measurements) == (
        SPEC.digest(), "10.0.0.1:1", "ee" * 32, MEASURED)
    assert again.signed(SPEC.digest(), "owner") and not again.signed("0" * 64, "owner")
    with pytest.raises(InputError):
        again.record(SPEC, "scheduler")


# -- real processes: the scheduler's operator substitutes a result ------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("pin")
    make_party_data(work / "a.csv", 300, seed=1)
    make_party_data(work / "b.csv", 200, seed=2)
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor()
        c.second = c.start_executor(name="executor2")
        for p in (Party("alice", "d1", work / "a.csv"), Party("bob", "d2", work / "b.csv")):
            c.start_provider(p)
        c.wait_for_datasets(["d1", "d2"])
        c.wait_for_executor(c.executor_address)
        c.wait_for_executor(c.second)
        c.operator = Operator(c.db)
        yield c
    finally:
        c.stop()


def _client(c: LocalCluster) -> Client:
    return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                  name=c.initiator_name)


def _cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"TEEFLOW_SCHEDULER": c.scheduler_url,
                               "TEEFLOW_KEY": str(c.initiator_key),
                               "TEEFLOW_POLICY": str(c.workdir / "alice.toml")},
                   columns=200, timeout=120)


@pytest.mark.e2e
def test_a_substituted_result_is_refused_naming_what_differs(cluster, tmp_path):
    """The issue's attack: the operator runs a task of its own (its own key as initiator,
    the initiator's keys as receivers, so the owners' rules sign it) on another genuine
    executor, and points the initiator's task row at it; then only at the other executor.
    The SDK and the CLI refuse, naming the spec digest, then the executor; the genuine
    result is still there to take."""
    c, op = cluster, cluster.operator
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        client.wait(task["id"], timeout=120)
        mine = op.task_row(task["id"])
        me = wire.Receiver(client.identity.public_key(), client.identity.encryption_public_key())

        operator_key = c.workdir / "operator.key"
        with Client(c.scheduler_url, key=operator_key, policy=appraisal_policy(),
                    name="operator", invite=c.invite("initiator", name="operator")) as rogue:
            fake = rogue.submit(["d1", "d2"], c.second, "logistic_regression",
                                {"label": "y"}, receivers=[me])
            rogue.wait(fake["id"], timeout=120)
            theirs = op.task_row(fake["id"])

        op.point(task["id"], spec=rogue_spec(theirs), spec_digest=theirs["spec_digest"],
                 executor=c.second)
        with pytest.raises(ResultMismatch) as caught:
            client.result(task["id"])
        assert caught.value.field == "spec digest"
        out = tmp_path / "r.json"
        refused = _cli(c, "result", task["id"], "--out", str(out))
        assert refused.returncode != 0 and "spec digest:" in refused.stderr and not out.exists()

        op.point(task["id"], spec=rogue_spec(mine), spec_digest=mine["spec_digest"],
                 executor=c.second)  # only the executor moved
        with pytest.raises(ResultMismatch) as caught:
            client.result(task["id"])
        assert caught.value.field == "executor"

        op.point(task["id"], executor=mine["executor"])
        taken = _cli(c, "result", task["id"], "--out", str(out),
                     "--digest", mine["spec_digest"])
        assert taken.returncode == 0, taken.stderr
        assert b'"n_samples": 500' in out.read_bytes()


def rogue_spec(row: dict) -> dict:
    import json

    return json.loads(row["spec"])


@pytest.mark.e2e
def test_owners_refuse_a_spec_swapped_after_their_approval(cluster):
    """After the owners signed, the operator swaps the task's spec (and digest) for one
    they never signed (other parameters; another executor's key): every owner refuses
    before a byte leaves; so it does when the spec stays and the executor is swapped."""
    c, op = cluster, cluster.operator
    cases = ("params", "executor_key", "executor")
    with _client(c) as client:
        for case in cases:  # a task each: no provider still busy with the case before
            task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                                 {"label": "y"})
            client.wait(task["id"], timeout=120)
            spec = wire.TaskSpec.from_dict(client.task(task["id"])["spec"])
            if case == "executor":  # the signed spec as it was, sent to another executor
                op.send_owners(task["id"], c.second)
                _refused(client, task["id"], ("attestation refused: executor_key",), case)
                continue
            swapped = wire.TaskSpec(**{**spec.__dict__, **(
                {"params": {"label": "y", "max_iter": "2"}} if case == "params"
                else {"executor_key": "ab" * 32})})
            op.point(task["id"], spec=swapped.to_dict(), spec_digest=swapped.digest())
            op.send_owners(task["id"], c.executor_address)
            _refused(client, task["id"], ("never signed", "signature does not verify"), case)


def _refused(client: Client, task_id: str, reasons: tuple[str, ...], case: object) -> None:
    """The task failed on an owner's refusal; no owner uploaded (the other one may not
    have been asked before the task failed)."""
    failed = wait_task_state(client, task_id, {"failed"}, timeout=90)
    states = [(a["state"], a["error"] or "", a["rows"]) for a in failed["assignments"]]
    assert any(s == "failed" for s, _, _ in states), (case, states)
    for state, error, rows in states:  # started: its refusal came after the task failed
        assert state in ("failed", "pending", "started") and rows == 0, (case, states)
        assert not error or any(r in error for r in reasons), (case, states)


@pytest.mark.e2e
def test_an_owner_uploads_only_for_a_digest_in_its_own_record(cluster, tmp_path):
    """A valid signature by the owner's key is not enough: one made with that key outside
    the node (a copy of the key, a shared HSM; not this node nor `teeflow approve` on its
    key file, which record it) gets no upload: the node uploads only for what it signed."""
    from teeflow.files.keys import load_key

    c = cluster
    alice, bob = load_key(c.workdir / "alice.key"), load_key(c.workdir / "bob.key")
    with _client(c) as client:
        code = client.executor_catalog(c.executor_address)["logistic_regression"].code_digest
        spec = client.build_spec(["d1", "d2"], "logistic_regression", {"label": "y"},
                                 code_digest=code, receivers=[wire.Receiver(
                                     KeySigner.generate().public_key(),
                                     client.identity.encryption_public_key())])
        task = _submit(client, spec, c.executor_address)
        for owner in (alice, bob):  # signed with copies of the keys, past the nodes' rules
            with Client(c.scheduler_url, key=owner, policy=appraisal_policy()) as hand:
                hand.decide(task["id"], "approved")
        failed = wait_task_state(client, task["id"], {"failed"}, timeout=90)
        errors = [a["error"] or "" for a in failed["assignments"] if a["state"] == "failed"]
        assert errors and all("never signed spec" in e for e in errors), errors


def _submit(client: Client, spec: wire.TaskSpec, address: str) -> dict:
    from teeflow.core import audit

    payload = audit.signed_payload(spec.task_id, "submitted",
                                   {"spec": spec.to_dict(), "spec_digest": spec.digest()})
    client.signed.record(spec, "initiator", address)
    signature = base64.b64encode(client.identity.sign(payload)).decode()
    return client.scheduler.submit(spec.to_dict(), signature, address)
