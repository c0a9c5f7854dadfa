"""`teeflow register-executor`: the executor host's operator registers an executor by hand
(the Gramine executor's argv is fixed in its manifest, so it cannot `--register` itself)."""

from __future__ import annotations

import json

import click

from teeflow.cli.common import client, console, echo_json
from teeflow.core.errors import PeerError, TeeflowError


class SchedulerRefused(PeerError):
    code = "scheduler_refused"


@click.command("register-executor")
@click.argument("address")
@click.option("--advertise", default=None, metavar="HOST:PORT",
              help="The address the scheduler and owners reach the executor at "
                   "(default ADDRESS).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def register_executor(ctx: click.Context, address: str, advertise: str | None,
                      as_json: bool) -> None:
    """Register the executor at ADDRESS with the scheduler, under your node key (an
    executor_host member). The executor signs the registration with its attested key."""
    from teeflow.net.executor_client import ExecutorClient, parse_address

    advertised = advertise or address
    parse_address(advertised)
    with client(ctx) as c:
        body = json.dumps({"address": advertised,
                           "node_key": c.identity.public_key()}).encode()
        with ExecutorClient(address, None) as ex:  # unpinned: the scheduler checks it all
            answer = ex.action_json("registration", body)
        try:
            done = c.scheduler.register_executor(answer["address"], answer["cert_pem"],
                                                 answer["signature"])
        except TeeflowError as exc:
            raise SchedulerRefused(f"scheduler refused executor {advertised}: {exc}") from exc
    if as_json:
        echo_json({"address": advertised, **done})
        return
    console.print(f"registered executor {advertised}", highlight=False)


COMMANDS = (register_executor,)
