"""`teeflow scheduler`, `teeflow provider`, `teeflow executor`: the three node roles.

Each command parses its flags and hands over to the role's own package; a daemon
runs until it is stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from teeflow.cli.common import SCHEDULER_LISTEN, console, echo_json, setup_logging
from teeflow.core.durations import parse_duration
from teeflow.core.errors import InputError

EXECUTOR_LISTEN = "127.0.0.1:8815"


@click.group(invoke_without_command=True)
@click.option("--db", type=click.Path(path_type=Path), help="SQLite file.")
@click.option("--listen", default=SCHEDULER_LISTEN, show_default=True)
@click.option("--port-file", default=None, help="Write the bound HOST:PORT here.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the scheduler's TLS certificate and keys live (default: the "
                   "db file's directory); made on first start.")
@click.option("--members", type=click.Path(path_type=Path), default=None,
              help="TOML list of member keys with roles, admitted without an invitation.")
@click.option("--task-deadline", default="1h", show_default=True,
              help="Deadline of a task whose spec names none, from its submission.")
@click.option("--executor-grace", default="60s", show_default=True,
              help="How long an executor may not answer before its live tasks fail.")
@click.pass_context
def scheduler(ctx: click.Context, db: Path | None, listen: str, port_file: str | None,
              data_dir: Path | None, members: Path | None, task_deadline: str,
              executor_grace: str) -> None:
    """Run the scheduler (HTTPS JSON API over a SQLite file); `invite` makes invitations."""
    if ctx.invoked_subcommand is not None:
        return
    if db is None:
        raise click.UsageError("Missing option '--db'.")
    from teeflow.scheduler.server import serve

    deadline = parse_duration(task_deadline, "--task-deadline")
    grace = parse_duration(executor_grace, "--executor-grace")
    setup_logging(False)
    host, port = listen_address(listen)
    check_db(db)
    serve(str(db), host, port, port_file, str(data_dir) if data_dir else None,
          str(members) if members else None, task_deadline=deadline, executor_grace=grace)


@scheduler.command("invite")
@click.option("--db", required=True, type=click.Path(path_type=Path), help="SQLite file.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="The scheduler's data dir (default: the db file's directory).")
@click.option("--role", "roles", multiple=True, required=True,
              type=click.Choice(["owner", "initiator", "executor_host", "auditor"]),
              help="A role the invited node gets (repeatable).")
@click.option("--name", default=None, help="The only node name the invitation admits.")
@click.option("--ttl", default="7d", show_default=True, help="How long it stays valid.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def invite(db: Path, data_dir: Path | None, roles: tuple[str, ...], name: str | None,
           ttl: str, as_json: bool) -> None:
    """Make a one-time invitation: a token and the certificate fingerprint to pin."""
    from teeflow.core.checkpoint import origin_of, verifier_key
    from teeflow.scheduler.identity import load_or_create
    from teeflow.scheduler.store import Store

    check_db(db)  # a mistyped directory must not become a second scheduler's
    ident = load_or_create(data_dir or db.resolve().parent)
    store = Store(db)
    try:
        token = store.invite(roles, name, parse_duration(ttl, "--ttl"))
    finally:
        store.close()
    log_key = ident.signer().public_key()
    if as_json:
        echo_json({"invitation": token, "scheduler_certificate": ident.fingerprint,
                   "log_key": verifier_key(origin_of(log_key), log_key),
                   "roles": sorted(roles), "name": name})
        return
    click.echo(f"invitation: {token}")
    click.echo(f"scheduler certificate: {ident.fingerprint}")
    click.echo(f"log key: {verifier_key(origin_of(log_key), log_key)} (nodes check every "
               "checkpoint against the first they see; compare it with this)")
    click.echo(f"join with: --scheduler https://HOST:PORT#{ident.fingerprint} "
               f"--invite {token}")


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--invite", default=None, envvar="TEEFLOW_INVITE",
              help="The operator's invitation token (else the config's node.invite).")
def provider(config_path: Path, invite: str | None) -> None:
    """Run a data provider node from its TOML config."""
    import dataclasses

    from teeflow.provider.config import load_config
    from teeflow.provider.node import Provider

    setup_logging(False)
    config = load_config(config_path)
    if invite:
        config = dataclasses.replace(config, invite=invite)
    node = Provider(config)
    console.print(f"teeflow provider {node.config.name} polling {node.config.scheduler}")
    node.run_forever()


@click.command()
@click.option("--tee", default="simulated", show_default=True, help="TEE backend.")
@click.option("--listen", default=EXECUTOR_LISTEN, show_default=True)
@click.option("--port-file", default=None, help="Write the bound HOST:PORT here.")
@click.option("--debug-enclave", is_flag=True, help="Simulated only: mark evidence debug.")
@click.option("--register", "register_with", default=None,
              help="Scheduler URL (pinned: https://HOST:PORT#sha256:...) to register with.")
@click.option("--invite", default=None, envvar="TEEFLOW_INVITE",
              help="The operator's invitation token (role executor_host).")
@click.option("--advertise", default=None, help="HOST:PORT others reach this executor at.")
@click.option("--attestation-dir", default=None, help="sgx: Gramine's /dev/attestation.")
@click.option("--tsm-root", default=None, help="tdx, sev-snp: the configfs-tsm report dir.")
@click.option("--memory-budget", default=None,
              help="Input bytes held in memory (e.g. 2GiB); beyond it inputs spill, sealed.")
@click.option("--spill-dir", default=None,
              help="Root of sealed spill files (default: TMPDIR); dead runs' are wiped at start.")
@click.option("--state-dir", default=None,
              help="Where finished results wait, sealed, across restarts "
                   "(default: SPILL_DIR/state with --spill-dir, else memory only).")
@click.option("--result-ttl", default="7d", show_default=True,
              help="How long an untaken result is kept (e.g. 12h, 7d, 3600s).")
@click.option("--upload-idle-timeout", default="60s", show_default=True,
              help="An upload silent this long is cut and its task failed (e.g. 30s, 5m).")
@click.option("--collateral-bundle", default=None,
              help="Pool tasks: Intel collateral (JSON bundle) to appraise SGX/TDX members.")
@click.option("--pccs-url", default=None,
              help="Pool tasks: a PCCS to fetch Intel collateral from (instead of a bundle).")
@click.option("--amd-ark", default=None,
              help="Pool tasks: the AMD root key (PEM) to appraise SEV-SNP members.")
@click.option("--pool-host", default=None,
              help="Pool tasks: the IP address of this machine the Dask links listen on, "
                   "where the other members reach them (default: 127.0.0.1).")
@click.option("--pool-ports", default=None,
              help="Pool tasks: LO-HI, the ports the Dask links may use (default: any).")
def executor(tee: str, listen: str, port_file: str | None, debug_enclave: bool,
             register_with: str | None, invite: str | None, advertise: str | None,
             attestation_dir: str | None,
             tsm_root: str | None, memory_budget: str | None, spill_dir: str | None,
             state_dir: str | None, result_ttl: str, upload_idle_timeout: str,
             collateral_bundle: str | None, pccs_url: str | None,
             amd_ark: str | None, pool_host: str | None, pool_ports: str | None) -> None:
    """Run a TEE executor (Flight over TLS, key made inside this process)."""
    from teeflow.attestation.registry import make_backend
    from teeflow.executor.server import serve

    setup_logging(False)
    host, port = listen_address(listen)
    if spill_dir is not None:  # made when missing, as the spill code would; named if it can't
        try:
            Path(spill_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--spill-dir {spill_dir}: cannot create this directory "
                             f"({exc.strerror or type(exc).__name__})") from None
    for option, path in (("--attestation-dir", attestation_dir), ("--tsm-root", tsm_root)):
        if path is not None and not Path(path).is_dir():
            raise InputError(f"{option} {path}: no such directory")
    if register_with:
        from teeflow.net.scheduler_client import split_pin

        split_pin(register_with)  # a plain-HTTP or unpinned URL fails now, not in the thread
    options: dict[str, Any] = {"debug": True} if debug_enclave else {}
    if tee == "sgx":
        options = {"attestation_dir": attestation_dir}
    elif tee in ("tdx", "sev-snp"):
        options = {"tsm_root": tsm_root}
    budget = parse_size(memory_budget) if memory_budget else None
    verifiers = peer_verifiers(collateral_bundle, pccs_url, amd_ark)
    from teeflow.executor.pool.links import parse_links

    links = parse_links(pool_host, pool_ports)
    backend = make_backend(tee, **options)
    print_measurement(backend)
    serve(backend, host, port, port_file, register_with, advertise,
          budget, spill_dir, invite=invite, state_dir=state_dir, verifiers=verifiers,
          pool_links=links,
          result_ttl=parse_duration(result_ttl),
          upload_idle_timeout=parse_duration(upload_idle_timeout, "--upload-idle-timeout"))


def peer_verifiers(bundle: str | None, pccs_url: str | None, ark: str | None) -> dict[str, Any]:
    """The verifiers an executor appraises its pool peers with: simulated evidence, plus
    SGX/TDX with Intel collateral, plus SEV-SNP with an AMD root; read now, so a bad file
    stops the executor before it serves."""
    from teeflow.attestation import registry

    raw: dict[str, str] = {}
    for field, value in (("bundle", bundle), ("pccs_url", pccs_url), ("amd_ark", ark)):
        if value is not None:
            raw[field] = value
    if not raw:
        return registry.make_verifiers()
    where = "executor collateral"
    return registry.make_verifiers(registry.collateral_source(raw, Path.cwd(), where),
                                   registry.amd_ark(raw, Path.cwd(), where))


def listen_address(text: str) -> tuple[str, int]:
    """`--listen HOST:PORT`, checked now: a malformed address or a port another process
    holds is a named error, not a traceback from deep in the server."""
    import errno

    from teeflow.net.listen import bind, parse_listen

    try:
        host, port = parse_listen(text)
    except ValueError:
        raise InputError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:8700, "
                         "port 0 for any free one)") from None
    if port != 0:
        try:
            bind(host, port).close()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(f"--listen {text}: port {port} is already in use (another "
                                 "process listens there; stop it or pick another port)"
                                 ) from None
            raise InputError(f"--listen {text}: cannot listen there "
                             f"({exc.strerror or exc})") from None
    return host, port


def check_db(db: Path) -> None:
    """The scheduler's SQLite file must be one it can write (made if absent)."""
    import sqlite3

    if db.is_dir():
        raise InputError(f"--db {db}: is a directory, not a database file")
    if not db.parent.is_dir():
        raise InputError(f"--db {db}: directory {db.parent} does not exist")
    try:
        conn = sqlite3.connect(db)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise InputError(f"--db {db}: cannot write to it ({exc})") from None


def print_measurement(backend: Any) -> None:
    """The executor's own measurement: the value each owner puts in its policy
    (`[policy.<tee>]`). Read from evidence over zero report data, unverified."""
    from teeflow.attestation.describe import claimed_measurements
    from teeflow.core.errors import TeeflowError

    try:
        evidence = backend.evidence(bytes(64))
        found = claimed_measurements(evidence.tee, evidence.quote)
    except (TeeflowError, OSError) as exc:
        click.echo(f"teeflow executor ({backend.tee}): measurement not readable: {exc}")
        return
    for name, value in found.items():
        # plain, one line: it is copied into policies
        click.echo(f"teeflow executor ({backend.tee}) {name} = {value}  (owners put this in "
                   f"[policy.{backend.tee}] {name} = [...])")


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


COMMANDS = (scheduler, provider, executor)
