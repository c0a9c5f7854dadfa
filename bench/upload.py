"""Upload throughput: attested teeflow upload versus plain Arrow Flight, same table, same run.

Three paths, each to a server in its own child process (so server and client do not
share a GIL), all fed the same in-memory float64 table cut into BATCH_ROWS-row batches:

- plain grpc+tcp do_put to a minimal Flight server that drains the batches;
- plain grpc+tls do_put to the same kind of server (TLS alone);
- teeflow: `ExecutorClient.upload` (challenge, Ed25519 signature, batches, end marker,
  receipt) over the attested, certificate-pinned channel to a real executor started
  with `python -m teeflow.cli.main executor --tee simulated`, into a real task. That
  executor validates every batch in full (`intake.check_batch`), as every executor does;
- the same upload to the same executor code built with `validate_batches=False` in a
  spawned child (the only place that option is used), for the cost of that validation.

Every path waits for the server's receipt, so a timing covers the whole transfer.
The executor holds uploaded batches in memory; each repeat gets a fresh task which is
cancelled (inputs wiped) afterwards. Paths are interleaved within each repeat, in a
rotating order, so drift on a noisy machine hits all of them alike.

Also timed: `attested_connect` (fetch the certificate, pin it, ask for evidence with
a fresh nonce, appraise it against a policy allowing simulated evidence for
`code_measurement()`), the one-time cost before a provider sends data.
"""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from bench import Options, Row, median_range
from teeflow import compute
from teeflow.attestation.policy import load_policy
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.core import audit, wire
from teeflow.core.crypto import EXECUTOR_TLS_NAME, KeySigner, make_tls_identity
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.intake import MAX_BATCH_BYTES, check_batch
from teeflow.files.datasets import BATCH_ROWS
from teeflow.net.executor_client import ExecutorClient, attested_connect

FULL_ROWS = 2_000_000
QUICK_ROWS = 200_000
COLUMNS = 20
FULL_REPEATS = 5
QUICK_REPEATS = 3
ATTEST_REPEATS = 10
START_TIMEOUT = 60.0
PUT_OPTIONS_TIMEOUT = 3600.0
MB = 1e6


# -- the minimal Flight server (runs in a spawned child) --------------------
class DrainServer(fl.FlightServerBase):
    """Takes any do_put, counts and drops the batches, answers with a small receipt."""

    def do_put(self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor,
               reader: fl.MetadataRecordBatchReader, writer: fl.FlightMetadataWriter) -> None:
        rows = nbytes = 0
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            if chunk.data is not None:
                rows += chunk.data.num_rows
                nbytes += chunk.data.nbytes
        writer.write(pa.py_buffer(json.dumps({"rows": rows, "bytes": nbytes}).encode()))


def _serve_drain(scheme: str, conn: Any) -> None:
    """Child process entry: start a DrainServer on port 0, send (port, cert), serve."""
    cert_pem: bytes | None = None
    kwargs: dict[str, Any] = {}
    if scheme == "grpc+tls":
        cert_pem, key_pem, _ = make_tls_identity()
        kwargs["tls_certificates"] = [fl.CertKeyPair(cert_pem, key_pem)]
    server = DrainServer(f"{scheme}://127.0.0.1:0", **kwargs)
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    conn.send((server.port, cert_pem))
    conn.close()
    server.serve()


def _serve_unvalidated(conn: Any) -> None:
    """Child process entry: the executor `teeflow executor` runs (as `server.build` makes
    it), but with `validate_batches=False`; sends its port, serves."""
    from cryptography.hazmat.primitives import serialization

    from teeflow.attestation.ratls import make_ratls_identity
    from teeflow.attestation.simulated import SimulatedBackend
    from teeflow.executor.server import ExecutorFlightServer
    from teeflow.executor.service import Executor

    backend = SimulatedBackend()
    cert_pem, key_pem = make_ratls_identity(backend)
    key = serialization.load_pem_private_key(key_pem, password=None)
    executor = Executor(backend, key, validate_batches=False)  # type: ignore[arg-type]
    server = ExecutorFlightServer(executor, "grpc+tls://127.0.0.1:0", cert_pem, key_pem)
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    conn.send((server.port, cert_pem))
    conn.close()
    server.serve()


@contextlib.contextmanager
def child_server(target: Callable[..., None], *args: Any, name: str
                 ) -> Iterator[tuple[int, bytes | None]]:
    """A server in a spawned child: `target(*args, conn)` sends (port, cert) and serves."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child), daemon=True, name=name)
    proc.start()
    child.close()
    try:
        if not parent.poll(START_TIMEOUT):
            raise RuntimeError(f"{name} did not start (exit code {proc.exitcode})")
        port, cert = parent.recv()
        yield port, cert
    finally:
        parent.close()
        _stop(proc.pid, proc.join, lambda: proc.exitcode is not None)


def drain_server(scheme: str) -> contextlib.AbstractContextManager[tuple[int, bytes | None]]:
    return child_server(_serve_drain, scheme, name=f"bench-drain-{scheme}")


def _stop(pid: int | None, join: Callable[[float], Any], exited: Callable[[], bool]) -> None:
    """SIGTERM one child we started, then SIGKILL it if it lingers."""
    if pid is None or exited():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    join(10.0)
    if not exited():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        join(10.0)


# -- the real executor (a child process through the CLI) --------------------
@contextlib.contextmanager
def executor_process(workdir: Path) -> Iterator[str]:
    port_file = workdir / "executor.port"
    log_path = workdir / "executor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "teeflow.cli.main", "executor", "--tee", "simulated",
             "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def join(timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)

    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("executor did not start:\n"
                                   + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        yield port_file.read_text().strip()
    finally:
        _stop(proc.pid, join, lambda: proc.poll() is not None)


# -- clients ----------------------------------------------------------------
def make_table(rows: int, columns: int = COLUMNS, seed: int = 0) -> pa.Table:
    """`columns` float64 columns x0.. and a 0/1 label y (float64), from a fixed seed."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((columns, rows))
    data[-1] = (data[0] + 0.5 * data[1] > 0).astype(np.float64)
    names = [f"x{i}" for i in range(columns - 1)] + ["y"]
    return pa.table({name: data[i] for i, name in enumerate(names)})


def plain_put(client: fl.FlightClient, schema: pa.Schema,
              batches: Sequence[pa.RecordBatch]) -> dict[str, Any]:
    """The same stream shape as ExecutorClient.upload, minus challenge and signature."""
    descriptor = fl.FlightDescriptor.for_command(b"bench")
    options = fl.FlightCallOptions(timeout=PUT_OPTIONS_TIMEOUT)
    writer, meta = client.do_put(descriptor, schema, options=options)
    with writer:
        rows = count = 0
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
            count += 1
        writer.write_metadata(pa.py_buffer(wire.end_marker(rows, count)))
        writer.done_writing()
        receipt = meta.read()
    return json.loads(receipt.to_pybytes()) if receipt is not None else {}


def _check(receipt: dict[str, Any], rows: int, what: str) -> None:
    if receipt.get("rows") != rows:
        raise RuntimeError(f"{what}: server received {receipt.get('rows')} rows, sent {rows}")


class AttestedUploader:
    """One provider uploading to a real executor task per repeat, over the attested channel."""

    def __init__(self, address: str, client: ExecutorClient, schema: pa.Schema) -> None:
        self.router = ExecutorClient(address, None)  # unpinned: task routing only, as a scheduler
        self.client = client
        self.provider = KeySigner.generate()
        self.initiator = KeySigner.generate()
        self.ref = wire.DatasetRef("bench", "bench-provider", self.provider.public_key(),
                                   schema_fingerprint(schema))
        self.schema = schema

    def upload(self, batches: Sequence[pa.RecordBatch]) -> float:
        task_id = f"bench{secrets.token_hex(6)}"
        policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                              "simulated": {"measurement": [code_measurement()]}})
        spec = wire.TaskSpec(
            task_id, "logistic_regression", compute.get("logistic_regression").code_digest,
            {"label": "y"}, (self.ref,), policy.to_dict(),
            (wire.Receiver(self.initiator.public_key(),
                           self.initiator.encryption_public_key()),),
            self.initiator.public_key())
        signature = self.provider.sign(audit.signed_payload(
            task_id, "approved", {"spec_digest": spec.digest()}))
        approvals = [{"signer": audit.ed25519_signer(self.provider.public_key()),
                      "signature": base64.b64encode(signature).decode()}]
        self.router.action("create-task", wire.canonical({"spec": spec.to_dict(),
                                                          "approvals": approvals}))
        try:
            t0 = time.perf_counter()
            receipt = self.client.upload(task_id, "bench", self.provider, self.schema, batches)
            elapsed = time.perf_counter() - t0
            # The executor hashes what it received after the transfer; let it finish so
            # the next repeat does not share the CPU with it.
            while self.router.action_json("status", task_id.encode())["digesting"]:
                time.sleep(0.01)
        finally:
            # the owner's signed cancel wipes the held batches
            self.router.action("cancel", wire.canonical({
                "task_id": task_id, "key": self.provider.public_key(),
                "signature": self.provider.sign(wire.cancel_message(task_id)).hex()}))
        _check(receipt, sum(b.num_rows for b in batches), "attested upload")
        return elapsed

    def close(self) -> None:
        self.router.close()
        self.client.close()


def _timed_plain(client: fl.FlightClient, schema: pa.Schema,
                 batches: Sequence[pa.RecordBatch], what: str) -> Callable[[], float]:
    rows = sum(b.num_rows for b in batches)

    def once() -> float:
        t0 = time.perf_counter()
        receipt = plain_put(client, schema, batches)
        elapsed = time.perf_counter() - t0
        _check(receipt, rows, what)
        return elapsed

    return once


# -- the section --------------------------------------------------------------
def run(opts: Options) -> list[Row]:
    rows = QUICK_ROWS if opts.quick else FULL_ROWS
    repeats = opts.repeats or (QUICK_REPEATS if opts.quick else FULL_REPEATS)
    table = make_table(rows)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    payload = table.nbytes

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="teeflow-bench-")))
        tcp_port, _ = stack.enter_context(drain_server("grpc+tcp"))
        tls_port, tls_cert = stack.enter_context(drain_server("grpc+tls"))
        address = stack.enter_context(executor_process(workdir))
        bare_port, _ = stack.enter_context(child_server(_serve_unvalidated,
                                                        name="bench-executor-unvalidated"))
        bare_address = f"127.0.0.1:{bare_port}"

        # The measurement is computed here, from the same source files the child hashed.
        policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                              "simulated": {"measurement": [code_measurement()]}})
        verifiers = make_verifiers()

        attest_ms: list[float] = []
        for _ in range(ATTEST_REPEATS):
            t0 = time.perf_counter()
            client, claims = attested_connect(address, policy, verifiers)
            attest_ms.append((time.perf_counter() - t0) * 1e3)
            client.close()
            if not claims.simulated:
                raise RuntimeError("expected simulated claims")

        pinned, _ = attested_connect(address, policy, verifiers)
        uploader = AttestedUploader(address, pinned, table.schema)
        stack.callback(uploader.close)
        bare_pinned, _ = attested_connect(bare_address, policy, verifiers)
        bare = AttestedUploader(bare_address, bare_pinned, table.schema)
        stack.callback(bare.close)
        tcp = fl.FlightClient(f"grpc+tcp://127.0.0.1:{tcp_port}")
        stack.callback(tcp.close)
        tls = fl.FlightClient(f"grpc+tls://127.0.0.1:{tls_port}", tls_root_certs=tls_cert,
                              override_hostname=EXECUTOR_TLS_NAME)
        stack.callback(tls.close)

        paths: dict[str, Callable[[], float]] = {
            "plain grpc+tcp": _timed_plain(tcp, table.schema, batches, "plain tcp"),
            "plain grpc+tls": _timed_plain(tls, table.schema, batches, "plain tls"),
            "attested (teeflow)": lambda: uploader.upload(batches),
            "attested, validation off": lambda: bare.upload(batches),
        }
        for once in paths.values():  # warm-up: connections up, allocators primed; untimed
            once()
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                seconds[name].append(paths[name]())

    # The check alone, in this process: the same work the executor does per batch.
    check_s: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            check_batch(batch, table.schema, "bench", i, MAX_BATCH_BYTES)
        check_s.append(time.perf_counter() - t0)

    out = [Row("payload", f"{payload / MB:,.1f} MB",
               f"{rows:,} rows x {COLUMNS} float64, {len(batches)} batches of <= {BATCH_ROWS:,} "
               "rows; table.nbytes, MB = 1e6 bytes")]
    mbps: dict[str, float] = {}
    for name, secs in seconds.items():
        rates = [payload / MB / s for s in secs]
        med, lo, hi = median_range(rates)
        mbps[name] = med
        out.append(Row(f"upload, {name}", f"{med:,.0f} MB/s",
                       f"median of {repeats} (+1 warm-up); range {lo:,.0f}-{hi:,.0f} MB/s; "
                       f"median {median_range(secs)[0] * 1e3:,.0f} ms"))
    tcp_rate = mbps["plain grpc+tcp"]
    out.append(Row("ratio attested / plain tcp", f"{mbps['attested (teeflow)'] / tcp_rate:.2f}",
                   "ratio of medians"))
    out.append(Row("ratio tls / plain tcp", f"{mbps['plain grpc+tls'] / tcp_rate:.2f}",
                   "ratio of medians"))
    validated, unvalidated = mbps["attested (teeflow)"], mbps["attested, validation off"]
    out.append(Row("ratio attested / attested without validation",
                   f"{validated / unvalidated:.2f}",
                   f"ratio of medians; full batch validation costs "
                   f"{(1 - validated / unvalidated) * 100:+.1f}% of throughput "
                   "(negative: within noise)"))
    check_med = median_range(check_s)[0]
    attested_med = median_range(seconds["attested (teeflow)"])[0]
    out.append(Row("full validation alone (check_batch)", f"{check_med * 1e3:,.2f} ms",
                   f"median of {repeats}, in process, over the same batches; "
                   f"{check_med / attested_med * 100:.2f}% of the attested upload's median"))
    out.append(Row("ratio attested / plain tls",
                   f"{mbps['attested (teeflow)'] / mbps['plain grpc+tls']:.2f}",
                   "ratio of medians; teeflow's own cost over TLS"))
    med, lo, hi = median_range(attest_ms)
    out.append(Row("attested_connect (connect, attest, pin)", f"{med:.1f} ms",
                   f"median of {ATTEST_REPEATS}; range {lo:.1f}-{hi:.1f} ms; one-time per "
                   "provider and executor"))
    out.append(Row("servers", "child processes",
                   "drain servers and the executor without validation: multiprocessing "
                   "spawn; executor: python -m teeflow.cli.main executor --tee simulated"))
    return out
