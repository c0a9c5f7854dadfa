"""Consent is spent once: a spec carries a nonce, an expiry and a number of runs; each
provider's ledger refuses an upload beyond them, the executor's run ledger refuses a digest
run as often as it allows, and the audit log shows each run with its number."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core import audit, wire
from teeflow.core.errors import AuthError, ConsentExpired, ConsentSpent, InputError
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.messages import UploadRequest
from teeflow.executor.runs import RunLedger
from teeflow.executor.service import Executor
from teeflow.provider.config import DatasetConfig, ProviderConfig
from teeflow.provider.consent import ApprovalRule, Constraint
from teeflow.provider.ledger import UploadLedger
from teeflow.provider.node import Provider
from teeflow.sdk import Client
from tests.factories import (
    appraisal_policy,
    approval,
    challenge_for,
    make_spec,
    receiver,
    wait_task_state,
)
from tests.rogue import Operator

TABLE = pa.table({"name": ["w0", "b"], "value": [0.5, 1.0], "n_samples": [5, 5]})
FP = schema_fingerprint(TABLE.schema)
NOW = 1_900_000_000


def _spec(owner, initiator, **consent) -> wire.TaskSpec:
    return make_spec([("a_data", "alice", owner, FP)], initiator, **consent)


# -- the spec's consent fields -------------------------------------------------------------
def test_consent_fields_are_signed_and_checked():
    from teeflow.core.crypto import KeySigner

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _spec(owner, initiator, runs=2, executor_key="ab" * 32)
    back = wire.TaskSpec.decode(spec.encode())
    assert back == spec and back.run_limit == 2
    for name, value in (("nonce", "a1" * 16), ("expires", NOW + 1), ("runs", 3),
                        ("executor_key", "cd" * 32)):
        assert wire.TaskSpec(**{**spec.__dict__, name: value}).digest() != spec.digest()
    for name, bad in (("nonce", "short"), ("nonce", "XY" * 16), ("expires", -1),
                      ("expires", "soon"), ("runs", 0), ("runs", 1001), ("runs", True),
                      ("executor_key", "ab")):
        with pytest.raises(InputError, match=f"task spec: {name}") as caught:
            wire.TaskSpec.from_dict({**spec.to_dict(), name: bad})
        if isinstance(bad, str) and len(bad) > 2:  # names the field, never the value
            assert bad not in str(caught.value)
    assert _spec(owner, initiator, runs=None).run_limit == 1


# -- the provider's ledger -----------------------------------------------------------------
def test_ledger_allows_runs_uploads_and_survives_a_restart(tmp_path):
    from teeflow.core.crypto import KeySigner

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    once, twice = _spec(owner, initiator), _spec(owner, initiator, runs=2, task_id="task0002")
    ledger = UploadLedger(tmp_path / "k.uploads.sqlite")
    assert ledger.claim(once, "a_data", "aa" * 32) == 1
    with pytest.raises(ConsentSpent, match="already uploaded 1 time"):
        ledger.claim(once, "a_data", "bb" * 32)
    assert [ledger.claim(twice, "a_data", k * 32) for k in ("aa", "bb")] == [1, 2]
    ledger.close()
    again = UploadLedger(tmp_path / "k.uploads.sqlite")  # the node restarted
    for spec in (once, twice):
        with pytest.raises(ConsentSpent):
            again.claim(spec, "a_data", "cc" * 32)
    assert [u["run"] for u in again.uploads(twice.digest())] == [1, 2]
    expired = _spec(owner, initiator, expires=NOW, task_id="task0003")
    with pytest.raises(ConsentExpired):
        again.claim(expired, "a_data", "aa" * 32, now=NOW)


def test_ledger_gives_the_last_run_to_one_of_two_racing_nodes(tmp_path):
    """Two provider processes sharing the file (two ledgers on it), many threads each."""
    from teeflow.core.crypto import KeySigner

    spec = _spec(KeySigner.generate(), KeySigner.generate(), runs=3)
    ledgers = [UploadLedger(tmp_path / "k.uploads.sqlite") for _ in range(2)]
    won: list[int] = []
    refused: list[Exception] = []

    def claim(ledger: UploadLedger) -> None:
        try:
            won.append(ledger.claim(spec, "a_data", "aa" * 32))
        except ConsentSpent as exc:
            refused.append(exc)

    threads = [threading.Thread(target=claim, args=(ledgers[i % 2],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [1, 2, 3] and len(refused) == 9


class FakeScheduler:
    def log_key(self) -> None:  # specs here name no scheduler (make_spec's default)
        return None

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def report(self, task_id, dataset, state, **extra):
        self.calls.append(("report", task_id, state, extra))

    def decide(self, task_id, decision, signature):
        self.calls.append(("decide", task_id, decision))


def _provider(tmp_path: Path, owner, initiator) -> Provider:
    path = tmp_path / "a.parquet"
    pq.write_table(TABLE, path)
    cfg = ProviderConfig(name="alice", key_file=tmp_path / "alice.key",
                         scheduler="https://x#sha256:" + "0" * 64,
                         datasets=(DatasetConfig("a_data", path),), policy=appraisal_policy(),
                         approve=(ApprovalRule(("model_aggregation",), ("a_data",),
                                               (receiver(initiator),), (),
                                               (("min_parties", Constraint("default")),)),))
    node = Provider(cfg, identity=owner)
    node.scheduler = FakeScheduler()  # type: ignore[assignment]
    return node


def test_provider_signs_only_a_spec_with_a_nonce_and_an_unexpired_expiry(tmp_path):
    from teeflow.core.crypto import KeySigner

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    node = _provider(tmp_path, owner, initiator)

    def item(spec: wire.TaskSpec) -> dict:
        return {"kind": "approve", "task_id": spec.task_id, "spec": spec.to_dict(),
                "spec_digest": spec.digest()}

    assert node.consider(item(_spec(owner, initiator))) == "approved"
    assert node.signed.signed(_spec(owner, initiator).digest(), "owner")
    for n, consent in enumerate(({"nonce": None}, {"expires": None},
                                 {"expires": int(time.time()) - 1})):
        spec = _spec(owner, initiator, task_id=f"task100{n}", **consent)
        assert node.consider(item(spec)) == "rejected"
        assert not node.signed.signed(spec.digest(), "owner")


# -- the executor's run ledger ---------------------------------------------------------------
KEY = ec.generate_private_key(ec.SECP256R1())


def _executor(tmp_path: Path, now: list[float]) -> Executor:
    return Executor(SimulatedBackend(), KEY, state_dir=str(tmp_path / "state"),
                    spill_dir=str(tmp_path / "spill"), now=lambda: now[0])


def _run_once(ex: Executor, spec: wire.TaskSpec, owner, initiator, now: list[float]) -> None:
    """Upload, run and hand the result over: one whole run."""
    ex.create_task(spec, [approval(spec, owner)])
    challenge = challenge_for(ex, spec.digest(), owner, at=int(now[0]))
    signature = owner.sign(wire.upload_message(spec.task_id, "a_data", challenge,
                                               ex.tls_spki_hash))
    batches = TABLE.to_batches()
    ex.receive(UploadRequest(spec.task_id, "a_data", challenge, signature,
                             spec_digest=spec.digest()), TABLE.schema,
               [(b, None) for b in batches] + [(None, wire.end_marker(2, len(batches)))])
    ex.run(spec.digest(), background=False)
    challenge = challenge_for(ex, spec.digest(), initiator, at=int(now[0]))
    ex.take_result(spec.digest(), initiator.public_key(), challenge, initiator.sign(
        wire.result_message(spec.task_id, challenge, ex.tls_spki_hash)))


def test_executor_refuses_a_digest_run_as_often_as_it_allows_also_after_a_restart(tmp_path):
    from teeflow.core.crypto import KeySigner

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    now = [float(NOW)]
    ex = _executor(tmp_path, now)
    once = _spec(owner, initiator, expires=NOW + 3600)
    _run_once(ex, once, owner, initiator, now)
    assert ex.status(once.digest())["status"] == "released"
    with pytest.raises(ConsentSpent, match="already ran 1 time"):
        ex.create_task(once, [approval(once, owner)])  # a replay on the same executor

    twice = _spec(owner, initiator, runs=2, expires=NOW + 3600, task_id="task0002")
    _run_once(ex, twice, owner, initiator, now)
    _run_once(ex, twice, owner, initiator, now)  # the second run it allows
    admitted = [e["body"] for e in ex.status(twice.digest())["audit"]
                if e["kind"] == "admitted"]
    assert admitted == [{"spec_digest": twice.digest(), "run": 2, "runs": 2}]
    with pytest.raises(ConsentSpent, match="already ran 2 time"):
        ex.create_task(twice, [approval(twice, owner)])
    ex.close()

    restarted = _executor(tmp_path, now)  # memory gone; the run ledger is in the state dir
    for spec in (once, twice):
        with pytest.raises(ConsentSpent):
            restarted.create_task(spec, [approval(spec, owner)])
    assert RunLedger(tmp_path / "state" / "runs.sqlite").count(twice.digest()) == 2


def test_executor_refuses_an_expired_spec_and_one_for_another_executor(tmp_path):
    from teeflow.core.crypto import KeySigner

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    now = [float(NOW)]
    ex = _executor(tmp_path, now)
    expired = _spec(owner, initiator, expires=NOW)
    with pytest.raises(ConsentExpired, match="consent expired"):
        ex.create_task(expired, [approval(expired, owner)])
    elsewhere = _spec(owner, initiator, executor_key="ab" * 32, task_id="task0002")
    with pytest.raises(AuthError, match="the spec is for executor key abababab"):
        ex.create_task(elsewhere, [approval(elsewhere, owner)])
    here = _spec(owner, initiator, executor_key=ex.tls_spki_hash.hex(), expires=NOW + 60,
                 task_id="task0003")
    ex.create_task(here, [approval(here, owner)])
    now[0] += 61  # the consent lapses before the owner uploads
    challenge = challenge_for(ex, here.digest(), owner, at=int(now[0]))
    signature = owner.sign(wire.upload_message(here.task_id, "a_data", challenge,
                                               ex.tls_spki_hash))
    with pytest.raises(ConsentExpired):
        ex.receive(UploadRequest(here.task_id, "a_data", challenge, signature),
                   TABLE.schema, iter(()))
    assert ex.status(here.digest())["received"] == {}


# -- real processes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Scheduler, executors A (durable state) and B, providers alice and bob by rule."""
    work = tmp_path_factory.mktemp("once")
    make_party_data(work / "a.csv", 300, seed=1)
    make_party_data(work / "b.csv", 200, seed=2)
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor("--spill-dir", str(work / "spill"))
        c.second = c.start_executor(name="executor2")
        c.parties = [Party("alice", "d1", work / "a.csv"), Party("bob", "d2", work / "b.csv")]
        for p in c.parties:
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


def _submit_unpinned(client: Client, address: str, runs: int = 1) -> dict:
    """As Client.submit, but the spec names no executor key: only the ledgers stop a
    replay on another executor."""
    code = client.executor_catalog(address)["logistic_regression"].code_digest
    spec = client.build_spec(["d1", "d2"], "logistic_regression", {"label": "y"},
                             code_digest=code, runs=runs)
    assert spec.executor_key is None
    payload = audit.signed_payload(spec.task_id, "submitted",
                                   {"spec": spec.to_dict(), "spec_digest": spec.digest()})
    client.signed.record(spec, "initiator", address)
    signature = base64.b64encode(client.identity.sign(payload)).decode()
    return client.scheduler.submit(spec.to_dict(), signature, address)


def _failed_uploads(client: Client, task_id: str) -> list[str]:
    task = wait_task_state(client, task_id, {"failed"}, timeout=90)
    return [a["error"] or "" for a in task["assignments"] if a["state"] == "failed"]


def _received_at(address: str, digest: str) -> dict:
    from teeflow.core.errors import UnknownTask
    from teeflow.net.executor_client import ExecutorClient

    with ExecutorClient(address, None) as ex:
        try:
            return ex.status(digest).received
        except UnknownTask:
            return {}


@pytest.mark.e2e
def test_a_replay_on_a_second_executor_gets_no_second_upload(cluster):
    """The operator hands a finished, signed task to executor B (which accepts it: it never
    ran it) and sends the owners there: each provider's ledger refuses, also after the
    providers restart, and B receives nothing."""
    c, op = cluster, cluster.operator
    with _client(c) as client:
        task = _submit_unpinned(client, c.executor_address)
        client.wait(task["id"], timeout=120)
        assert client.result(task["id"]).value["n_samples"] == 500
        op.create_at(task["id"], c.second)
        for p in c.parties:  # the ledger is a file: a restarted node still holds it
            c.stop_process(f"provider-{p.node}")
            c.start_provider(p)
        op.send_owners(task["id"], c.second)
        errors = _failed_uploads(client, task["id"])
        assert errors and all("already uploaded 1 time(s)" in e for e in errors), errors
        assert _received_at(c.second, task["spec_digest"]) == {}


@pytest.mark.e2e
def test_a_pinned_spec_is_refused_by_another_executor_and_its_owners(cluster):
    """A spec the SDK signs names its executor's attested key: executor B refuses it, and
    owners sent to B refuse before sending a byte."""
    c, op = cluster, cluster.operator
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        spec = client.task(task["id"])["spec"]
        assert spec["executor_key"] and spec["nonce"] and spec["expires"]
        client.wait(task["id"], timeout=120)
        with pytest.raises(AuthError, match="the spec is for executor key"):
            op.create_at(task["id"], c.second)
        op.send_owners(task["id"], c.second)
        errors = _failed_uploads(client, task["id"])
        assert errors and all("attestation refused: executor_key" in e for e in errors), errors
        assert _received_at(c.second, task["spec_digest"]) == {}


@pytest.mark.e2e
def test_a_replay_on_the_same_executor_is_refused_by_it_also_after_a_restart(cluster):
    """Unpinned (a restart makes a new key, which a pinned spec would not name anyway):
    the executor's run ledger alone refuses, from its state dir after the restart."""
    c, op = cluster, cluster.operator
    with _client(c) as client:
        task = _submit_unpinned(client, c.executor_address)
        client.wait(task["id"], timeout=120)
        client.result(task["id"])
        with pytest.raises(ConsentSpent, match="already ran 1 time"):
            op.create_at(task["id"], c.executor_address)
        c.stop_process("executor")
        port_file = c.workdir / "executor-again.port"
        c._spawn("executor", "executor", "--tee", "simulated", "--listen", c.executor_address,
                 "--port-file", str(port_file), "--spill-dir", str(c.workdir / "spill"))
        assert c._wait_port("executor", port_file) == c.executor_address
        with pytest.raises(ConsentSpent, match="already ran 1 time"):
            op.create_at(task["id"], c.executor_address)  # the run ledger is on disk


@pytest.mark.e2e
def test_runs_two_allows_exactly_two_runs(cluster):
    """A spec for two runs: the operator's replay on B is the second, and served (each
    owner's signed `attested` entry numbers its run, each executor's `admitted` entry its
    own); a third, even on an executor that ran it only once, gets no upload."""
    c, op = cluster, cluster.operator
    with _client(c) as client:
        task = _submit_unpinned(client, c.executor_address, runs=2)
        client.wait(task["id"], timeout=120)
        op.create_at(task["id"], c.second)
        op.send_owners(task["id"], c.second)
        wait_task_state(client, task["id"], {"done", "released"}, timeout=120)
        log = client.audit_log(task["id"])
        assert sorted(e.body["run"] for e in log if e.kind == "attested") == [1, 1, 2, 2]
        admitted = [e for e in log if e.kind == "admitted"]
        assert [(e.body["run"], e.body["runs"]) for e in admitted] == [(1, 2), (1, 2)]
        assert len({e.signer for e in admitted}) == 2  # signed by A, then by B
        op.create_at(task["id"], c.executor_address)  # A ran it once of the two it allows
        op.send_owners(task["id"], c.executor_address)
        errors = _failed_uploads(client, task["id"])
        assert errors and all("already uploaded 2 time(s)" in e for e in errors), errors


@pytest.mark.e2e
def test_an_expired_spec_is_refused_by_the_owners(cluster):
    with _client(c := cluster) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"}, expires=int(time.time()) - 1)
        done = wait_task_state(client, task["id"], {"rejected"}, timeout=60)
        assert {a["decision"] for a in done["approvals"]} == {"rejected"}
