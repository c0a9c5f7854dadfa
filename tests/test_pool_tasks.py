"""A pool task on its members (issue 11): what create-task refuses, and the attackers of
a member, over real Flight servers in this process.

Attackers: the scheduler's operator, who names one pool to the members and another to a
provider (the upload is signed for the pool the provider attested, so a member refuses a
part meant for another pool); a stranger at a member's port, who asks for its pool
evidence or calls it into a scheduler of its own, or runs it directly. Then the honest run
on two members: the value is the single executor's over the union, and every member wipes;
and a member lost while the lead computes fails the task with every part wiped.

Two simulated executors serve Flight on 127.0.0.1 port 0 from threads; the lead's Dask
scheduler and both workers run in this process too, each on its own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow import compute
from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core import seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import (
    AuthError,
    InputError,
    ParameterError,
    StateError,
    TeeflowError,
    UnknownTask,
)
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.pool import held
from teeflow.executor.pool.seat import _CONCLUDE, held_key, join_message
from teeflow.executor.server import ExecutorFlightServer, build
from teeflow.executor.service import Executor, UploadRequest
from teeflow.executor.tasks import PoolSeat
from teeflow.net.executor_client import ExecutorClient
from tests.factories import Serving, approval, attested_client, challenge_for, make_spec

TASK = "pooltask1"
SCHEMA = pa.schema([("a", pa.float64()), ("b", pa.float64()), ("c", pa.int64()),
                    ("y", pa.float64())])
FP = schema_fingerprint(SCHEMA)
LINEAR = {"label": "y"}
TLS_KEY = ec.generate_private_key(ec.SECP256R1())
MINE = hashlib.sha256(TLS_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
OTHER = "cd" * 32  # another member's key, as the scheduler names it
WAIT = 90.0  # seconds a loaded machine may take for a pool run (a bound, not an assert)


def regression_data(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = x @ [1.5, -0.2, 3.0] + 0.7 + rng.normal(scale=0.5, size=n)
    return pa.table({"a": x[:, 0], "b": x[:, 1],
                     "c": np.round(x[:, 2] * 100).astype(np.int64), "y": y}, schema=SCHEMA)


@dataclass
class Parties:
    alice: KeySigner = field(default_factory=KeySigner.generate)
    bob: KeySigner = field(default_factory=KeySigner.generate)
    initiator: KeySigner = field(default_factory=KeySigner.generate)
    tables: dict[str, pa.Table] = field(default_factory=lambda: {
        "a_data": regression_data(1, 120), "b_data": regression_data(2, 80)})

    @property
    def owners(self) -> dict[str, KeySigner]:
        return {"a_data": self.alice, "b_data": self.bob}

    def spec(self, compute_name: str = "linear_regression", params: dict | None = None,
             **consent: Any) -> wire.TaskSpec:
        """A spec over both datasets, a pool of 2 unless `consent` says otherwise."""
        consent = {"pool": 2, "task_id": TASK, **consent}
        if consent["pool"] is None:
            del consent["pool"]
        return make_spec([("a_data", "alice", self.alice, FP), ("b_data", "bob", self.bob, FP)],
                         self.initiator, compute_name, LINEAR if params is None else params,
                         **consent)

    def approvals(self, spec: wire.TaskSpec) -> list[dict]:
        return [approval(spec, self.alice), approval(spec, self.bob)]


@pytest.fixture
def p() -> Parties:
    return Parties()


def _seats(*keys: str) -> list[PoolSeat]:
    return [PoolSeat(f"127.0.0.1:{1000 + i}", k) for i, k in enumerate(keys)]


def _refused(p: Parties, spec: wire.TaskSpec, pool: list[PoolSeat] | None, error: type,
             match: str) -> None:
    """create-task is refused with `error` and nothing is created."""
    ex = Executor(SimulatedBackend(), TLS_KEY)
    try:
        with pytest.raises(error, match=match):
            ex.create_task(spec, p.approvals(spec), pool=pool)
        with pytest.raises(UnknownTask):
            ex.status(spec.digest())
    finally:
        ex.close()


# -- 1. create-task: the seats must be the spec's pool, this executor among them ----------


def test_a_pool_spec_needs_its_seats(p):
    spec = p.spec()
    _refused(p, spec, None, InputError, "pool of 2; 0 member")
    _refused(p, spec, [], InputError, "pool of 2; 0 member")
    _refused(p, spec, _seats(MINE), InputError, "pool of 2; 1 member")
    _refused(p, spec, _seats(MINE, OTHER, "ef" * 32), InputError, "pool of 2; 3 member")


def test_this_executor_must_be_a_seat(p):
    _refused(p, p.spec(), _seats(OTHER, "ef" * 32), AuthError, "not one of the pool's members")


def test_a_member_named_twice_is_refused(p):
    _refused(p, p.spec(), _seats(MINE, MINE), InputError, "named twice")
    same_address = [PoolSeat("127.0.0.1:1000", MINE), PoolSeat("127.0.0.1:1000", OTHER)]
    _refused(p, p.spec(), same_address, InputError, "named twice")


def test_seats_for_a_spec_without_a_pool_are_refused(p):
    _refused(p, p.spec(pool=None), _seats(MINE, OTHER), InputError, "without a pool")


@pytest.mark.parametrize("name,params", [("model_aggregation", {}),
                                         ("xgboost", {"label": "y"})])
def test_a_computation_the_pool_does_not_run_is_refused(p, name, params):
    _refused(p, p.spec(name, params), _seats(MINE, OTHER), ParameterError,
             f"{name}.*not available on an executor pool")


def test_a_sql_pool_spec_is_taken_or_refused_by_name(p):
    """sql is listed as a pool computation: its spec is held, or refused with a named error,
    never an ImportError from inside."""
    spec = p.spec("sql", {"query": "SELECT COUNT(*) AS n, SUM(y) AS s FROM a_data"})
    ex = Executor(SimulatedBackend(), TLS_KEY)
    try:
        try:
            ex.create_task(spec, p.approvals(spec), pool=_seats(MINE, OTHER))
        except TeeflowError:
            return
        assert ex.status(spec.digest())["status"] == "waiting"
    finally:
        ex.close()


def test_a_held_out_split_is_refused_on_a_pool(p):
    spec = p.spec(params={"label": "y", "test_fraction": "0.2"})
    _refused(p, spec, _seats(MINE, OTHER), ParameterError, "test_fraction")


def test_a_good_pool_spec_is_held_with_its_seats_in_order(p):
    spec = p.spec()
    ex = Executor(SimulatedBackend(), TLS_KEY)
    try:
        ex.create_task(spec, p.approvals(spec), pool=_seats(OTHER, MINE))
        status = ex.status(spec.digest())
        assert status["status"] == "waiting" and status["expected"] == ["a_data", "b_data"]
        with pytest.raises(StateError, match="run by its lead only"):  # OTHER leads
            ex.run(spec.digest(), background=False)
    finally:
        ex.close()


def test_pool_and_executor_key_do_not_decode_together(p):
    body = p.spec().to_dict()
    with pytest.raises(InputError, match="no single executor_key"):
        wire.TaskSpec.from_dict({**body, "executor_key": MINE})
    for size in (1, 17, True, "2", 2.0):
        with pytest.raises(InputError, match="pool must be"):
            wire.TaskSpec.from_dict({**body, "pool": size})
    assert wire.TaskSpec.from_dict(body).pool == 2


# -- 2. the operator gives a provider another pool than the members' ------------------------


def _messages(table: pa.Table):
    batches = table.to_batches(max_chunksize=16)
    for batch in batches:
        yield batch, None
    yield None, wire.end_marker(table.num_rows, len(batches))


def _upload(ex: Executor, p: Parties, spec: wire.TaskSpec, dataset: str,
            pool: list[str] | None) -> dict[str, int]:
    """The owner's upload of its whole dataset to `ex`, signed for `pool`."""
    owner = p.owners[dataset]
    challenge = challenge_for(ex, spec.digest(), owner)
    signature = owner.sign(wire.upload_message(spec.task_id, dataset, challenge,
                                               ex.tls_spki_hash, pool))
    table = p.tables[dataset]
    return ex.receive(UploadRequest(spec.task_id, dataset, challenge, signature,
                                    spec_digest=spec.digest()), table.schema, _messages(table))


@pytest.fixture
def member(p: Parties) -> Iterator[tuple[Executor, wire.TaskSpec]]:
    """An executor holding a pool task whose pool is [this executor, OTHER]."""
    spec = p.spec()
    ex = Executor(SimulatedBackend(), TLS_KEY)
    ex.create_task(spec, p.approvals(spec), pool=_seats(MINE, OTHER))
    try:
        yield ex, spec
    finally:
        ex.close()


@pytest.mark.parametrize("signed_for", [
    [MINE, "ef" * 32],  # the provider attested another second member
    [OTHER, MINE],  # the same members, another lead
    [MINE],  # a pool of one: this executor alone
    [MINE, OTHER, "ef" * 32],  # one member more
    None,  # an upload for a single executor
])
def test_an_upload_signed_for_another_pool_is_refused(member, p, signed_for):
    ex, spec = member
    with pytest.raises(AuthError, match="'a_data'.*not signed for this executor's pool"):
        _upload(ex, p, spec, "a_data", signed_for)
    status = ex.status(spec.digest())
    assert status["status"] == "waiting"  # a forged upload cannot fail the task
    assert status["inputs_held"] == [] and status["received"] == {}
    assert status["receiving"] == [] and ex.held_bytes(spec.digest()) == 0
    assert [e["kind"] for e in status["audit"]] == ["admitted"]
    # the owner's upload signed for the members' own pool is taken
    assert _upload(ex, p, spec, "a_data", [MINE, OTHER])["rows"] == 120
    assert ex.status(spec.digest())["inputs_held"] == ["a_data"]


# -- two real members over Flight ----------------------------------------------------------


@dataclass
class Member:
    server: ExecutorFlightServer
    serving: Serving
    stopped: bool = False

    @property
    def executor(self) -> Executor:
        return self.server.executor

    @property
    def address(self) -> str:
        return self.serving.address

    @property
    def key(self) -> str:
        return self.executor.tls_spki_hash.hex()

    def status(self, digest: str) -> dict[str, Any]:
        return self.executor.status(digest)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.serving.stop()
            self.executor.close()


@pytest.fixture
def pair() -> Iterator[list[Member]]:
    """Two simulated executors on Flight: [lead, member]. Both stopped at the end."""
    members: list[Member] = []
    try:
        for _ in range(2):
            server = build(SimulatedBackend())
            members.append(Member(server, Serving(server)))
        yield members
    finally:
        for m in members:
            m.stop()


# the rows each member is streamed, in pool order: uneven parts of each dataset
CUTS = {"a_data": 70, "b_data": 20}


def _part(p: Parties, dataset: str, index: int) -> pa.Table:
    table, cut = p.tables[dataset], CUTS[dataset]
    return table.slice(0, cut) if index == 0 else table.slice(cut)


def _pool_task(pair: list[Member], p: Parties) -> wire.TaskSpec:
    """A 2-member pool task created on both members over Flight (as the scheduler hands it
    out) and every part uploaded over Flight (as the providers stream them)."""
    spec = p.spec()
    keys = [m.key for m in pair]
    body = wire.canonical({"spec": spec.to_dict(), "approvals": p.approvals(spec),
                           "pool": [{"address": m.address, "key": m.key} for m in pair]})
    for index, m in enumerate(pair):
        with attested_client(m.address) as client:
            assert json.loads(client.action("create-task", body)) == {"accepted": True}
            for dataset, owner in p.owners.items():
                part = _part(p, dataset, index)
                receipt = client.upload(spec.task_id, dataset, owner, SCHEMA,
                                        part.to_batches(max_chunksize=16),
                                        spec_digest=spec.digest(), pool=keys)
                assert receipt["rows"] == part.num_rows
    for m in pair:
        assert m.status(spec.digest())["inputs_held"] == ["a_data", "b_data"]
    return spec


def _sign(key_pem: bytes, message: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def _join(client: ExecutorClient, digest: str, scheduler: str, signature: bytes) -> bytes:
    return client.action("pool-join", wire.canonical(
        {"spec_digest": digest, "scheduler": scheduler, "signature": signature.hex()}))


def _untouched(m: Member, digest: str, audit: list[str]) -> None:
    """The member still waits with every part, has given none to a worker, and has
    recorded nothing since."""
    status = m.status(digest)
    assert status["status"] == "waiting" and status["error"] is None
    assert status["inputs_held"] == ["a_data", "b_data"]
    assert [e["kind"] for e in status["audit"]] == audit
    key = held_key(digest, m.key)
    with pytest.raises(StateError):
        held.tables(key)
    assert key not in _CONCLUDE


def _kinds(m: Member, digest: str) -> list[str]:
    """The member's audit kinds once each held part's `received` entry is in (their
    digests are signed on threads of their own, after the upload returns)."""
    end = time.monotonic() + WAIT
    while True:
        status = m.status(digest)
        kinds = [e["kind"] for e in status["audit"]]
        if kinds.count("received") >= len(status["inputs_held"]) or time.monotonic() > end:
            return kinds
        time.sleep(0.05)


def _wait_status(m: Member, digest: str, states: set[str]) -> dict[str, Any]:
    end = time.monotonic() + WAIT
    while True:
        status = m.status(digest)
        if status["status"] in states:
            return status
        assert time.monotonic() < end, status["status"]
        time.sleep(0.05)


# -- 3. a stranger at a member's port ---------------------------------------------------------


def test_a_stranger_cannot_call_a_member_into_a_pool(pair, p):
    lead, member = pair
    spec = _pool_task(pair, p)
    digest = spec.digest()
    audit = _kinds(member, digest)
    scheduler = "tls://127.0.0.1:9"
    stranger_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    lead_pool_key = lead.executor._seats.identity().key_pem
    forged = {
        "a stranger's key": _sign(stranger_key, join_message(digest, scheduler)),
        # the lead's attested executor key is not its pool key
        "the lead's TLS key": _sign(lead.server._key_pem, join_message(digest, scheduler)),
        # the member's own pool key: only the lead calls members in
        "the member's pool key": _sign(member.executor._seats.identity().key_pem,
                                       join_message(digest, scheduler)),
        # the lead's word, but for another scheduler or another task
        "another scheduler": _sign(lead_pool_key, join_message(digest, "tls://127.0.0.1:10")),
        "another task": _sign(lead_pool_key, join_message("ab" * 32, scheduler)),
        "not a signature": b"\x00" * 64,
    }
    with attested_client(member.address) as stranger:
        for signature in forged.values():
            with pytest.raises(AuthError, match="not signed by the pool's lead"):
                _join(stranger, digest, scheduler, signature)
            _untouched(member, digest, audit)
        for bad in ("tcp://127.0.0.1:9", "127.0.0.1:9", "inproc://x", "tls://" + "1" * 251):
            with pytest.raises(InputError, match="scheduler"):
                _join(stranger, digest, bad, _sign(lead_pool_key, join_message(digest, bad)))
        with pytest.raises(UnknownTask):
            _join(stranger, "ab" * 32, scheduler, forged["a stranger's key"])
    _untouched(member, digest, audit)
    _untouched(lead, digest, _kinds(lead, digest))


def test_pool_evidence_only_for_a_pool_task_held_here_and_a_fresh_nonce(pair, p):
    lead, member = pair
    spec = _pool_task(pair, p)
    digest = spec.digest()
    single = p.spec(pool=None, task_id="single001")
    member.executor.create_task(single, p.approvals(single))

    def ask(target: str, nonce: bytes) -> dict:
        return json.loads(stranger.action("pool-evidence", wire.canonical(
            {"spec_digest": target, "nonce": nonce.hex()})))

    with attested_client(member.address) as stranger:
        for unknown in ("ab" * 32, single.digest()):  # none held; not a pool task
            with pytest.raises(UnknownTask):
                ask(unknown, b"\x01" * 32)
        for nonce in (b"", b"\x01" * 16, b"\x01" * 31, b"\x01" * 33, b"\x01" * 64):
            with pytest.raises(InputError, match="nonce must be 32 bytes"):
                ask(digest, nonce)
        with pytest.raises(InputError):  # a task id is not a digest
            stranger.action("pool-evidence", wire.canonical(
                {"spec_digest": TASK, "nonce": "01" * 32}))
        answer = ask(digest, b"\x01" * 32)  # what a member asks: nothing of the task in it
        assert sorted(answer) == ["cert_pem", "evidence"]
    _untouched(member, digest, _kinds(member, digest))


def test_a_member_is_never_run_directly(pair, p):
    lead, member = pair
    spec = _pool_task(pair, p)
    digest = spec.digest()
    audit = _kinds(member, digest)
    with attested_client(member.address) as stranger:
        for ref in (digest, TASK):
            with pytest.raises(StateError, match="run by its lead only"):
                stranger.action("run", ref.encode())
    with pytest.raises(StateError, match="run by its lead only"):
        member.executor.run(digest, background=False)
    _untouched(member, digest, audit)
    _untouched(lead, digest, _kinds(lead, digest))


# -- 4. the honest run -----------------------------------------------------------------------


def close(a: Any, b: Any, tol: float, path: str = "") -> None:
    """a equals b: the same keys and types, floats within `tol` (relative or absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float), path
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def _single_value(p: Parties) -> dict[str, Any]:
    comp = compute.get("linear_regression")
    return comp.run(list(p.tables.items()), comp.check_params(dict(LINEAR)))


def _wiped(m: Member, digest: str) -> list[dict]:
    return [e["body"] for e in m.status(digest)["audit"] if e["kind"] == "wiped"]


def _run(pair: list[Member], p: Parties) -> tuple[wire.TaskSpec, dict[str, Any]]:
    """Run a pool task on its lead until done; the spec and the initiator's opened result."""
    lead, _ = pair
    spec = _pool_task(pair, p)
    digest = spec.digest()
    with attested_client(lead.address) as client:
        assert client.action_json("run", digest.encode())["status"] == "running"
        status = _wait_status(lead, digest, {"done", "failed"})
        assert status["status"] == "done", status["error"]
        envelope = client.take_result(spec.task_id, p.initiator, spec_digest=digest)
    return spec, json.loads(seal.open_sealed(base64.b64decode(envelope.sealed),
                                             p.initiator.encryption_private_key(), digest))


def test_the_pool_computes_the_single_executors_value_and_every_member_wipes(pair, p):
    lead, member = pair
    spec, body = _run(pair, p)
    digest = spec.digest()
    value = body["result"]
    close(value, _single_value(p), 1e-6)
    assert value["n_samples"] == 200
    assert body["spec_digest"] == digest and body["simulated"] is True
    # the member ended its part on the lead's word: wiped, nothing left to hand out
    status = _wait_status(member, digest, {"released", "failed"})
    assert status["status"] == "released" and status["error"] is None
    assert status["inputs_held"] == [] and status["receiving"] == []
    assert _wiped(member, digest) == [{"inputs": ["a_data", "b_data"], "reason": "computed"}]
    assert member.executor.held_bytes(digest) == 0
    lead_status = lead.status(digest)
    assert lead_status["status"] == "released" and lead_status["inputs_held"] == []
    assert _wiped(lead, digest) == [{"inputs": ["a_data", "b_data"], "reason": "computed"}]
    for m in pair:
        with pytest.raises(StateError):
            held.tables(held_key(digest, m.key))
        assert held_key(digest, m.key) not in _CONCLUDE
    with attested_client(member.address) as client, pytest.raises(StateError):
        client.take_result(spec.task_id, p.initiator, spec_digest=digest)


def test_the_sealed_result_counts_every_members_rows(pair, p):
    """A receiver reads how many rows of each dataset went in: all of them, over the pool
    (the value's n_samples is 200; the lead alone was streamed 70 and 20)."""
    _, body = _run(pair, p)
    assert body["result"]["n_samples"] == 200
    assert body["inputs"] == {"a_data": 120, "b_data": 80}


# -- 5. a member lost while the lead computes -----------------------------------------------


def _lose_member(pair: list[Member], p: Parties, monkeypatch: pytest.MonkeyPatch
                 ) -> wire.TaskSpec:
    """Run a pool task whose computation never ends by itself, stop the member once the
    lead computes, and wait for the lead to end the task."""
    lead, member = pair
    spec = _pool_task(pair, p)
    digest = spec.digest()
    computing = threading.Event()

    async def stalled(*args: Any, **kwargs: Any) -> dict[str, Any]:
        computing.set()  # every worker joined and the lead watches them
        await asyncio.Event().wait()  # until the lead cancels it
        raise AssertionError("unreachable")

    monkeypatch.setattr("teeflow.executor.pool.lead.run_on_pool", stalled)
    assert lead.executor.run(digest) == "running"
    assert computing.wait(WAIT), lead.status(digest)
    assert member.status(digest)["status"] == "running"  # it joined, its parts on its worker
    member.stop()  # its Flight server and its Dask worker go
    _wait_status(lead, digest, {"failed", "done"})
    return spec


def test_a_member_lost_while_the_lead_computes_fails_the_task_and_both_wipe(
        pair, p, monkeypatch):
    lead, member = pair
    digest = _lose_member(pair, p, monkeypatch).digest()
    status = lead.status(digest)
    assert status["status"] == "failed"
    assert f"pool member {member.key[:16]}" in status["error"]
    assert status["inputs_held"] == []
    assert _wiped(lead, digest) == [{"inputs": ["a_data", "b_data"], "reason": "failed"}]
    gone = _wait_status(member, digest, {"failed", "released"})
    assert gone["status"] == "failed" and gone["inputs_held"] == []
    assert _wiped(member, digest) == [{"inputs": ["a_data", "b_data"], "reason": "failed"}]
    for m in pair:
        assert m.executor.held_bytes(digest) == 0
        with pytest.raises(StateError):
            held.tables(held_key(digest, m.key))
        assert held_key(digest, m.key) not in _CONCLUDE


def test_the_lead_does_not_wait_for_a_member_that_left(pair, p, monkeypatch, caplog):
    """Failing, the lead tells only the members still linked: one that left wiped when it
    did, and reaching for it cost Dask's connect timeout (30 s), the lead's task still
    running and holding its inputs meanwhile."""
    caplog.set_level(logging.WARNING, logger="teeflow.executor")
    digest = _lose_member(pair, p, monkeypatch).digest()
    assert pair[0].status(digest)["status"] == "failed"
    told = [r.getMessage() for r in caplog.records if r.name == "teeflow.executor"]
    assert not [m for m in told if "members not told the task failed" in m], told
