"""Who a pool task is shown to (scheduler/service.py `parties`): besides its initiator,
owners and receivers, the host of every member (each holds part of its rows), and no host
of an executor outside the pool. Pure: a Scheduler over a stand-in store."""

from __future__ import annotations

from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Task


class _Hosts:
    """The one store call `parties` makes: who registered each executor."""

    def __init__(self, hosts: dict[str, str | None]) -> None:
        self.hosts = hosts

    def executor_host(self, address: str) -> str | None:
        return self.hosts.get(address)


SPEC = {"initiator_key": "I", "datasets": [{"owner_key": "A"}, {"owner_key": "B"}],
        "receivers": [{"sign_key": "R"}]}


def _task(executor: str, pool: tuple[str, ...] = ()) -> Task:
    return Task("t1", "running", "linear_regression", {}, executor, "I", SPEC, "0" * 64,
                None, 0.0, 0.0, pool=pool)


def test_every_members_host_sees_a_pool_task_and_no_other_host():
    store = _Hosts({"m1:1": "H1", "m2:1": "H2", "m3:1": None, "other:1": "H9"})
    scheduler = Scheduler(store)  # type: ignore[arg-type]
    pooled = _task("m1:1", ("m1:1", "m2:1", "m3:1"))
    assert scheduler.parties(pooled) == {"I", "A", "B", "R", "H1", "H2"}
    assert scheduler.parties(_task("m1:1")) == {"I", "A", "B", "R", "H1"}
    assert "H9" not in scheduler.parties(pooled)
