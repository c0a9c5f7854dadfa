"""What every `teeflow` command shares: consoles, the session the group sets up,
policy loading, the SDK client, and the one place failures become exit codes.

Imports no command module (and never `teeflow.cli.main`): the command modules
import this, `main` imports them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.core.errors import ConfigError, InputError, TeeflowError
from teeflow.files import read_capped

if TYPE_CHECKING:
    from teeflow.sdk import Client

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, whole
SCHEDULER_LISTEN = "127.0.0.1:8700"
DEFAULT_SCHEDULER = f"https://{SCHEDULER_LISTEN}"  # + "#sha256:..." from your invitation
MAX_POLICY_FILE = 1024 * 1024


@dataclass(frozen=True)
class Session:
    """What the `teeflow` group's own options say: which scheduler, which key."""

    scheduler: str
    key: Path | None


def version() -> str:
    """The installed teeflow's version (the source tree's when run uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("teeflow")
    except PackageNotFoundError:  # pragma: no cover - run from a bare source tree
        return "unknown (not installed)"


# Options of the `teeflow` group that a user may also write after the subcommand
# (`teeflow approve ID --key alice.key`); no subcommand has an option of these names.
GLOBAL_OPTIONS = ("--scheduler", "--key")


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with every group option found after the subcommand moved in front of it."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in arg or i + 1 == len(args):
                front.append(arg)
                i += 1
            else:
                front.extend(args[i:i + 2])
                i += 2
            continue
        rest.append(arg)
        i += 1
    return front + rest


class TeeflowGroup(click.Group):
    """The `teeflow` group: its own options are accepted after the subcommand too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(list(args)))


def echo_json(value: Any) -> None:
    """What `--json` prints: one JSON document on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


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


def read_policy_doc(given: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The policy file (`--policy`, else TEEFLOW_POLICY) and its parsed TOML, or None; an
    error names where the path came from, so a stale variable is found at once."""
    path = policy_path(given)
    if path is None:
        return None
    try:
        doc = read_toml(path)
        policy_from_doc(doc)
    except ConfigError as exc:
        source = "--policy" if given is not None else "TEEFLOW_POLICY"
        raise ConfigError(f"{source}: {exc}") from exc
    return path, doc


def key_path(ctx: click.Context) -> Path:
    from teeflow.sdk.client import DEFAULT_HOME

    return (session(ctx).key or DEFAULT_HOME / "key.pem").expanduser()


def require_key(ctx: click.Context) -> Path:
    """The key file this command signs with; a missing one is an error, never made here
    (only `teeflow init` makes a key: a mistyped --key must not become a new identity)."""
    path = key_path(ctx)
    if not path.is_file():
        given = "--key" if session(ctx).key is not None else "default key"
        raise ConfigError(f"{given} {path}: no such key file (check the path; "
                          "`teeflow init` makes a new key)")
    return path


def client(ctx: click.Context, policy: Path | None = None, name: str | None = None,
           invite: str | None = None, needs_policy: bool = False) -> Client:
    """An SDK client; the policy file may also hold a [collateral] table for SGX/TDX.
    TEEFLOW_POLICY is read only by commands that appraise (`needs_policy`), so a stale
    one breaks nothing else."""
    from teeflow.attestation.registry import amd_ark, collateral_source
    from teeflow.sdk import Client

    found = read_policy_doc(policy) if (needs_policy or policy is not None) else None
    pol = collateral = ark = None
    if found is not None:
        path, doc = found
        pol = policy_from_doc(doc)
        table = doc.get("collateral")
        collateral = collateral_source(table, path.parent)
        ark = amd_ark(table, path.parent)
    s = session(ctx)
    key = require_key(ctx)
    return Client(s.scheduler, key=key, policy=pol, collateral=collateral, amd_ark=ark,
                  name=name, invite=invite)


def metrics_lines(value: dict[str, Any]) -> list[str]:
    """A model's metrics, each saying which rows it was measured on: `metrics` are on the
    training rows (optimistic), `test_metrics` on the held-out rows."""
    out = []
    for key, where in (("metrics", "training set"), ("test_metrics", "held-out test set")):
        for name, v in (value.get(key) or {}).items():
            if isinstance(v, int | float):
                out.append(f"{name} ({where}): {v:.4f}")
    if value.get("metrics") and not value.get("test_metrics"):
        out.append("(training-set figures: no rows held out; --param test_fraction=0.2 "
                   "gives held-out ones)")
    return out


def signer_label(signer: str, names: dict[str, str]) -> str:
    """Who signed an audit entry or event: the member's name when known, else its kind."""
    if signer in names:
        return names[signer]
    kind = signer.split(":", 1)[0]
    return {"p256": "the executor", "ed25519": "an unknown member"}.get(kind, kind or "-")


def signer_names(c: Client, tasks: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """Audit signer -> name: owners and initiators as the signed specs name them, then the
    scheduler's member list (its word only; a spec's name wins)."""
    from teeflow.core.audit import ed25519_signer

    names: dict[str, str] = {}
    try:
        for n in c.scheduler.nodes():
            names[ed25519_signer(n["public_key"])] = n["name"]
    except TeeflowError:
        pass
    for t in tasks or []:
        spec = t.get("spec") or {}
        for d in spec.get("datasets", []):
            names[ed25519_signer(d["owner_key"])] = f"{d['owner']} (owner)"
        me = ed25519_signer(spec.get("initiator_key", ""))
        if not names.get(me, "").endswith("(owner)"):
            names[me] = f"{names[me]} (initiator)" if me in names else "the initiator"
    return names


def wait_with_progress(client: Client, task_id: str,
                       timeout: float | None = None) -> dict[str, Any]:
    """`client.wait` with a progress bar of uploaded rows on stderr (`submit`, `wait`)."""
    total = {d["name"]: d["rows"] for d in client.datasets()}
    err_console.print(f"waiting for task {task_id} (Ctrl-C stops waiting, not the task)",
                      highlight=False, markup=False)
    try:
        return _progress(client, task_id, timeout, total)
    except KeyboardInterrupt:
        err_console.print(f"stopped waiting; the task goes on: `teeflow wait {task_id}` "
                          "resumes", highlight=False, markup=False)
        raise click.exceptions.Abort() from None


def _progress(client: Client, task_id: str, timeout: float | None,
              total: dict[str, int]) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<10}"), BarColumn(),
                  TextColumn("{task.fields[rows]}"), TimeElapsedColumn(),
                  console=err_console, transient=False) as bar:
        job = bar.add_task("submitted", total=None, rows="")

        said: list[Any] = [None]

        def update(task: dict[str, Any]) -> None:
            waiting = task.get("waiting") or {}
            # the line again only when who or what it waits for changes, not every tick
            who = [(w["who"], w["what"]) for w in waiting.get("for", [])]
            if who and who != said[0]:
                bar.console.print(waiting.get("text", ""), highlight=False, markup=False)
            said[0] = who
            assignments = task.get("assignments", [])
            rows = sum(a["rows"] for a in assignments)
            want = sum(total.get(a["dataset"], 0) for a in assignments)
            done = task["state"] in ("done", "released")
            bar.update(job, description=task["state"], completed=want if done else rows,
                       total=want or None, rows=f"{rows:,}/{want:,} rows uploaded")

        return client.wait(task_id, timeout=timeout, on_update=update)


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
    except TeeflowError as exc:  # escaped: a message may quote [tables] or a peer's text
        err_console.print(f"[red]error[/]: {escape(str(exc))}", highlight=False)
        if "not registered" in str(exc):
            err_console.print("hint: run `teeflow init --name NAME` to register your key")
        sys.exit(1)
    except TimeoutError as exc:
        err_console.print(f"[red]error[/]: {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except OSError as exc:  # a file or socket of this machine: name it, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        err_console.print(f"[red]error[/]: {escape(str(exc.strerror or exc) + where)}",
                          highlight=False)
        sys.exit(1)
