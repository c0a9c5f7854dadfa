"""Bounded memory: an executor process given a memory budget, and input four times that.

A real executor (`teeflow executor --tee simulated --memory-budget B`) runs as a child
process. Two owners upload over the attested channel (data generated batch by batch in
this process, never held), the executor runs the computation, and we read the executor
process's peak resident memory (VmHWM) against what it used just before the first byte
arrived (VmRSS). Inputs beyond the budget are sealed to disk and streamed; the margin on top
of the budget is the computation's own working set (a few batches in flight, per-row
predictions for the metrics) and the allocator's slack; for SQL, DuckDB's own buffer pool.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import Options, Row
from teeflow import compute
from teeflow.attestation.policy import load_policy
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.schemas import schema_fingerprint
from teeflow.net.executor_client import ExecutorClient, attested_connect

MiB = 2**20
FEATURES = 20
BATCH_ROWS = 65_536
CASES = {
    "linear_regression": {"label": "t"},
    "logistic_regression": {"label": "y", "max_iter": "25"},
    "sql": {"query": "SELECT g, count(*) AS n, avg(x0) AS m, sum(t) AS s FROM p0 GROUP BY g"},
}


def _batches(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    w = np.linspace(-1, 1, FEATURES)
    done = 0
    while done < rows:
        n = min(BATCH_ROWS, rows - done)
        x = rng.standard_normal((n, FEATURES))
        cols = {f"x{i}": x[:, i] for i in range(FEATURES)}
        cols["t"] = x @ w + rng.standard_normal(n)
        cols["y"] = (cols["t"] > 0).astype(np.int64)
        cols["g"] = (np.arange(done, done + n) % 8).astype(np.int64)
        yield pa.RecordBatch.from_pydict(cols)
        done += n


def _mem(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def _case(name: str, params: dict[str, str], budget: int, total: int, work: Path) -> dict:
    port_file = work / f"{name}.port"
    log = open(work / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "teeflow.cli.main", "executor", "--tee", "simulated",
         "--listen", "127.0.0.1:0", "--port-file", str(port_file),
         "--memory-budget", str(budget), "--spill-dir", str(work)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"executor did not start: {(work / f'{name}.log').read_text()}")
            time.sleep(0.05)
        address = port_file.read_text().strip()
        schema = next(_batches(1, 0)).schema
        rows = int(total / 2 / (next(_batches(1000, 0)).nbytes / 1000))
        owners, me = [KeySigner.generate(), KeySigner.generate()], KeySigner.generate()
        policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                              "simulated": {"measurement": [code_measurement()]}})
        spec = wire.TaskSpec(
            "membench01", name, compute.get(name).code_digest, params,
            tuple(wire.DatasetRef(f"p{i}", f"o{i}", o.public_key(), schema_fingerprint(schema))
                  for i, o in enumerate(owners)),
            policy.to_dict(), (wire.Receiver(me.public_key(), me.encryption_public_key()),),
            me.public_key())
        approvals = [{"signer": audit.ed25519_signer(o.public_key()),
                      "signature": base64.b64encode(o.sign(audit.signed_payload(
                          spec.task_id, "approved", {"spec_digest": spec.digest()}))).decode()}
                     for o in owners]
        with ExecutorClient(address, None) as router:
            router.action("create-task", wire.canonical({"spec": spec.to_dict(),
                                                         "approvals": approvals}))
            baseline = _mem(proc.pid, "VmRSS")
            t0 = time.perf_counter()
            client, _ = attested_connect(address, policy, make_verifiers())
            with client:
                for i, owner in enumerate(owners):
                    client.upload(spec.task_id, f"p{i}", owner, schema, _batches(rows, i + 1),
                                  spec_digest=spec.digest())
            ref = spec.digest().encode()  # the executor's name for the task
            status = router.action_json("status", ref)
            spilled = sum(status["spilled"].values())
            router.action("run", ref)
            while status["status"] in ("waiting", "running"):
                time.sleep(0.1)
                status = router.action_json("status", ref)
            seconds = time.perf_counter() - t0
        if status["status"] != "done":
            raise RuntimeError(f"{name}: {status['error']}")
        return {"peak_growth": _mem(proc.pid, "VmHWM") - baseline, "spilled": spilled,
                "rows": 2 * rows, "seconds": seconds}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def run(opts: Options) -> list[Row]:
    budget = (32 if opts.quick else 128) * MiB
    total = 4 * budget
    out = [Row("memory budget / input", f"{budget // MiB} MiB / {total // MiB} MiB",
               "two owners over the attested channel; 20 float64 features + label + group")]
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in CASES.items():
            got = _case(name, params, budget, total, Path(tmp))
            margin = got["peak_growth"] - budget
            out.append(Row(
                f"{name}: executor peak memory growth", f"{got['peak_growth'] / MiB:,.0f} MiB",
                f"= budget + {margin / MiB:,.0f} MiB ({got['peak_growth'] / budget:.2f}x "
                f"budget); {got['spilled'] / MiB:,.0f} MiB sealed to disk; {got['rows']:,} "
                f"rows; {got['seconds']:.1f} s"))
    return out
