"""Backoff against a scheduler that is down: only Unreachable is retried."""

from __future__ import annotations

import logging
import threading

import pytest

from teeflow.core.errors import AuthError, Unreachable
from teeflow.net import retry

LOG = logging.getLogger("test")


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_WAIT", 0.01)
    monkeypatch.setattr(retry, "LONGEST_WAIT", 0.02)


def test_unreachable_is_waited_out():
    calls = []

    def call() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise Unreachable("scheduler down")
        return "ok"

    assert retry.patiently(call, "x", LOG, give_up_after=30) == "ok" and len(calls) == 4


def test_a_refusal_is_not_retried():
    calls = []

    def call() -> None:
        calls.append(1)
        raise AuthError("no")

    with pytest.raises(AuthError):
        retry.patiently(call, "x", LOG)
    assert len(calls) == 1


def test_a_stop_ends_the_wait_with_the_last_error():
    stop = threading.Event()
    stop.set()

    def call() -> None:
        raise Unreachable("down")

    with pytest.raises(Unreachable):
        retry.patiently(call, "x", LOG, stop=stop)
