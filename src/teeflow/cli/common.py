"""What every `teeflow` command shares: consoles, the session the group sets up,
policy loading, the SDK client, and the one place failures become exit codes.

Imports no command module (and never `teeflow.cli.main`): the command modules
import this, `main` imports them.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.core.errors import ConfigError, InputError, TeeflowError
from teeflow.files import read_capped

if TYPE_CHECKING:
    from teeflow.sdk import Client

console = Console()
err_console = Console(stderr=True)
SCHEDULER_LISTEN = "127.0.0.1:8700"
DEFAULT_SCHEDULER = f"https://{SCHEDULER_LISTEN}"  # + "#sha256:..." from your invitation
MAX_POLICY_FILE = 1024 * 1024


@dataclass(frozen=True)
class Session:
    """What the `teeflow` group's own options say: which scheduler, which key."""

    scheduler: str
    key: Path | None


def session(ctx: click.Context) -> Session:
    obj = ctx.find_object(Session)
    if obj is None:  # pragma: no cover - the group always sets it
        raise click.UsageError("no teeflow session; run the command through `teeflow`")
    return obj


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(verbose: bool) -> None:
    """Log to stderr at INFO (DEBUG if `verbose`), or at TEEFLOW_LOG_LEVEL if it is set."""
    level = os.environ.get("TEEFLOW_LOG_LEVEL", "").strip().upper() or \
        ("DEBUG" if verbose else "INFO")
    if level not in LOG_LEVELS:
        raise ConfigError(f"TEEFLOW_LOG_LEVEL: one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def kv(values: tuple[str, ...], what: str) -> dict[str, str]:
    """`KEY=VALUE` options (`--param`) as a dict; `what` names the option in errors."""
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise InputError(f"{what} {v!r} is not KEY=VALUE")
        out[key] = value
    return out


# -- policy files ----------------------------------------------------------------------------
def read_toml(path: Path) -> dict[str, Any]:
    raw = read_capped(path, MAX_POLICY_FILE, "policy file")
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy file {path}: {exc}") from exc


def policy_from_doc(doc: dict[str, Any]) -> AppraisalPolicy:
    """The [policy] table of a parsed file, or the whole file if it has none."""
    return load_policy(doc.get("policy", doc), "policy")


def load_policy_file(path: Path) -> AppraisalPolicy:
    """A TOML file holding a [policy] table (a provider config works too)."""
    return policy_from_doc(read_toml(path))


def policy_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    env = os.environ.get("TEEFLOW_POLICY")
    return Path(env) if env else None


def client(ctx: click.Context, policy: Path | None = None, name: str | None = None,
           invite: str | None = None) -> Client:
    """An SDK client; the policy file may also hold a [collateral] table for SGX/TDX."""
    from teeflow.attestation.registry import amd_ark, collateral_source
    from teeflow.sdk import Client

    path = policy_path(policy)
    pol = collateral = ark = None
    if path is not None:
        doc = read_toml(path)
        pol = policy_from_doc(doc)
        table = doc.get("collateral")
        collateral = collateral_source(table, path.parent)
        ark = amd_ark(table, path.parent)
    s = session(ctx)
    return Client(s.scheduler, key=s.key, policy=pol, collateral=collateral, amd_ark=ark,
                  name=name, invite=invite)


def wait_with_progress(client: Client, task_id: str) -> dict[str, Any]:
    """`client.wait` with a progress bar of uploaded rows on stderr."""
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


# -- exit codes ------------------------------------------------------------------------------
def run(group: click.Group) -> None:
    """Run the command line; every failure prints what went wrong and exits non-zero:
    130 when aborted, click's own code for usage errors, 1 for everything else."""
    try:
        group(standalone_mode=False)
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
