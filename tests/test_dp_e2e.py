"""End to end: DP aggregates through real scheduler, executor and provider processes, with
each owner's privacy budget kept by its own provider, across restarts of every process and a
scheduler whose state is wiped."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.core.errors import TaskFailed
from teeflow.files.checkpoints import checkpoint_path
from teeflow.sdk import Client
from tests.factories import appraisal_policy, wait_task_state

pytestmark = pytest.mark.e2e

PRIVACY = {
    # alice signs by rule; bob's data has no privacy table; carol signs by hand
    "alice": "[datasets.privacy]\nepsilon_budget = 1.5\nmax_epsilon_per_task = 1.0\n"
             "required = true\nidentity = \"pid\"\n",
    "bob": "",
    "carol": "[datasets.privacy]\nepsilon_budget = 1.0\nrequired = true\n",
}


# What alice's and bob's rules sign: the parameters that decide what a DP release spends
# and protects, each bound (a rule that left one out would not match).
BIND = {"dp_aggregate": {"epsilon": {"max": 1.0}, "identity": ["pid"],
                         "max_contributions": {"max": 2}, "column": ["age"],
                         "lower": {"min": 0}, "upper": {"max": 100}}}


def _data(path, n, seed):
    rng = np.random.default_rng(seed)
    pd.DataFrame({"pid": [f"{path.stem}{i % (n // 2)}" for i in range(n)],
                  "age": rng.uniform(20, 80, n).round(1),
                  "visits": rng.integers(0, 10, n),
                  "ward": rng.choice(["a", "b", "c"], n)}).to_csv(path, index=False)


def _start_provider(c: LocalCluster, party: Party, approve: bool) -> None:
    c.start_provider(party, approve=approve, bind=BIND, dataset_toml=PRIVACY[party.node],
                     poll_wait=1)


def _start(c: LocalCluster, parties: list[Party], db: str) -> None:
    c.start_scheduler(db_name=db)
    c.start_executor()
    for p in parties:
        _start_provider(c, p, approve=p.node != "carol")
    c.wait_for_datasets([p.dataset for p in parties])
    c.wait_for_executor(c.executor_address)


def _stop(c: LocalCluster) -> None:
    for proc in c.processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    c.stop()



def _mean(eps: str) -> dict[str, str]:
    return {"statistic": "mean", "column": "age", "lower": "0", "upper": "100",
            "epsilon": eps, "identity": "pid", "max_contributions": "2"}


def _log(c: LocalCluster, node: str) -> str:
    return (c.workdir / "logs" / f"provider-{node}.log").read_text()


@pytest.fixture
def cluster(tmp_path):
    work = tmp_path / "c"
    work.mkdir()
    for name, n, seed in (("alice", 4000, 1), ("bob", 3000, 2), ("carol", 1000, 3)):
        _data(work / f"{name}.csv", n, seed)
    parties = [Party(n, f"{n}_ds", work / f"{n}.csv") for n in ("alice", "bob", "carol")]
    c = LocalCluster(work)
    c.parties = parties
    try:
        yield c
    finally:
        _stop(c)


def test_dp_aggregate_spends_the_owners_budget_which_no_restart_resets(cluster):
    c = cluster
    _start(c, c.parties, "scheduler.sqlite")

    def key() -> Client:
        return Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                      name=c.initiator_name)

    frames = [pd.read_csv(p.path) for p in c.parties[:2]]
    truth = pd.concat(frames)["age"].mean()
    with key() as client:
        first = client.submit(["alice_ds", "bob_ds"], None, "dp_aggregate", _mean("1.0"))
        client.wait(first["id"], timeout=120)
        value = client.result(first["id"]).value
        assert value["privacy"]["differentially_private"] is True
        assert value["privacy"]["epsilon"] == 1.0 and value["privacy"]["delta"] == 0.0
        assert value["privacy"]["max_contributions"] == 2
        assert abs(value["mean"] - truth) < 5  # noised, bounded: near the truth
        assert value["count"] != 7000 or value["sum"] != pd.concat(frames)["age"].sum()

        # a non-DP computation on a dataset that requires DP: alice refuses to sign
        plain = client.submit(["alice_ds"], None, "linear_regression", {"label": "age",
                                                                         "features": "visits"})
        wait_task_state(client, plain["id"], {"rejected"})

        # 1.0 of 1.5 spent: another 1.0 would overdraw; alice refuses, naming the dataset
        over = client.submit(["alice_ds", "bob_ds"], None, "dp_aggregate", _mean("1.0"))
        wait_task_state(client, over["id"], {"rejected"})
        with pytest.raises(TaskFailed, match="rejected"):
            client.wait(over["id"], timeout=10)
    log = _log(c, "alice")
    assert "dataset 'alice_ds' requires differential privacy" in log
    assert "dataset 'alice_ds': privacy budget would be overdrawn" in log

    # every process stops; the scheduler comes back with its state wiped (its operator
    # resetting what it could). The providers hold its old log checkpoint and see the log
    # shrank: they refuse to go on.
    _stop(c)
    c.start_scheduler(db_name="wiped.sqlite")
    c.start_executor()
    _start_provider(c, c.parties[0], approve=True)
    deadline = time.monotonic() + 60
    while "the log shrank" not in _log(c, "alice") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "the log shrank" in _log(c, "alice")
    _stop(c)
    # even an owner who then accepts the new log (drops its checkpoint) keeps its budget:
    # alice's budget is in alice's own file, and holds
    for key_file in [c.workdir / f"{p.node}.key" for p in c.parties] + [c.initiator_key]:
        checkpoint_path(key_file).unlink(missing_ok=True)
    _start(c, c.parties, "wiped.sqlite")
    with key() as client:
        again = client.submit(["alice_ds"], None, "dp_aggregate", _mean("0.6"))
        wait_task_state(client, again["id"], {"rejected"})
        fits = client.submit(["alice_ds"], None, "dp_aggregate", _mean("0.5"))
        client.wait(fits["id"], timeout=120)
        assert client.result(fits["id"]).value["privacy"]["epsilon"] == 0.5


def test_a_task_signed_by_hand_is_debited_at_upload_and_refused_when_spent(cluster):
    """carol has no rule: she signs with `teeflow approve` (here the SDK's decide), which
    goes around her provider; her provider debits before a byte leaves, and refuses the
    upload once the budget is spent."""
    c = cluster
    _start(c, c.parties, "scheduler.sqlite")
    carol_key = c.workdir / "carol.key"
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                name=c.initiator_name) as client, \
            Client(c.scheduler_url, key=carol_key) as carol:
        params = {"statistic": "histogram", "column": "ward", "categories": "a,b,c,d",
                  "epsilon": "1.0"}
        first = client.submit(["carol_ds"], None, "dp_aggregate", params)
        wait_task_state(client, first["id"], {"submitted"})
        carol.decide(first["id"], "approved")
        client.wait(first["id"], timeout=120)
        value = client.result(first["id"]).value
        assert [g["category"] for g in value["groups"]] == ["a", "b", "c", "d"]
        assert value["privacy"]["epsilon"] == 1.0

        second = client.submit(["carol_ds"], None, "dp_aggregate", {**params,
                                                                    "epsilon": "0.1"})
        wait_task_state(client, second["id"], {"submitted"})
        carol.decide(second["id"], "approved")
        with pytest.raises(TaskFailed, match="dataset 'carol_ds': privacy budget would be "
                                             "overdrawn"):
            client.wait(second["id"], timeout=120)
