"""The `teeflow` command: the group and its global options, with every command registered.

The commands live by job: `daemons` (scheduler, provider, executor), `initiator`
(keys, tasks, consent, results), `audit`, `attest`, `budget`, `demo`; what they share is in
`common`. Nothing imports this module; it imports them.
"""

from __future__ import annotations

from pathlib import Path

import click

from teeflow.cli import daemons, initiator, register
from teeflow.cli.attest import attest
from teeflow.cli.audit import audit
from teeflow.cli.budget import budget
from teeflow.cli.catalog import computations
from teeflow.cli.common import DEFAULT_SCHEDULER, Session, TeeflowGroup, run, version
from teeflow.cli.dashboard import dashboard
from teeflow.cli.demo import demo
from teeflow.cli.doctor import doctor


@click.group(cls=TeeflowGroup)
@click.version_option(version(), "--version", prog_name="teeflow")
@click.option("--scheduler", envvar="TEEFLOW_SCHEDULER", default=DEFAULT_SCHEDULER,
              show_default=True, help="Scheduler URL (env TEEFLOW_SCHEDULER).")
@click.option("--key", "key_file", envvar="TEEFLOW_KEY", type=click.Path(path_type=Path),
              default=None, help="Your signing key (env TEEFLOW_KEY; default "
              "~/.config/teeflow/key.pem; only `teeflow init` makes one). Both options "
              "may also follow the subcommand.")
@click.pass_context
def cli(ctx: click.Context, scheduler: str, key_file: Path | None) -> None:
    """teeflow: multi-party computation in trusted execution environments."""
    ctx.obj = Session(scheduler=scheduler, key=key_file)


for command in (*daemons.COMMANDS, *initiator.COMMANDS, *register.COMMANDS, audit, attest,
                budget, demo, computations, doctor, dashboard):
    cli.add_command(command)


def main() -> None:
    run(cli)


if __name__ == "__main__":
    main()
