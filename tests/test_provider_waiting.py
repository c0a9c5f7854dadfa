"""A task waiting for a person costs its providers nothing: the long poll blocks while the
node holds every item already, and the waiting task is logged once, not on every poll."""

from __future__ import annotations

import time

import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.sdk import Client
from tests.factories import appraisal_policy

pytestmark = pytest.mark.e2e
WAITING = "waiting for `teeflow approve`"


def _log(c: LocalCluster, name: str) -> list[str]:
    return (c.workdir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()


def test_a_task_waiting_for_a_person_is_no_busy_loop(tmp_path):
    party = Party("grace", "by_hand", tmp_path / "grace.csv")
    make_party_data(party.path, 200, seed=2)
    with LocalCluster(tmp_path / "c") as c:
        c.start_scheduler()
        executor = c.start_executor()
        # a short long poll: before the fix every poll returned at once, whatever its length
        config = c.write_provider_config(party, approve=False, poll_wait=1)
        c._spawn("provider-grace", "provider", "--config", str(config))
        c.wait_for_datasets([party.dataset])
        with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                    name=c.initiator_name) as client:
            task = client.submit([party.dataset], executor, "logistic_regression",
                                 {"label": "y"})
            deadline = time.monotonic() + 60
            while not any(WAITING in line for line in _log(c, "provider-grace")):
                assert time.monotonic() < deadline, "the provider never saw the task"
                time.sleep(0.2)
            before = len(_log(c, "provider-grace"))
            time.sleep(4)  # a window to count lines in, not a duration asserted
            lines = _log(c, "provider-grace")
            assert client.task(task["id"])["state"] == "submitted"
    # one poll a second at most (each may log its request), never one per tenth of a second
    assert len(lines) - before <= 10, lines[before:]
    assert sum(WAITING in line for line in lines) == 1
