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
from rich.table import Column, Table

from teeflow.cli.common import (
    client,
    console,
    echo_json,
    key_path,
    kv,
    metrics_lines,
    session,
    signer_label,
    signer_names,
    wait_with_progress,
)
from teeflow.cli.legacy import SeedForm, apply_seed_form
from teeflow.core.durations import format_span, parse_duration
from teeflow.core.errors import InputError, TeeflowError

if TYPE_CHECKING:
    from teeflow.sdk import Client

JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


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
@click.option("--deadline", default=None,
              help="Fail the task if it is not done within this long, e.g. 30m or 2h "
                   "(signed into the spec; default: the scheduler's --task-deadline).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="With --wait: take the result and write it here as JSON.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy for taking the result (env TEEFLOW_POLICY).")
@click.option("--pool", type=click.IntRange(2, 16), default=None,
              help="Run across this many executors as one pool (docs/scale.md).")
@click.option("--members", default=None,
              help="With --pool: the members' HOST:PORT, comma-separated, the lead first "
                   "(default: the scheduler picks them by the spec's policy).")
@click.pass_context
def submit(ctx: click.Context, datasets: str | None, executor_addr: str | None,
           compute: str | None, params: tuple[str, ...], task_lang: str | None,
           task_type: str | None, seed_params: str | None, wait: bool, deadline: str | None,
           out: Path | None, policy: Path | None, pool: int | None,
           members: str | None) -> None:
    """Submit a task to the scheduler and (by default) wait for it."""
    seconds = None if deadline is None else parse_duration(deadline, "--deadline")
    given = SeedForm(datasets, executor_addr, compute, kv(params, "--param"))
    if seed_params is not None:
        given = apply_seed_form(task_lang, task_type, seed_params, given)
    names = [d.strip() for d in (given.datasets or "").split(",") if d.strip()]
    if not names:
        raise InputError("--datasets: name at least one dataset")
    if not given.compute:
        raise InputError("--compute: name the computation")
    chosen = [m.strip() for m in (members or "").split(",") if m.strip()]
    if chosen and pool is None:
        raise InputError("--members: only with --pool")
    with client(ctx, policy, needs_policy=True) as c:
        task = c.submit(names, given.executor, given.compute, given.params, deadline=seconds,
                        pool=pool, members=chosen or None)
        where = (f"pool of {pool}: {', '.join(task['pool'])}" if pool
                 else f"executor {task['executor']}")
        console.print(f"task [bold]{task['id']}[/] submitted ({task['state']}; {where}); "
                      "waiting for the owners' signatures")
        if not wait:
            console.print(f"follow it with `teeflow wait {task['id']}`", highlight=False)
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
    for line in metrics_lines(result.value):
        console.print(f"  {line}", highlight=False)


@click.command()
@click.option("--name", default=None, help="Register this identity with the scheduler as NAME.")
@click.option("--invite", default=None, envvar="TEEFLOW_INVITE",
              help="The operator's one-time invitation token (env TEEFLOW_INVITE).")
@JSON
@click.pass_context
def init(ctx: click.Context, name: str | None, invite: str | None, as_json: bool) -> None:
    """Make your key pair (owner-only file) and optionally register it with the scheduler.
    The one command that makes a key (`--key FILE`, default ~/.config/teeflow/key.pem)."""
    from teeflow.core.crypto import key_id
    from teeflow.files.keys import load_or_create_key

    s = session(ctx)
    path = key_path(ctx)
    existed = path.exists()
    identity = load_or_create_key(path)
    doc = {"key_file": str(path), "made": not existed,
           "key_id": key_id(identity.public_key()), "public_key": identity.public_key(),
           "encryption_key": identity.encryption_public_key(), "registered_as": None}
    if name:
        with client(ctx, name=name, invite=invite):
            doc["registered_as"] = name
    if as_json:
        echo_json(doc)
        return
    verb = "using" if existed else "made"
    console.print(f"{verb} key {path} (id {doc['key_id']})", highlight=False)
    console.print(f"public key: {identity.public_key()}", highlight=False)
    console.print(f"encryption key: {identity.encryption_public_key()}", highlight=False)
    if name:
        console.print(f"registered as {name!r} with {s.scheduler}", highlight=False)


@click.command()
@click.argument("task_id")
@click.option("--yes", is_flag=True, help="Sign without asking (after showing the spec).")
@JSON
@click.pass_context
def approve(ctx: click.Context, task_id: str, yes: bool, as_json: bool) -> None:
    """Show what a task would do with your data and sign its digest as an owner."""
    _decide(ctx, task_id, "approved", yes, as_json)


@click.command()
@click.argument("task_id")
@click.option("--yes", is_flag=True, help="Refuse without asking (after showing the spec).")
@JSON
@click.pass_context
def reject(ctx: click.Context, task_id: str, yes: bool, as_json: bool) -> None:
    """Refuse a task that uses your data; it will not run."""
    _decide(ctx, task_id, "rejected", yes, as_json)


def policy_summary(policy: dict[str, Any]) -> str:
    """The executor policy a spec carries, in one line: which TEEs, which code."""
    parts = [f"tee {', '.join(policy.get('tee_types', [])) or '-'}",
             "simulated allowed" if policy.get("allow_simulated") else "no simulated",
             "debug allowed" if policy.get("allow_debug") else "no debug",
             f"tcb {', '.join(policy.get('accepted_tcb_status', [])) or '-'}"]
    for tee in ("simulated", "sgx", "tdx", "sev-snp"):
        for field, values in (policy.get(tee) or {}).items():
            if isinstance(values, list):
                shown = ", ".join(str(v)[:16] + ("…" if len(str(v)) > 16 else "")
                                  for v in values)
                parts.append(f"{tee}.{field} in [{shown}]")
            else:
                parts.append(f"{tee}.{field} = {values}")
    return "; ".join(parts)


def show_spec(task: dict[str, Any], names: dict[str, str]) -> None:
    """What an owner signs (`spec_lines`), printed as is: no markup, so no value can
    restyle or hide the rest."""
    for line in spec_lines(task, names):
        console.print(line, highlight=False, markup=False)


def spec_lines(task: dict[str, Any], names: dict[str, str]) -> list[str]:
    """What an owner signs: the computation and its parameters, every dataset with its
    owner, who can open the result, which executors may run it. Every value is the
    initiator's or the scheduler's text: values are quoted, and whoever shows the lines
    shows them as plain text (the console without markup, the dashboard escaped)."""
    from teeflow import compute
    from teeflow.core.audit import ed25519_signer

    out: list[str] = []
    say = out.append
    spec = task["spec"]
    say(f"task {task['id']} asks to run {spec['compute']!r} (code {spec['code_digest'][:16]}…)")
    try:
        comp: compute.Computation | None = compute.get(spec["compute"])
    except TeeflowError:
        comp = None
    given = spec["params"]
    if comp is not None:
        say(f"  {comp.description}")
        for p in comp.all_params or comp.params:
            value = given.get(p.name)
            shown = repr(value) if value is not None else f"{p.default!r} (default)"
            mark = "  <- can reveal rows" if p.name in comp.revealing else ""
            say(f"  param {p.name} = {shown}{mark}")
    for k in given:
        if comp is None or comp.param(k) is None:
            say(f"  param {k!r} = {given[k]!r}")
    for d in spec["datasets"]:
        say(f"  input {d['name']!r} owned by {d['owner']!r} (key {d['owner_key'][:12]}…)")
    for r in spec["receivers"]:
        who = signer_label(ed25519_signer(r["sign_key"]), names)
        say(f"  result sealed to {who} (key {r['sign_key'][:12]}…)")
    say(f"  executor policy: {policy_summary(spec['executor_policy'])}")
    if spec.get("pool"):
        members = ", ".join(repr(m) for m in task.get("pool") or [])
        say(f"  runs across a pool of {spec['pool']} executors, each holding a part of "
            f"every input: {members or 'not picked yet'}")
    say(f"  submitted by {signer_label(ed25519_signer(spec['initiator_key']), names)}; "
        f"executor {task['executor']}")
    if spec.get("deadline"):
        import time

        say(f"  deadline in {(spec['deadline'] - time.time()) / 3600:.1f} h")
    say(f"  spec digest {task['spec_digest']}")
    return out


def _decide(ctx: click.Context, task_id: str, decision: str, yes: bool,
            as_json: bool = False) -> None:
    from teeflow.core import wire

    verb = "approve" if decision == "approved" else "reject"
    if as_json and not yes:
        raise InputError("--json: pass --yes too (the prompt needs the spec shown as text)")
    with client(ctx) as c:
        task = c.task(task_id)
        # what is shown is what is signed: the digest of the spec as displayed
        shown = wire.TaskSpec.from_dict(task["spec"]).digest()
        if not as_json:
            show_spec(task, signer_names(c, [task]))
        if not yes:
            try:
                ok = click.confirm(f"{verb} task {task_id} with your key?", default=False,
                                   err=True)
            except click.exceptions.Abort:
                ok = False
            if not ok:
                raise InputError(f"not signed: you did not confirm; task {task_id} is "
                                 "unchanged (pass --yes to sign without a prompt)")
        state = c.decide(task_id, decision, expect_digest=shown)["state"]
    if as_json:
        echo_json({"task_id": task_id, "decision": decision, "spec_digest": shown,
                   "state": state, "spec": task["spec"]})
        return
    console.print(f"{decision}; task is now {state}")


@click.command()
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy (env TEEFLOW_POLICY).")
@JSON
@click.pass_context
def executors(ctx: click.Context, policy: Path | None, as_json: bool) -> None:
    """Registered executors, each appraised now by you."""
    with client(ctx, policy, needs_policy=True) as c:
        found = c.executors()
    if as_json:
        echo_json(found)
        return
    table = Table(Column("address", no_wrap=True), "verdict", "tee", "measurement",
                  "tcb status")
    for ex in found:
        if ex["verdict"] == "accepted":
            meas = ", ".join(f"{k}={v}" for k, v in ex["measurements"].items())
            tee = ex["tee"] + (" (simulated)" if ex["simulated"] else "")
            table.add_row(ex["address"], "accepted", tee, meas, ex["tcb_status"])
        else:
            table.add_row(ex["address"], "refused", ex["registered_tee"], ex["reason"], "")
    console.print(table)


@click.command()
@JSON
@click.pass_context
def tasks(ctx: click.Context, as_json: bool) -> None:
    """List tasks (full ids: copy them into status, wait, approve)."""
    with client(ctx) as c:
        found = c.tasks()
    if as_json:
        echo_json(found)
        return
    width = max((len(t["id"]) for t in found), default=2)
    table = Table(Column("id", no_wrap=True, min_width=width), "state", "compute",
                  "datasets", "executor", "error")
    for t in found:
        table.add_row(t["id"], t["state"], t["compute"], ",".join(t["datasets"]),
                      t["executor"], t.get("error") or "")
    console.print(table)


def deadline_line(task: dict[str, Any], now: float) -> str:
    deadline = task.get("deadline")
    if deadline is None:
        return ""
    left = deadline - now
    when = f"in {format_span(left)}" if left > 0 else f"passed {format_span(-left)} ago"
    return f"deadline {when} (unix time {int(deadline)})"


def print_task(task: dict[str, Any], names: dict[str, str]) -> None:
    import time

    console.print(f"task [bold]{task['id']}[/]: {task['state']}  ({task['compute']})")
    waiting = (task.get("waiting") or {}).get("text")
    if waiting:
        console.print(f"  {waiting}", highlight=False, markup=False)
    if task["state"] not in ("failed", "cancelled", "rejected", "released") and \
            deadline_line(task, time.time()):
        console.print(f"  {deadline_line(task, time.time())}", highlight=False, markup=False)
    if task.get("error"):
        console.print(f"  error: {task['error']}", highlight=False, markup=False)
    for a in task["assignments"]:
        console.print(f"  {a['dataset']} from {a['node']}: {a['state']} {a['rows']:,} rows"
                      + (f" ({a['error']})" if a.get("error") else ""), highlight=False,
                      markup=False)
    for e in task["events"]:
        console.print(f"  #{e['seq']} {e['event']} (by {signer_label(e['signer'], names)}) "
                      f"{json.dumps(e['detail'])[:200]}", highlight=False, markup=False)


@click.command()
@JSON
@click.argument("task_id")
@click.pass_context
def status(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's state, assignments and history (who signed each step)."""
    with client(ctx) as c:
        task = c.task(task_id)
        if not as_json:  # the task's events name only the key type; the log, the key
            names = signer_names(c, [task])
            signers = {e.seq: e.signer for e in c.audit_log(task_id)}
            for e in task["events"]:
                e["signer"] = signers.get(e["seq"], e["signer"])
    if as_json:
        echo_json(task)
        return
    print_task(task, names)
    if task["state"] in ("failed", "cancelled"):
        sys.exit(1)


@click.command()
@click.argument("task_id")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Then take the result and write it here as JSON.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="With --out: your appraisal policy (env TEEFLOW_POLICY).")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@JSON
@click.pass_context
def wait(ctx: click.Context, task_id: str, out: Path | None, policy: Path | None,
         timeout: float | None, as_json: bool) -> None:
    """Wait for a submitted task (again: after Ctrl-C or `submit --no-wait`), with the
    same progress as `submit`; exits non-zero if it fails."""
    with client(ctx, policy, needs_policy=out is not None) as c:
        task = wait_with_progress(c, task_id, timeout)
        if out is not None:
            _write_result(c, task_id, out)
    if as_json:
        echo_json(task)
    elif out is None:
        console.print(f"task {task_id}: {task['state']}; take it with "
                      f"`teeflow result {task_id} --out FILE`", highlight=False)


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
    with client(ctx, policy, needs_policy=True) as c:
        _write_result(c, task_id, out, digest)


@click.command()
@click.argument("task_id")
@JSON
@click.pass_context
def cancel(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Cancel a task; the executor wipes its inputs."""
    with client(ctx) as c:
        done = c.cancel(task_id)
    if as_json:
        echo_json(done)
        return
    console.print(f"task {task_id}: {done['state']}")


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


def columns_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A catalog entry's columns and Arrow types, from the schema its owner published;
    refused if that schema is not the one its fingerprint (what a spec binds) names."""
    from teeflow.core.schemas import schema_fingerprint, schema_from_b64

    schema = schema_from_b64(entry["schema_b64"])
    if schema_fingerprint(schema) != entry["fingerprint"]:
        raise InputError(f"dataset {entry['name']!r}: its schema does not match its "
                         "fingerprint (the scheduler's catalog is inconsistent)")
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="the whole catalog: columns, rules and fingerprints")
@click.pass_context
def datasets(ctx: click.Context, as_json: bool) -> None:
    """List the dataset catalog: names, owners, sizes, columns and types, analysis rules
    (never rows)."""
    with client(ctx) as c:
        entries = c.datasets()
    for d in entries:
        d["columns"] = columns_of(d)
    if as_json:
        echo_json(entries)
        return
    table = Table(Column("name", no_wrap=True), "owner", "rows", "columns",
                  "analysis rules")
    for d in entries:
        cols = "\n".join(f"{col['name']}: {col['type']}" for col in d["columns"])
        table.add_row(d["name"], d["owner"], f"{d['rows']:,}", cols,
                      rules_summary(d.get("rules")))
    console.print(table)


COMMANDS = (init, submit, tasks, status, wait, result, approve, reject, executors, cancel,
            datasets)
