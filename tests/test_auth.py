"""Signed requests (core/auth.py), alone and through the scheduler's app: who sent a request,
that nothing in it changed on the way, and that it is not a replay."""

from __future__ import annotations

import base64

import pyarrow as pa
import pytest

from teeflow.core import auth
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, Unreachable
from teeflow.core.schemas import schema_to_b64
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store
from tests.factories import SignedClient, make_spec, scheduler_app, submit_signature

NOW = 1_700_000_000
ALICE, BOB, MALLORY = (KeySigner.generate() for _ in range(3))


def _schema_b64() -> str:
    return schema_to_b64(pa.schema([("x", pa.int64())]))


class Nonces:
    """A set-backed fresh_nonce, as the store's but in memory."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.expiries: list[int] = []

    def __call__(self, key: str, nonce: str, expires: int) -> bool:
        self.expiries.append(expires)
        if (key, nonce) in self.seen:
            return False
        self.seen.add((key, nonce))
        return True


def _verify(headers: dict, method: str = "POST", target: str = "/v1/tasks?x=1",
            body: bytes = b'{"a":1}', now: int = NOW, nonces: Nonces | None = None) -> str:
    return auth.verify_request(method, target, headers, body, now, nonces or Nonces())


def _signed(method: str = "POST", target: str = "/v1/tasks?x=1", body: bytes = b'{"a":1}',
            signer: KeySigner = ALICE, now: int = NOW) -> dict[str, str]:
    return auth.sign_request(signer, method, target, body, now)


# -- core/auth.py ----------------------------------------------------------------------------


def test_signed_request_verifies():
    headers = _signed()
    nonces = Nonces()
    assert _verify(headers, nonces=nonces) == ALICE.public_key()
    assert set(headers) == {auth.KEY, auth.TIME, auth.NONCE, auth.SIGNATURE}
    assert headers[auth.KEY] == ALICE.public_key() and headers[auth.TIME] == str(NOW)
    assert nonces.seen == {(ALICE.public_key(), headers[auth.NONCE])}
    assert nonces.expiries == [NOW + 2 * auth.WINDOW]  # kept past the whole window
    assert _signed()[auth.NONCE] != headers[auth.NONCE]  # a fresh nonce per request


def test_the_message_covers_every_part():
    base = auth.message("POST", "/v1/a?b=1", NOW, "ab" * 8, b"body")
    assert auth.message("post", "/v1/a?b=1", NOW, "ab" * 8, b"body") == base
    for other in (auth.message("GET", "/v1/a?b=1", NOW, "ab" * 8, b"body"),
                  auth.message("POST", "/v1/a?b=2", NOW, "ab" * 8, b"body"),
                  auth.message("POST", "/v1/a?b=1", NOW + 1, "ab" * 8, b"body"),
                  auth.message("POST", "/v1/a?b=1", NOW, "cd" * 8, b"body"),
                  auth.message("POST", "/v1/a?b=1", NOW, "ab" * 8, b"body ")):
        assert other != base


@pytest.mark.parametrize("change", [
    {"method": "PUT"},
    {"method": "GET"},
    {"target": "/v1/nodes?x=1"},
    {"target": "/v1/tasks/?x=1"},
    {"target": "/v1/tasks?x=2"},
    {"target": "/v1/tasks?x=1&y=2"},
    {"target": "/v1/tasks"},
    {"body": b'{"a":2}'},
    {"body": b'{"a":1} '},
    {"body": b""},
])
def test_tampered_request_fails(change):
    headers = _signed()
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(headers, **change)


def _other_sig() -> str:
    return _signed(body=b"other")[auth.SIGNATURE]


@pytest.mark.parametrize("header,value", [
    (auth.TIME, str(NOW + 1)),
    (auth.NONCE, "0123456789abcdef0123456789abcdef"),
    (auth.SIGNATURE, "other"),
    (auth.KEY, BOB.public_key()),
], ids=["time", "nonce", "signature", "key"])  # fixed ids: a key is random per process
def test_tampered_header_fails(header, value):
    headers = _signed()
    headers[header] = _other_sig() if value == "other" else value
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(headers)


def test_signature_by_another_key_fails():
    headers = _signed(signer=MALLORY)
    headers[auth.KEY] = ALICE.public_key()  # mallory claims to be alice
    with pytest.raises(AuthError):
        _verify(headers)


def test_a_failed_request_uses_up_no_nonce():
    headers = _signed()
    nonces = Nonces()
    with pytest.raises(AuthError):
        _verify(headers, body=b"forged", nonces=nonces)
    assert nonces.seen == set()
    assert _verify(headers, nonces=nonces) == ALICE.public_key()


@pytest.mark.parametrize("skew", [auth.WINDOW + 1, -auth.WINDOW - 1, 10 * auth.WINDOW])
def test_outside_the_time_window_fails(skew):
    headers = _signed(now=NOW + skew)
    with pytest.raises(AuthError, match="window"):
        _verify(headers)


@pytest.mark.parametrize("skew", [auth.WINDOW, -auth.WINDOW, 0])
def test_inside_the_time_window_passes(skew):
    assert _verify(_signed(now=NOW + skew)) == ALICE.public_key()


def test_replayed_nonce_fails():
    headers = _signed()
    nonces = Nonces()
    assert _verify(headers, nonces=nonces) == ALICE.public_key()
    with pytest.raises(AuthError, match="replay"):
        _verify(headers, nonces=nonces)
    with pytest.raises(AuthError, match="replay"):  # later, still inside the window
        _verify(headers, now=NOW + 100, nonces=nonces)


@pytest.mark.parametrize("header", [auth.KEY, auth.TIME, auth.NONCE, auth.SIGNATURE])
def test_missing_header_fails(header):
    headers = _signed()
    del headers[header]
    with pytest.raises(AuthError, match="not signed"):
        _verify(headers)
    headers[header] = ""
    with pytest.raises(AuthError, match="not signed"):
        _verify(headers)


def test_no_headers_at_all():
    with pytest.raises(AuthError, match="not signed"):
        _verify({})


@pytest.mark.parametrize("header,value,match", [
    (auth.KEY, "not a key", "public key"),
    (auth.KEY, base64.b64encode(b"short").decode(), "public key"),
    (auth.TIME, "-5", "window"),
    (auth.TIME, "soon", "window"),
    (auth.NONCE, "ABCDEF0123456789", "nonce"),
    (auth.NONCE, "abc", "nonce"),
    (auth.NONCE, "a" * 65, "nonce"),
    (auth.NONCE, "g" * 16, "nonce"),
    (auth.SIGNATURE, "not base64!", "base64"),
])
def test_malformed_header_fails(header, value, match):
    headers = _signed()
    headers[header] = value
    with pytest.raises(AuthError, match=match):
        _verify(headers)


def test_time_header_with_a_non_ascii_digit():
    headers = _signed()
    headers[auth.TIME] = "\u00b2"
    with pytest.raises(AuthError, match="window"):
        _verify(headers)


# -- through the app -------------------------------------------------------------------------


class Link:
    """An executor that is never there; the app tests must not reach one."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connect(self, address: str) -> Link:
        self.calls.append(address)
        raise Unreachable(f"executor {address} unreachable")


class App(SignedClient):
    """The scheduler app, its store, and the executor link it must never use here."""

    def __init__(self, api: SignedClient, store: Store, link: Link) -> None:
        super().__init__(api.client)
        self.store, self.link = store, link

    def register(self, name: str, key: KeySigner):
        r = self.register_node(name, key)
        assert r.status_code == 200, r.text


@pytest.fixture
def app():
    store = Store(":memory:")
    link = Link()
    with scheduler_app(store, Scheduler(store, connect=link.connect)) as api:
        yield App(api, store, link)
    store.close()


def _unauthenticated(r) -> str:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthenticated"
    return r.json()["error"]["message"]


ENDPOINTS = [("GET", "/v1/nodes"), ("GET", "/v1/executors"), ("GET", "/v1/datasets"),
             ("GET", "/v1/tasks"), ("GET", "/v1/tasks/task0001"), ("GET", "/v1/audit"),
             ("GET", "/v1/nodes/alice/work"), ("POST", "/v1/tasks"),
             ("POST", "/v1/datasets"), ("POST", "/v1/executors"),
             ("POST", "/v1/tasks/task0001/decision"), ("POST", "/v1/tasks/task0001/cancel"),
             ("POST", "/v1/tasks/task0001/assignments/a_data"), ("POST", "/v1/nodes")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_unsigned_request_is_refused(app: App, method, path):
    app.register("alice", ALICE)
    before = (app.store.nodes(), app.store.datasets(), app.store.tasks(), app.store.audit_log())
    r = app.send(method, path, {"name": "bob", "public_key": BOB.public_key(),
                                "enc_key": BOB.encryption_public_key()}
                 if method == "POST" else None)
    assert "not signed" in _unauthenticated(r)
    after = (app.store.nodes(), app.store.datasets(), app.store.tasks(), app.store.audit_log())
    assert after == before
    assert app.link.calls == []


@pytest.mark.parametrize("method,path", [e for e in ENDPOINTS if e[1] != "/v1/nodes"])
def test_request_signed_by_an_unregistered_key_is_refused(app: App, method, path):
    app.register("alice", ALICE)
    r = app.call(MALLORY, method, path, {} if method == "POST" else None)
    assert "not registered" in _unauthenticated(r)
    assert app.link.calls == []


def test_health_needs_no_signature(app: App):
    assert app.client.get("/v1/health").status_code == 200


def test_unsigned_submit_changes_nothing(app: App):
    app.register("alice", ALICE)
    spec = make_spec([("a_data", "alice", ALICE, "fa")], ALICE)
    r = app.send("POST", "/v1/tasks", {"spec": spec.to_dict(),
                                       "signature": submit_signature(spec, ALICE)})
    _unauthenticated(r)
    forged = dict(app.signed(MALLORY, "POST", "/v1/tasks", {})[0])
    forged[auth.KEY] = ALICE.public_key()  # mallory's signature under alice's key
    r = app.send("POST", "/v1/tasks", {}, headers=forged)
    _unauthenticated(r)
    assert app.store.tasks() == [] and app.store.audit_log() == []


def test_replayed_request_is_refused_and_applied_once(app: App):
    app.register("alice", ALICE)
    body = {"name": "a_data", "owner": "alice", "schema": _schema_b64(), "rows": 1}
    headers, raw = app.signed(ALICE, "POST", "/v1/datasets", body)
    r = app.client.post("/v1/datasets", content=raw, headers=headers)
    assert r.status_code == 200, r.text
    registered = app.store.datasets()
    r = app.client.post("/v1/datasets", content=raw, headers=headers)
    assert "replay" in _unauthenticated(r)
    assert app.store.datasets() == registered  # not re-registered (its timestamp unchanged)


def test_replayed_report_is_applied_once(app: App):
    app.register("alice", ALICE)
    app.store.add_dataset("alice", "a_data", _schema_b64(), "fa", 1)
    spec = make_spec([("a_data", "alice", ALICE, "fa")], ALICE)
    app.store.create_task(spec.to_dict(), spec.digest(), "127.0.0.1:9",
                          submit_signature(spec, ALICE))
    app.store.approve(spec.task_id, ALICE.public_key(), "approved", "c2ln", "approved", True)
    app.store.transition(spec.task_id, "accept")
    target = f"/v1/tasks/{spec.task_id}/assignments/a_data"
    headers, raw = app.signed(ALICE, "POST", target, {"state": "started"})
    assert app.client.post(target, content=raw, headers=headers).status_code == 200
    log = app.store.audit_log()
    assert log[-1].kind == "upload"
    _unauthenticated(app.client.post(target, content=raw, headers=headers))
    assert app.store.audit_log() == log


def test_request_sent_elsewhere_than_signed_for(app: App):
    app.register("alice", ALICE)
    headers, raw = app.signed(ALICE, "GET", "/v1/audit?task=task0001")
    _unauthenticated(app.client.get("/v1/audit?task=task0002", headers=headers))
    _unauthenticated(app.client.get("/v1/tasks?task=task0001", headers=headers))
    headers, raw = app.signed(ALICE, "GET", "/v1/audit?task=task0001")
    assert app.client.get("/v1/audit?task=task0001", headers=headers).status_code == 200


def test_registration_signed_by_another_key(app: App):
    r = app.call(MALLORY, "POST", "/v1/nodes", {
        "name": "alice", "public_key": ALICE.public_key(),
        "enc_key": ALICE.encryption_public_key()})
    assert "its own key" in _unauthenticated(r)
    assert app.store.nodes() == []
    assert app.store.node_by_key(ALICE.public_key()) is None
    app.register("alice", ALICE)  # alice herself can


def test_app_clock_bounds_the_window():
    store = Store(":memory:")
    try:
        with scheduler_app(store, clock=lambda: NOW) as api:
            a = App(api, store, Link())
            invite = store.invite(["owner"], "alice")
            r = a.call(ALICE, "POST", "/v1/nodes", {
                "name": "alice", "public_key": ALICE.public_key(),
                "enc_key": ALICE.encryption_public_key(), "invite": invite},
                now=NOW - auth.WINDOW - 1)
            assert "window" in _unauthenticated(r)
            assert store.nodes() == []
            r = a.call(ALICE, "POST", "/v1/nodes", {
                "name": "alice", "public_key": ALICE.public_key(),
                "enc_key": ALICE.encryption_public_key(), "invite": invite},
                now=NOW - auth.WINDOW + 1)
            assert r.status_code == 200, r.text
    finally:
        store.close()
