"""The scheduler's operator rewrites its own log: a real scheduler process, its real
SQLite file edited by hand (and re-chained and re-signed with the scheduler's own log
key, which the operator holds), then restarted. Each rewrite still passes a check of the
log by itself (audit.verify_chain); each is caught by the party that holds a checkpoint
from before it, on its next contact (LogInconsistent), and by `audit verify` offline.
A fork (two views for two parties) is caught when one party's checkpoint meets the
other view. An honest append, by contrast, is accepted and can be cosigned."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.cli.cluster import LocalCluster
from teeflow.core import audit
from teeflow.core.audit import AuditError
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import LogInconsistent
from teeflow.files.checkpoints import CheckpointFile
from teeflow.files.keys import load_key
from teeflow.net.logcheck import verify_party
from teeflow.net.logview import LogView
from teeflow.net.scheduler_client import SchedulerClient
from teeflow.scheduler.identity import SIGNING_KEY
from teeflow.scheduler.store import Store
from tests.factories import MEMBER, approval, make_spec, p256_signer, sign_entry, submit_signature

ALICE, BOB = KeySigner.generate(), KeySigner.generate()
EXECUTOR_KEY = ec.generate_private_key(ec.SECP256R1())


@dataclass
class World:
    cluster: LocalCluster
    tmp: Path

    @property
    def db(self) -> Path:
        return self.cluster.db

    def log_signer(self) -> KeySigner:
        return load_key(self.tmp / SIGNING_KEY)

    def restart(self) -> None:
        self.cluster.stop_process("scheduler")
        self.cluster.start_scheduler()

    def party(self, key: KeySigner, name: str) -> SchedulerClient:
        return SchedulerClient(self.cluster.scheduler_url, key,
                               checkpoints=self.tmp / f"{name}.checkpoint.json")

    def offline(self) -> Store:
        """The store as the scheduler's own code writes it (the process stopped)."""
        self.cluster.stop_process("scheduler")
        return Store(self.db, log_signer=self.log_signer())


def _flow(store: Store, initiator: KeySigner) -> None:
    """Two interleaved tasks of the initiator, with both owners' and an executor's
    signed entries, written by the scheduler's own code."""
    one = make_spec([("a_data", "alice", ALICE, "fa"), ("b_data", "bob", BOB, "fb")],
                    initiator, task_id="task0001")
    two = make_spec([("a_data", "alice", ALICE, "fa")], initiator, task_id="task0002")
    store.create_task(one.to_dict(), one.digest(), "127.0.0.1:9",
                      submit_signature(one, initiator))
    store.create_task(two.to_dict(), two.digest(), "127.0.0.1:9",
                      submit_signature(two, initiator))
    for spec, owner, last in ((one, ALICE, False), (two, ALICE, True), (one, BOB, True)):
        a = approval(spec, owner)
        store.approve(spec.task_id, owner.public_key(), "approved", a["signature"],
                      "approved", last)
    store.transition("task0001", "accept", {"executor": "127.0.0.1:9"})
    store.transition("task0001", "upload", {"dataset": "a_data"})
    body = {"executor": "127.0.0.1:9", "tls_key_sha256": audit.p256_key_hash(
        p256_signer(EXECUTOR_KEY)), "spec_digest": one.digest(),
        "claims": {"tee": "simulated", "simulated": True}}
    store.transition("task0001", "attested", body, signer=audit.ed25519_signer(
        ALICE.public_key()), signature=sign_entry(ALICE, "task0001", "attested", body))
    rbody = {"dataset": "a_data", "rows": 2}
    store.append("task0001", "received", rbody, p256_signer(EXECUTOR_KEY),
                 audit.sign_p256(EXECUTOR_KEY, audit.signed_payload("task0001", "received",
                                                                    rbody)))
    store.transition("task0002", "accept", {"executor": "127.0.0.1:9"})


@pytest.fixture
def world(tmp_path: Path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start_scheduler()
        w = World(cluster, tmp_path)
        store = w.offline()
        for name, key in (("alice", ALICE), ("bob", BOB)):
            store.register_node(name, key.public_key(), key.encryption_public_key(),
                                store.invite(MEMBER, name))
        _flow(store, cluster.initiator)
        store.close()
        cluster.start_scheduler()
        yield w
    finally:
        cluster.stop()


# -- what the operator does to the file -----------------------------------------------------


def _rows(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        con.close()


def _rewrite(w: World, rows: list[dict], restart: bool = True) -> None:
    """Replace the log by `rows`, re-chained and re-signed with the scheduler's own key:
    every index, previous root, leaf hash and log signature consistent again."""
    w.cluster.stop_process("scheduler")
    signer = w.log_signer()
    con = sqlite3.connect(w.db)
    try:
        with con:
            con.execute("DELETE FROM audit")
            entries: list[audit.Entry] = []
            for r in rows:
                e = audit.chain(entries, r["task_id"], r["kind"], json.loads(r["body"]),
                                r["signer"], r["signature"], signer)
                entries.append(e)
                con.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (e.seq, e.task_id, r["at"], e.kind, json.dumps(e.body), e.signer,
                             e.signature, e.prev_root, e.hash, e.log_signature))
    finally:
        con.close()
    if restart:
        w.cluster.start_scheduler()


def _self_consistent(w: World) -> int:
    """The rewritten file passes every check of the log by itself."""
    store = Store(w.db)
    try:
        return audit.verify_chain(store.audit_log(), w.log_signer().public_key())
    finally:
        store.close()


def _held(w: World, key: KeySigner, name: str) -> None:
    """A party sees the log as it is now and checks its own entries (keeping the
    checkpoint in its file)."""
    with w.party(key, name) as sc:
        assert verify_party(sc)["entries"] > 0


# -- the attacks -------------------------------------------------------------------------


def test_honest_growth_is_accepted_and_cosigned(world: World):
    with world.party(world.cluster.initiator, "initiator") as sc:
        first = verify_party(sc)
    store = world.offline()
    store.transition("task0002", "cancel", {"by": "initiator"})
    store.close()
    world.cluster.start_scheduler()
    with world.party(world.cluster.initiator, "initiator") as sc:
        again = verify_party(sc)
        assert again["size"] == first["size"] + 1
        cp = sc.cosign("initiator")
        assert verify_party(sc)["cosigners"] == ["initiator"] and cp.size == again["size"]
    with world.party(ALICE, "alice") as sc:
        assert verify_party(sc)["cosigners"] == ["initiator"]


def test_deleting_a_task_is_caught(world: World):
    _held(world, world.cluster.initiator, "initiator")
    _rewrite(world, [r for r in _rows(world.db) if r["task_id"] != "task0002"])
    assert _self_consistent(world) > 0  # the log by itself still looks fine
    with world.party(world.cluster.initiator, "initiator") as sc, \
            pytest.raises(LogInconsistent):
        sc.tasks()


def test_truncating_the_tail_is_caught(world: World):
    _held(world, ALICE, "alice")
    _rewrite(world, _rows(world.db)[:-3])
    assert _self_consistent(world) > 0
    with world.party(ALICE, "alice") as sc, pytest.raises(LogInconsistent, match="shrank"):
        sc.datasets()


def test_reordering_is_caught(world: World):
    _held(world, BOB, "bob")
    rows = _rows(world.db)
    rows[2], rows[3] = rows[3], rows[2]
    _rewrite(world, rows)
    assert _self_consistent(world) == len(rows)
    with world.party(BOB, "bob") as sc, pytest.raises(LogInconsistent, match="fork"):
        sc.tasks()


def test_inserting_is_caught_even_with_the_tail_grown(world: World):
    _held(world, world.cluster.initiator, "initiator")
    rows = _rows(world.db)
    fake = {**rows[4], "kind": "cancel", "body": json.dumps({"by": "scheduler"}),
            "signer": audit.SCHEDULER, "signature": "", "task_id": "task0002"}
    _rewrite(world, [*rows[:5], fake, *rows[5:]])
    with world.party(world.cluster.initiator, "initiator") as sc, \
            pytest.raises(LogInconsistent, match="not an extension"):
        sc.tasks()


def test_edited_entry_without_rechaining_is_caught_by_audit_verify(world: World):
    _held(world, ALICE, "alice")
    world.cluster.stop_process("scheduler")
    con = sqlite3.connect(world.db)
    with con:
        con.execute("UPDATE audit SET body=? WHERE seq=11", (json.dumps(
            {"dataset": "a_data", "rows": 999}),))
    con.close()
    world.cluster.start_scheduler()
    with world.party(ALICE, "alice") as sc, pytest.raises(AuditError, match="edited"):
        verify_party(sc)


def test_offline_verify_against_a_party_checkpoint(world: World):
    _held(world, ALICE, "alice")
    rows = _rows(world.db)
    rows[2], rows[3] = rows[3], rows[2]
    _rewrite(world, rows)
    held = CheckpointFile(world.tmp / "alice.checkpoint.json").load()
    assert held is not None
    from click.testing import CliRunner

    from teeflow.cli.main import cli

    out = CliRunner().invoke(cli, ["audit", "verify", "--db", str(world.db), "--checkpoint",
                                    str(world.tmp / "alice.checkpoint.json")])
    assert "audit log OK" in out.output  # the file by itself passes
    assert isinstance(out.exception, LogInconsistent)
    assert "does not extend the checkpoint" in str(out.exception)


def test_fork_between_two_parties_is_caught(world: World):
    """The operator keeps two copies of the file and serves Alice one, Bob the other,
    each grown differently after a common prefix both saw."""
    _held(world, ALICE, "alice")
    _held(world, BOB, "bob")
    world.cluster.stop_process("scheduler")
    fork_db = world.tmp / "fork.sqlite"
    shutil.copy(world.db, fork_db)
    for db, reason in ((world.db, "view-a"), (fork_db, "view-b")):
        store = Store(db, log_signer=world.log_signer())
        store.transition("task0002", "cancel", {"by": reason})
        store.close()
    url_a = world.cluster.start_scheduler()
    proc = world.cluster._spawn("scheduler-b", "scheduler", "--db", str(fork_db),
                                "--data-dir", str(world.tmp), "--listen", "127.0.0.1:0",
                                "--port-file", str(world.tmp / "b.port"))
    assert proc
    address_b = world.cluster._wait_port("scheduler-b", world.tmp / "b.port")
    url_b = f"https://{address_b}#{world.cluster.fingerprint}"
    with SchedulerClient(url_a, ALICE, checkpoints=world.tmp / "alice.checkpoint.json") as a:
        a.tasks()  # Alice's view: consistent with what she saw
    with SchedulerClient(url_b, BOB, checkpoints=world.tmp / "bob.checkpoint.json") as b:
        b.tasks()  # Bob's view: consistent with what he saw
        alice_note = CheckpointFile(world.tmp / "alice.checkpoint.json").load()
        assert alice_note is not None
        with pytest.raises(LogInconsistent, match="fork"):
            b.compare(alice_note[1])  # Alice's checkpoint, passed to Bob out of band
    # and the moment Alice is served Bob's view, she stops
    with SchedulerClient(url_b, ALICE, checkpoints=world.tmp / "alice.checkpoint.json") as a, \
            pytest.raises(LogInconsistent, match="fork"):
        a.tasks()


def test_a_real_provider_stops_on_a_truncated_log(world: World):
    """A provider process holds the checkpoint it saw; the operator truncates the log and
    restarts the scheduler at the same address; the provider's next poll refuses and the
    node stops, naming why."""
    from teeflow.cli.cluster import Party
    from teeflow.cli.demo import make_party_data

    make_party_data(world.tmp / "carol.csv", 20, seed=1)
    proc = world.cluster.start_provider(Party("carol", "carol_data", world.tmp / "carol.csv"))
    world.cluster.wait_for_datasets(["carol_data"])
    held = world.tmp / "carol.key.checkpoint.json"
    assert CheckpointFile(held).load() is not None
    size = LogView(CheckpointFile(held)).snapshot()
    assert size is not None and size.size == len(_rows(world.db))
    world.cluster.stop_process("scheduler")
    rows = _rows(world.db)[:-2]
    _rewrite(world, rows, restart=False)
    port_file = world.tmp / "scheduler.port"
    port_file.unlink(missing_ok=True)
    world.cluster._spawn("scheduler", "scheduler", "--db", str(world.db), "--data-dir",
                         str(world.tmp), "--listen", world.cluster.scheduler_address,
                         "--port-file", str(port_file))
    world.cluster._wait_port("scheduler", port_file)
    assert proc.wait(timeout=60) != 0
    log = (world.tmp / "logs" / "provider-carol.log").read_text()
    assert "stopping" in log and "shrank" in log


def test_cli_verify_cosign_and_compare(world: World):
    """`teeflow audit verify`, `audit checkpoint --cosign` and `--compare` as a party runs
    them, with its key file (the checkpoint kept next to it)."""
    from click.testing import CliRunner

    from teeflow.cli.main import cli

    base = ["--scheduler", world.cluster.scheduler_url, "--key",
            str(world.cluster.initiator_key)]
    runner = CliRunner()
    out = runner.invoke(cli, [*base, "audit", "verify"])
    assert out.exit_code == 0, out.output
    assert "log OK" in out.output and "nobody yet" in out.output
    out = runner.invoke(cli, [*base, "audit", "checkpoint", "--cosign"])
    assert out.exit_code == 0, out.output
    assert "cosigned size" in out.output
    assert "initiator" in runner.invoke(cli, [*base, "audit", "verify"]).output
    mine = Path(str(world.cluster.initiator_key) + ".checkpoint.json")
    assert CheckpointFile(mine).load() is not None
    # another party's checkpoint from the same log: consistent
    _held(world, ALICE, "alice")
    out = runner.invoke(cli, [*base, "audit", "checkpoint", "--compare",
                              str(world.tmp / "alice.checkpoint.json")])
    assert out.exit_code == 0 and "consistent with the other" in out.output
