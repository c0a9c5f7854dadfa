"""The executor's Flight handlers and the provider's appraisal step, over real loopback Flight.

Each misbehaving executor is a tiny server of its own on port 0. The provider
must send nothing (no do_put at all) to any executor whose evidence fails.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization

from teeflow.attestation.evidence import bind_report_data
from teeflow.attestation.policy import AppraisalPolicy
from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import SimulatedBackend, code_measurement
from teeflow.core import wire
from teeflow.core.crypto import KeySigner, make_tls_identity, spki_sha256
from teeflow.core.errors import (
    AuthError,
    InputError,
    PolicyRefused,
    StateError,
    UnknownTask,
    Unreachable,
)
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import open_sealed
from teeflow.executor.server import ExecutorFlightServer
from teeflow.executor.service import Executor
from teeflow.net.executor_client import ExecutorClient, attested_connect, fetch_certificate
from teeflow.provider.config import DatasetConfig, ProviderConfig
from teeflow.provider.node import Provider
from tests.factories import (
    Serving,
    appraisal_policy,
    approval,
    attested_client,
    make_spec,
    simulated_policy,
)

TABLE = pa.table({"name": ["w", "b"], "value": [1.0, 2.0], "n_samples": [10, 10]})


def _policy(measurement: str | None = None, allow_simulated: bool = True) -> AppraisalPolicy:
    if not allow_simulated:
        return AppraisalPolicy(tee_types=("simulated",), allow_simulated=False,
                               measurements={"simulated": {"measurement": (code_measurement(),)}})
    return appraisal_policy(measurement)


class CountingServer(ExecutorFlightServer):
    """A real executor that counts upload attempts and can lie in its evidence."""

    def __init__(self, *, evidence=None, backend=None):
        backend = backend or SimulatedBackend()
        cert, key_pem = make_ratls_identity(backend)
        key = serialization.load_pem_private_key(key_pem, password=None)
        super().__init__(Executor(backend, key), "grpc+tls://127.0.0.1:0", cert, key_pem)
        self.puts = 0
        self._evidence = evidence

    def do_action(self, context, action):
        if action.type == "evidence" and self._evidence is not None:
            return [fl.Result(pa.py_buffer(self._evidence(self, action.body.to_pybytes())))]
        return super().do_action(context, action)

    def do_put(self, context, descriptor, reader, writer):
        self.puts += 1
        return super().do_put(context, descriptor, reader, writer)


def _stale(server, nonce):  # evidence made for an old nonce, replayed
    return server.executor.evidence(b"\x01" * 32).encode()


def _other_key(server, nonce):  # evidence binding a key that is not the TLS certificate's
    other, _, _ = make_tls_identity()
    report = bind_report_data(spki_sha256(other), nonce)
    return server.executor.backend.evidence(report).encode()


TASK = "task0001"


def _spec(owner: KeySigner, initiator: KeySigner, policy: dict | None = None) -> wire.TaskSpec:
    return make_spec([("d1", "alice", owner, schema_fingerprint(TABLE.schema))], initiator,
                     policy=policy)


def _create(server, owner: KeySigner, initiator: KeySigner, **kw) -> wire.TaskSpec:
    spec = _spec(owner, initiator, **kw)
    server.executor.create_task(spec, [approval(spec, owner)])
    return spec


def _item(spec: wire.TaskSpec, owner: KeySigner, address: str, approvals=None) -> dict:
    a = approval(spec, owner)
    approvals = approvals if approvals is not None else [
        {"owner_key": owner.public_key(), "decision": "approved", "signature": a["signature"]}]
    return {"kind": "upload", "task_id": spec.task_id, "dataset": "d1", "executor": address,
            "spec": spec.to_dict(), "approvals": approvals}


class FakeScheduler:
    def log_key(self) -> None:  # specs here name no scheduler (make_spec's default)
        return None

    def __init__(self) -> None:
        self.reports: list[tuple] = []
        self.log = SimpleNamespace(snapshot=lambda: None)  # no log head held yet

    def report(self, task_id, dataset, state, **extra):
        self.reports.append((state, extra))


def _provider(tmp_path: Path, policy: AppraisalPolicy, signer: KeySigner) -> Provider:
    path = tmp_path / "d1.parquet"
    pq.write_table(TABLE, path)
    cfg = ProviderConfig(name="alice", key_file=tmp_path / "unused.key",
                         scheduler="https://x#sha256:" + "0" * 64,
                         datasets=(DatasetConfig("d1", path),), policy=policy)
    node = Provider(cfg, identity=signer)
    node.scheduler = FakeScheduler()  # type: ignore[assignment]
    return node


@pytest.mark.parametrize("case,check", [
    ("wrong_measurement", "measurement.measurement"),
    ("simulated_not_allowed", "allow_simulated"),
    ("stale_nonce", "nonce"),
    ("unbound_certificate", "tls_key"),
])
def test_provider_sends_nothing_when_evidence_fails(serve, tmp_path, case, check):
    evidence = {"stale_nonce": _stale, "unbound_certificate": _other_key}.get(case)
    server = CountingServer(evidence=evidence)
    running = serve(server)
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator)
    policy = {"wrong_measurement": _policy("00" * 32),
              "simulated_not_allowed": _policy(allow_simulated=False)}.get(case, _policy())
    node = _provider(tmp_path, policy, owner)
    node.signed.record(spec, "owner")  # as its decide() records
    assert node.handle(_item(spec, owner, running.address)) is None
    assert server.puts == 0
    assert server.executor.status(TASK)["received"] == {}
    state, extra = node.scheduler.reports[-1]
    assert state == "failed" and extra["error"].startswith(f"attestation refused: {check}")


def test_provider_uploads_to_good_executor(serve, tmp_path):
    server = CountingServer()
    running = serve(server)
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator)
    node = _provider(tmp_path, _policy(), owner)
    node.signed.record(spec, "owner")  # as its decide() records
    receipt = node.handle(_item(spec, owner, running.address))
    assert receipt is not None and receipt["rows"] == 2
    assert server.puts == 1
    assert [r[0] for r in node.scheduler.reports] == ["started", "started", "uploaded"]
    attested = node.scheduler.reports[1][1]["attested"]
    assert attested["body"]["spec_digest"] == spec.digest()


def test_provider_uploads_only_for_a_spec_it_signed(serve, tmp_path):
    server = CountingServer()
    running = serve(server)
    owner, initiator, other = KeySigner.generate(), KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator)
    node = _provider(tmp_path, _policy(), owner)
    node.signed.record(spec, "owner")  # as its decide() records
    forged = approval(spec, other)
    for approvals in ([], [{"owner_key": owner.public_key(), "decision": "approved",
                            "signature": forged["signature"]}]):
        assert node.handle(_item(spec, owner, running.address, approvals)) is None
        error = node.scheduler.reports[-1][1]["error"]
        assert "never signed" in error or "signature does not verify" in error
    assert server.puts == 0


def test_provider_checks_the_spec_policy_too(serve, tmp_path):
    server = CountingServer()
    running = serve(server)
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator, policy=simulated_policy("cd" * 32))
    node = _provider(tmp_path, _policy(), owner)  # its own policy accepts the executor
    node.signed.record(spec, "owner")  # as its decide() records
    assert node.handle(_item(spec, owner, running.address)) is None
    assert server.puts == 0
    assert node.scheduler.reports[-1][1]["error"].startswith(
        "attestation refused: measurement.measurement")


def test_pinned_client_refuses_a_different_certificate(executor_server):
    running = executor_server
    other, _, _ = make_tls_identity()
    with ExecutorClient(running.address, other) as client, pytest.raises(Unreachable):
        client.action("info")
    assert fetch_certificate(running.address) == running.server.cert_pem


def test_attested_connect_returns_claims(executor_server):
    running = executor_server
    client, claims = attested_connect(running.address, _policy(), make_verifiers())
    with client:
        assert claims.simulated and claims.measurements["measurement"] == code_measurement()
        info = client.action_json("info")
        assert {k: info[k] for k in ("tee", "simulated")} == {"tee": "simulated",
                                                             "simulated": True}
        assert set(info["startup"]) == {"wiped", "results", "durable"}
    with pytest.raises(PolicyRefused):
        attested_connect(running.address, _policy("ab" * 32), make_verifiers())


def _uploaded(running: Serving, owner: KeySigner, initiator: KeySigner) -> ExecutorClient:
    _create(running.server, owner, initiator)
    client = attested_client(running.address)
    client.upload(TASK, "d1", owner, TABLE.schema, TABLE.to_batches())
    return client


def test_no_one_can_read_inputs_back(executor_server):
    running = executor_server
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    client = _uploaded(running, owner, initiator)
    raw = fl.FlightClient(f"grpc+tls://{running.address}", disable_server_verification=True)
    with client:
        for ticket in (TASK.encode(), b"d1", TASK.encode() + b"/d1", b""):
            with pytest.raises(fl.FlightError, match="inputs cannot be read back"):
                raw.do_get(fl.Ticket(ticket)).read_all()
        assert list(raw.list_flights()) == []
        with pytest.raises(fl.FlightError):
            raw.get_flight_info(fl.FlightDescriptor.for_command(TASK.encode()))
        with pytest.raises(fl.FlightError):
            raw.get_flight_info(fl.FlightDescriptor.for_path(TASK, "d1"))
        status = client.status(TASK)
        assert status.received == {"d1": {"rows": 2, "bytes": TABLE.nbytes}}
        assert "value" not in str(status) and "w" not in status.received
        # The owner itself cannot take the "result" either: it is not a receiver.
        with pytest.raises(AuthError):
            client.take_result(TASK, owner)
    raw.close()


def test_upload_by_a_non_owner_is_refused(executor_server):
    running = executor_server
    owner, initiator, outsider = KeySigner.generate(), KeySigner.generate(), KeySigner.generate()
    _create(running.server, owner, initiator)
    client = attested_client(running.address)
    with client:
        with pytest.raises(AuthError, match="signature"):
            client.upload(TASK, "d1", outsider, TABLE.schema, TABLE.to_batches())
        with pytest.raises(InputError, match="not an input"):
            client.upload(TASK, "nope", owner, TABLE.schema, TABLE.to_batches())
        assert client.status(TASK).received == {}


def test_result_only_to_initiator(executor_server):
    running = executor_server
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    with _uploaded(running, owner, initiator) as client:
        assert client.action_json("run", TASK.encode())["status"] == "running"
        for _ in range(200):
            if client.status(TASK).status == "done":
                break
            threading.Event().wait(0.05)
        with pytest.raises(AuthError):
            client.take_result(TASK, owner)
        envelope = client.take_result(TASK, initiator)
        digest = _spec(owner, initiator).digest()
        sealed = base64.b64decode(envelope.sealed)
        with pytest.raises(AuthError):
            open_sealed(sealed, owner.encryption_private_key(), digest)
        body = wire.parse_json(open_sealed(sealed, initiator.encryption_private_key(), digest),
                               "result")
        assert body["result"]["parameters"] == {"w": 1.0, "b": 2.0}
        assert body["simulated"] is True and envelope.simulated is True
        status = client.status(TASK)
        assert status.status == "released" and status.inputs_held == []
        with pytest.raises(StateError):
            client.take_result(TASK, initiator)  # once


def _raw_action(address: str, kind: str, body: bytes) -> None:
    client = ExecutorClient(address, fetch_certificate(address))
    with client:
        client.action(kind, body)


def test_create_task_with_a_mistyped_approval_is_an_input_error(executor_server):
    """An approval field of the wrong type is named, not an AttributeError from inside."""
    running = executor_server
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _spec(owner, initiator)
    body = wire.canonical({"spec": spec.to_dict(),
                           "approvals": [{"signer": 5, "signature": []}]})
    with pytest.raises(InputError, match="create-task.*approvals.0.signer") as err:
        _raw_action(running.address, "create-task", body)
    assert "AttributeError" not in str(err.value)
    with pytest.raises(UnknownTask):
        running.server.executor.status(TASK)
