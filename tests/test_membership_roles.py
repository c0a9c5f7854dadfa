"""Every role against every route, one table: a route refuses (403 "role") exactly the
members whose roles it does not serve, before it reads the body."""

from __future__ import annotations

import pytest

from teeflow.core.crypto import KeySigner
from teeflow.scheduler.store import Store
from tests.factories import scheduler_app

ROLES = ("owner", "initiator", "executor_host", "auditor")
ANY = set(ROLES)
# (method, path) -> the roles it serves
ROUTES = {
    ("GET", "/v1/nodes"): ANY,
    ("GET", "/v1/executors"): ANY,
    ("POST", "/v1/executors"): {"executor_host"},
    ("POST", "/v1/datasets"): {"owner"},
    ("GET", "/v1/datasets"): {"initiator", "owner", "auditor"},
    ("POST", "/v1/tasks"): {"initiator"},
    ("GET", "/v1/tasks"): ANY,
    ("GET", "/v1/audit"): ANY,
    ("POST", "/v1/tasks/task0001/decision"): {"owner"},
    ("POST", "/v1/tasks/task0001/assignments/a_data"): {"owner"},
}


@pytest.fixture(scope="module")
def members():
    store = Store(":memory:")
    with scheduler_app(store) as api:
        keys = {}
        for role in ROLES:
            keys[role] = KeySigner.generate()
            r = api.register_node(role, keys[role], roles=[role])
            assert r.status_code == 200 and r.json()["roles"] == [role], r.text
        yield api, keys
    store.close()


@pytest.mark.parametrize("route", list(ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
def test_each_route_serves_exactly_its_roles(members, route):
    api, keys = members
    method, path = route
    refused = set()
    for role, key in keys.items():
        r = api.call(key, method, path, {} if method == "POST" else None)
        if r.status_code == 403 and r.json()["error"]["code"] == "role":
            assert role in r.json()["error"]["message"]  # names what the caller holds
            refused.add(role)
    assert refused == ANY - ROUTES[route]


def test_a_key_without_an_invitation_is_not_a_member():
    store = Store(":memory:")
    try:
        with scheduler_app(store) as api:
            stranger = KeySigner.generate()
            r = api.register_node("stranger", stranger, invite=None)
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_invited"
            r = api.call(stranger, "GET", "/v1/tasks")
            assert r.status_code == 401  # not a member: nothing at all
            assert store.nodes() == []
    finally:
        store.close()


def test_a_stranger_learns_no_member_name_and_a_refused_join_spends_nothing():
    store = Store(":memory:")
    try:
        with scheduler_app(store) as api:
            alice, mallory = KeySigner.generate(), KeySigner.generate()
            assert api.register_node("alice", alice).status_code == 200
            r = api.register_node("alice", mallory, invite=None)  # a taken name, no invite
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_invited"
            assert "alice" not in r.json()["error"]["message"]
            token = store.invite(["owner"])
            r = api.register_node("alice", mallory, invite=token)  # invited, name taken
            assert r.status_code == 403 and r.json()["error"]["code"] == "auth"
            r = api.register_node("mallory", mallory, invite=token)  # the token still works
            assert r.status_code == 200 and r.json()["roles"] == ["owner"]
    finally:
        store.close()
