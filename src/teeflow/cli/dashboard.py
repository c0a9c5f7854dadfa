"""`teeflow dashboard`: this party's web pages, served on loopback with its own key."""

from __future__ import annotations

from pathlib import Path

import click

from teeflow.cli.common import client
from teeflow.core.errors import InputError


@click.command()
@click.option("--listen", default="127.0.0.1:8790", show_default=True,
              help="Loopback HOST:PORT (port 0: any free one).")
@click.option("--port-file", default=None, help="Write the bound HOST:PORT here.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Your appraisal policy (env TEEFLOW_POLICY): executors, submit, results.")
@click.pass_context
def dashboard(ctx: click.Context, listen: str, port_file: str | None,
              policy: Path | None) -> None:
    """Serve your dashboard: tasks, approvals, datasets, executors, the audit log. Prints
    the URL to open (with its one-time token); only this machine can reach it."""
    from teeflow.dashboard.serve import check_loopback, serve
    from teeflow.net.listen import parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError:
        raise InputError(f"--listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:8790, "
                         "port 0 for any free one)") from None
    check_loopback(host)
    with client(ctx, policy, needs_policy=True) as c:
        serve(c, host, port, port_file)
