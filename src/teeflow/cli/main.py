"""The `teeflow` command: daemons (scheduler, provider, executor) and the initiator's CLI.

A thin layer over the SDK and the node packages; every failure prints what went
wrong and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.core.errors import ConfigError, InputError, TeeflowError
from teeflow.files import read_capped

console = Console()
err_console = Console(stderr=True)
DEFAULT_SCHEDULER = "http://127.0.0.1:8700"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _read_toml(path: Path) -> dict[str, Any]:
    raw = read_capped(path, 1024 * 1024, "policy file")
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy file {path}: {exc}") from exc


def load_policy_file(path: Path) -> AppraisalPolicy:
    """A TOML file holding a [policy] table (a provider config works too)."""
    doc = _read_toml(path)
    return load_policy(doc.get("policy", doc), "policy")


def _policy_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    env = os.environ.get("TEEFLOW_POLICY")
    return Path(env) if env else None


@click.group()
@click.option("--scheduler", envvar="TEEFLOW_SCHEDULER", default=DEFAULT_SCHEDULER,
              show_default=True, help="Scheduler URL (env TEEFLOW_SCHEDULER).")
@click.option("--key", "key_file", envvar="TEEFLOW_KEY", type=click.Path(path_type=Path),
              default=None, help="Your signing key (env TEEFLOW_KEY; default "
              "~/.config/teeflow/key.pem, made on first use).")
@click.pass_context
def cli(ctx: click.Context, scheduler: str, key_file: Path | None) -> None:
    """teeflow: multi-party computation in trusted execution environments."""
    ctx.obj = {"scheduler": scheduler, "key": key_file}


def _client(ctx: click.Context, policy: Path | None = None, name: str | None = None):
    """An SDK client; the policy file may also hold a [collateral] table for SGX/TDX."""
    from teeflow.attestation.registry import amd_ark, collateral_source
    from teeflow.sdk import Client

    path = _policy_path(policy)
    pol = collateral = ark = None
    if path is not None:
        pol = load_policy_file(path)
        table = _read_toml(path).get("collateral")
        collateral = collateral_source(table, path.parent)
        ark = amd_ark(table, path.parent)
    return Client(ctx.obj["scheduler"], key=ctx.obj["key"], policy=pol, collateral=collateral,
                  amd_ark=ark, name=name)


# -- daemons ---------------------------------------------------------------
@cli.command()
@click.option("--db", required=True, type=click.Path(path_type=Path), help="SQLite file.")
@click.option("--listen", default="127.0.0.1:8700", show_default=True)
@click.option("--port-file", default=None, help="Write the bound HOST:PORT here.")
def scheduler(db: Path, listen: str, port_file: str | None) -> None:
    """Run the scheduler (HTTP JSON API over a SQLite file)."""
    from teeflow.net.listen import parse_listen
    from teeflow.scheduler.server import serve

    _setup_logging(False)
    host, port = parse_listen(listen)
    serve(str(db), host, port, port_file)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def provider(config_path: Path) -> None:
    """Run a data provider node from its TOML config."""
    from teeflow.provider.config import load_config
    from teeflow.provider.node import Provider

    _setup_logging(False)
    node = Provider(load_config(config_path))
    console.print(f"teeflow provider {node.config.name} polling {node.config.scheduler}")
    node.run_forever()


@cli.command()
@click.option("--tee", default="simulated", show_default=True, help="TEE backend.")
@click.option("--listen", default="127.0.0.1:8815", show_default=True)
@click.option("--port-file", default=None, help="Write the bound HOST:PORT here.")
@click.option("--debug-enclave", is_flag=True, help="Simulated only: mark evidence debug.")
@click.option("--register", "register_with", default=None,
              help="Scheduler URL to register this executor with.")
@click.option("--advertise", default=None, help="HOST:PORT others reach this executor at.")
@click.option("--attestation-dir", default=None, help="sgx: Gramine's /dev/attestation.")
@click.option("--tsm-root", default=None, help="tdx, sev-snp: the configfs-tsm report dir.")
@click.option("--memory-budget", default=None,
              help="Input bytes held in memory (e.g. 2GiB); beyond it inputs spill, sealed.")
@click.option("--spill-dir", default=None, help="Where sealed spill files go (default: TMPDIR).")
def executor(tee: str, listen: str, port_file: str | None, debug_enclave: bool,
             register_with: str | None, advertise: str | None, attestation_dir: str | None,
             tsm_root: str | None, memory_budget: str | None, spill_dir: str | None) -> None:
    """Run a TEE executor (Flight over TLS, key made inside this process)."""
    from teeflow.attestation.registry import make_backend
    from teeflow.executor.server import serve
    from teeflow.net.listen import parse_listen

    _setup_logging(False)
    host, port = parse_listen(listen)
    options: dict[str, Any] = {"debug": True} if debug_enclave else {}
    if tee == "sgx":
        options = {"attestation_dir": attestation_dir}
    elif tee in ("tdx", "sev-snp"):
        options = {"tsm_root": tsm_root}
    budget = parse_size(memory_budget) if memory_budget else None
    serve(make_backend(tee, **options), host, port, port_file, register_with, advertise,
          budget, spill_dir)


def parse_size(text: str) -> int:
    """Bytes from '512MB', '2GiB', '1000000'."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("BIKMG")
    unit = text.strip().upper()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise InputError(f"--memory-budget {text!r} is not a size like 512MB or 2GiB") from None
    if value < 1:
        raise InputError("--memory-budget must be positive")
    return int(value)


# -- initiator -------------------------------------------------------------
def _seed_params(text: str) -> dict[str, str]:
    """The seed's form: `name:TYPE:flag:value,...` (a value may hold ':')."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":", 3)
        if len(parts) != 4:
            raise InputError(f"--params entry {item!r} is not name:TYPE:flag:value")
        out[parts[0]] = parts[3]
    return out


def _kv(values: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise InputError(f"{what} {v!r} is not KEY=VALUE")
        out[key] = value
    return out


@cli.command()
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
    extra = _kv(params, "--param")
    if seed_params is not None:
        if task_lang not in (None, "proto") or task_type not in (None, "6"):
            raise InputError("seed form: only --task_lang=proto --task_type=6 (TEE) is known")
        seed = _seed_params(seed_params)
        datasets = datasets or seed.pop("datasets", "").replace(";", ",")
        executor_addr = executor_addr or seed.pop("server", None)
        compute = compute or seed.pop("compute", "model_aggregation")
        extra = {**seed, **extra}
    names = [d.strip() for d in (datasets or "").split(",") if d.strip()]
    if not names:
        raise InputError("--datasets: name at least one dataset")
    if not compute:
        raise InputError("--compute: name the computation")
    with _client(ctx, policy) as client:
        task = client.submit(names, executor_addr, compute, extra)
        console.print(f"task [bold]{task['id']}[/] submitted ({task['state']}; executor "
                      f"{task['executor']}); waiting for the owners' signatures")
        if not wait:
            return
        _wait_with_progress(client, task["id"])
        if out is not None:
            _write_result(client, task["id"], out)


def _wait_with_progress(client, task_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = {d["name"]: d["rows"] for d in client.datasets()}
    with Progress(TextColumn("{task.description:<10}"), BarColumn(),
                  TextColumn("{task.fields[rows]}"), TimeElapsedColumn(),
                  console=err_console, transient=False) as bar:
        job = bar.add_task("submitted", total=None, rows="")

        def update(task: dict[str, Any]) -> None:
            assignments = task.get("assignments", [])
            rows = sum(a["rows"] for a in assignments)
            want = sum(total.get(a["dataset"], 0) for a in assignments)
            done = task["state"] in ("done", "released")
            bar.update(job, description=task["state"], completed=want if done else rows,
                       total=want or None, rows=f"{rows:,}/{want:,} rows uploaded")

        return client.wait(task_id, on_update=update)


def _write_result(client, task_id: str, out: Path) -> None:
    result = client.result(task_id)
    out.write_bytes(json.dumps(json.loads(result.raw), indent=2).encode())
    mark = " [yellow](SIMULATED TEE: not a hardware attestation)[/]" if result.simulated else ""
    console.print(f"result of {task_id} written to {out}{mark}")


@cli.command()
@click.option("--name", default=None, help="Register this identity with the scheduler as NAME.")
@click.pass_context
def init(ctx: click.Context, name: str | None) -> None:
    """Make your key pair (owner-only file) and optionally register it with the scheduler."""
    from teeflow.core.crypto import key_id
    from teeflow.files.keys import load_or_create_key
    from teeflow.sdk.client import DEFAULT_HOME

    path = (ctx.obj["key"] or DEFAULT_HOME / "key.pem").expanduser()
    existed = path.exists()
    identity = load_or_create_key(path)
    verb = "using" if existed else "made"
    console.print(f"{verb} key {path} (id {key_id(identity.public_key())})")
    console.print(f"public key: {identity.public_key()}")
    console.print(f"encryption key: {identity.encryption_public_key()}")
    if name:
        with _client(ctx, name=name):
            console.print(f"registered as {name!r} with {ctx.obj['scheduler']}")


@cli.command()
@click.argument("task_id")
@click.pass_context
def approve(ctx: click.Context, task_id: str) -> None:
    """Sign a task's digest as the owner of data it uses."""
    _decide(ctx, task_id, "approved")


@cli.command()
@click.argument("task_id")
@click.pass_context
def reject(ctx: click.Context, task_id: str) -> None:
    """Refuse a task that uses your data; it will not run."""
    _decide(ctx, task_id, "rejected")


def _decide(ctx: click.Context, task_id: str, decision: str) -> None:
    with _client(ctx) as client:
        task = client.task(task_id)
        spec = task["spec"]
        console.print(f"task {task_id}: {spec['compute']} (code {spec['code_digest'][:16]}) "
                      f"params {spec['params']}")
        for d in spec["datasets"]:
            console.print(f"  input {d['name']} owned by {d['owner']}")
        for r in spec["receivers"]:
            console.print(f"  result sealed to key {r['sign_key']}")
        console.print(f"  digest {task['spec_digest']}")
        state = client.decide(task_id, decision)["state"]
    console.print(f"{decision}; task is now {state}")


@cli.command()
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy (env TEEFLOW_POLICY).")
@click.pass_context
def executors(ctx: click.Context, policy: Path | None) -> None:
    """Registered executors, each appraised now by you."""
    with _client(ctx, policy) as client:
        table = Table("address", "verdict", "tee", "measurement", "tcb status")
        for ex in client.executors():
            if ex["verdict"] == "accepted":
                meas = ", ".join(f"{k}={v[:16]}…" for k, v in ex["measurements"].items())
                tee = ex["tee"] + (" (simulated)" if ex["simulated"] else "")
                table.add_row(ex["address"], "accepted", tee, meas, ex["tcb_status"])
            else:
                table.add_row(ex["address"], "refused", ex["registered_tee"], ex["reason"], "")
        console.print(table)


@cli.group()
def audit() -> None:
    """The hash-chained audit log."""


@audit.command("verify")
@click.option("--db", type=click.Path(path_type=Path), default=None,
              help="Check a scheduler database file offline (else ask the scheduler).")
@click.pass_context
def audit_verify(ctx: click.Context, db: Path | None) -> None:
    """Check every link and signature; name the first broken entry."""
    from teeflow.core.audit import verify_chain

    if db is not None:
        from teeflow.scheduler.store import Store

        if not db.is_file():
            raise InputError(f"--db {db}: no such file")
        store = Store(db)
        try:
            entries = store.audit_log()
        finally:
            store.close()
    else:
        with _client(ctx) as client:
            entries = client.audit_log()
    count = verify_chain(entries)
    console.print(f"audit log OK: {count} entries, every link and signature verified")


@audit.command("show")
@click.argument("task_id", required=False)
@click.pass_context
def audit_show(ctx: click.Context, task_id: str | None) -> None:
    """Print the audit entries (of one task)."""
    with _client(ctx) as client:
        for e in client.audit_log(task_id):
            console.print(f"#{e.seq} {e.task_id} {e.kind} by {e.signer.split(':')[0]} "
                          f"{json.dumps(e.body)[:160]}", highlight=False)


@cli.command()
@click.pass_context
def tasks(ctx: click.Context) -> None:
    """List tasks."""
    with _client(ctx) as client:
        table = Table("id", "state", "compute", "datasets", "executor", "error")
        for t in client.tasks():
            table.add_row(t["id"], t["state"], t["compute"], ",".join(t["datasets"]),
                          t["executor"], t.get("error") or "")
        console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.argument("task_id")
@click.pass_context
def status(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's state, assignments and history."""
    with _client(ctx) as client:
        task = client.task(task_id)
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


@cli.command()
@click.argument("task_id")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy for the executor (env TEEFLOW_POLICY).")
@click.pass_context
def result(ctx: click.Context, task_id: str, out: Path, policy: Path | None) -> None:
    """Appraise the executor and take a finished task's result (once)."""
    with _client(ctx, policy) as client:
        _write_result(client, task_id, out)


@cli.command()
@click.argument("task_id")
@click.pass_context
def cancel(ctx: click.Context, task_id: str) -> None:
    """Cancel a task; the executor wipes its inputs."""
    with _client(ctx) as client:
        console.print(f"task {task_id}: {client.cancel(task_id)['state']}")


@cli.command()
@click.pass_context
def datasets(ctx: click.Context) -> None:
    """List the dataset catalog (names, owners, sizes; never rows)."""
    with _client(ctx) as client:
        table = Table("name", "owner", "rows", "schema")
        for d in client.datasets():
            table.add_row(d["name"], d["owner"], f"{d['rows']:,}", d["fingerprint"][:12])
        console.print(table)


def _register_more() -> None:
    from teeflow.cli.attest import attest
    from teeflow.cli.demo import demo

    cli.add_command(demo)
    cli.add_command(attest)


def main() -> None:
    _register_more()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TeeflowError as exc:
        err_console.print(f"[red]error[/]: {exc}", highlight=False)
        if "not registered" in str(exc):
            err_console.print("hint: run `teeflow init --name NAME` to register your key")
        sys.exit(1)
    except TimeoutError as exc:
        err_console.print(f"[red]error[/]: {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
