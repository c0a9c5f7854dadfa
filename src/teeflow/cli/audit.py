"""`teeflow audit`: check and read the signed, hash-chained audit log.

`verify` works offline on a scheduler's database file too, so a party need not
trust the scheduler to check the scheduler's own record.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from teeflow.cli.common import client, console
from teeflow.core.errors import InputError


@click.group()
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
        with client(ctx) as c:
            entries = c.audit_log()
    count = verify_chain(entries)
    console.print(f"audit log OK: {count} entries, every link and signature verified")


@audit.command("show")
@click.argument("task_id", required=False)
@click.pass_context
def audit_show(ctx: click.Context, task_id: str | None) -> None:
    """Print the audit entries (of one task)."""
    with client(ctx) as c:
        for e in c.audit_log(task_id):
            console.print(f"#{e.seq} {e.task_id} {e.kind} by {e.signer.split(':')[0]} "
                          f"{json.dumps(e.body)[:160]}", highlight=False)
