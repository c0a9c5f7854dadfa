"""The scheduler API's models (core/api.py): published in /openapi.json, enforced on every
body, and used by the client (net/scheduler_client.py)."""

from __future__ import annotations

import json
import time
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow.core import api, auth
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import InputError, PeerError
from teeflow.net.scheduler_client import SchedulerClient, _Signed
from teeflow.scheduler.app import create_app
from teeflow.scheduler.store import Store

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


@pytest.fixture
def app_client():
    store = Store(":memory:")
    with TestClient(create_app(store, tick=3600)) as client:
        yield client, store
    store.close()


def _signed(client, signer: KeySigner, method: str, path: str, raw: bytes):
    headers = auth.sign_request(signer, method, path, raw, int(time.time()))
    headers["content-type"] = "application/json"
    return client.request(method, path, content=raw, headers=headers)


def _resolve(doc: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_openapi_lists_every_route_with_its_models(app_client):
    client, _ = app_client
    doc = client.get("/openapi.json").json()
    operations = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert operations == EXPECTED
    for path, method in operations:
        op = doc["paths"][path][method]
        status = "201" if (path, method) == ("/v1/tasks", "post") else "200"
        answer = op["responses"][status]["content"]["application/json"]["schema"]
        answer = answer.get("items", answer)
        assert "$ref" in answer or "oneOf" in answer, (path, answer)
        if method == "get":
            assert "requestBody" not in op
            continue
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" in body, (path, body)  # a named model, not a bare dict / Any
        model = _resolve(doc, body)
        assert model["type"] == "object" and model["additionalProperties"] is False
        assert model["properties"], path


EXPECTED = {
    ("/v1/health", "get"), ("/v1/nodes", "post"), ("/v1/nodes", "get"),
    ("/v1/executors", "post"), ("/v1/executors", "get"), ("/v1/datasets", "post"),
    ("/v1/datasets", "get"), ("/v1/tasks", "post"), ("/v1/tasks", "get"),
    ("/v1/tasks/{task_id}", "get"), ("/v1/tasks/{task_id}/decision", "post"),
    ("/v1/tasks/{task_id}/cancel", "post"), ("/v1/tasks/{task_id}/assignments/{dataset}", "post"),
    ("/v1/audit", "get"), ("/v1/nodes/{node}/work", "get"),
    ("/v1/log/checkpoint", "get"), ("/v1/log/consistency", "get"),
    ("/v1/log/inclusion", "get"), ("/v1/log/entries", "get"),
    ("/v1/log/cosignatures", "post")}


def test_every_model_is_frozen_strict_and_closed():
    models = [m for m in vars(api).values()
              if isinstance(m, type) and issubclass(m, api.Model) and m is not api.Model]
    assert len(models) > 20
    for m in models:
        assert m.model_config.get("frozen") and m.model_config.get("strict"), m
        assert m.model_config.get("extra") == "forbid", m


def _register(client, signer: KeySigner, **fields):
    body = {"name": "alice", "public_key": signer.public_key(),
            "enc_key": signer.encryption_public_key(), **fields}
    return _signed(client, signer, "POST", "/v1/nodes", json.dumps(body).encode())


@pytest.mark.parametrize("fields, field", [
    ({"name": 12345}, "name"),
    ({"name": ["alice"]}, "name"),
    ({"favourite": "secret-value-123"}, "favourite"),
    ({"enc_key": None}, "enc_key"),
])
def test_wrong_type_or_unknown_field_is_a_named_input_error(app_client, fields, field):
    client, store = app_client
    alice = KeySigner.generate()
    r = _register(client, alice, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "input" and field in err["message"]
    for value in fields.values():  # the value sent is never echoed
        assert json.dumps(value).strip('"') not in err["message"] or value is None
    assert store.nodes() == []


def test_an_unsigned_bad_body_is_401_not_400(app_client):
    client, store = app_client
    r = client.post("/v1/nodes", content=b'{"name": 1}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_bad_query_is_a_named_input_error(app_client):
    client, store = app_client
    alice = KeySigner.generate()
    assert _register(client, alice, invite=store.invite(["owner"], "alice")).status_code == 200
    path = "/v1/nodes/alice/work?wait=soon"
    r = _signed(client, alice, "GET", path, b"")
    assert r.status_code == 400 and "wait" in r.json()["error"]["message"]


def test_models_do_not_coerce():
    with pytest.raises(InputError, match="rows"):
        api.request(api.Report, {"state": "started", "rows": "3"}, "report")
    with pytest.raises(InputError, match="decision"):
        api.request(api.Decision, {"decision": "maybe", "signature": "x"}, "decision")
    with pytest.raises(PeerError, match="ok"):
        api.response(api.Ok, {"ok": "yes"}, "answer")
    report = api.request(api.Report, {"state": "started"}, "report")
    with pytest.raises(ValueError):  # frozen
        report.rows = 3  # type: ignore[misc]


def test_client_builds_bodies_from_the_models_and_checks_answers(app_client):
    client, store = app_client
    alice = KeySigner.generate()
    sched = SchedulerClient("https://testserver#sha256:" + "0" * 64, alice)
    sched._http = TestClient(client.app, base_url="http://testserver")  # in process, no TLS
    sched._http.auth = _Signed(alice)
    sched.register_node("alice", store.invite(["owner", "initiator"], "alice"))
    [node] = sched.nodes()
    assert node["name"] == "alice" and node["public_key"] == alice.public_key()
    assert sched.tasks() == [] and sched.audit() == [] and sched.datasets() == []
    with pytest.raises(InputError, match="name"):
        sched.register_node("x" * 65)  # refused before it is sent
    with pytest.raises(InputError, match="rows"):
        sched.add_dataset("alice", "d", "schema", -1)


# -- properties: every request and answer model takes any JSON as itself or a named error -----

SECRET = "value-never-echoed-42"
REQUESTS = [api.RegisterNode, api.RegisterExecutor, api.AddDataset, api.SubmitTask,
            api.Decision, api.Cancel, api.Report]
ANSWERS = [api.Node, api.Executor, api.Dataset, api.TaskView, api.TaskDetail, api.AuditEntry,
           api.ApproveWork, api.UploadWork]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.text(max_size=8)
                    | st.just(SECRET),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=15)


def _fields(model) -> list[str]:
    return sorted({f.alias or name for name, f in model.model_fields.items()})


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(REQUESTS + ANSWERS), st.data())
def test_any_json_body_is_the_model_or_a_named_error(model, data):
    body = data.draw(st.dictionaries(st.sampled_from(_fields(model)) | st.text(max_size=6),
                                     JSON, max_size=8))
    try:
        if model in REQUESTS:
            assert isinstance(api.request(model, body, "body"), model)
        else:
            assert isinstance(api.response(model, body, "answer"), model)
    except (InputError, PeerError) as exc:
        assert SECRET not in str(exc)
