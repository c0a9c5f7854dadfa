"""`teeflow doctor`: check a node's setup before it is needed, one line per check.

The config parses; the key file exists and loads (never made here); the scheduler answers
over HTTPS with the pinned certificate; this machine's clock agrees with the scheduler's
(signed requests outside the window are refused); the key is a member; and the node's
policy, appraised against every registered executor, accepts or refuses each, with the
reason. Exit 1 if any check fails. Reads nothing but the node's own files and the
scheduler's and executors' answers; sends no signature that consents to anything.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from teeflow.cli.common import console, echo_json, key_path, read_policy_doc, session
from teeflow.core.errors import TeeflowError

MAX_SKEW = 30.0  # seconds; the scheduler refuses signed requests beyond auth.WINDOW


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Node:
    """What the checks need, from a provider config or from --key/--scheduler/--policy."""

    key_file: Path
    scheduler: str
    policy: Any = None
    verifiers: Any = None


def _node(ctx: click.Context, config: Path | None, policy: Path | None,
          checks: list[Check]) -> Node | None:
    from teeflow.attestation.registry import amd_ark, collateral_source, make_verifiers
    from teeflow.cli.common import policy_from_doc

    if config is not None:
        from teeflow.provider.config import load_config

        try:
            cfg = load_config(config)
        except TeeflowError as exc:
            checks.append(Check("config", False, str(exc)))
            return None
        checks.append(Check("config", True, f"{config}: node {cfg.name}, "
                            f"{len(cfg.datasets)} dataset(s)"))
        for d in cfg.datasets:
            exists = Path(d.path).is_file()
            checks.append(Check(f"dataset {d.name}", exists, f"{d.path}" if exists else
                                f"{d.path}: no such file (the node would offer it to no one)"))
        return Node(cfg.key_file, cfg.scheduler, cfg.policy,
                    make_verifiers(cfg.collateral, cfg.amd_ark))
    node = Node(key_path(ctx), session(ctx).scheduler)
    try:
        found = read_policy_doc(policy)
    except TeeflowError as exc:
        checks.append(Check("policy file", False, str(exc)))
        return node
    if found is not None:
        path, doc = found
        table = doc.get("collateral")
        node.policy = policy_from_doc(doc)
        node.verifiers = make_verifiers(collateral_source(table, path.parent),
                                        amd_ark(table, path.parent))
        checks.append(Check("policy file", True, str(path)))
    return node


def _reach(url: str, checks: list[Check]) -> bool:
    """The scheduler over HTTPS, pinned; then its clock against ours."""
    import httpx

    from teeflow.net.scheduler_client import pinned_context, split_pin

    try:
        base, pin = split_pin(url)
        parsed = httpx.URL(base)
        host, port = parsed.host, parsed.port or 443
        ctx = pinned_context(host, port, pin)
        with httpx.Client(verify=ctx, timeout=10.0) as http:
            before = time.time()
            resp = http.get(f"{base}/v1/health")
            after = time.time()
    except (TeeflowError, httpx.HTTPError) as exc:
        checks.append(Check("scheduler", False, f"{url}: {exc}"))
        return False
    if resp.status_code != 200:
        checks.append(Check("scheduler", False, f"{base}/v1/health answered "
                            f"{resp.status_code}"))
        return False
    checks.append(Check("scheduler", True, f"{base} answers; certificate matches {pin[:19]}…"))
    date = resp.headers.get("date")
    if not date:
        checks.append(Check("clock", False, "the scheduler sent no Date header to compare"))
        return True
    theirs = email.utils.parsedate_to_datetime(date).timestamp()
    # Date has one-second resolution: compare with the middle of the request
    skew = (before + after) / 2 - theirs
    ok = abs(skew) <= MAX_SKEW + 1
    ahead = "ahead of" if skew > 0 else "behind"
    checks.append(Check("clock", ok, f"this machine is {abs(skew):.0f}s {ahead} the "
                        "scheduler" + ("" if ok else f" (over {MAX_SKEW:.0f}s: signed "
                                       "requests may be refused; fix the clock, e.g. NTP)")))
    return True


def _member_and_executors(node: Node, identity: Any, checks: list[Check]) -> None:
    from teeflow.files.checkpoints import checkpoint_path
    from teeflow.net.executor_client import attested_connect
    from teeflow.net.scheduler_client import SchedulerClient

    try:
        with SchedulerClient(node.scheduler, identity,
                             checkpoints=checkpoint_path(node.key_file)) as sc:
            me = identity.public_key()
            name = next((n["name"] for n in sc.nodes() if n["public_key"] == me), None)
            registered = sc.executors()
    except TeeflowError as exc:
        checks.append(Check("membership", False, str(exc)))
        return
    checks.append(Check("membership", True, f"this key is member {name!r}" if name
                        else "this key is a member"))
    if node.policy is None:
        checks.append(Check("executors", True, f"{len(registered)} registered; no policy "
                            "given (--config, --policy or TEEFLOW_POLICY) to appraise them"))
        return
    if not registered:
        checks.append(Check("executors", False, "none is registered with the scheduler"))
    for ex in registered:
        try:
            client, claims = attested_connect(ex["address"], node.policy, node.verifiers)
            client.close()
        except TeeflowError as exc:
            checks.append(Check(f"executor {ex['address']}", False, f"refused: {exc}"))
            continue
        meas = ", ".join(f"{k}={v[:16]}…" for k, v in claims.measurements.items())
        sim = " (simulated)" if claims.simulated else ""
        checks.append(Check(f"executor {ex['address']}", True,
                            f"accepted: {claims.tee}{sim} {meas}"))


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="A provider's TOML config (its key, scheduler and policy); without it, "
                   "--key, --scheduler and --policy / TEEFLOW_POLICY.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Without --config: the policy to appraise executors with.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def doctor(ctx: click.Context, config_path: Path | None, policy: Path | None,
           as_json: bool) -> None:
    """Check a node: config, key, scheduler reachable (pinned), clock, membership, and
    its policy against every registered executor. Exit 1 if any check fails."""
    from teeflow.files.keys import load_key

    checks: list[Check] = []
    node = _node(ctx, config_path, policy, checks)
    identity = None
    if node is not None:
        if not node.key_file.is_file():
            checks.append(Check("key", False, f"{node.key_file}: no such key file (check the "
                                "path; `teeflow init` or a provider's first start makes one)"))
        else:
            try:
                identity = load_key(node.key_file)
                checks.append(Check("key", True, f"{node.key_file} loads"))
            except TeeflowError as exc:
                checks.append(Check("key", False, str(exc)))
        if _reach(node.scheduler, checks) and identity is not None:
            _member_and_executors(node, identity, checks)
    failed = [c for c in checks if not c.ok]
    if as_json:
        echo_json({"ok": not failed, "checks": [vars(c) for c in checks]})
    else:
        for c in checks:
            mark = "[green]ok[/]  " if c.ok else "[red]FAIL[/]"
            console.print(f"{mark} {c.name}: ", end="")
            console.print(c.detail, highlight=False, markup=False)
        console.print(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise SystemExit(1)
