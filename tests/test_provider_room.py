"""A provider whose upload the executor has no room for yet (OverBudget) tries again
instead of failing the task; at most UPLOAD_SLOTS of its uploads run at once."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from teeflow.core.crypto import KeySigner
from teeflow.core.errors import OverBudget
from teeflow.provider import node
from teeflow.provider.node import Provider
from tests.factories import make_spec

OWNER, INITIATOR = KeySigner.generate(), KeySigner.generate()
SPEC = make_spec([("d", "owner", OWNER, "f")], INITIATOR, compute_name="logistic_regression")


class _Stop(threading.Event):
    def wait(self, timeout: float | None = None) -> bool:  # no real sleeping in a test
        return self.is_set()


def _provider(send) -> SimpleNamespace:
    p = SimpleNamespace(_upload_slots=threading.BoundedSemaphore(node.UPLOAD_SLOTS),
                        _stop=_Stop(), _send=send)
    return p


def test_an_upload_refused_for_room_is_tried_again():
    calls = []

    def send(*args):
        calls.append(args)
        if len(calls) < 3:
            raise OverBudget("2 uploads by this key already running")
        return {"rows": 5}

    receipt = Provider._send_when_room(_provider(send), "t", "d", "ex", SPEC, None, "path")
    assert receipt == {"rows": 5} and len(calls) == 3


def test_a_stopping_node_gives_up():
    def send(*args):
        raise OverBudget("no room")

    p = _provider(send)
    p._stop.set()
    with pytest.raises(OverBudget):
        Provider._send_when_room(p, "t", "d", "ex", SPEC, None, "path")


def test_uploads_take_a_slot_each():
    running, most, lock = [0], [0], threading.Lock()
    start = threading.Barrier(6)

    def send(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return {}

    p = _provider(send)

    def one():
        start.wait()
        Provider._send_when_room(p, "t", "d", "ex", SPEC, None, "path")

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] <= node.UPLOAD_SLOTS
