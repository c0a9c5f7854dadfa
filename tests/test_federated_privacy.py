"""What federated rounds reveal to the parties, attacked: with two parties each recovers the
other's exact update from the global model, so a task with fewer owners than its minimum
(default 3) is refused by the executor; owners may ask for DP-FedAvg (clipped updates, OpenDP
Gaussian noise) and for `final_only` (no global model between rounds). Real Flight on
loopback, three owners."""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer

from teeflow import compute
from teeflow.compute import federated
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import ParameterError
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import open_sealed
from teeflow.provider.federated import take_part
from tests.factories import approval, attested_client, make_spec

BASE = {"label": "y", "rounds": "4", "local_epochs": "3", "lr": "0.5"}


@pytest.fixture
def parties(tmp_path):
    data = load_breast_cancer()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    names = [f"f{i}" for i in range(x.shape[1])]
    paths = []
    for i, rows in enumerate((slice(0, 190), slice(190, 380), slice(380, None))):
        table = pa.table({**{n: x[rows, j] for j, n in enumerate(names)},
                          "y": data.target[rows].astype(np.int64)})
        paths.append(tmp_path / f"p{i}.parquet")
        pq.write_table(table, paths[-1])
    return paths


@pytest.fixture
def executor(executor_server):
    return executor_server.server


def _spec(parties, owners, initiator, params):
    fp = schema_fingerprint(pq.read_schema(parties[0]))
    return make_spec([(f"p{i}", f"o{i}", o, fp) for i, o in enumerate(owners)], initiator,
                     compute_name="federated_logistic_regression", params=params)


class _Spy:
    """An owner's executor client that records every global model it is handed."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: list[list[float] | None] = []

    def federated(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        answer = self.client.federated(kind, *args, **kwargs)
        if kind == "fl-model":
            self.seen.append(answer.weights)
        return answer


def _run(executor, parties, params) -> tuple[dict[str, Any], list[_Spy]]:
    owners = [KeySigner.generate() for _ in parties]
    initiator = KeySigner.generate()
    spec = _spec(parties, owners, initiator, params)
    executor.executor.create_task(spec, [approval(spec, o) for o in owners])
    checked = compute.get(spec.compute).check_params(dict(spec.params))
    errors: list[BaseException] = []
    spies: list[_Spy] = []

    def party(i: int) -> None:
        try:
            with attested_client(f"127.0.0.1:{executor.port}") as client:
                spy = _Spy(client)
                spies.append(spy)
                take_part(spy, spec.task_id, f"p{i}", parties[i], checked,  # type: ignore[arg-type]
                          owners[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(len(parties))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with attested_client(f"127.0.0.1:{executor.port}") as client:
        envelope = client.take_result(spec.task_id, initiator)
    body = wire.parse_json(open_sealed(base64.b64decode(envelope.sealed),
                                       initiator.encryption_private_key(), spec.digest()),
                           "result")["result"]
    return body, spies


def test_two_parties_are_refused_unless_their_owners_lower_the_minimum(executor, parties):
    owners = [KeySigner.generate(), KeySigner.generate()]
    initiator = KeySigner.generate()
    spec = _spec(parties[:2], owners, initiator, BASE)
    with pytest.raises(ParameterError, match="fewer parties than the owners' minimum of 3"):
        executor.executor.create_task(spec, [approval(spec, o) for o in owners])
    # one owner holding two of the datasets is one party
    same = _spec(parties, [owners[0], owners[0], owners[1]], initiator, BASE)
    with pytest.raises(ParameterError, match="minimum of 3"):
        executor.executor.create_task(same, [approval(same, owners[0]),
                                             approval(same, owners[1])])
    lowered = _spec(parties[:2], owners, initiator, {**BASE, "min_parties": "2"})
    executor.executor.create_task(lowered, [approval(lowered, o) for o in owners])


def test_the_two_party_attack_and_what_dp_fedavg_leaves_of_it():
    """Party A knows its own update and row count; from the global model it recovers B's
    update exactly under plain FedAvg, but only up to the noise under DP-FedAvg."""
    rng = np.random.default_rng(7)
    w_a, w_b = rng.normal(size=31), rng.normal(size=31)
    n_a, n_b = 190, 379
    plain, _ = federated.aggregate([(w_a, n_a, 0.1), (w_b, n_b, 0.2)])
    recovered = ((n_a + n_b) * plain - n_a * w_a) / n_b
    assert np.allclose(recovered, w_b, atol=1e-12)  # why two parties are refused by default

    params = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    noised, loss = federated.aggregate([(w_a, n_a, 0.1), (w_b, n_b, 0.2)], params, None)
    assert loss is None  # the loss is not noised, so it is not released
    # the attacker's best guess of B's clipped change: 2 * global - its own clipped change
    guess = 2 * noised - federated.clip(w_a, 1.0)
    assert np.linalg.norm(guess - federated.clip(w_b, 1.0)) > 0.5  # sigma 1 over 31 coords
    assert np.linalg.norm(federated.clip(w_b, 1.0)) == pytest.approx(1.0)


def test_dp_fedavg_noise_is_opendps_gaussian(monkeypatch):
    from teeflow.compute import dp

    calls = []
    real = dp.opendp

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(dp, "opendp", spy)
    w = [(np.ones(3), 5, 0.0), (np.zeros(3), 5, 0.0), (np.ones(3), 5, 0.0)]
    out, _ = federated.aggregate(w, {"noise_multiplier": 0.5, "clip_norm": 2.0}, None)
    assert calls and out.shape == (3,) and np.all(np.isfinite(out))


def test_final_only_hands_no_model_between_rounds(executor, parties):
    body, spies = _run(executor, parties, {**BASE, "final_only": "true"})
    assert len(spies) == 3
    for spy in spies:
        assert spy.seen and all(w is None for w in spy.seen)
    assert body["final_only"] is True and "privacy" not in body
    assert [h["round"] for h in body["history"]] == list(range(4))
    assert body["n_samples"] == 569 and len(body["coefficients"]) == 30


def test_dp_fedavg_rounds_clip_and_noise_and_say_what_they_spent(executor, parties):
    params = {**BASE, "noise_multiplier": "0.8", "clip_norm": "2"}
    body, spies = _run(executor, parties, params)
    assert all(any(w is not None for w in spy.seen) for spy in spies)  # rounds 1..3
    note = body["privacy"]
    assert note["unit"] == "party" and note["noised_rounds"] == 4
    assert note["rho_zcdp"] == pytest.approx(4 / (2 * 0.8 * 0.8))
    assert all("loss" not in h for h in body["history"])
    assert all(np.isfinite(v) for v in body["coefficients"].values())
