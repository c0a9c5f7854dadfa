"""Load: many tasks at once over four owners' providers and one executor, real processes.

A LocalCluster (scheduler, simulated executor, one provider per owner, each approving by
rule) runs one warm-up task, so imports and first-use caches are in the executor's
baseline; then N tasks over all four owners' datasets are submitted at once, each result
is taken as soon as its task is done, and we read the executor's resident memory (VmRSS)
before and after. Every task must end `done` (then `released`, its result taken).

Used by `make bench` (section `load`) and by tests/test_load.py at a small size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import Options, Row, median_range
from teeflow.attestation.policy import load_policy
from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.sdk import Client

OWNERS = 4
COMPUTE, PARAMS = "logistic_regression", {"label": "y"}
TIMEOUT = 900.0  # seconds for every task to end; a task still live then is reported
FINAL = ("released", "rejected", "failed", "cancelled")
POLL_WAIT = 1  # the providers' long poll: short, so the cluster stops quickly


@dataclass
class LoadRun:
    tasks: int
    states: dict[str, str] = field(default_factory=dict)  # task id -> last state seen
    errors: dict[str, str] = field(default_factory=dict)  # task id -> why it failed
    reached_done: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)  # submit -> result taken, seconds
    wall: float = 0.0
    rss_before: int = 0  # executor VmRSS after the warm-up task, bytes
    rss_after: int = 0  # ... after every result was taken
    rss_peak: int = 0  # VmHWM


def rss(pid: int, field_name: str = "VmRSS") -> int:
    """A /proc/PID/status memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _start(c: LocalCluster, parties: list[Party]) -> None:
    c.start_scheduler()
    c.start_executor()
    for p in parties:
        config = c.write_provider_config(p)
        config.write_text(config.read_text().replace("poll_wait = 5\n",
                                                     f"poll_wait = {POLL_WAIT}\n"))
        c._spawn(f"provider-{p.node}", "provider", "--config", str(config))
    c.wait_for_datasets([p.dataset for p in parties])
    c.wait_for_executor(c.executor_address)


def _one(client: Client, datasets: list[str], executor: str) -> None:
    task = client.submit(datasets, executor, COMPUTE, PARAMS)
    client.wait(task["id"], timeout=TIMEOUT)
    client.result(task["id"])


def drive(workdir: Path, tasks: int, rows: int = 2000) -> LoadRun:
    """Run the load; the cluster is stopped on return (also on error)."""
    parties = [Party(f"owner{i}", f"load_d{i}", workdir / f"owner{i}.csv")
               for i in range(OWNERS)]
    for i, p in enumerate(parties):
        make_party_data(p.path, rows, seed=100 + i)
    datasets = [p.dataset for p in parties]
    policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                          "simulated": {"measurement": [code_measurement()]}})
    run = LoadRun(tasks=tasks)
    with LocalCluster(workdir / "cluster") as c:
        _start(c, parties)
        pid = c.processes["executor"].pid
        executor = c.executor_address
        with Client(c.scheduler_url, key=c.initiator_key, policy=policy,
                    name=c.initiator_name) as client:
            _one(client, datasets, executor)  # warm-up: imports, first-use caches
            run.rss_before = rss(pid)
            started = time.monotonic()
            submitted = {}
            for _ in range(tasks):
                task = client.submit(datasets, executor, COMPUTE, PARAMS)
                submitted[task["id"]] = time.monotonic()
                run.states[task["id"]] = task["state"]
            deadline = started + TIMEOUT
            live = set(submitted)
            while live and time.monotonic() < deadline:
                for t in client.tasks():
                    if t["id"] not in live:
                        continue
                    run.states[t["id"]] = t["state"]
                    if t["state"] == "done":
                        run.reached_done.add(t["id"])
                        client.result(t["id"])
                        run.latencies.append(time.monotonic() - submitted[t["id"]])
                        run.states[t["id"]] = "released"
                        live.discard(t["id"])
                    elif t["state"] in FINAL:
                        run.errors[t["id"]] = str(t.get("error") or "")
                        live.discard(t["id"])
                time.sleep(0.2)
            run.wall = time.monotonic() - started
            # the executor wipes a task once its last receiver took the result; give its
            # bookkeeping a moment to settle before reading its memory
            settle = time.monotonic() + 10
            while time.monotonic() < settle and any(
                    t["state"] != "released" for t in client.tasks()
                    if t["id"] in submitted):
                time.sleep(0.2)
            run.rss_after = rss(pid)
            run.rss_peak = rss(pid, "VmHWM")
    return run


def run(opts: Options) -> list[Row]:
    import tempfile

    tasks, rows = (8, 2000) if opts.quick else (50, 20_000)
    with tempfile.TemporaryDirectory(prefix="teeflow-load-") as tmp:
        r = drive(Path(tmp), tasks, rows)
    done = sum(s == "released" for s in r.states.values())
    mid, low, high = median_range(r.latencies) if r.latencies else (0.0, 0.0, 0.0)
    MiB = 2**20
    others = sorted({s for s in r.states.values() if s != "released"})
    return [
        Row("tasks done", f"{done}/{tasks}", f"{OWNERS} owners x {rows} rows each, one "
            f"executor, {COMPUTE}; "
            + (f"others: {', '.join(others)}" if others else "every result taken")),
        *[Row("failed", task_id, reason[:100]) for task_id, reason in sorted(r.errors.items())][:5],
        Row("wall time", f"{r.wall:.1f} s", "first submit to last result taken"),
        Row("task latency (median)", f"{mid:.1f} s", f"submit to result; {low:.1f}-{high:.1f} s"),
        Row("executor RSS before", f"{r.rss_before / MiB:.0f} MiB", "after one warm-up task"),
        Row("executor RSS after", f"{r.rss_after / MiB:.0f} MiB",
            f"{(r.rss_after / r.rss_before - 1) * 100:+.0f}% of before; peak "
            f"{r.rss_peak / MiB:.0f} MiB"),
    ]
