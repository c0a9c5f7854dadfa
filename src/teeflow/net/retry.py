"""Waiting out a scheduler that is down: exponential backoff with jitter (tenacity), for
as long as the caller says, never a crash. Only `Unreachable` is retried; a refusal
(the scheduler answered and said no) is final and raised at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

from teeflow.core.errors import Unreachable

T = TypeVar("T")
FIRST_WAIT = 1.0  # seconds before the first retry
LONGEST_WAIT = 30.0  # seconds between retries at most


def patiently(call: Callable[[], T], what: str, log: logging.Logger,
              give_up_after: float | None = None,
              stop: threading.Event | None = None) -> T:
    """`call()`, retried while it raises Unreachable: for `give_up_after` seconds (None:
    until `stop` is set), then its last error."""
    stops: list[tenacity.stop.stop_base] = []
    if give_up_after is not None:
        stops.append(tenacity.stop_after_delay(give_up_after))
    if stop is not None:
        stops.append(_Stopped(stop))
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Unreachable),
        wait=tenacity.wait_exponential(multiplier=FIRST_WAIT, max=LONGEST_WAIT)
        + tenacity.wait_random(0, FIRST_WAIT),
        stop=tenacity.stop_any(*stops) if stops else tenacity.stop_never,
        sleep=_sleeper(stop),
        before_sleep=lambda state: log.warning(
            "%s: %s; trying again in %.0fs", what,
            state.outcome.exception() if state.outcome else "",
            state.next_action.sleep if state.next_action else 0),
        reraise=True)
    return retrying(call)


def _sleeper(stop: threading.Event | None) -> Callable[[float], None]:
    """Sleeps that a stop cuts short (a node shutting down does not wait out a backoff)."""
    if stop is None:
        return tenacity.nap.sleep

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


class _Stopped(tenacity.stop.stop_base):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.event.is_set()
