"""Fault injection: each role SIGKILLed (then restarted) or SIGSTOPped (then resumed) while a
task waits for an owner's consent, while it uploads, while the executor computes, and once
done, before its result is taken. Every time the task ends (done, or
failed with a reason), the executor holds nothing of it, no result is released twice, and
`teeflow audit verify` passes on the scheduler's file."""

from __future__ import annotations

import signal
import time

import pytest

from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party, policy_toml
from teeflow.core.errors import TeeflowError
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, wait_task_state
from tests.test_e2e import (  # noqa: F401  (own_cluster: the fixture)
    _client,
    _start_provider,
    _wait_uploading,
    make_party_data,
    own_cluster,
)
from tests.test_task_ends import _log_verifies

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
ROWS = 3 * 65536  # bob's; in the uploading stage paced at a batch a second (~3 s)
FEW = 3000  # bob's in the stages that need no long upload or run (consent, releasing)
PAUSE = 4.0  # seconds a stopped process stays stopped
# The computation of each stage. `running` needs one that computes for seconds, to be hit in
# the middle: XGBoost at its defaults (100 rounds; alice's generated rules hold its revealing
# parameters to them) over the ~200K rows.
COMPUTE = {"running": "xgboost"}


def _parties(tmp_path) -> tuple[Party, Party]:
    return (Party("alice", "d1", tmp_path / "a.parquet"),
            Party("bob", "d2", tmp_path / "b.parquet"))


def _start_bob(c: LocalCluster, bob: Party, paced: bool) -> None:
    # no approval rule: bob signs by hand, so the task waits for his consent; paced only
    # where the fault must land mid-upload (elsewhere it would only slow the suite)
    _start_provider(c, bob, policy_toml(code_measurement()), approve=False,
                    node_settings="upload_rows_per_second = 65536\n" if paced else "")


def _restart(c: LocalCluster, role: str, tmp_path, paced: bool) -> None:
    if role == "scheduler":
        port = c.scheduler_address.rsplit(":", 1)[1]
        (c.workdir / "again.port").unlink(missing_ok=True)
        c._spawn("scheduler", "scheduler", "--db", str(c.db), "--data-dir", str(c.workdir),
                 "--listen", f"127.0.0.1:{port}", "--port-file", str(c.workdir / "again.port"))
        c._wait_port("scheduler", c.workdir / "again.port")
    elif role == "executor":
        c.start_executor(listen=c.executor_address)
    else:
        _start_bob(c, _parties(tmp_path)[1], paced)


def _inject(c: LocalCluster, role: str, sig: int, tmp_path, paced: bool) -> None:
    name = {"scheduler": "scheduler", "executor": "executor", "provider": "provider-bob"}[role]
    if sig == signal.SIGKILL:
        c.stop_process(name, signal.SIGKILL)
        _restart(c, role, tmp_path, paced)
    else:
        proc = c.processes[name]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(PAUSE)
        proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("stage", ["consent", "uploading", "running", "releasing"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
@pytest.mark.parametrize("role", ["scheduler", "provider", "executor"])
def test_a_fault_ends_the_task_cleanly(own_cluster, tmp_path, role, sig, stage):  # noqa: F811
    c = own_cluster()
    alice, bob = _parties(tmp_path)
    make_party_data(alice.path, 2000, seed=1)
    rows = ROWS if stage in ("uploading", "running") else FEW
    make_party_data(bob.path, rows, seed=2)
    c.start_scheduler()
    c.start_executor()
    _start_provider(c, alice)
    _start_bob(c, bob, stage == "uploading")
    c.wait_for_datasets(["d1", "d2"])
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address,
                             COMPUTE.get(stage, "logistic_regression"), {"label": "y"})
        wait_task_state(client, task["id"], {"submitted"})
        if stage == "consent":
            _inject(c, role, sig, tmp_path, stage == "uploading")
        with Client(c.scheduler_url, key=c.workdir / "bob.key",
                    policy=appraisal_policy()) as by_hand:
            by_hand.decide(task["id"], "approved")
        if stage == "uploading":
            _wait_uploading(client, task["id"], "bob")
            _inject(c, role, sig, tmp_path, stage == "uploading")
        if stage == "running":
            _wait_running(c.executor_address, task["spec_digest"])
            _inject(c, role, sig, tmp_path, stage == "uploading")
            if (role, sig) == ("executor", signal.SIGKILL):  # its inputs died with it
                final = wait_task_state(client, task["id"], {"failed"}, timeout=90)
                assert "no longer holds the task" in final["error"]
            else:  # the run goes on, or resumes, and its one result is let out
                client.wait(task["id"], timeout=150)
                assert client.result(task["id"]).value["n_samples"] == 2000 + rows
                final = wait_task_state(client, task["id"], {"released"}, timeout=60)
        if stage == "releasing":  # done: its result waits for the initiator
            client.wait(task["id"], timeout=150)
            _inject(c, role, sig, tmp_path, stage == "uploading")
            if (role, sig) == ("executor", signal.SIGKILL):  # no state dir: result gone
                final = wait_task_state(client, task["id"], {"failed"}, timeout=90)
                assert "lost the result" in final["error"]
            else:
                assert client.result(task["id"]).value["n_samples"] == 2000 + rows
                final = wait_task_state(client, task["id"], {"released"}, timeout=60)
        final = wait_task_state(client, task["id"], {"done", "released", "failed"},
                                timeout=150)
        if final["state"] == "failed":
            assert final["error"], final
        elif stage not in ("running", "releasing"):
            assert client.result(task["id"]).value["n_samples"] == 2000 + rows
        _nothing_held(c.executor_address, final["spec_digest"])
        kinds = _log_verifies(c, client, task["id"])
        assert kinds.count("released") <= 1 and kinds.count("release-granted") <= 1
        if (stage, role, sig) == ("running", "executor", signal.SIGKILL):
            assert "computed" not in kinds and "release-granted" not in kinds, kinds  # cut short


def _wait_running(address: str, digest: str, timeout: float = 120) -> None:
    """Until the executor says it computes the task; a run that ends first misses the stage."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ExecutorClient(address, None) as ex:
                status = ex.status(digest).status
        except TeeflowError:  # not handed over yet
            status = "unknown"
        if status == "running":
            return
        assert status in ("unknown", "waiting") and time.monotonic() < deadline, status
        time.sleep(0.05)


def _nothing_held(address: str, digest: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ExecutorClient(address, None) as ex:
                status = ex.status(digest)
        except TeeflowError:  # restarted: it holds no task of that digest at all
            return
        if not status.inputs_held and not status.receiving:
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
