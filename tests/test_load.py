"""Load, at a small size: concurrent tasks over four owners' providers and one executor
(real processes). Every task ends done, and the executor's memory returns to within 10%
of its baseline (after a warm-up task) once every result is taken."""

from __future__ import annotations

import pytest
from bench.load import drive

pytestmark = [pytest.mark.e2e, pytest.mark.load]
TASKS = 8
MARGIN = 0.10


def test_concurrent_tasks_all_end_done_and_memory_returns(tmp_path):
    run = drive(tmp_path, TASKS)
    assert len(run.states) == TASKS
    assert run.reached_done == set(run.states), run.states
    assert set(run.states.values()) == {"released"}, run.states
    assert run.rss_after <= run.rss_before * (1 + MARGIN), (
        f"executor RSS {run.rss_before} -> {run.rss_after} bytes after every result was taken")
