"""`teeflow budget`: a data owner's privacy budgets, read from its own provider's config and
budget file (never from the scheduler, which holds no budget)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from teeflow.cli.common import console


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="Your provider's TOML config.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def budget(config_path: Path, as_json: bool) -> None:
    """Per dataset: the privacy budget (epsilon), what is spent, what is left, and the tasks
    (spec digests) that spent it."""
    from teeflow.provider.budget import Ledger, summarize
    from teeflow.provider.config import load_config

    config = load_config(config_path)
    privacy = {d.name: d.privacy for d in config.datasets}
    path = config.budget_path
    if path.exists():
        ledger = Ledger(path)
        try:
            report = ledger.report(privacy)
        finally:
            ledger.close()
    else:  # nothing signed yet; do not create the file
        report = summarize(privacy, lambda _: [])
    if as_json:
        click.echo(json.dumps({"budget_file": str(path), "datasets": report}, indent=2))
        return
    table = Table("dataset", "budget ε", "spent ε", "remaining ε", "per task", "DP only",
                  "identity", "tasks")
    for r in report:
        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:g}"
        table.add_row(r["dataset"], num(r["epsilon_budget"]), num(r["spent"]),
                      num(r["remaining"]), num(r["max_epsilon_per_task"]),
                      "yes" if r["required"] else "no", r["identity"] or "-",
                      str(len(r["spends"])))
    console.print(table)
    for r in report:
        for s in r["spends"]:
            console.print(f"  {r['dataset']}: ε {s['epsilon']:g} by task {s['task_id']} "
                          f"(spec {s['spec_digest']})", highlight=False)


COMMANDS = (budget,)
