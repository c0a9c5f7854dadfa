"""`teeflow demo`: a local cluster doing a real TEE task, start to finish.

Starts a scheduler, a simulated executor and one provider per party as separate
processes on loopback ports they pick, submits through the SDK the way a user
does, checks the result against the same computation in plaintext, and stops
everything it started.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from teeflow.attestation.policy import load_policy
from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.common import console, kv, metrics_lines, wait_with_progress
from teeflow.core.errors import InputError

N_FEATURES = 10
TRUE_WEIGHTS = np.linspace(-1.5, 1.5, N_FEATURES)


def make_party_data(path: Path, rows: int, seed: int, with_pid: bool = False) -> None:
    """Rows with a real, learnable signal: y ~ Bernoulli(sigmoid(x . w + 0.3)); with
    `with_pid`, a person id column too (text, so no model takes it as a feature), the same
    ids in every party's file, so the parties' rows can be joined."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N_FEATURES))
    p = 1.0 / (1.0 + np.exp(-(x @ TRUE_WEIGHTS + 0.3)))
    y = (rng.random(rows) < p).astype(np.int64)
    ids = {"pid": [f"p{i:07d}" for i in range(rows)]} if with_pid else {}
    table = pa.table({**ids, **{f"x{i}": x[:, i] for i in range(N_FEATURES)}, "y": y})
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=64 * 1024)
    else:
        table.to_pandas().to_csv(path, index=False, float_format="%.17g")


def _read(path: Path) -> Any:
    import pandas as pd  # here: every `teeflow` command imports this module

    return pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)


def plaintext_check(compute: str, params: dict[str, str], parties: list[Party],
                    value: dict[str, Any]) -> float | None:
    """Largest absolute difference from the same computation on the concatenated data."""
    import pandas as pd

    from teeflow import plaintext as reference

    frames = [_read(p.path) for p in parties]
    if compute == "logistic_regression":
        features = params.get("features")
        ref = reference.plaintext_logistic_regression(
            pd.concat(frames, ignore_index=True), params["label"],
            features.split(",") if features else None, float(params.get("C", 1.0)),
            int(params.get("max_iter", 1000)))
        diffs = [abs(ref["coefficients"][k] - v) for k, v in value["coefficients"].items()]
        return max(diffs + [abs(ref["intercept"] - value["intercept"])])
    if compute == "federated_logistic_regression":
        from teeflow import compute as registry
        from teeflow.provider.federated import load_xy

        checked = registry.get(compute).check_params(dict(params))
        parts = [load_xy(p.path, checked) for p in parties]
        ref = reference.plaintext_federated([(x, y) for x, y, _ in parts], parts[0][2], checked)
        diffs = [abs(ref["coefficients"][k] - v) for k, v in value["coefficients"].items()]
        return max(diffs + [abs(ref["intercept"] - value["intercept"])])
    if compute == "model_aggregation":
        ref = reference.plaintext_fedavg(frames)
        return max(abs(ref["parameters"][k] - v) for k, v in value["parameters"].items())
    return None


def demo_rules(compute: str, params: dict[str, str],
               queries: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """What the demo's owners bind beyond the generated rules: the demo's SQL queries by
    their digests (never any query), with the group-size floor asked for, at least the
    default. user_code is never approved by rule: its owners would sign by hand."""
    texts = list(queries)
    if compute == "sql" and "query" in params:
        texts.append(params["query"])
    if not texts:
        return {}
    floor = max(int(params.get("min_group_size", "10")), 10)
    return {"sql": {"query_sha256": [hashlib.sha256(q.encode()).hexdigest() for q in texts],
                    "min_group_size": {"min": floor}}}


@click.command()
@click.option("--party", "parties", multiple=True,
              help="NAME=FILE: a provider named NAME owning the CSV or Parquet FILE (repeatable).")
@click.option("--compute", default="logistic_regression", show_default=True)
@click.option("--param", "params", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--rows", default=100_000, show_default=True, help="Rows per sample party.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Result as JSON.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--keep", is_flag=True, help="Leave the workdir (db, configs, logs) in place.")
@click.option("--executors", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Simulated executors; above 1 the task runs across them as one pool "
                   "(docs/scale.md).")
def demo(parties: tuple[str, ...], compute: str, params: tuple[str, ...], rows: int,
         out: Path | None, workdir: Path | None, keep: bool, executors: int) -> None:
    """Run a local cluster (scheduler, providers, simulated TEE executors) on one task."""
    from teeflow.sdk import Client

    started = time.monotonic()
    work = workdir or Path(tempfile.mkdtemp(prefix="teeflow-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    param_map = kv(params, "--param")
    party_list: list[Party] = []
    sample = False
    for spec in parties:
        name, sep, file = spec.partition("=")
        if not sep or not name or not Path(file).is_file():
            raise InputError(f"--party {spec!r}: give NAME=FILE with an existing file")
        party_list.append(Party(node=name, dataset=name, path=Path(file)))
    if not party_list:
        console.print(f"making sample data: 2 parties x {rows:,} rows in {work}")
        make_party_data(work / "alice.csv", rows, seed=1, with_pid=True)
        make_party_data(work / "bob.parquet", rows, seed=2, with_pid=True)
        sample = True
        party_list = [Party("alice", "train_party_1", work / "alice.csv"),
                      Party("bob", "train_party_2", work / "bob.parquet")]
        if compute == "logistic_regression":
            param_map.setdefault("label", "y")

    measurement = code_measurement()
    cluster = LocalCluster(work)
    try:
        cluster.start_scheduler()
        addresses = [cluster.start_executor(name="executor" if i == 0 else f"executor-{i + 1}")
                     for i in range(executors)]
        bind = demo_rules(compute, param_map,
                          _demo_queries([p.dataset for p in party_list]) if sample else ())
        for party in party_list:
            cluster.start_provider(party, bind=bind,
                                   dataset_toml=demo_rules_toml(compute) if sample else "",
                                   max_pool=executors)
        names = [p.dataset for p in party_list]
        cluster.wait_for_datasets(names)
        console.print(f"cluster up: scheduler {cluster.scheduler_url}, simulated "
                      f"executor(s) {', '.join(addresses)}, providers "
                      f"{', '.join(p.node for p in party_list)}")
        for address in addresses:
            cluster.wait_for_executor(address)
        console.print("every node joined by its own one-time invitation and talks to the "
                      f"scheduler over HTTPS pinned to {cluster.fingerprint}")
        policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                              "simulated": {"measurement": [measurement]}})
        with Client(cluster.scheduler_url, key=cluster.initiator_key, policy=policy,
                    name=cluster.initiator_name) as client:
            pool = executors if executors > 1 else None
            task = client.submit(names, None, compute, param_map, pool=pool)
            picked = (f"a pool of {executors} executors led by {task['executor']} (each "
                      "provider appraises every member and streams each a part; the "
                      "members appraise each other and link on pinned TLS under Dask)"
                      if pool else f"executor {task['executor']}")
            console.print(f"task [bold]{task['id']}[/] submitted: {compute} over {names}; "
                          f"the scheduler picked {picked}; owners sign by their config "
                          "rules")
            wait_with_progress(client, task["id"])
            result = client.result(task["id"])
            for entry in client.audit_log(task["id"]):
                signer = entry.signer.split(":")[0]
                console.print(f"  audit #{entry.seq:<3} {entry.kind:<10} signed by {signer}",
                              highlight=False)
            if sample:
                _sql_under_rules(client, names)
        _show(result.value, compute)
        diff = plaintext_check(compute, param_map, party_list, result.value)
        if diff is not None:
            verdict = "[green]OK[/]" if diff <= 1e-6 else "[red]MISMATCH[/]"
            console.print(f"check against plaintext on the concatenated data: max |diff| = "
                          f"{diff:.2e} {verdict}")
        console.print("result was sealed (HPKE) to the initiator's key and opened here")
        if result.simulated:
            console.print("[yellow]SIMULATED TEE[/]: the evidence was software-signed; this "
                          "run shows the flow, not a hardware guarantee.")
        if out is not None:
            out.write_text(json.dumps(json.loads(result.raw), indent=2))
            console.print(f"result written to {out}")
        console.print(f"done in {time.monotonic() - started:.1f}s")
        if diff is not None and diff > 1e-6:
            raise click.ClickException("result differs from plaintext")
    finally:
        cluster.stop()
        if keep:
            console.print(f"kept cluster files in {work}; check the audit log with: "
                          f"teeflow audit verify --db {work / 'scheduler.sqlite'}")
        elif workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def demo_rules_toml(compute: str) -> str:
    """The sample parties' analysis rules: aggregates of x0..x2 by y, joined on pid, at
    least 20 distinct people per output row; the demo's main computation allowed too."""
    computations = ", ".join(f'"{c}"' for c in dict.fromkeys(["sql", compute]))
    return ("[datasets.rules]\n"
            f"computations = [{computations}]\n"
            "[datasets.rules.aggregation]\n"
            'aggregates = { count = ["*", "pid"], sum = ["x0", "x1", "x2"], '
            'avg = ["x0", "x1", "x2"] }\n'
            'join_columns = ["pid"]\n'
            'dimension_columns = ["y"]\n'
            'identity = "pid"\n'
            "min_identities = 20\n")


DEMO_SQL = ("SELECT a.y, count(*) AS people, avg(a.x0) AS mean_x0_alice, "
            "avg(b.x1) AS mean_x1_bob FROM {a} a JOIN {b} b ON a.pid = b.pid "
            "GROUP BY a.y ORDER BY a.y")
DEMO_REFUSED = "SELECT max(x0) FROM {a}"


def _demo_queries(names: list[str]) -> tuple[str, ...]:
    """The demo's SQL texts, as submitted (their owners bind them by digest)."""
    quoted = {"a": f'"{names[0]}"', "b": f'"{names[1]}"'}
    return DEMO_SQL.format(**quoted), DEMO_REFUSED.format(**quoted)


def _sql_under_rules(client: Any, names: list[str]) -> None:
    """An SQL join the owners' aggregation rules grant, and one they refuse."""
    from teeflow.core.errors import TaskFailed

    quoted = {"a": f'"{names[0]}"', "b": f'"{names[1]}"'}
    task = client.submit(names, None, "sql", {"query": DEMO_SQL.format(**quoted)})
    console.print(f"task [bold]{task['id']}[/] submitted: sql join under the owners' "
                  "aggregation rules (at least 20 distinct pids per output row)")
    wait_with_progress(client, task["id"])
    value = client.result(task["id"]).value
    table = Table(*value["columns"], title="sql result (analysis rules: "
                  f"{value.get('analysis_rules', {}).get('mode')})")
    for row in value["rows"]:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
    refused = client.submit(names[:1], None, "sql", {"query": DEMO_REFUSED.format(**quoted)})
    try:
        client.wait(refused["id"])
    except TaskFailed:
        reason = client.task(refused["id"]).get("error")
        console.print(f"task {refused['id']} (max(x0): one row's value) refused by the "
                      f"executor before any data moved: {reason}", highlight=False)
    else:
        raise click.ClickException("the analysis rules let max() through")


def _show(value: dict[str, Any], compute: str) -> None:
    table = Table("parameter", "value", title=f"{compute} result")
    items = value.get("coefficients") or value.get("parameters") or {}
    for k, v in items.items():
        table.add_row(k, f"{v:+.6f}")
    if "intercept" in value:
        table.add_row("intercept", f"{value['intercept']:+.6f}")
    console.print(table)
    for line in metrics_lines(value):
        console.print(line, highlight=False)
    if "n_samples" in value:
        console.print(f"trained on {value['n_samples']:,} rows from all parties")
