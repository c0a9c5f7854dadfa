"""Federated rounds with the TEE as aggregator, over real loopback Flight: the providers'
rows never leave them, and the result equals the same rounds computed in one process."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer

from teeflow import compute
from teeflow import plaintext as reference
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, InputError, StateError
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import open_sealed
from teeflow.provider.federated import load_xy, take_part
from tests.factories import approval, attested_client, make_spec

PARAMS = {"label": "y", "rounds": "6", "local_epochs": "3", "lr": "0.5", "l2": "0.01",
          "min_parties": "1"}  # these tests run one or two owners
TOLERANCE = 1e-9  # same float operations in the same order: equal up to summation noise


@pytest.fixture
def parties(tmp_path):
    data = load_breast_cancer()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    names = [f"f{i}" for i in range(x.shape[1])]
    paths = []
    for i, rows in enumerate((slice(0, 300), slice(300, None))):
        table = pa.table({**{n: x[rows, j] for j, n in enumerate(names)},
                          "y": data.target[rows].astype(np.int64)})
        paths.append(tmp_path / f"p{i}.parquet")
        pq.write_table(table, paths[-1])
    return paths


@pytest.fixture
def executor(executor_server):
    return executor_server.server


def _connect(server):
    return attested_client(f"127.0.0.1:{server.port}")


def test_rounds_equal_plaintext_and_rows_stay_home(executor, parties):
    owners = [KeySigner.generate(), KeySigner.generate()]
    initiator = KeySigner.generate()
    fp = schema_fingerprint(pq.read_schema(parties[0]))
    spec = make_spec([("p0", "a", owners[0], fp), ("p1", "b", owners[1], fp)], initiator,
                     compute_name="federated_logistic_regression", params=PARAMS)
    executor.executor.create_task(spec, [approval(spec, o) for o in owners])
    checked = compute.get(spec.compute).check_params(dict(spec.params))
    errors: list[BaseException] = []

    def party(i: int) -> None:
        try:
            with _connect(executor) as client:
                take_part(client, spec.task_id, f"p{i}", parties[i], checked, owners[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    status = executor.executor.status(spec.task_id)
    assert status["status"] == "done" and status["inputs_held"] == []
    received = [e for e in status["audit"] if e["kind"] == "received"]
    assert len(received) == 2 * 6 and all("round" in e["body"] for e in received)
    with _connect(executor) as client:
        envelope = client.take_result(spec.task_id, initiator)
    body = wire.parse_json(open_sealed(base64.b64decode(envelope.sealed),
                                       initiator.encryption_private_key(), spec.digest()),
                           "result")["result"]
    data = [load_xy(p, checked) for p in parties]
    ref = reference.plaintext_federated([(x, y) for x, y, _ in data], data[0][2], checked)
    assert body["coefficients"].keys() == ref["coefficients"].keys()
    for k, v in ref["coefficients"].items():
        assert body["coefficients"][k] == pytest.approx(v, abs=TOLERANCE)
    assert body["intercept"] == pytest.approx(ref["intercept"], abs=TOLERANCE)
    assert [h["round"] for h in body["history"]] == list(range(6))
    assert body["history"][-1]["loss"] < body["history"][0]["loss"]  # it learns
    assert body["n_samples"] == 569


def test_round_messages_are_authenticated(executor, parties):
    owner, outsider, initiator = KeySigner.generate(), KeySigner.generate(), KeySigner.generate()
    fp = schema_fingerprint(pq.read_schema(parties[0]))
    spec = make_spec([("p0", "a", owner, fp)], initiator,
                     compute_name="federated_logistic_regression", params=PARAMS)
    executor.executor.create_task(spec, [approval(spec, owner)])
    update = {"weights": [0.0] * 31, "n_samples": 10, "loss": 0.5,
              "features": [f"f{i}" for i in range(30)]}
    with _connect(executor) as client:
        with pytest.raises(AuthError):
            client.federated("fl-model", spec.task_id, "p0", 0, outsider)
        with pytest.raises(AuthError):
            client.federated("fl-update", spec.task_id, "p0", 0, outsider, update)
        with pytest.raises(StateError, match="not the current round"):
            client.federated("fl-update", spec.task_id, "p0", 3, owner, update)
        with pytest.raises(InputError, match="do not match"):
            client.federated("fl-update", spec.task_id, "p0", 0, owner,
                             {**update, "weights": [0.0] * 5})
        assert client.federated("fl-update", spec.task_id, "p0", 0, owner,
                                update).closed is True  # type: ignore[union-attr]
        with pytest.raises(StateError, match="not the current round"):
            client.federated("fl-update", spec.task_id, "p0", 0, owner, update)  # replay
        with pytest.raises(InputError, match="federated"):
            client.upload(spec.task_id, "p0", owner, pa.schema([("a", pa.int64())]), [])
