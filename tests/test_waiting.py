"""What a task waits for (scheduler/waiting.py, pure), durations, last-seen records, and
the deadline the scheduler holds a task to. No network."""

from __future__ import annotations

import time

import pytest

from teeflow.core.durations import format_span, parse_duration
from teeflow.core.errors import InputError
from teeflow.scheduler import waiting
from teeflow.scheduler.store import SEEN_EVERY, Store

T0 = 1_800_000_000.0
SPEC = {"datasets": [{"name": "d1", "owner": "alice", "owner_key": "ka"},
                     {"name": "d2", "owner": "bob", "owner_key": "kb"}],
        "receivers": [{"sign_key": "kc", "enc_key": "x"}]}
EX = "127.0.0.1:9000"


def _wait(state, approvals=(), assignments=(), events=(), seen=None, now=T0 + 120,
          taken_by=None):
    return waiting.waiting_for(state, SPEC, T0, EX, approvals, assignments, events,
                               seen or {}, {"kc": "carol"}, now, taken_by)


def _a(dataset, node, state, at=T0):
    return {"dataset": dataset, "node": node, "state": state, "updated_at": at}


def test_submitted_waits_for_each_owner_yet_to_sign():
    w = _wait("submitted", approvals=[{"owner_key": "ka"}], seen={"kb": T0 + 115})
    assert [(x.who, x.what, x.since, x.last_seen) for x in w.waiters] == [
        ("bob", "signature", T0, T0 + 115)]
    assert w.text == "waiting 2m for bob's signature; bob last seen 5s ago"


def test_a_node_never_seen_says_so():
    w = _wait("submitted")
    assert w.text == ("waiting 2m for alice's signature and bob's signature; "
                      "alice never seen, bob never seen")
    assert w.to_dict()["for"][0] == {"who": "alice", "what": "signature", "since": T0,
                                     "last_seen": None}


def test_uploading_waits_for_the_uploads_not_done_since_accept():
    events = [{"event": "submitted", "at": T0}, {"event": "accept", "at": T0 + 60}]
    w = _wait("uploading", assignments=[_a("d1", "alice", "uploaded"),
                                        _a("d2", "bob", "started")],
              events=events, seen={"kb": T0 - 60})
    assert [(x.who, x.what, x.since) for x in w.waiters] == [("bob", "upload of d2", T0 + 60)]
    assert w.text == "waiting 1m for bob's upload of d2; bob last seen 3m ago"


def test_every_upload_in_means_waiting_for_the_executor():
    w = _wait("uploading", assignments=[_a("d1", "alice", "uploaded", T0 + 100),
                                        _a("d2", "bob", "uploaded", T0 + 110)],
              seen={EX: T0 + 119})
    assert [(x.who, x.what, x.since) for x in w.waiters] == [(EX, "the executor", T0 + 110)]
    assert w.text == f"waiting 10s for the executor {EX}; {EX} last seen 1s ago"


@pytest.mark.parametrize("state,event", [("approved", "consented"), ("running", "run")])
def test_approved_and_running_wait_for_the_executor(state, event):
    w = _wait(state, events=[{"event": event, "at": T0 + 90}])
    assert [(x.who, x.what, x.since, x.last_seen) for x in w.waiters] == [
        (EX, "the executor", T0 + 90, None)]


def test_done_waits_for_receivers_who_have_not_taken_their_result():
    w = _wait("done", events=[{"event": "finish", "at": T0 + 100}], seen={"kc": T0 + 110})
    assert [(x.who, x.what) for x in w.waiters] == [("carol", "result taken by carol")]
    assert w.text == "waiting 20s for carol to take the result; carol last seen 10s ago"
    assert _wait("done", taken_by=["kc"]).waiters == ()


@pytest.mark.parametrize("state", ["released", "rejected", "failed", "cancelled"])
def test_a_final_task_waits_for_nothing(state):
    assert _wait(state) is None


def test_the_line_holds_names_only_never_an_error_text():
    row = {**_a("d2", "bob", "started"), "error": "row 7: salary=123456"}
    w = _wait("uploading", assignments=[row])
    assert "123456" not in w.text and "123456" not in str(w.to_dict())


def test_deadline_reason_names_what_was_waited_for():
    w = _wait("uploading", assignments=[_a("d2", "bob", "pending")],
              seen={"kb": T0 + 1800 - 180}, now=T0 + 1800)
    assert waiting.deadline_reason(w, T0 + 1800, T0, T0 + 1800) == (
        "deadline passed after 30m: waiting for bob's upload of d2; bob last seen 3m ago")
    assert waiting.deadline_reason(None, T0 + 60, T0, T0 + 60) == "deadline passed after 1m"


def test_the_spec_deadline_wins_over_the_default():
    assert waiting.task_deadline(int(T0) + 600, T0, 3600) == T0 + 600
    assert waiting.task_deadline(None, T0, 3600) == T0 + 3600
    assert "done" not in waiting.DEADLINE_STATES  # its result is being taken


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("30m", 1800),
                                          ("2h", 7200), ("7d", 7 * 86400), (" 1.5h ", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text, "--deadline") == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-5m", "0s", "abc", "inf", "nan", "1e9d",
                                  "5mm"])
def test_parse_duration_refused_names_the_option(text):
    with pytest.raises(InputError, match="--deadline"):
        parse_duration(text, "--deadline")


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"),
                                          (3600, "1h"), (3900, "1h 5m"), (86400, "1d"),
                                          (90000, "1d 1h"), (-3, "0s")])
def test_format_span(seconds, text):
    assert format_span(seconds) == text


def test_last_seen_is_throttled_and_survives_a_restart(tmp_path):
    db = tmp_path / "s.sqlite"
    store = Store(db)
    now = time.time()
    store.mark_seen("kb", now)
    store.mark_seen("kb", now + SEEN_EVERY / 2)  # within the window: not written
    assert store.last_seen(["kb", "nobody"]) == {"kb": now}
    store.mark_seen("kb", now + SEEN_EVERY)
    assert store.last_seen(["kb"]) == {"kb": now + SEEN_EVERY}
    version = store.version
    store.mark_seen("ka", now)
    assert store.version == version  # a seen write wakes no long poll
    store.close()
    again = Store(db)
    assert again.last_seen(["ka", "kb"]) == {"ka": now, "kb": now + SEEN_EVERY}
    again.close()


def test_a_database_from_before_deadlines_gains_the_column(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE tasks DROP COLUMN deadline")
    con.commit()
    con.close()
    store = Store(db)
    assert "deadline" in {r["name"] for r in store._rows("PRAGMA table_info(tasks)")}
    store.close()
