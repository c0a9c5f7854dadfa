"""Closed membership, against a real scheduler process over HTTPS: who may join, what a
member who is party to nothing can read, where executor registration makes the
scheduler connect, and that nodes talk only to the certificate they pinned.

One cluster for the module: carol (initiator) asks for a task over alice's a_data on a
real simulated executor; a second task failed when the executor was gone. Mallory is a
member (initiator and owner) party to neither; a stranger holds no invitation.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time

import httpx
import pyarrow as pa
import pytest

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.cli.cluster import LocalCluster
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import (
    AuthError,
    ConfigError,
    InputError,
    NotInvited,
    PeerError,
    RoleRefused,
    UnknownTask,
)
from teeflow.core.schemas import schema_fingerprint, schema_to_b64
from teeflow.executor.server import build
from teeflow.net.scheduler_client import SchedulerClient
from teeflow.scheduler.identity import load_or_create
from teeflow.scheduler.store import Store
from tests.factories import make_spec, sign_entry, submit_signature

SCHEMA = pa.schema([("name", pa.string()), ("value", pa.float64()), ("n_samples", pa.int64())])
FP = schema_fingerprint(SCHEMA)


class Listener:
    """Another local server (plain TCP) that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


class World:
    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.url = c.scheduler_url
        self.carol = c.initiator
        self.alice, self.mallory, self.stranger, self.host, self.ann = (
            KeySigner.generate() for _ in range(5))

    def client(self, key: KeySigner) -> SchedulerClient:
        return SchedulerClient(self.url, key)

    def join(self, key: KeySigner, name: str, *roles: str) -> None:
        with self.client(key) as s:
            s.register_node(name, self.c.invite(*roles, name=name))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("members"))
    try:
        c.start_scheduler()
        w = World(c)
        c.wait_for_executor(c.start_executor())
        w.join(w.alice, "alice", "owner")
        w.join(w.mallory, "mallory", "initiator", "owner")
        w.join(w.host, "hoster", "executor_host")
        w.join(w.ann, "ann", "auditor")
        with w.client(w.alice) as alice:
            alice.add_dataset("alice", "a_data", schema_to_b64(SCHEMA), 2)
        with w.client(w.carol) as carol:
            w.executor_cert = carol.executors()[0]["cert_pem"]
            for task_id in ("taskopen1", "taskfail1"):
                spec = make_spec([("a_data", "alice", w.alice, FP)], w.carol, task_id=task_id)
                carol.submit(spec.to_dict(), submit_signature(spec, w.carol), c.executor_address)
                if task_id == "taskfail1":
                    w.failed_digest = spec.digest()
                else:
                    w.open_digest = spec.digest()
        c.stop_process("executor")  # alice's consent to task_failed cannot be dispatched
        with w.client(w.alice) as alice:
            alice.decide("taskfail1", "approved", sign_entry(
                w.alice, "taskfail1", "approved", {"spec_digest": w.failed_digest}))
            assert alice.task("taskfail1")["error"]  # the scheduler recorded why
        yield w
    finally:
        c.stop()


# -- joining ---------------------------------------------------------------------------------

def test_a_stranger_cannot_join_without_an_invitation(world: World):
    with world.client(world.stranger) as s:
        with pytest.raises(NotInvited, match="no invitation"):
            s.register_node("stranger")
        with pytest.raises(NotInvited, match="unknown invitation"):
            s.register_node("stranger", "tfi_" + "A" * 43)
    with world.client(world.carol) as carol:
        assert "stranger" not in {n["name"] for n in carol.nodes()}


def test_an_invitation_is_spent_once_and_only_for_its_name(world: World):
    token = world.c.invite("initiator", name="once")
    first, second = KeySigner.generate(), KeySigner.generate()
    with world.client(second) as s, pytest.raises(NotInvited, match="another node name"):
        s.register_node("other", token)
    with world.client(first) as s:
        assert s.register_node("once", token)["roles"] == ["initiator"]
    with world.client(second) as s, pytest.raises(NotInvited, match="already used"):
        s.register_node("once2", token)


def test_an_invitation_is_stored_hashed_and_expires(world: World, tmp_path):
    store = Store(tmp_path / "s.sqlite")
    try:
        token = store.invite(["owner"], "x", ttl=0.001)
        key = KeySigner.generate()
        time.sleep(0.01)  # past its lifetime
        with pytest.raises(NotInvited, match="expired"):
            store.register_node("x", key.public_key(), key.encryption_public_key(), token)
        assert store.nodes() == []
    finally:
        store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("s.sqlite*"))
    assert token.encode() not in raw and token.removeprefix("tfi_").encode() not in raw


def test_one_token_spent_by_two_keys_at_once_admits_one(tmp_path):
    store = Store(tmp_path / "race.sqlite")
    try:
        token = store.invite(["owner"])
        keys = [KeySigner.generate() for _ in range(8)]
        outcomes: list[str] = []

        def join(i: int) -> None:
            try:
                store.register_node(f"n{i}", keys[i].public_key(),
                                    keys[i].encryption_public_key(), token)
                outcomes.append("in")
            except NotInvited:
                outcomes.append("refused")

        threads = [threading.Thread(target=join, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["in"] + ["refused"] * 7
        assert len(store.nodes()) == 1
    finally:
        store.close()


def test_members_file_admits_its_keys_with_their_roles(tmp_path):
    listed, other = KeySigner.generate(), KeySigner.generate()
    members = tmp_path / "members.toml"
    members.write_text(f'[[member]]\npublic_key = "{listed.public_key()}"\n'
                       'roles = ["auditor"]\nname = "aud"\n')
    with LocalCluster(tmp_path / "c") as c:
        c.start_scheduler("scheduler.sqlite", "--members", str(members))
        with SchedulerClient(c.scheduler_url, listed) as s:
            with pytest.raises(NotInvited):
                s.register_node("not-aud")  # the list binds the key to its name
            assert s.register_node("aud")["roles"] == ["auditor"]
            with pytest.raises(RoleRefused, match="owner"):
                s.add_dataset("aud", "d", schema_to_b64(SCHEMA), 1)
        with SchedulerClient(c.scheduler_url, other) as s, pytest.raises(NotInvited):
            s.register_node("other")


def test_a_bad_members_file_is_refused_naming_the_field(tmp_path):
    from teeflow.scheduler.members import load_members

    bad = tmp_path / "m.toml"
    bad.write_text('[[member]]\npublic_key = "nope"\nroles = ["owner"]\n')
    with pytest.raises(ConfigError, match=r"member\[0\].public_key"):
        load_members(bad)
    bad.write_text(f'[[member]]\npublic_key = "{KeySigner.generate().public_key()}"\n'
                   'roles = ["root"]\n')
    with pytest.raises(ConfigError, match="roles"):
        load_members(bad)


# -- roles -----------------------------------------------------------------------------------

def test_roles_are_enforced_per_route(world: World):
    with world.client(world.alice) as alice, pytest.raises(RoleRefused, match="initiator"):
        spec = make_spec([("a_data", "alice", world.alice, FP)], world.alice, task_id="taskown01")
        alice.submit(spec.to_dict(), submit_signature(spec, world.alice))
    with world.client(world.host) as host:
        with pytest.raises(RoleRefused, match="owner"):
            host.add_dataset("hoster", "h_data", schema_to_b64(SCHEMA), 1)
        with pytest.raises(RoleRefused):
            host.datasets()  # the catalog is for initiators, owners and auditors
    with world.client(world.carol) as carol, pytest.raises(RoleRefused, match="executor_host"):
        carol.register_executor(world.c.executor_address, world.executor_cert, "AAAA")


# -- visibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("task_id", ["taskopen1", "taskfail1"])
def test_a_member_not_party_to_a_task_reads_nothing_of_it(world: World, task_id: str):
    digest = world.open_digest if task_id == "taskopen1" else world.failed_digest
    with world.client(world.mallory) as m:
        with pytest.raises(UnknownTask):
            m.task(task_id)  # as if there were no such task: its spec, query, error
        assert m.audit(task_id) == []
        assert all(e["task_id"] != task_id for e in m.audit())
        assert all(t["id"] != task_id for t in m.tasks())
        with pytest.raises(AuthError):
            m.work("alice", 0)  # alice's work items carry the spec
        with pytest.raises(UnknownTask):
            m.cancel(task_id)
        seen = json.dumps([m.tasks(), m.audit(), m.audit(task_id)])
        assert digest not in seen and task_id not in seen
    with world.client(world.carol) as carol:  # the initiator reads it all
        detail = carol.task(task_id)
        assert detail["spec_digest"] == digest
        assert any(e["task_id"] == task_id for e in carol.audit())
    with world.client(world.alice) as alice:  # so does the owner
        assert alice.task(task_id)["spec"]["datasets"][0]["name"] == "a_data"
    with world.client(world.ann) as ann:  # and the auditor
        assert ann.audit(task_id) and ann.task(task_id)["spec_digest"] == digest


def test_the_executor_host_sees_its_executors_tasks_only(world: World, serve):
    ours = serve(build(SimulatedBackend()))  # hoster's executor, registered by its proof
    with world.client(world.host) as host:
        assert host.tasks() == []
        host.register_executor(ours.address, *ours.server.registration(
            ours.address, world.host.public_key()))
    spec = make_spec([("a_data", "alice", world.alice, FP)], world.carol, task_id="taskhost1")
    with world.client(world.carol) as carol:
        carol.submit(spec.to_dict(), submit_signature(spec, world.carol), ours.address)
    with world.client(world.host) as host:
        assert [t["id"] for t in host.tasks()] == ["taskhost1"]
        assert host.task("taskhost1")["spec_digest"] == spec.digest()
        with pytest.raises(UnknownTask):
            host.task("taskopen1")


def test_a_stranger_reads_nothing(world: World):
    with world.client(world.stranger) as s:
        for read in (s.tasks, s.audit, s.datasets, s.nodes, s.executors,
                     lambda: s.task("taskopen1"), lambda: s.audit("taskopen1"),
                     lambda: s.work("alice", 0)):
            with pytest.raises(AuthError, match="not registered"):
                read()


def test_the_catalog_is_shown_to_initiators_owners_and_auditors(world: World):
    for key in (world.carol, world.alice, world.mallory, world.ann):
        with world.client(key) as s:
            assert "a_data" in {d["name"] for d in s.datasets()}


# -- executor registration ------------------------------------------------------------------

def test_registering_an_executor_at_another_servers_address_connects_nowhere(world: World,
                                                                            serve):
    other = Listener()
    try:
        with world.client(world.host) as host:
            before = host.executors()
            # a genuine executor's certificate, copied, with no signature of its key
            with pytest.raises(AuthError, match="attested key"):
                host.register_executor(other.address, world.executor_cert, "AAAA")
            # a real signature of that executor, but for its own address, replayed here
            server = build(SimulatedBackend())
            try:
                cert, sig = server.registration(world.c.executor_address,
                                                world.host.public_key())
                with pytest.raises(AuthError, match="attested key"):
                    host.register_executor(other.address, cert, sig)
                # ... or made for another node's registration
                cert, sig = server.registration(other.address, world.mallory.public_key())
                with pytest.raises(AuthError, match="attested key"):
                    host.register_executor(other.address, cert, sig)
                # not an RA-TLS certificate at all
                with pytest.raises(AuthError, match="RA-TLS"):
                    host.register_executor(other.address, load_or_create(
                        world.c.workdir).cert_pem.decode(), sig)
                assert other.accepted == 0  # the scheduler connected to nothing
                # a key of its own that signs for that address: probed, and the server
                # there does not present the registered certificate: nothing stored
                cert, sig = server.registration(other.address, world.host.public_key())
                with pytest.raises(PeerError):
                    host.register_executor(other.address, cert, sig)
                # a genuine executor's proof for the address where another one serves
                real = serve(build(SimulatedBackend()))
                cert, sig = server.registration(real.address, world.host.public_key())
                with pytest.raises(AuthError, match="another certificate"):
                    host.register_executor(real.address, cert, sig)
            finally:
                server.shutdown()
            assert host.executors() == before
    finally:
        other.close()


# -- HTTPS -----------------------------------------------------------------------------------

def test_plain_http_is_refused_by_server_and_client(world: World):
    address = world.c.scheduler_address
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{address}/v1/health", timeout=10)
    with pytest.raises(ConfigError, match="plain HTTP"):
        SchedulerClient(f"http://{address}#{world.c.fingerprint}", world.carol)
    with pytest.raises(ConfigError, match="pin"):
        SchedulerClient(f"https://{address}", world.carol)  # no pin: nothing to trust


def test_a_node_talks_only_to_the_certificate_it_pinned(world: World, tmp_path):
    other = load_or_create(tmp_path / "impostor")  # another scheduler's identity
    address = world.c.scheduler_address
    with SchedulerClient(world.url, world.carol) as carol:
        before = json.dumps([n["name"] for n in carol.nodes()])
    key = KeySigner.generate()
    with SchedulerClient(f"https://{address}#{other.fingerprint}", key) as s:
        with pytest.raises(AuthError, match="not the pinned"):
            s.register_node("pinned-elsewhere", world.c.invite("owner"))
    with SchedulerClient(world.url, world.carol) as carol:
        assert json.dumps([n["name"] for n in carol.nodes()]) == before


def test_the_scheduler_identity_is_made_once_and_kept(tmp_path):
    first = load_or_create(tmp_path)
    again = load_or_create(tmp_path)
    assert first.fingerprint == again.fingerprint
    assert first.signer().public_key() == again.signer().public_key()
    for f in (first.key_file, first.signing_key_file):
        assert f.stat().st_mode & 0o077 == 0  # owner-only


def test_a_task_naming_an_unregistered_executor_is_refused_before_any_connection(
        world: World):
    other = Listener()
    try:
        spec = make_spec([("a_data", "alice", world.alice, FP)], world.carol,
                         task_id="tasknowhere")
        with world.client(world.carol) as carol:
            with pytest.raises(InputError, match="not registered"):
                carol.submit(spec.to_dict(), submit_signature(spec, world.carol), other.address)
            with pytest.raises(UnknownTask):
                carol.task("tasknowhere")
        assert other.accepted == 0
    finally:
        other.close()


def test_invite_command_prints_a_working_token_and_the_fingerprint(tmp_path):
    from click.testing import CliRunner

    from teeflow.cli.main import cli

    db = tmp_path / "s.sqlite"
    out = CliRunner().invoke(cli, ["scheduler", "invite", "--db", str(db), "--role", "owner",
                                   "--role", "auditor", "--name", "bob"])
    assert out.exit_code == 0, out.output
    token = out.output.split("invitation: ")[1].split()[0]
    assert load_or_create(tmp_path).fingerprint in out.output
    store = Store(db)
    try:
        bob = KeySigner.generate()
        assert store.register_node("bob", bob.public_key(), bob.encryption_public_key(),
                                   token) == ["auditor", "owner"]
    finally:
        store.close()
    bad = CliRunner().invoke(cli, ["scheduler", "invite", "--db", str(db), "--role", "root"])
    assert bad.exit_code != 0 and "root" in bad.output


def test_a_database_from_before_membership_gives_its_nodes_no_roles(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE nodes (name TEXT PRIMARY KEY, public_key TEXT NOT NULL UNIQUE, "
        "enc_key TEXT NOT NULL, registered_at REAL NOT NULL);"
        "CREATE TABLE executors (address TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, "
        "tee TEXT NOT NULL, measurements TEXT NOT NULL, registered_at REAL NOT NULL);")
    old = KeySigner.generate()
    con.execute("INSERT INTO nodes VALUES (?,?,?,0)", ("old", old.public_key(),
                                                     old.encryption_public_key()))
    con.commit()
    con.close()
    store = Store(db)
    try:
        assert store.node("old")["roles"] == []
        store.set_members([(old.public_key(), ["owner"], None)])
        assert store.node("old")["roles"] == ["owner"]
    finally:
        store.close()
