"""The waiting line, last seen and deadlines through the scheduler's HTTP API (TestClient,
the fake executor of test_scheduler_api)."""

from __future__ import annotations

import time

import pytest

from teeflow.attestation.simulated import code_measurement
from tests.test_scheduler_api import World, _error, world  # noqa: F401 - the fixture


def test_only_a_verified_member_request_counts_as_seen(world: World):  # noqa: F811
    world.register()
    bob = world.bob.public_key()
    world.store._seen_written.clear()
    world.store._db.execute("DELETE FROM seen")
    # mallory replays bob's signed headers over another body: refused, bob not "seen"
    from teeflow.core import auth

    headers = auth.sign_request(world.bob, "GET", "/v1/nodes", b"", int(time.time()))
    forged = world.client.request("POST", "/v1/datasets", content=b'{"x": 1}',
                                  headers={**headers, "content-type": "application/json"})
    assert forged.status_code == 401
    assert world.store.last_seen([bob]) == {}
    assert world.call("mallory", "GET", "/v1/tasks").status_code == 401  # not a member
    assert world.store.last_seen([world.mallory.public_key()]) == {}
    assert world.call("bob", "GET", "/v1/tasks").status_code == 200
    assert bob in world.store.last_seen([bob])


def test_the_task_answer_says_who_it_waits_for_and_its_deadline(world: World):  # noqa: F811
    world.register()
    spec = world.spec()
    assert world.submit(spec).status_code == 201
    world.decide("alice", spec)
    task = world.call("carol", "GET", f"/v1/tasks/{spec.task_id}").json()
    assert [(w["who"], w["what"]) for w in task["waiting"]["for"]] == [("bob", "signature")]
    assert task["waiting"]["for"][0]["last_seen"] is not None  # bob registered
    assert task["waiting"]["text"].startswith("waiting ")
    assert "bob's signature; bob last seen" in task["waiting"]["text"]
    assert task["deadline"] == pytest.approx(task["created_at"] + world.scheduler.task_deadline,
                                             abs=1)
    # a stranger learns nothing, not even who is late
    assert world.call("mallory", "GET", f"/v1/tasks/{spec.task_id}").status_code == 401


def test_the_tick_fails_a_task_past_its_deadline_naming_what_it_waited_for(world: World):  # noqa: F811
    world.register()
    world.scheduler.task_deadline = 0.5
    spec = world.spec()
    assert world.submit(spec).status_code == 201
    world.decide("bob", spec)
    world.scheduler.tick()
    assert world.store.task(spec.task_id).state == "submitted"  # not yet
    time.sleep(0.6)
    world.scheduler.tick()
    task = world.store.task(spec.task_id)
    assert task.state == "failed"
    assert task.error is not None and task.error.startswith(
        "deadline passed after 0s: waiting for alice's signature; alice last seen ")


def test_a_spec_deadline_already_past_is_refused(world: World):  # noqa: F811
    world.register()
    spec = world.spec(deadline=int(time.time()) - 1)
    assert "deadline" in _error(world.submit(spec), 400, "input")
    assert world.store.tasks() == []


def test_automatic_choice_names_each_executor_skipped_and_why(world: World):  # noqa: F811
    world.register()  # its executor has no measurement: refused by the policy
    world.store.register_executor("127.0.0.1:7002", "pem", "simulated",
                                  {"measurement": code_measurement()})
    world.fake.unreachable = True
    message = _error(world.submit(executor=None), 400, "input")
    assert "127.0.0.1:9999: its measurement is not one the policy accepts" in message
    assert "127.0.0.1:7002: it does not answer" in message
    world.fake.unreachable = False
    r = world.submit(executor=None)
    assert r.status_code == 201 and r.json()["executor"] == "127.0.0.1:7002"
