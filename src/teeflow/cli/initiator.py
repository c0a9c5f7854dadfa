"""The initiator's and the owners' commands: keys, tasks, consent, results, catalogs.

Every command talks to the scheduler through the SDK client; results are taken
only after this user's own appraisal of the executor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from teeflow.cli.common import client, console, kv, session, wait_with_progress
from teeflow.cli.legacy import SeedForm, apply_seed_form
from teeflow.core.errors import InputError

if TYPE_CHECKING:
    from teeflow.sdk import Client


@click.command()
@click.option("--datasets", default=None, help="Comma-separated dataset names.")
@click.option("--executor", "executor_addr", default=None,
              help="Executor HOST:PORT (default: one the scheduler picks by your policy).")
@click.option("--compute", default=None, help="Computation name.")
@click.option("--param", "params", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--task_lang", default=None, help="Seed form: proto.")
@click.option("--task_type", default=None, help="Seed form: 6 (TEE task).")
@click.option("--params", "seed_params", default=None, help="Seed form parameter string.")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="With --wait: take the result and write it here as JSON.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy for taking the result (env TEEFLOW_POLICY).")
@click.pass_context
def submit(ctx: click.Context, datasets: str | None, executor_addr: str | None,
           compute: str | None, params: tuple[str, ...], task_lang: str | None,
           task_type: str | None, seed_params: str | None, wait: bool, out: Path | None,
           policy: Path | None) -> None:
    """Submit a task to the scheduler and (by default) wait for it."""
    given = SeedForm(datasets, executor_addr, compute, kv(params, "--param"))
    if seed_params is not None:
        given = apply_seed_form(task_lang, task_type, seed_params, given)
    names = [d.strip() for d in (given.datasets or "").split(",") if d.strip()]
    if not names:
        raise InputError("--datasets: name at least one dataset")
    if not given.compute:
        raise InputError("--compute: name the computation")
    with client(ctx, policy) as c:
        task = c.submit(names, given.executor, given.compute, given.params)
        console.print(f"task [bold]{task['id']}[/] submitted ({task['state']}; executor "
                      f"{task['executor']}); waiting for the owners' signatures")
        if not wait:
            return
        wait_with_progress(c, task["id"])
        if out is not None:
            _write_result(c, task["id"], out)


def _write_result(c: Client, task_id: str, out: Path, digest: str | None = None) -> None:
    result = c.result(task_id, digest=digest)
    # result.value: coefficients in the model's column order (raw JSON has sorted keys)
    out.write_bytes(json.dumps({**json.loads(result.raw), "result": result.value},
                               indent=2).encode())
    mark = " [yellow](SIMULATED TEE: not a hardware attestation)[/]" if result.simulated else ""
    console.print(f"result of {task_id} written to {out}{mark}")


@click.command()
@click.option("--name", default=None, help="Register this identity with the scheduler as NAME.")
@click.option("--invite", default=None, envvar="TEEFLOW_INVITE",
              help="The operator's one-time invitation token (env TEEFLOW_INVITE).")
@click.pass_context
def init(ctx: click.Context, name: str | None, invite: str | None) -> None:
    """Make your key pair (owner-only file) and optionally register it with the scheduler."""
    from teeflow.core.crypto import key_id
    from teeflow.files.keys import load_or_create_key
    from teeflow.sdk.client import DEFAULT_HOME

    s = session(ctx)
    path = (s.key or DEFAULT_HOME / "key.pem").expanduser()
    existed = path.exists()
    identity = load_or_create_key(path)
    verb = "using" if existed else "made"
    console.print(f"{verb} key {path} (id {key_id(identity.public_key())})")
    console.print(f"public key: {identity.public_key()}")
    console.print(f"encryption key: {identity.encryption_public_key()}")
    if name:
        with client(ctx, name=name, invite=invite):
            console.print(f"registered as {name!r} with {s.scheduler}")


@click.command()
@click.argument("task_id")
@click.pass_context
def approve(ctx: click.Context, task_id: str) -> None:
    """Sign a task's digest as the owner of data it uses."""
    _decide(ctx, task_id, "approved")


@click.command()
@click.argument("task_id")
@click.pass_context
def reject(ctx: click.Context, task_id: str) -> None:
    """Refuse a task that uses your data; it will not run."""
    _decide(ctx, task_id, "rejected")


def _decide(ctx: click.Context, task_id: str, decision: str) -> None:
    with client(ctx) as c:
        task = c.task(task_id)
        spec = task["spec"]
        console.print(f"task {task_id}: {spec['compute']} (code {spec['code_digest'][:16]}) "
                      f"params {spec['params']}")
        for d in spec["datasets"]:
            console.print(f"  input {d['name']} owned by {d['owner']}")
        for r in spec["receivers"]:
            console.print(f"  result sealed to key {r['sign_key']}")
        console.print(f"  digest {task['spec_digest']}")
        state = c.decide(task_id, decision)["state"]
    console.print(f"{decision}; task is now {state}")


@click.command()
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy (env TEEFLOW_POLICY).")
@click.pass_context
def executors(ctx: click.Context, policy: Path | None) -> None:
    """Registered executors, each appraised now by you."""
    with client(ctx, policy) as c:
        table = Table("address", "verdict", "tee", "measurement", "tcb status")
        for ex in c.executors():
            if ex["verdict"] == "accepted":
                meas = ", ".join(f"{k}={v[:16]}…" for k, v in ex["measurements"].items())
                tee = ex["tee"] + (" (simulated)" if ex["simulated"] else "")
                table.add_row(ex["address"], "accepted", tee, meas, ex["tcb_status"])
            else:
                table.add_row(ex["address"], "refused", ex["registered_tee"], ex["reason"], "")
        console.print(table)


@click.command()
@click.pass_context
def tasks(ctx: click.Context) -> None:
    """List tasks."""
    with client(ctx) as c:
        table = Table("id", "state", "compute", "datasets", "executor", "error")
        for t in c.tasks():
            table.add_row(t["id"], t["state"], t["compute"], ",".join(t["datasets"]),
                          t["executor"], t.get("error") or "")
        console.print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.argument("task_id")
@click.pass_context
def status(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's state, assignments and history."""
    with client(ctx) as c:
        task = c.task(task_id)
    if as_json:
        click.echo(json.dumps(task, indent=2))
        return
    console.print(f"task [bold]{task['id']}[/]: {task['state']}  ({task['compute']})")
    if task.get("error"):
        console.print(f"  error: {task['error']}")
    for a in task["assignments"]:
        console.print(f"  {a['dataset']} from {a['node']}: {a['state']} {a['rows']:,} rows"
                      + (f" ({a['error']})" if a.get("error") else ""))
    for e in task["events"]:
        console.print(f"  #{e['seq']} {e['event']} (by {e['signer']}) "
                      f"{json.dumps(e['detail'])[:200]}", highlight=False)
    if task["state"] in ("failed", "cancelled"):
        sys.exit(1)


@click.command()
@click.argument("task_id")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy for the executor (env TEEFLOW_POLICY).")
@click.option("--digest", default=None,
              help="The spec digest you signed (default: the one recorded when you submitted).")
@click.pass_context
def result(ctx: click.Context, task_id: str, out: Path, policy: Path | None,
           digest: str | None) -> None:
    """Appraise the executor and take a finished task's result (once), only for the spec
    you signed: a task, spec digest or executor other than it is refused, named."""
    with client(ctx, policy) as c:
        _write_result(c, task_id, out, digest)


@click.command()
@click.argument("task_id")
@click.pass_context
def cancel(ctx: click.Context, task_id: str) -> None:
    """Cancel a task; the executor wipes its inputs."""
    with client(ctx) as c:
        console.print(f"task {task_id}: {c.cancel(task_id)['state']}")


def rules_summary(rules: dict[str, Any] | None) -> str:
    """One line per rule kind a dataset's owner published (`--json` for all of them)."""
    if not rules:
        return "-"
    out = []
    agg = rules.get("aggregation")
    if agg:
        fns = ", ".join(f"{f}({'|'.join(c)})" for f, c in agg["aggregates"].items())
        out.append(f"aggregation: {fns}; by {', '.join(agg['dimension_columns']) or '-'}; "
                   f"join on {', '.join(agg['join_columns']) or '-'}; "
                   f">= {agg['min_identities']} {agg['identity']} per row")
    lst = rules.get("list")
    if lst:
        out.append(f"list: {', '.join(lst['list_columns'])} "
                   f"(join on {', '.join(lst['join_columns'])})")
    if rules.get("analyses"):
        out.append("analyses: " + ", ".join(a["name"] for a in rules["analyses"]))
    return "\n".join(out)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the whole catalog, rules included")
@click.pass_context
def datasets(ctx: click.Context, as_json: bool) -> None:
    """List the dataset catalog (names, owners, sizes, analysis rules; never rows)."""
    with client(ctx) as c:
        entries = c.datasets()
        if as_json:
            click.echo(json.dumps(entries, indent=2))
            return
        table = Table("name", "owner", "rows", "schema", "analysis rules")
        for d in entries:
            table.add_row(d["name"], d["owner"], f"{d['rows']:,}", d["fingerprint"][:12],
                          rules_summary(d.get("rules")))
        console.print(table)


COMMANDS = (init, submit, tasks, status, result, approve, reject, executors, cancel, datasets)
