"""Every task ends, and the scheduler and the executor agree how: real processes, faults
injected with SIGSTOP and SIGKILL.

Attackers and accidents: the executor's host pausing it past the scheduler's grace (it
must not keep the inputs, nor hand out a result the log never released), an executor
restarted at the same address (its tasks are gone: they must fail, not hang), a provider
killed as its upload was being set up (it resumes or the task fails with the reason)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from teeflow.cli.cluster import LocalCluster
from teeflow.core.errors import TeeflowError
from teeflow.net.executor_client import ExecutorClient
from tests.factories import wait_task_state
from tests.test_e2e import (  # noqa: F401  (own_cluster: the fixture)
    _client,
    _start_provider,
    _wait_uploading,
    make_party_data,
    own_cluster,
)

pytestmark = pytest.mark.e2e

from teeflow.attestation.simulated import code_measurement  # noqa: E402
from teeflow.cli.cluster import Party, policy_toml  # noqa: E402


def _cluster(c: LocalCluster, tmp_path, rows: int, *scheduler_args: str) -> None:
    """Alice at full speed, bob paced at one 64K-row batch a second."""
    make_party_data(tmp_path / "a.parquet", 2000, seed=1)
    make_party_data(tmp_path / "b.parquet", rows, seed=2)
    c.start_scheduler("scheduler.sqlite", *scheduler_args)
    c.start_executor()
    _start_provider(c, Party("alice", "d1", tmp_path / "a.parquet"))
    _start_provider(c, Party("bob", "d2", tmp_path / "b.parquet"),
                    policy_toml(code_measurement()),
                    node_settings="upload_rows_per_second = 65536\n")
    c.wait_for_datasets(["d1", "d2"])


def _executor_status(address: str, task_id: str, want: set[str], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ExecutorClient(address, None) as ex:
                status = ex.status(task_id)
            if status.status in want and not status.inputs_held:
                return status
        except TeeflowError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"executor never reached {want} with nothing held")
        time.sleep(0.3)


def _log_verifies(c: LocalCluster, client, task_id: str) -> list[str]:
    """`teeflow audit verify` passes on the scheduler's file; the task's entry kinds."""
    done = subprocess.run([sys.executable, "-m", "teeflow.cli.main", "audit", "verify",
                           "--db", str(c.db)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [e.kind for e in client.audit_log(task_id)]


def _wait_receiving(address: str, task_id: str, dataset: str) -> None:
    """Until the executor holds part of `dataset`'s stream (so it has something to wipe)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with ExecutorClient(address, None) as ex:
                status = ex.status(task_id)
            if dataset in status.inputs_held:
                return
        except TeeflowError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the executor never took {dataset}'s stream")


def test_executor_paused_past_the_grace_is_told_and_wipes(own_cluster, tmp_path):  # noqa: F811
    c = own_cluster()
    _cluster(c, tmp_path, 4 * 65536, "--executor-grace", "3s")
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _wait_uploading(client, task["id"], "bob")
        _wait_receiving(c.executor_address, task["id"], "d2")
        c.processes["executor"].send_signal(signal.SIGSTOP)
        try:
            final = wait_task_state(client, task["id"], {"failed"}, timeout=90)
        finally:
            c.processes["executor"].send_signal(signal.SIGCONT)
        # the scheduler's grace, or an upload that timed out first: either names the executor
        assert "executor lost" in final["error"] or c.executor_address in final["error"]
        status = _executor_status(c.executor_address, task["id"], {"failed", "cancelled"})
        mine = [e.kind for e in status.audit]
        assert "wiped" in mine, mine  # it held part of d2 when it was paused
        deadline = time.monotonic() + 30  # the scheduler records what the executor signed
        while not set(mine) <= set(kinds := _log_verifies(c, client, task["id"])):
            assert time.monotonic() < deadline, (mine, kinds)
            time.sleep(0.3)
        assert "release-granted" not in kinds and "released" not in kinds
        with pytest.raises(TeeflowError):
            client.result(task["id"])


def test_an_executor_restarted_at_its_address_fails_its_tasks(own_cluster, tmp_path):  # noqa: F811
    c = own_cluster()
    _cluster(c, tmp_path, 4 * 65536)
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _wait_uploading(client, task["id"], "bob")
        providers = [c.processes[f"provider-{n}"] for n in ("alice", "bob")]
        for p in providers:  # so no upload's failure tells the scheduler first
            p.send_signal(signal.SIGSTOP)
        try:
            address = c.executor_address
            c.stop_process("executor", signal.SIGKILL)
            c.start_executor(listen=address)
            final = wait_task_state(client, task["id"], {"failed"}, timeout=90)
        finally:
            for p in providers:
                p.send_signal(signal.SIGCONT)
        assert "no longer holds the task" in final["error"]
        _log_verifies(c, client, task["id"])


def test_a_provider_killed_as_it_starts_resumes_or_fails_with_the_reason(own_cluster,  # noqa: F811
                                                                         tmp_path):
    c = own_cluster()
    rows = 3 * 65536
    _cluster(c, tmp_path, rows)
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        deadline = time.monotonic() + 60
        while not any(a["node"] == "bob" and a["state"] == "started"
                      for a in client.task(task["id"])["assignments"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c.stop_process("provider-bob", signal.SIGKILL)
        _start_provider(c, Party("bob", "d2", tmp_path / "b.parquet"),
                        policy_toml(code_measurement()),
                        node_settings="upload_rows_per_second = 65536\n")
        final = wait_task_state(client, task["id"], {"done", "released", "failed"},
                                timeout=120)
        if final["state"] == "failed":  # killed mid-stream: the executor dropped it all
            # the first report wins: bob's d2, or alice's d1 refused by the failed task
            assert "d2" in final["error"] or "is failed, not taking uploads" in \
                final["error"], final["error"]
            _executor_status(c.executor_address, task["id"], {"failed", "cancelled"})
        else:
            assert client.result(task["id"]).value["n_samples"] == 2000 + rows
        _log_verifies(c, client, task["id"])


def test_a_provider_started_while_the_scheduler_is_down_waits_for_it(own_cluster,  # noqa: F811
                                                                     tmp_path):
    c = own_cluster()
    make_party_data(tmp_path / "a.parquet", 200, seed=1)
    c.start_scheduler()
    port = c.scheduler_address.rsplit(":", 1)[1]
    c.stop_process("scheduler")
    _start_provider(c, Party("alice", "d1", tmp_path / "a.parquet"))
    time.sleep(3)  # a few failed tries: it must not have exited
    assert c.processes["provider-alice"].poll() is None
    c._spawn("scheduler", "scheduler", "--db", str(c.db), "--data-dir", str(c.workdir),
             "--listen", f"127.0.0.1:{port}", "--port-file", str(c.workdir / "s2.port"))
    c._wait_port("scheduler", c.workdir / "s2.port")
    c.wait_for_datasets(["d1"])  # it registered once the scheduler came back
