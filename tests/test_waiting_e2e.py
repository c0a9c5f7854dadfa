"""Every task says what it waits for and ends by its deadline; automatic executor choice
skips a dead executor. Real processes (LocalCluster, port 0); the CLI as a subprocess.

alice approves by rule; bob signs by hand, and his provider is stopped (SIGSTOP) where a
test needs a party that has gone silent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party, policy_toml
from teeflow.cli.demo import make_party_data
from teeflow.core import audit
from teeflow.core.errors import InputError, TeeflowError
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli, wait_task_state

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("waiting")
    make_party_data(work / "alice.csv", 300, seed=1)
    make_party_data(work / "bob.csv", 200, seed=2)
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        c.start_provider(Party("alice", "w_alice", work / "alice.csv"), poll_wait=1)
        c.start_provider(Party("bob", "w_bob", work / "bob.csv"), approve=False, poll_wait=1)
        c.wait_for_datasets(["w_alice", "w_bob"])
        c.wait_for_executor(c.executor_address)
        policy = work / "policy.toml"
        policy.write_text(policy_toml(code_measurement()))
        c.env = {"TEEFLOW_SCHEDULER": c.scheduler_url, "TEEFLOW_KEY": str(c.initiator_key),
                 "TEEFLOW_POLICY": str(policy)}
        yield c


@contextmanager
def _stopped(c: LocalCluster, name: str) -> Iterator[None]:
    """The process frozen (SIGSTOP) for the block, then let go, so stop() can end it."""
    pid = c.processes[name].pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def _client(c: LocalCluster, key: Path | None = None) -> Client:
    return Client(c.scheduler_url, key=key or c.initiator_key, policy=appraisal_policy())


def _until(what: str, check, timeout: float = 90.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def test_status_names_the_stopped_provider_and_when_it_was_last_seen(cluster):
    c = cluster
    with _stopped(c, "provider-bob"), _client(c) as client:
        task = client.submit(["w_alice", "w_bob"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _until("alice signed", lambda: client.task(task["id"])["approvals"])
        shown = run_cli("status", task["id"], env=c.env, columns=200)
        assert shown.returncode == 0, shown.stderr
        line = next(ln.strip() for ln in shown.stdout.splitlines() if "waiting" in ln)
        assert line.startswith("waiting ") and "for bob's signature; bob last seen " in line
        assert line.endswith(" ago") and "alice" not in line
        doc = json.loads(run_cli("status", task["id"], "--json", env=c.env, columns=200).stdout)
        (waiter,) = doc["waiting"]["for"]
        assert (waiter["who"], waiter["what"]) == ("bob", "signature")
        assert waiter["last_seen"] is not None and waiter["last_seen"] <= time.time()
        assert doc["deadline"] > time.time()
        # `wait` resumes waiting (after Ctrl-C or --no-wait) and says the same line
        waited = run_cli("wait", task["id"], "--timeout", "2", env=c.env, columns=200)
        assert waited.returncode != 0
        assert "for bob's signature; bob last seen" in waited.stderr
        client.cancel(task["id"])


def test_a_task_past_its_deadline_fails_naming_what_it_waited_for(cluster):
    c = cluster
    with _stopped(c, "provider-bob"), _client(c) as client:
        submitted = run_cli("submit", "--datasets", "w_alice,w_bob", "--executor",
                         c.executor_address, "--compute", "logistic_regression", "--param",
                         "label=y", "--deadline", "20s", "--no-wait", env=c.env, columns=200)
        assert submitted.returncode == 0, submitted.stderr
        task_id = next(t["id"] for t in client.tasks() if t["state"] == "submitted")
        digest = client.task(task_id)["spec_digest"]
        # bob signs by hand (his node's key), then his node stays silent: no upload
        with _client(c, c.workdir / "bob.key") as bob:
            bob.decide(task_id, "approved")
        wait_task_state(client, task_id, {"uploading", "failed"})
        task = wait_task_state(client, task_id, {"failed"}, timeout=90)
    reason = task["error"]
    # 20s from when the spec was signed; the scheduler counts from the submission after it
    assert re.match(r"deadline passed after \d+s: waiting for ", reason), reason
    assert "bob's upload of w_bob" in reason and "bob last seen " in reason
    # the executor holds nothing of it: it fails the task at the same signed deadline
    with ExecutorClient(c.executor_address, None) as ex:
        status = _until("the executor wiped the task", lambda: (
            s if (s := ex.status(digest)).status == "failed" and not s.inputs_held
            else None))
    assert status.receiving == [] and status.spilled == {}


def test_a_bad_deadline_is_a_named_error(cluster):
    c = cluster
    with _client(c) as client:
        before = len(client.tasks())
    for bad in ("5x", "-3m", "0s", "soon"):
        proc = run_cli("submit", "--datasets", "w_alice", "--compute", "logistic_regression",
                    "--param", "label=y", "--deadline", bad, "--no-wait", env=c.env, columns=200)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "--deadline" in proc.stderr and "error" in proc.stderr, proc.stderr
    proc = run_cli("scheduler", "--db", str(c.workdir / "other.sqlite"), "--task-deadline",
                "forever", env=c.env, columns=200)
    assert proc.returncode != 0 and "--task-deadline" in proc.stderr, proc.stderr
    with _client(c) as client:
        assert len(client.tasks()) == before  # nothing submitted


def _submit_for_scheduler_choice(client: Client, code_digest: str) -> dict:
    """Signed as the SDK signs, but with no executor named: the scheduler picks."""
    spec = client.build_spec(["w_alice"], "logistic_regression", {"label": "y"},
                             code_digest=code_digest)
    payload = audit.signed_payload(spec.task_id, "submitted",
                                   {"spec": spec.to_dict(), "spec_digest": spec.digest()})
    signature = base64.b64encode(client.identity.sign(payload)).decode()
    return client.scheduler.submit(spec.to_dict(), signature, None)


def test_automatic_choice_skips_a_dead_executor(tmp_path):
    make_party_data(tmp_path / "alice.csv", 100, seed=1)
    with LocalCluster(tmp_path / "c") as c:
        c.start_scheduler()
        first = c.start_executor(name="ex-a")
        second = c.start_executor(name="ex-b")
        c.start_provider(Party("alice", "w_alice", tmp_path / "alice.csv"), poll_wait=1)
        c.wait_for_datasets(["w_alice"])
        for address in (first, second):
            c.wait_for_executor(address)
        # the one listed first is the one a choice that does not probe would take
        names = {first: "ex-a", second: "ex-b"}
        dead, live = sorted(names)
        with _client(c) as client:
            digest = client.executor_catalog(live)["logistic_regression"].code_digest
            c.stop_process(names[dead], signal.SIGKILL)
            task = _submit_for_scheduler_choice(client, digest)
            assert task["executor"] == live
            c.stop_process(names[live], signal.SIGKILL)
            with pytest.raises(TeeflowError) as caught:
                _submit_for_scheduler_choice(client, digest)
    assert isinstance(caught.value, InputError)
    message = str(caught.value)
    assert f"{dead}: it does not answer" in message and f"{live}: it does not answer" in message
