"""The pool's rendezvous (executor/pool/rendezvous.py): untrusted, capped, never waits
past its deadline, and a peer that gave up ends the wait at once."""

from __future__ import annotations

import time

import pytest

from teeflow.core.errors import InputError, PeerError
from teeflow.executor.pool.rendezvous import MAX_MESSAGE, Rendezvous


def test_messages_go_to_whom_they_are_addressed(tmp_path):
    rv = Rendezvous(tmp_path)
    rv.publish("nonce", "m1", b"for m2", to="m2")
    rv.publish("nonce", "m1", b"for m3", to="m3")
    assert rv.wait("nonce", ["m1"], time.monotonic() + 5, to="m2") == {"m1": b"for m2"}
    assert rv.read("nonce", "m1", to="m4") is None


def test_a_wait_ends_at_its_deadline_naming_who_is_missing(tmp_path):
    rv = Rendezvous(tmp_path)
    rv.publish("cert", "m2", b"x")
    with pytest.raises(PeerError, match="no cert from 'm3'"):
        rv.wait("cert", ["m2", "m3"], time.monotonic() + 0.2)


def test_a_peer_that_gave_up_ends_the_wait(tmp_path):
    rv = Rendezvous(tmp_path)
    rv.publish("failed", "m1", b"member_refused")
    with pytest.raises(PeerError, match="'m1' gave up"):
        rv.wait("scheduler", ["m1"], time.monotonic() + 60)


def test_oversized_messages_and_odd_names_are_refused(tmp_path):
    rv = Rendezvous(tmp_path)
    with pytest.raises(InputError):
        rv.publish("cert", "m1", b"x" * (MAX_MESSAGE + 1))
    (tmp_path / "cert").mkdir()
    (tmp_path / "cert" / "m9").write_bytes(b"x" * (MAX_MESSAGE + 1))  # anyone may write here
    with pytest.raises(PeerError, match="larger than"):
        rv.read("cert", "m9")
    for name in ("../m1", "m1/x", ""):
        with pytest.raises(InputError):
            rv.publish("cert", name, b"x")
    with pytest.raises(InputError):
        rv.publish("evil", "m1", b"x")
