"""A dataset file that changed since its provider catalogued it is refused, naming what
changed (rows, size, content), and nothing of it reaches the executor; one bad file takes
only its own dataset offline. Real processes (LocalCluster)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.core.errors import DatasetChanged, DatasetOffline, UnknownTask
from teeflow.files.datasets import catalogue, open_unchanged, unchanged_batches
from teeflow.net.executor_client import ExecutorClient
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli, wait_task_state

SECRET = "SECRETVALUE42"
A_ROWS, B_ROWS = 400, 300


def _bad_csv(path: Path) -> None:
    """Over 8 MiB of good rows (past the CSV reader's first block), then one that does not
    parse as the int column it falls in."""
    make_party_data(path, 50_000, seed=5)
    assert path.stat().st_size > 8 << 20
    header = path.read_text().splitlines()[0].split(",")
    with path.open("a") as f:
        f.write(",".join(["0.5"] * (len(header) - 1) + [SECRET]) + "\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """alice (d1) signs by hand, so her file can change between her signature and her
    upload; bob (d2) signs by rule and also holds d_bad, a CSV with a bad row past 8 MiB."""
    work = tmp_path_factory.mktemp("changes")
    make_party_data(work / "a.csv", A_ROWS, seed=1)
    make_party_data(work / "b.csv", B_ROWS, seed=2)
    _bad_csv(work / "bad.csv")
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor()
        c.alice = Party("alice", "d1", work / "a.csv")
        c.bob = Party("bob", "d2", work / "b.csv")
        c.start_provider(c.alice, approve=False)
        c.start_provider(c.bob, dataset_toml=(
            f'\n[[datasets]]\nname = "d_bad"\npath = "{work / "bad.csv"}"\n'))
        c.wait_for_datasets(["d1", "d2"])
        c.wait_for_executor(c.executor_address)
        yield c
    finally:
        c.stop()


@pytest.fixture
def restore(cluster):
    """Each test's edits to a.csv and b.csv are undone after it (same bytes, same digest)."""
    saved = {p: p.read_bytes() for p in (cluster.alice.path, cluster.bob.path)}
    yield
    for p, data in saved.items():
        p.write_bytes(data)


def _client(c: LocalCluster) -> Client:
    return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                  name=c.initiator_name)


def _alice_approves(c: LocalCluster, task_id: str) -> None:
    proc = run_cli("approve", task_id, env={"TEEFLOW_SCHEDULER": c.scheduler_url,
                                            "TEEFLOW_KEY": str(c.workdir / "alice.key")},
                   input="y\n", columns=200, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _received(c: LocalCluster, digest: str) -> dict:
    with ExecutorClient(c.executor_address, None) as ex:
        try:
            return dict(ex.status(digest).received)
        except UnknownTask:
            return {}


def _wait_log(c: LocalCluster, node: str, text: str, timeout: float = 60) -> None:
    path = c.workdir / "logs" / f"provider-{node}.log"
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{node}'s log never said {text!r}"
        time.sleep(0.1)


def _submit_then_change(c: LocalCluster, change) -> tuple[dict, dict]:
    """Submit over d1 and d2; bob signs by rule; alice signs by hand while her node is
    stopped (SIGSTOP), her file is changed, and her node resumes to upload: only its
    check before sending stands between the changed file and the executor."""
    alice = c.processes["provider-alice"]
    with _client(c) as client:
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _wait_log(c, "alice", f"task {task['id']}: no rule approves it")
        os.killpg(alice.pid, signal.SIGSTOP)
        try:
            _alice_approves(c, task["id"])
            change(c.alice.path)
        finally:
            os.killpg(alice.pid, signal.SIGCONT)
        ended = wait_task_state(client, task["id"], {"failed"}, timeout=120)
    return ended, task


def _alice_error(ended: dict) -> str:
    errors = [a["error"] or "" for a in ended["assignments"]
              if a["dataset"] == "d1" and a["state"] == "failed"]
    assert errors, ended["assignments"]
    return errors[0]


def _quarter(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 4])


def _append(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    with path.open("a") as f:
        f.writelines(lines[1:51])  # 50 more rows, of the same schema


def _same_size_other_content(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"\n") + 1  # the first data row's first value
    while not chr(data[at]).isdigit():
        at += 1
    data[at] = ord("1") if data[at] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


@pytest.mark.e2e
@pytest.mark.parametrize("change, what", [(_quarter, "size"), (_append, "size"),
                                          (_same_size_other_content, "content")])
def test_a_file_changed_after_signing_is_not_sent(cluster, restore, change, what):
    ended, task = _submit_then_change(cluster, change)
    error = _alice_error(ended)
    assert f"dataset 'd1': its file's {what} changed since it was catalogued" in error, error
    assert "d1" not in _received(cluster, task["spec_digest"])
    assert SECRET not in error


@pytest.mark.e2e
def test_a_file_changed_before_signing_is_rejected_and_named_in_the_log(cluster, restore):
    """bob's rule would sign; his node checks the file first and rejects instead."""
    _append(cluster.bob.path)
    with _client(cluster) as client:
        task = client.submit(["d1", "d2"], cluster.executor_address, "logistic_regression",
                             {"label": "y"})
        ended = wait_task_state(client, task["id"], {"rejected"}, timeout=60)
    assert [a["decision"] for a in ended["approvals"]] == ["rejected"]
    log = (cluster.workdir / "logs" / "provider-bob.log").read_text()
    assert f"task {task['id']}: rejected: dataset 'd2': its file's size changed" in log
    assert "d2" not in _received(cluster, task["spec_digest"])


@pytest.mark.e2e
def test_one_bad_file_takes_only_its_own_dataset_offline(cluster):
    """bob started although d_bad has a bad row past the first 8 MiB: it is not
    catalogued, his log names it (never the row), and d2 still serves a whole task."""
    c = cluster
    assert c.processes["provider-bob"].poll() is None
    with _client(c) as client:
        assert "d_bad" not in {d["name"] for d in client.datasets()}
        task = client.submit(["d1", "d2"], c.executor_address, "logistic_regression",
                             {"label": "y"})
        _alice_approves(c, task["id"])
        client.wait(task["id"], timeout=120)
        assert client.result(task["id"]).value["n_samples"] == A_ROWS + B_ROWS
    log = (c.workdir / "logs" / "provider-bob.log").read_text()
    assert "dataset 'd_bad'" in log and "dataset offline" in log
    assert SECRET not in log


# -- the checks themselves, on files ------------------------------------------------------
def test_catalogue_finds_a_bad_row_past_the_first_block_without_quoting_it(tmp_path):
    path = tmp_path / "bad.csv"
    _bad_csv(path)
    with pytest.raises(DatasetOffline, match="not valid CSV") as caught:
        catalogue("d", path)
    assert SECRET not in str(caught.value)
    with pytest.raises(DatasetOffline, match="cannot read"):
        catalogue("d", tmp_path / "missing.csv")


def test_a_change_mid_stream_is_caught_before_the_end(tmp_path):
    """The file grows while it is being sent: the rows streamed are checked against the
    catalogued count, and the file re-hashed, before the end marker could go."""
    path = tmp_path / "d.csv"
    pacsv.write_csv(pa.table({"a": list(range(200_000))}), path)
    record = catalogue("d", path)
    f = open_unchanged("d", path, record)
    batches = unchanged_batches("d", path, f, record, batch_rows=10_000)
    next(batches)
    with path.open("a") as out:
        out.write("1\n2\n")
    with pytest.raises(DatasetChanged, match="rows changed|content changed|size changed"):
        list(batches)
