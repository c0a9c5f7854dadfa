"""`teeflow audit`: check and read the transparency log.

`verify` asks the scheduler for proofs and checks them against the checkpoint this node
keeps next to its key (net/logcheck.py); `--db` checks a scheduler's database file
offline, against a party's checkpoint file if given, so a party need not trust the
scheduler to check the scheduler's own record. `checkpoint` shows the newest checkpoint,
cosigns it, or compares it with another party's.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from teeflow.cli.common import client, console
from teeflow.core.errors import InputError


@click.group()
def audit() -> None:
    """The transparency log of every task step."""


@audit.command("verify")
@click.option("--db", type=click.Path(path_type=Path), default=None,
              help="Check a scheduler database file offline (else ask the scheduler).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="With --db: the scheduler's data dir, for its log key (default: the "
                   "db file's directory).")
@click.option("--checkpoint", "checkpoint_file", type=click.Path(path_type=Path),
              default=None, help="With --db: a party's checkpoint file the db must extend.")
@click.pass_context
def audit_verify(ctx: click.Context, db: Path | None, data_dir: Path | None,
                 checkpoint_file: Path | None) -> None:
    """Check inclusion, consistency and every signature; name the first broken entry."""
    if db is not None:
        _verify_db(db, data_dir, checkpoint_file)
        return
    from teeflow.net.logcheck import verify_party

    with client(ctx) as c:
        r = verify_party(c.scheduler)
    console.print(f"log OK: checkpoint {r['origin']} size {r['size']} root {r['root'][:16]}.. "
                  f"extends the one this node held; {r['entries']} entries of your tasks "
                  "included, every signature verified", highlight=False)
    if r["whole_log"] is not None:
        console.print(f"whole log rebuilt: {r['whole_log']} entries hash to that root")
    console.print("cosigned by: " + (", ".join(r["cosigners"]) or "nobody yet"))


def _verify_db(db: Path, data_dir: Path | None, checkpoint_file: Path | None) -> None:
    from teeflow.core import audit as log
    from teeflow.core.checkpoint import origin_of
    from teeflow.core.errors import LogInconsistent
    from teeflow.files.checkpoints import CheckpointFile
    from teeflow.files.keys import load_key
    from teeflow.net.logview import LogView
    from teeflow.scheduler.identity import SIGNING_KEY
    from teeflow.scheduler.store import Store

    if not db.is_file():
        raise InputError(f"--db {db}: no such file")
    key_file = (data_dir or db.resolve().parent) / SIGNING_KEY
    log_key = load_key(key_file).public_key() if key_file.is_file() else None
    store = Store(db)
    try:
        entries = store.audit_log()
    finally:
        store.close()
    count = log.verify_chain(entries, log_key)
    tree = log.tree_of(entries)
    console.print(f"audit log OK: {count} entries, every index, previous root and signature "
                  "verified" + ("" if log_key else " (no log key found: log signatures "
                                                     "not checked)"))
    if checkpoint_file is not None:
        held = LogView(CheckpointFile(checkpoint_file)).snapshot()
        if held is None:
            raise InputError(f"--checkpoint {checkpoint_file}: no such file")
        if log_key is not None and held.origin != origin_of(log_key):
            raise LogInconsistent("the checkpoint is of another log than this db's")
        if held.size > len(tree) or tree.root(held.size) != held.root:
            raise LogInconsistent(f"the db does not extend the checkpoint of size "
                                  f"{held.size} (rewritten or truncated)")
        console.print(f"extends the checkpoint of size {held.size} in {checkpoint_file}")


@audit.command("checkpoint")
@click.option("--cosign", is_flag=True, help="Cosign the checkpoint after checking it.")
@click.option("--compare", "other", type=click.Path(path_type=Path), default=None,
              help="Another party's checkpoint (a note, or its checkpoint file): refuse if "
                   "the two are not one log.")
@click.pass_context
def audit_checkpoint(ctx: click.Context, cosign: bool, other: Path | None) -> None:
    """Show the newest checkpoint (checked against the one this node held)."""
    from teeflow.files import read_capped

    with client(ctx) as c:
        sc = c.scheduler
        doc = sc.checkpoint()
        if other is not None:
            raw = read_capped(other, 128 * 1024, "checkpoint").decode()
            note = json.loads(raw)["note"] if raw.lstrip().startswith("{") else raw
            theirs = sc.compare(note)
            console.print(f"consistent with the other checkpoint (size {theirs.size})")
        if cosign:
            me = sc.identity.public_key()
            name = next((n["name"] for n in sc.nodes() if n["public_key"] == me), None)
            if name is None:
                raise InputError("this key is not a member; it cannot cosign")
            cp = sc.cosign(name)
            console.print(f"cosigned size {cp.size} as {name}")
            doc = sc.checkpoint()
    console.print(doc["note"], end="", highlight=False, markup=False)
    console.print(f"log key: {doc['log_key']}", highlight=False)


@audit.command("show")
@click.argument("task_id", required=False)
@click.pass_context
def audit_show(ctx: click.Context, task_id: str | None) -> None:
    """Print the audit entries (of one task)."""
    with client(ctx) as c:
        for e in c.audit_log(task_id):
            console.print(f"#{e.seq} {e.task_id} {e.kind} by {e.signer.split(':')[0]} "
                          f"{json.dumps(e.body)[:160]}", highlight=False)
