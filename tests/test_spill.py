"""Inputs beyond the executor's memory budget: sealed on disk, streamed to the computation,
gone when wiped; results equal the in-memory run."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import ComputeError
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import open_sealed
from teeflow.executor.service import Executor, UploadRequest
from teeflow.executor.spill import SealedSpill
from tests.factories import approval, challenge_for, make_spec

ROWS, BATCH = 20_000, 2_048
BUDGET = 500_000  # bytes; each party's input is ~1.7 MB in 10 batches, the budget ~2.3 of them


def _party(seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, 10))
    y = (x @ np.linspace(-1, 1, 10) + 0.3 * rng.standard_normal(ROWS) > 0).astype(np.int64)
    return pa.table({**{f"x{i}": x[:, i] for i in range(10)},
                     "t": x @ np.arange(10.0) + rng.standard_normal(ROWS),
                     "g": (np.arange(ROWS) % 4).astype(np.int64), "y": y})


PARTIES = [_party(1), _party(2)]


def test_sealed_spill_round_trip_and_tamper(tmp_path):
    table = PARTIES[0].slice(0, 10_000)
    spill = SealedSpill(table.schema, tmp_path)
    for batch in table.to_batches(max_chunksize=BATCH):
        spill.append(batch)
    assert pa.Table.from_batches(list(spill.batches())).equals(table)
    raw = spill.path.read_bytes()
    assert table.column("x0").to_numpy()[:4].tobytes() not in raw  # sealed, not plaintext
    flipped = bytearray(raw)
    flipped[100] ^= 1
    spill.path.write_bytes(bytes(flipped))
    with pytest.raises(ComputeError, match="does not decrypt"):
        list(spill.batches())
    spill.close()
    assert not spill.path.exists()


def _run(compute: str, params: dict, budget: int | None, spill_dir) -> tuple[dict, dict]:
    key = ec.generate_private_key(ec.SECP256R1())
    ex = Executor(SimulatedBackend(), key, memory_budget=budget, spill_dir=str(spill_dir))
    owners, initiator = [KeySigner.generate(), KeySigner.generate()], KeySigner.generate()
    fp = schema_fingerprint(PARTIES[0].schema)
    spec = make_spec([("p0", "a", owners[0], fp), ("p1", "b", owners[1], fp)], initiator,
                     compute_name=compute, params=params)
    ex.create_task(spec, [approval(spec, o) for o in owners])
    for i, table in enumerate(PARTIES):
        challenge = challenge_for(ex, spec.task_id, owners[i])
        signature = owners[i].sign(wire.upload_message(spec.task_id, f"p{i}", challenge,
                                                       ex.tls_spki_hash))
        batches = table.to_batches(max_chunksize=BATCH)
        messages = [(b, None) for b in batches] + [
            (None, wire.end_marker(table.num_rows, len(batches)))]
        ex.receive(UploadRequest(spec.task_id, f"p{i}", challenge, signature), table.schema,
                   messages)
    during = ex.status(spec.task_id)
    ex.run(spec.task_id, background=False)
    status = ex.status(spec.task_id)
    assert ex.held_bytes(spec.task_id) == 0 and status["inputs_held"] == []
    run_dir = Path(ex.spill_dir)  # this run's own directory under spill_dir
    assert run_dir.parent == spill_dir
    assert sorted(f.name for f in run_dir.iterdir()) == ["lock", "sql"]  # spills deleted
    assert list((run_dir / "sql").iterdir()) == []  # and DuckDB's temp folders
    if status["status"] != "done":
        raise ComputeError(status["error"])
    envelope = ex.take_result(spec.task_id, initiator.public_key(), *_signed(ex, spec,
                                                                             initiator))
    body = wire.parse_json(envelope, "envelope")
    opened = open_sealed(base64.b64decode(body["sealed"]), initiator.encryption_private_key(),
                         spec.digest())
    return wire.parse_json(opened, "result")["result"], during


def _signed(ex, spec, who):
    challenge = challenge_for(ex, spec.task_id, who)
    return challenge, who.sign(wire.result_message(spec.task_id, challenge, ex.tls_spki_hash))


@pytest.mark.parametrize("compute,params,tolerance", [
    ("linear_regression", {"label": "t", "features": "x0,x1,x2,x3,x4,x5,x6,x7,x8,x9"}, 1e-9),
    ("logistic_regression", {"label": "y", "features": "x0,x1,x2,x3,x4,x5,x6,x7,x8,x9"}, 1e-5),
])
def test_models_over_budget_equal_in_memory(tmp_path, compute, params, tolerance):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    in_memory, _ = _run(compute, params, None, tmp_path / "a")
    spilled, during = _run(compute, params, BUDGET, tmp_path / "b")
    assert sum(during["spilled"].values()) > 4 * BUDGET  # most of the input went to disk
    for name, value in in_memory["coefficients"].items():
        assert spilled["coefficients"][name] == pytest.approx(value, abs=tolerance)
    assert spilled["intercept"] == pytest.approx(in_memory["intercept"], abs=tolerance)
    assert spilled["n_samples"] == 2 * ROWS


def test_sql_over_budget_equals_in_memory(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    params = {"query": "SELECT g, count(*) AS n, avg(x0) AS m FROM p0 GROUP BY g ORDER BY g"}
    in_memory, _ = _run("sql", params, None, tmp_path / "a")
    spilled, _ = _run("sql", params, BUDGET, tmp_path / "b")
    assert spilled["columns"] == in_memory["columns"]
    for got, want in zip(spilled["rows"], in_memory["rows"], strict=True):
        assert got[:2] == want[:2]  # group and count exactly; the mean up to summation order
        assert got[2] == pytest.approx(want[2], rel=1e-12, abs=1e-15)


def test_computation_that_needs_memory_says_so(tmp_path):
    with pytest.raises(ComputeError, match="needs its whole input in memory"):
        _run("xgboost", {"label": "y", "n_estimators": "2"}, BUDGET, tmp_path)


def test_aggregation_over_budget_equals_in_memory(tmp_path):
    from teeflow import compute
    from teeflow.compute.rows import Source

    rng = np.random.default_rng(3)
    names = [f"w{i}" for i in range(5000)]
    tables = [pa.table({"name": names, "value": rng.standard_normal(5000),
                        "n_samples": np.full(5000, n, dtype=np.int64)}) for n in (10, 30, 60)]
    comp = compute.get("model_aggregation")
    checked = comp.check_params({})
    whole = comp.run([(f"p{i}", t) for i, t in enumerate(tables)], checked)
    streamed = comp.run_stream([Source.of_table(f"p{i}", t) for i, t in enumerate(tables)],
                               checked)
    assert streamed["n_samples"] == whole["n_samples"] == 100
    for name, value in whole["parameters"].items():
        assert streamed["parameters"][name] == pytest.approx(value, rel=1e-12, abs=1e-15)
