"""A receiver that asks for its result before the scheduler released it (the SDK asks again
for a while) is told NotReleased each time, and takes its result once it is released: an
early ask spends the challenge it used, so asking often does not use up the few challenges
its key may hold outstanding, which would lock it out until they expire.

Accident: the scheduler down or slow between marking a task done and granting its release,
while the initiator's SDK retries."""

from __future__ import annotations

import pytest

from teeflow.core import wire
from teeflow.core.errors import AuthError, NotReleased
from teeflow.executor.challenges import MAX_PER_KEY
from tests.test_executor_agreement import TASK, _word, ex, p  # noqa: F401
from tests.test_executor_service import SPKI, Parties, _done, _take, challenge_for


def test_asking_early_more_often_than_the_challenge_cap_still_takes_it(ex, p):  # noqa: F811
    _done(ex, p)
    for _ in range(2 * MAX_PER_KEY):
        with pytest.raises(NotReleased, match="has not released"):
            _take(ex, p, p.initiator)
    assert ex.grant_release(TASK, 1, _word("release", p))
    assert _take(ex, p, p.initiator)["sealed"]


def test_the_challenge_of_an_early_ask_is_spent(ex, p: Parties):  # noqa: F811
    _done(ex, p)
    challenge = challenge_for(ex, TASK, p.initiator)
    sig = p.initiator.sign(wire.result_message(p.spec.task_id, challenge, SPKI))
    with pytest.raises(NotReleased):
        ex.take_result(p.spec.task_id, p.initiator.public_key(), challenge, sig)
    assert ex.grant_release(TASK, 1, _word("release", p))
    with pytest.raises(AuthError, match="already used"):
        ex.take_result(p.spec.task_id, p.initiator.public_key(), challenge, sig)
    assert _take(ex, p, p.initiator)["sealed"]
