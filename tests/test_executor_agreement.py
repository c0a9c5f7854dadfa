"""The scheduler named in a spec, and only it, ends a task on the executor (abort) and lets
its result out (release): the two can never disagree on whether a result was released.

Attackers: a stranger or another party who reaches the executor's port and sends its own
abort or release; the scheduler's operator replaying an old abort against a later run."""

from __future__ import annotations

import pytest

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, NotReleased, StateError
from teeflow.executor.service import Executor
from tests.test_executor_service import (
    TASK,
    TLS_KEY,
    Parties,
    _done,
    _take,
    _upload,
)

SCHEDULER = KeySigner.generate()


@pytest.fixture
def p() -> Parties:
    return Parties(scheduler_key=SCHEDULER.public_key())


@pytest.fixture
def ex(p: Parties) -> Executor:
    executor = Executor(SimulatedBackend(), TLS_KEY)
    executor.create_task(p.spec, p.approvals)
    return executor


def _word(kind: str, p: Parties, run: int = 1, key: KeySigner = SCHEDULER) -> bytes:
    make = wire.abort_message if kind == "abort" else wire.release_message
    return key.sign(make(p.spec.digest(), run))


def test_no_result_leaves_before_the_scheduler_releases_it(ex, p):
    _done(ex, p)
    with pytest.raises(NotReleased, match="has not released"):
        _take(ex, p, p.initiator)
    assert ex.grant_release(TASK, 1, _word("release", p))
    assert ex.status(TASK)["granted"] is True
    assert _take(ex, p, p.initiator)["sealed"]


@pytest.mark.parametrize("who", ["initiator", "alice", "mallory"])
def test_a_release_or_abort_signed_by_anyone_else_is_refused(ex, p, who):
    _done(ex, p)
    key = getattr(p, who)
    with pytest.raises(AuthError):
        ex.grant_release(TASK, 1, _word("release", p, key=key))
    with pytest.raises(AuthError):
        ex.abort(TASK, 1, _word("abort", p, key=key))
    status = ex.status(TASK)
    assert status["status"] == "done" and status["granted"] is False


def test_abort_wipes_a_waiting_task_and_records_it(ex, p):
    _upload(ex, p, "a_data")
    assert ex.held_bytes(TASK) > 0
    assert ex.abort(TASK, 1, _word("abort", p)) == "failed"
    status = ex.status(TASK)
    assert status["status"] == "failed" and status["inputs_held"] == []
    assert [e["kind"] for e in status["audit"]][-2:] == ["aborted", "wiped"]
    with pytest.raises(StateError):
        _upload(ex, p, "b_data")
    assert ex.abort(TASK, 1, _word("abort", p)) == "failed"  # repeating it is harmless


def test_abort_of_a_done_task_drops_its_result(ex, p):
    _done(ex, p)
    assert ex.abort(TASK, 1, _word("abort", p)) == "cancelled"
    with pytest.raises(StateError, match="no result to release"):
        ex.grant_release(TASK, 1, _word("release", p))
    with pytest.raises(StateError):  # nothing left to take
        _take(ex, p, p.initiator)


def test_once_released_the_result_cannot_be_aborted_or_cancelled(ex, p):
    _done(ex, p)
    ex.grant_release(TASK, 1, _word("release", p))
    with pytest.raises(StateError, match="let the result out"):
        ex.abort(TASK, 1, _word("abort", p))
    with pytest.raises(StateError, match="too late"):
        ex.cancel(TASK, p.alice.public_key(), p.alice.sign(wire.cancel_message(TASK)))
    assert _take(ex, p, p.bob)["sealed"]


def test_an_abort_for_another_run_is_refused(ex, p):
    _upload(ex, p, "a_data")
    with pytest.raises(StateError, match="run 2, this is run 1"):
        ex.abort(TASK, 2, _word("abort", p, run=2))
    assert ex.status(TASK)["status"] == "waiting"


def test_a_spec_without_a_scheduler_key_takes_no_word():
    legacy = Parties()
    ex = Executor(SimulatedBackend(), TLS_KEY)
    ex.create_task(legacy.spec, legacy.approvals)
    with pytest.raises(AuthError, match="names no scheduler key"):
        ex.abort(TASK, 1, SCHEDULER.sign(wire.abort_message(legacy.spec.digest(), 1)))
