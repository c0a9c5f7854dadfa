"""Executor pool: three members versus one executor with a memory budget, same data, same run.

Input: three partitions of BUDGET bytes each (20 float64 features x00..x19 and a float64
label y; about 3x the budget in all), written once as Arrow IPC files. Five paths,
interleaved within each repeat in a rotating order:

- single executor: a real executor (`teeflow executor --tee simulated --memory-budget
  BUDGET`) in a child process; three owners upload their partitions over the attested
  channel (read from the memory-mapped files, batch by batch), the executor runs
  linear_regression (inputs beyond the budget are sealed to disk and streamed back), and
  the receiver takes and opens the sealed result. Peak memory: the executor's VmHWM.
- pool: three member processes (`python -m teeflow.executor.pool.member`), one partition
  each, as tests/test_pool_links.py starts them: identity, admission through the
  rendezvous, Dask on pinned TLS (1 worker thread each), linear_regression by partial
  sums. Each member's peak resident memory is its VmHWM (/proc/PID/status), sampled every
  10 ms until it exits (not wait4's ru_maxrss, which counts this process's image the child
  was forked from). Phases are timed from the members' own step lines as they print them.
- pool, 1 BLAS thread: the same, each member started with OPENBLAS_NUM_THREADS=1. As
  shipped, each member's numpy starts one OpenBLAS thread per core (2 here) beside its one
  Dask thread: 3 members x 2 spinning BLAS threads on 2 cores.
- in process: the pool's computation without the pool, in this one process: the three
  tables read into memory as members read them, then `pool.linreg.hold_partition` for each
  (Arrow to float64 numpy) and the same partial sums (X'X, X'y, column sums) and solve.

An idle pool (the same three members on 1,000-row partitions, the fifth path) gives each
member's baseline peak, measured the same way, so the data's share of a member's peak is
reported apart from Python + Dask + TLS. Bytes each member moved (rchar/wchar of
/proc/PID/io, sampled with VmHWM; they count TLS traffic, which Python's ssl reads and
writes with read(2)/write(2), but not plain send(2)/recv(2)) beyond the idle member's, less
its partition file, are what crossed the links because of the data: near zero if only
aggregates cross, a partition's size if Dask moved a block. The three results must agree
to 1e-6 or the section raises. Both the pool and the in-process path run on the machine's
cores (2 here): that is the "equal total cores" of the overhead ratio.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from bench import Options, Row, median_range
from teeflow import compute
from teeflow.attestation.policy import load_policy
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.core import audit, seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import TeeflowError
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.pool import linreg as pool_linreg
from teeflow.net.executor_client import ExecutorClient, attested_connect

MiB = 2**20
FULL_BUDGET = 64 * MiB
QUICK_BUDGET = 16 * MiB
FULL_REPEATS = 4
QUICK_REPEATS = 1
N_FEATURES = 20
FEATURES = [f"x{i:02d}" for i in range(N_FEATURES)]
LABEL = "y"
ROW_BYTES = (N_FEATURES + 1) * 8
BATCH_ROWS = 65_536
IDLE_ROWS = 1_000
MEMBERS = ["m1", "m2", "m3"]
SAMPLE = 0.01  # seconds between samples of each member's VmHWM
START_TIMEOUT = 120.0  # seconds: members on a loaded 2-core machine
SRC = Path(__file__).resolve().parents[1] / "src"
POLICY = {"tee_types": ["simulated"], "allow_simulated": True,
          "simulated": {"measurement": [code_measurement()]}}


# -- data -------------------------------------------------------------------------------------
def write_partition(path: Path, rows: int, seed: int) -> None:
    """One partition, generated and written batch by batch (never held whole here)."""
    rng = np.random.default_rng(seed)
    w = np.linspace(-1.0, 1.0, N_FEATURES)
    schema = pa.schema([(f, pa.float64()) for f in [*FEATURES, LABEL]])
    with ipc.new_file(path, schema) as writer:
        done = 0
        while done < rows:
            n = min(BATCH_ROWS, rows - done)
            x = rng.standard_normal((n, N_FEATURES))
            cols = [pa.array(x[:, i]) for i in range(N_FEATURES)]
            cols.append(pa.array(x @ w + 0.5 + rng.standard_normal(n)))
            writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
            done += n


def file_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(str(path)) as source:
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def file_schema(path: Path) -> pa.Schema:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).schema


def _mem(pid: int, fieldname: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(fieldname + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {fieldname} for {pid}")


def _io(pid: int) -> tuple[int, int]:
    got = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(got["rchar"]), int(got["wchar"])


# -- single executor --------------------------------------------------------------------------
def single_executor(paths: list[Path], budget: int, work: Path, tag: str) -> dict[str, Any]:
    port_file = work / f"executor-{tag}.port"
    log_path = work / f"executor-{tag}.log"
    spill = work / f"spill-{tag}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "teeflow.cli.main", "executor", "--tee", "simulated",
             "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             "--memory-budget", str(budget), "--spill-dir", str(spill)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"executor did not start: {log_path.read_text()}")
            time.sleep(0.05)
        address = port_file.read_text().strip()
        schema = file_schema(paths[0])
        owners, me = [KeySigner.generate() for _ in paths], KeySigner.generate()
        policy = load_policy(POLICY)
        spec = wire.TaskSpec(
            f"poolbench{tag}", "linear_regression", compute.get("linear_regression").code_digest,
            {"label": LABEL},
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
                for i, (owner, path) in enumerate(zip(owners, paths, strict=True)):
                    client.upload(spec.task_id, f"p{i}", owner, schema, file_batches(path),
                                  spec_digest=spec.digest())
                ref = spec.digest().encode()  # the executor's name for the task
                status = router.action_json("status", ref)
                spilled = sum(status["spilled"].values())
                t1 = time.perf_counter()
                router.action("run", ref)
                while status["status"] in ("waiting", "running"):
                    time.sleep(0.02)
                    status = router.action_json("status", ref)
                t2 = time.perf_counter()
                if status["status"] != "done":
                    raise RuntimeError(f"single executor: {status['error']}")
                envelope = client.take_result(spec.task_id, me, spec_digest=spec.digest())
            plain = seal.open_sealed(base64.b64decode(envelope.sealed),
                                     me.encryption_private_key(), spec.digest())
        return {"seconds": t2 - t0, "upload": t1 - t0, "run": t2 - t1,
                "peak": _mem(proc.pid, "VmHWM"), "baseline": baseline, "spilled": spilled,
                "result": json.loads(plain)["result"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- pool -------------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    proc: subprocess.Popen[bytes]
    lines: list[tuple[float, str]] = field(default_factory=list)  # (perf_counter, line)
    peak: int = 0  # bytes: the highest VmHWM sampled
    io: tuple[int, int] = (0, 0)  # (rchar, wchar) at the last sample
    code: int | None = None
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.perf_counter(), raw.decode("utf-8", "replace").rstrip()))

    def seen(self, text: str) -> float:
        for when, line in self.lines:
            if text in line:
                return when
        raise RuntimeError(f"member {self.name} never said {text!r}:\n" + self.log())

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _sample(member: Member) -> bool:
    """Read the member's VmHWM (its peak resident memory so far), then whether it exited.

    Not wait4's ru_maxrss: a child's ru_maxrss also counts the image it was forked (or
    vforked) from, this bench process, before it exec'd the member; VmHWM is the member's
    own address space only. Sampled until exit, so growth in the last interval is missed.
    """
    if member.code is not None:
        return True
    with contextlib.suppress(OSError, RuntimeError):  # exited between the two reads
        member.peak = max(member.peak, _mem(member.proc.pid, "VmHWM"))
        member.io = _io(member.proc.pid)
    code = member.proc.poll()
    if code is None:
        return False
    member.code = code
    return True


@contextlib.contextmanager
def started_pool(paths: list[Path], work: Path, tag: str, blas_threads: int | None = None,
                 ) -> Iterator[tuple[list[Member], Path, float]]:
    folder = work / f"pool-{tag}"
    folder.mkdir()
    (folder / "policy.json").write_text(json.dumps(POLICY))
    result = folder / "result.json"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    if blas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    members: list[Member] = []
    t0 = time.perf_counter()
    try:
        for name, path in zip(MEMBERS, paths, strict=True):
            proc = subprocess.Popen(
                [sys.executable, "-m", "teeflow.executor.pool.member",
                 "--rendezvous", str(folder / "rv"), "--name", name,
                 "--members", ",".join(MEMBERS), "--policy", str(folder / "policy.json"),
                 "--data", str(path), "--label", LABEL, "--result", str(result),
                 "--timeout", str(START_TIMEOUT)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env)
            member = Member(name, proc)
            member.reader = threading.Thread(target=member.read, daemon=True)
            member.reader.start()
            members.append(member)
        yield members, result, t0
    finally:
        for member in members:
            if member.code is None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGTERM)
        for member in members:
            if member.code is None:
                try:
                    member.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    member.proc.kill()
                    member.proc.wait()
            if member.reader is not None:
                member.reader.join(timeout=5)
            if member.proc.stdout is not None:
                member.proc.stdout.close()


def pool_run(paths: list[Path], work: Path, tag: str,
             blas_threads: int | None = None) -> dict[str, Any]:
    with started_pool(paths, work, tag, blas_threads) as (members, result_path, t0):
        deadline = time.monotonic() + START_TIMEOUT + 30
        while not all([_sample(m) for m in members]):
            if time.monotonic() > deadline:
                raise RuntimeError("pool did not finish in time")
            time.sleep(SAMPLE)
        for m in members:
            if m.reader is not None:
                m.reader.join(timeout=5)
        failed = [m for m in members if m.code != 0]
        if failed or not result_path.exists():
            raise RuntimeError("pool failed:\n" + "\n".join(f"{m.name} ({m.code}):\n{m.log()}"
                                                           for m in members))
        leader = members[0]
        admitted = max(m.seen("admitted") for m in members)
        joined = max(m.seen("worker listening") for m in members)
        done = leader.seen("computed")
        return {"seconds": done - t0, "startup": admitted - t0, "form": joined - admitted,
                "compute": done - joined, "after_admission": done - admitted,
                "peak": {m.name: m.peak for m in members},
                "io": {m.name: m.io for m in members},
                "result": json.loads(result_path.read_text())}


# -- integrated pool: real executors, providers, scheduler ------------------------------------
INTEGRATED_MEMBERS = 3
INTEGRATED_REPEATS = 2  # at most: each repeat is a pooled and a single task (~60 s)
POLL = 0.2  # seconds between status polls of each executor (spilled while inputs are held)


def write_parquet(paths: list[Path], out: Path) -> None:
    """The three partitions, batch by batch, as one party's parquet file: the same rows
    the other paths see, so every result must agree."""
    with pq.ParquetWriter(out, file_schema(paths[0])) as writer:
        for path in paths:
            for batch in file_batches(path):
                writer.write_batch(batch)


class _Watch:
    """Polls executors' status of one task from a thread; keeps each one's most spilled
    bytes (status reports spills only while inputs are held, so once is not enough)."""

    def __init__(self, addresses: list[str], task_id: str) -> None:
        self.addresses, self.task_id = addresses, task_id
        self.spilled = dict.fromkeys(addresses, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while True:
            for address in self.addresses:
                with contextlib.suppress(TeeflowError, OSError):
                    with ExecutorClient(address, None) as ex:
                        got = sum(ex.status(self.task_id).spilled.values())
                    self.spilled[address] = max(self.spilled[address], got)
            if self.stop.wait(POLL):
                return

    def done(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join(timeout=30)
        self._poll()  # once more after the task (stop is set: one pass)
        return self.spilled


def _integrated_task(client: Any, dataset: str, executors: list[str],
                     pool: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if pool:
        task = client.submit([dataset], None, "linear_regression", {"label": LABEL},
                             pool=len(executors), members=executors)
    else:
        task = client.submit([dataset], executors[0], "linear_regression", {"label": LABEL})
    watch = _Watch(executors, task["id"])
    try:
        client.wait(task["id"], timeout=300)
        value = client.result(task["id"]).value
    finally:
        spilled = watch.done()
    return {"seconds": time.perf_counter() - t0, "spilled": spilled, "result": value}


def integrated(paths: list[Path], budget: int, work: Path, repeats: int) -> dict[str, Any]:
    """A LocalCluster: scheduler, three member executors, a fourth for the single run and
    an idle fifth (its VmHWM is an executor's baseline), all with --memory-budget B; one
    provider holding the 3B parquet file. Per repeat: the pooled task and the single one,
    in alternating order."""
    from teeflow.cli.cluster import LocalCluster, Party
    from teeflow.sdk import Client

    folder = work / "integrated"
    data = folder / "party.parquet"
    folder.mkdir()
    write_parquet(paths, data)
    party = Party("owner", "pool_bench", data)
    names = [f"member-{i + 1}" for i in range(INTEGRATED_MEMBERS)] + ["single", "idle"]
    got: dict[str, Any] = {"pool": [], "single": []}
    with LocalCluster(folder) as cluster:
        cluster.start_scheduler()
        address = {n: cluster.start_executor("--memory-budget", str(budget), "--spill-dir",
                                             str(folder / f"spill-{n}"), name=n)
                   for n in names}
        cluster.start_provider(party, poll_wait=1, max_pool=len(names))
        cluster.wait_for_datasets([party.dataset])
        for a in address.values():
            cluster.wait_for_executor(a)
        members = [address[n] for n in names[:INTEGRATED_MEMBERS]]
        with Client(cluster.scheduler_url, key=cluster.initiator_key,
                    policy=load_policy(POLICY), name=cluster.initiator_name) as client:
            for r in range(repeats):
                order = ("pool", "single") if r % 2 == 0 else ("single", "pool")
                for which in order:
                    got[which].append(_integrated_task(
                        client, party.dataset,
                        members if which == "pool" else [address["single"]],
                        pool=which == "pool"))
        got["peak"] = {n: _mem(cluster.processes[n].pid, "VmHWM") for n in names}
        got["members"] = dict(zip(members, names[:INTEGRATED_MEMBERS], strict=True))
    return got


# -- in process -------------------------------------------------------------------------------
def in_process(paths: list[Path]) -> dict[str, Any]:
    """The pool's own computation in one process: hold each partition, the same sums."""
    tables = []
    for path in paths:
        with ipc.open_file(str(path)) as reader:
            tables.append(reader.read_all())  # as a member reads its --data
    t0 = time.perf_counter()
    p = N_FEATURES
    xtx, xty, sx, sy, n = np.zeros((p, p)), np.zeros(p), np.zeros(p), 0.0, 0
    for i, table in enumerate(tables):
        name = f"inproc{i}"
        pool_linreg.hold_partition(name, table, FEATURES, LABEL)
        x, y = pool_linreg.partition_x(name), pool_linreg.partition_y(name)
        xtx += x.T @ x
        xty += x.T @ y
        sx += x.sum(axis=0)
        sy += float(y.sum())
        n += len(y)
        pool_linreg.drop_partition(name)
    result = pool_linreg.solve(xtx, xty, sx, sy, n, FEATURES)
    return {"seconds": time.perf_counter() - t0, "result": result}


# -- section ----------------------------------------------------------------------------------
def _agree(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    got = [a["intercept"], *(a["coefficients"][f] for f in FEATURES)]
    want = [b["intercept"], *(b["coefficients"][f] for f in FEATURES)]
    if a["n_samples"] != b["n_samples"] or not np.allclose(got, want, rtol=0, atol=1e-6):
        raise RuntimeError(f"{what}: results differ")


def _med(values: list[float]) -> float:
    return median_range(values)[0]


def _fmt(values: list[float], unit: str = "s") -> str:
    mid, lo, hi = median_range(values)
    return f"{mid:.2f} {unit}" if len(values) == 1 else f"{mid:.2f} {unit} ({lo:.2f}-{hi:.2f})"


PATHS = ("single", "pool", "pool1", "idle", "local")


def run(opts: Options) -> list[Row]:
    budget = QUICK_BUDGET if opts.quick else FULL_BUDGET
    repeats = opts.repeats or (QUICK_REPEATS if opts.quick else FULL_REPEATS)
    rows = budget // ROW_BYTES  # per member: its partition is one budget's worth
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
    with tempfile.TemporaryDirectory(prefix="teeflow-poolbench-") as tmp:
        work = Path(tmp)
        paths = [work / f"{m}.arrow" for m in MEMBERS]
        idle_paths = [work / f"{m}-idle.arrow" for m in MEMBERS]
        for i, (path, idle) in enumerate(zip(paths, idle_paths, strict=True)):
            write_partition(path, rows, seed=100 + i)
            write_partition(idle, IDLE_ROWS, seed=200 + i)
        files = {m: p.stat().st_size - i.stat().st_size  # the partition's share of rchar
                 for m, p, i in zip(MEMBERS, paths, idle_paths, strict=True)}
        in_process(paths)  # warm-up (imports, page cache), untimed
        for r in range(repeats):
            for name in PATHS[r % 5:] + PATHS[:r % 5]:
                if name == "single":
                    got[name].append(single_executor(paths, budget, work, str(r)))
                elif name == "pool":
                    got[name].append(pool_run(paths, work, f"{r}"))
                elif name == "pool1":
                    got[name].append(pool_run(paths, work, f"{r}-blas1", blas_threads=1))
                elif name == "idle":
                    got[name].append(pool_run(idle_paths, work, f"{r}-idle"))
                else:
                    got[name].append(in_process(paths))
        whole = integrated(paths, budget, work, min(repeats, INTEGRATED_REPEATS))
    for r, s in enumerate(got["single"]):
        for run_ in (*whole["pool"], *whole["single"]):
            _agree(run_["result"], s["result"], "integrated pool/single vs single executor")
        for name in ("pool", "pool1", "local"):
            _agree(got[name][r]["result"], s["result"], f"{name} vs single executor")
    return _rows(budget, rows, repeats, got, files) + _integrated_rows(budget, whole)


def _integrated_rows(budget: int, whole: dict[str, Any]) -> list[Row]:
    b, n = budget / MiB, len(whole["pool"])
    pool_s = [x["seconds"] for x in whole["pool"]]
    single_s = [x["seconds"] for x in whole["single"]]
    tag = "integrated pool (real executors, providers, scheduler)"
    idle = whole["peak"]["idle"] / MiB
    out = [Row(f"{tag}: submit -> result", _fmt(pool_s),
               f"pool=3, members with --memory-budget B; {n} repeat(s)"),
           Row(f"{tag}: single executor (budget B)", _fmt(single_s),
               f"same cluster, same data, no pool; {n} repeat(s)"),
           Row(f"{tag}: single / pool", f"{_med(single_s) / _med(pool_s):.2f}x", "wall time")]
    for address, name in whole["members"].items():
        peak = whole["peak"][name] / MiB
        spilled = max(x["spilled"][address] for x in whole["pool"])
        out.append(Row(f"{tag}: {name} peak RSS", f"{peak:,.0f} MiB",
                       f"idle executor {idle:,.0f} MiB, so data {peak - idle:,.0f} MiB = "
                       f"{(peak - idle) / b:.2f} B; spilled "
                       f"{'yes, ' + format(spilled / MiB, '.0f') + ' MiB' if spilled else 'no'}"))
    peak = whole["peak"]["single"] / MiB
    spilled = max(sum(x["spilled"].values()) for x in whole["single"])
    out.append(Row(f"{tag}: single executor peak RSS", f"{peak:,.0f} MiB",
                   f"data {peak - idle:,.0f} MiB = {(peak - idle) / b:.2f} B; spilled "
                   f"{'yes, ' + format(spilled / MiB, '.0f') + ' MiB' if spilled else 'no'}"))
    return out


def _rows(budget: int, rows: int, repeats: int, got: dict[str, list[dict[str, Any]]],
          files: dict[str, int]) -> list[Row]:
    b, total = budget / MiB, rows * len(MEMBERS)
    single, idles, local = got["single"], got["idle"], got["local"]
    out = [Row("budget B / input", f"{b:.0f} MiB / {total * ROW_BYTES / MiB:.0f} MiB",
               f"{total:,} rows x {N_FEATURES} float64 features + label, 3 partitions "
               f"of {rows:,} rows (one B each); medians of {repeats}, range in brackets")]
    s_peak = _med([s["peak"] / MiB for s in single])
    s_base = _med([s["baseline"] / MiB for s in single])
    out += [
        Row("single executor (budget B): upload + run", _fmt([s["seconds"] for s in single]),
            f"upload {_fmt([s['upload'] for s in single])}, run "
            f"{_fmt([s['run'] for s in single])}; attested channel, 3 owners"),
        Row("single executor: peak RSS", f"{s_peak:,.0f} MiB",
            f"idle {s_base:,.0f} MiB before upload, so data {s_peak - s_base:,.0f} MiB = "
            f"{(s_peak - s_base) / b:.2f} B; spilled "
            f"{_med([s['spilled'] / MiB for s in single]):,.0f} MiB, sealed to disk"),
    ]
    for name, what in (("pool", "pool of 3, as shipped"),
                       ("pool1", "pool of 3, OPENBLAS_NUM_THREADS=1"),
                       ("idle", f"pool of 3, idle ({IDLE_ROWS:,}-row partitions)")):
        runs = got[name]
        out.append(Row(f"{what}: launch -> result", _fmt([p["seconds"] for p in runs]),
                       f"to all admitted {_fmt([p['startup'] for p in runs])}; holding "
                       f"partitions + Dask up {_fmt([p['form'] for p in runs])}; computing "
                       f"{_fmt([p['compute'] for p in runs])}"))
    for name in MEMBERS:
        peak = _med([p["peak"][name] / MiB for p in got["pool"]])
        base = _med([i["peak"][name] / MiB for i in idles])
        out.append(Row(f"member {name}: peak RSS", f"{peak:,.0f} MiB",
                       f"idle member {base:,.0f} MiB, so data {peak - base:,.0f} MiB = "
                       f"{(peak - base) / b:.2f} B; the whole peak is {peak / b:.2f} B"))
    for name in MEMBERS:
        recv = (_med([p["io"][name][0] for p in got["pool"]])
                - _med([i["io"][name][0] for i in idles]) - files[name])
        sent = (_med([p["io"][name][1] for p in got["pool"]])
                - _med([i["io"][name][1] for i in idles]))
        out.append(Row(f"member {name}: bytes moved beyond idle's",
                       f"in {recv / 1024:,.0f} KiB, out {sent / 1024:,.0f} KiB",
                       "rchar less its partition file, wchar: TLS links and files"))
    local_s = _med([loc["seconds"] for loc in local])
    idle_after = _med([i["after_admission"] for i in idles])
    out.append(Row("in process: same sums, one process", _fmt([x["seconds"] for x in local]),
                   f"hold_partition x3 + X'X, X'y, sums + solve; {total / local_s:,.0f} rows/s"))
    for name, what in (("pool", "as shipped"), ("pool1", "1 BLAS thread")):
        after = _med([p["after_admission"] for p in got[name]])
        whole = _med([p["seconds"] for p in got[name]])
        marginal = after - idle_after  # at --quick sizes this is within the noise
        out += [
            Row(f"pool ({what}) / in process", f"{after / local_s:.2f}x",
                f"after admission {after:.2f} s; launch -> result {whole / local_s:.2f}x; "
                "same 2 cores"),
            Row(f"per member ({what}), marginal",
                f"{rows / marginal:,.0f} rows/s" if marginal > 0.05 else "n/a (noise)",
                f"{rows:,} rows / (after admission {after:.2f} s - idle's {idle_after:.2f} s)"),
        ]
    single_s = _med([s["seconds"] for s in single])
    out += [
        Row("single executor / pool (1 BLAS thread)",
            f"{single_s / _med([p['seconds'] for p in got['pool1']]):.2f}x",
            "single: upload + spilled run; pool: launch -> result, data already on members"),
        Row("single executor run (spilled)",
            f"{total / _med([s['run'] for s in single]):,.0f} rows/s",
            "run only, inputs already uploaded"),
    ]
    return out
