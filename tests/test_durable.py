"""Results and wipes survive restarts: finished envelopes (ciphertext only) kept in the
executor's state dir and re-signed by a restarted executor's new key; what a dead run left
in the spill root removed at start. In process, and against real processes killed with
SIGKILL."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core import seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, StateError
from teeflow.executor.release import sign_envelope
from teeflow.executor.service import SQL_TEMP_ROOT_ENV, Executor
from teeflow.executor.spill import RunDir
from teeflow.executor.store import ResultStore
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, attested_client, challenge_for, sign_entry
from tests.test_executor_service import TASK, TLS_KEY, Parties, _upload

KEY1 = TLS_KEY  # the key test_executor_service signs uploads for
KEY2 = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def p() -> Parties:
    return Parties()


def _finished(p: Parties, spill: Path, **kw) -> Executor:
    ex = Executor(SimulatedBackend(), KEY1, spill_dir=str(spill), **kw)
    ex.create_task(p.spec, p.approvals)
    _upload(ex, p, "a_data")
    _upload(ex, p, "b_data")
    ex.run(TASK, background=False)
    assert ex.status(TASK)["status"] == "done"
    return ex


def _take(ex: Executor, signer: KeySigner) -> dict:
    challenge = challenge_for(ex, TASK, signer)
    sig = signer.sign(wire.result_message(TASK, challenge, ex.tls_spki_hash))
    return json.loads(ex.take_result(TASK, signer.public_key(), challenge, sig))


def test_sql_temp_root_name_is_the_one_session_reads():
    from teeflow.compute.sql import session

    assert session.TEMP_ROOT_ENV == SQL_TEMP_ROOT_ENV


def test_a_restarted_executor_serves_untaken_results_re_signed(p, tmp_path):
    first = _finished(p, tmp_path)
    _take(first, p.initiator)
    computed = next(e for e in first.status(TASK)["audit"] if e["kind"] == "computed")
    state = list((tmp_path / "state" / "results").iterdir())
    assert len(state) == 1
    text = state[0].read_text()
    assert '"result"' not in text and "salt" not in text  # ciphertext only
    del first  # the run is over; its key is gone

    second = Executor(SimulatedBackend(), KEY2, spill_dir=str(tmp_path))
    assert second.startup["results"] == {"restored": 1, "expired": 0, "refused": 0}
    status = second.status(TASK)
    assert status["status"] == "done" and status["taken_by"] == [p.initiator.public_key()]
    restored = status["audit"][-1]
    assert restored["kind"] == "restored" and restored["signer"] == second.signer
    assert restored["body"]["previous_signer"] == computed["signer"] != second.signer
    envelope = _take(second, p.bob)
    assert envelope["signer"] == second.signer  # the key a receiver appraises now
    sealed = base64.b64decode(envelope["sealed"])
    assert computed["body"]["sealed_sha256"][p.bob.public_key()] == \
        hashlib.sha256(sealed).hexdigest()
    plaintext = seal.open_sealed(sealed, p.bob.encryption_private_key(), p.spec.digest())
    assert computed["body"]["result_commitment"] == hashlib.sha256(plaintext).hexdigest()
    assert second.status(TASK)["status"] == "released"
    assert list((tmp_path / "state" / "results").iterdir()) == []  # all taken: gone
    with pytest.raises(StateError):
        _take(second, p.initiator)  # one take each, also across a restart


def test_results_expire(p, tmp_path):
    now = [time.time()]  # the clock of deadlines, challenges and expiry alike
    _finished(p, tmp_path, result_ttl=60, now=lambda: now[0])
    now[0] += 61
    later = Executor(SimulatedBackend(), KEY2, spill_dir=str(tmp_path), now=lambda: now[0])
    assert later.startup["results"]["expired"] == 1
    assert list((tmp_path / "state" / "results").iterdir()) == []

    other = Parties()
    live = _finished(other, tmp_path / "b", result_ttl=60, now=lambda: now[0])
    now[0] += 61
    with pytest.raises(StateError):
        _take(live, other.initiator)
    assert live.status(TASK)["audit"][-1]["kind"] == "expired"
    assert list((tmp_path / "b" / "state" / "results").iterdir()) == []


def test_a_swapped_ciphertext_is_not_restored(p, tmp_path):
    """The host swaps a stored ciphertext for one of its own making (anyone can seal to a
    receiver's public key): it no longer hashes to the computed entry, so nothing loads."""
    _finished(p, tmp_path)
    path = next((tmp_path / "state" / "results").iterdir())
    record = json.loads(path.read_text())
    forged = seal.seal(b'{"result": {"forged": true}}', p.spec.receivers[1].enc_key,
                       p.spec.digest())
    record["sealed"][p.bob.public_key()] = base64.b64encode(forged).decode()
    path.write_text(json.dumps(record))
    ex = Executor(SimulatedBackend(), KEY2, spill_dir=str(tmp_path))
    assert ex.startup["results"] == {"restored": 0, "expired": 0, "refused": 1}
    assert not path.exists()


def test_a_receiver_refuses_a_planted_result_the_computed_entry_does_not_commit_to(
        p, tmp_path):
    """Where the disk is not sealed to the enclave, a host can plant a whole state file
    (its own computed entry, its own ciphertext) and have it re-signed. The receiver's
    check against the computed entry an owner-attested key signed refuses it."""
    real = _finished(p, tmp_path)
    computed = next(e for e in real.status(TASK)["audit"] if e["kind"] == "computed")
    forged_plain = b'{"result": {"forged": true}, "salt": "00"}'
    forged = seal.seal(forged_plain, p.spec.receivers[0].enc_key, p.spec.digest())
    envelope = json.loads(sign_envelope(real._tasks.notary, p.spec, p.initiator.public_key(),
                                        forged, "simulated"))
    body = {"tls_key_sha256": real.tls_spki_hash.hex(), "spec_digest": p.spec.digest()}
    log = [SimpleNamespace(kind="submitted", body={"spec": p.spec.to_dict()}, signer="",
                           signature=""),
           SimpleNamespace(kind="attested", body=body, signer=f"ed25519:{p.alice.public_key()}",
                           signature=sign_entry(p.alice, TASK, "attested", body)),
           SimpleNamespace(**computed)]

    class Receiver(Client):
        def __init__(self) -> None:  # no scheduler: the log above is what it serves
            self.identity = p.initiator

        def audit_log(self, task_id=None):
            return log

    receiver = Receiver()
    with pytest.raises(AuthError, match="commits to"):
        receiver._check_commitment(TASK, envelope["sealed_sha256"], forged_plain, p.spec)
    genuine = _take(real, p.initiator)
    plaintext = seal.open_sealed(base64.b64decode(genuine["sealed"]),
                                 p.initiator.encryption_private_key(), p.spec.digest())
    receiver._check_commitment(TASK, genuine["sealed_sha256"], plaintext, p.spec)
    log.pop(1)  # no owner attested the key that signed the computed entry
    with pytest.raises(AuthError, match="attested"):
        receiver._check_commitment(TASK, genuine["sealed_sha256"], plaintext, p.spec)


def test_a_start_wipes_what_dead_runs_left_and_spares_live_ones(tmp_path):
    live = RunDir(tmp_path)
    (live.spill / "teeflow-spill-live").write_bytes(b"x")
    dead = tmp_path / "run-dead"
    (dead / "sql" / "teeflow-sql-abc").mkdir(parents=True)
    (dead / "lock").write_bytes(b"")
    (dead / "teeflow-spill-1").write_bytes(b"sealed")
    (dead / "teeflow-spill-2").write_bytes(b"sealed")
    (tmp_path / "teeflow-spill-old").write_bytes(b"sealed")  # an older executor's
    ex = Executor(SimulatedBackend(), KEY1, spill_dir=str(tmp_path))
    assert ex.startup["wiped"] == {"runs": 1, "spill_files": 3, "sql_dirs": 1}
    assert not dead.exists() and not (tmp_path / "teeflow-spill-old").exists()
    assert (live.spill / "teeflow-spill-live").exists()  # a live run sharing the root
    assert os.environ[SQL_TEMP_ROOT_ENV] == str(Path(ex.spill_dir) / "sql")
    live.close()
    ex.close()
    assert not live.path.exists() and not Path(ex.spill_dir).exists()


# -- real processes ------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "c")
    yield c
    for proc in c.processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    c.stop()


def test_killed_executor_restarts_and_serves_the_result_and_wipes_leftovers(cluster, tmp_path):
    """An executor finishes a task, is SIGKILLed before the receiver takes the result, and
    restarts on the same port with the same spill and state dirs: the receiver appraises
    the new executor and opens its result; the dead run's spill files and SQL temp folders
    are gone."""
    c = cluster
    spill = tmp_path / "spill"
    make_party_data(tmp_path / "a.csv", 500, seed=1)
    make_party_data(tmp_path / "b.csv", 400, seed=2)
    c.start_scheduler()
    address = c.start_executor("--spill-dir", str(spill))
    for party in (Party("alice", "d1", tmp_path / "a.csv"),
                  Party("bob", "d2", tmp_path / "b.csv")):
        c.start_provider(party)
    c.wait_for_datasets(["d1", "d2"])
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                name=c.initiator_name) as client:
        task = client.submit(["d1", "d2"], address, "logistic_regression", {"label": "y"})
        client.wait(task["id"], timeout=120)
        with attested_client(address) as ex:
            first_key = ex.tls_key_hash
        c.stop_process("executor", signal.SIGKILL)
        (dead,) = spill.glob("run-*")
        (dead / "teeflow-spill-left").write_bytes(b"sealed under a key that died")
        (dead / "sql" / "teeflow-sql-left").mkdir()

        port_file = c.workdir / "executor2.port"
        c._spawn("executor", "executor", "--tee", "simulated", "--listen", address,
                 "--port-file", str(port_file), "--spill-dir", str(spill))
        assert c._wait_port("executor", port_file) == address
        with attested_client(address) as ex:
            assert ex.tls_key_hash != first_key  # a new key, made at start
            info = ex.action_json("info")
        assert info["startup"]["wiped"] == {"runs": 1, "spill_files": 1, "sql_dirs": 1}
        assert info["startup"]["results"]["restored"] == 1
        assert not dead.exists()

        result = client.result(task["id"])  # appraises the restarted executor
        assert result.value["n_samples"] == 900
        with ExecutorClient(address, None) as ex:
            assert ex.status(task["id"]).status == "released"
    assert list((spill / "state" / "results").iterdir()) == []


def test_store_rejects_nothing_it_wrote(p, tmp_path):
    """A store's own record loads back (a format round trip, with every receiver pending)."""
    ex = _finished(p, tmp_path / "x", state_dir=str(tmp_path / "s"))
    assert ResultStore(tmp_path / "s").dir.exists()
    assert len(list((tmp_path / "s" / "results").iterdir())) == 1
    del ex
