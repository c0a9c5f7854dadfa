"""The executor's Flight bodies (executor/messages.py): decoded once, strictly; every bad
field an InputError that names the message and the field, never the value sent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from teeflow.core import wire
from teeflow.core.errors import InputError
from teeflow.executor.messages import (
    CancelRequest,
    CreateTask,
    FlModel,
    FlRequest,
    FlUpdate,
    Message,
    ResultRequest,
    UploadRequest,
)

SECRET = "s3cret-value-never-echoed"
GOOD: dict[type[Message], dict] = {
    UploadRequest: {"task_id": "t1", "dataset": "d1", "challenge": "ab", "signature": "cd"},
    ResultRequest: {"task_id": "t1", "receiver": "k", "challenge": "ab", "signature": "cd"},
    CancelRequest: {"task_id": "t1", "key": "k", "signature": "cd"},
    FlModel: {"task_id": "t1", "dataset": "d1", "round": 0, "challenge": "ab",
              "signature": "cd"},
    FlUpdate: {"task_id": "t1", "dataset": "d1", "round": 0, "challenge": "ab",
               "signature": "cd", "update": {"weights": [1.0]}},
    CreateTask: {"spec": {"task_id": "t1"}, "approvals": [{"signer": "a", "signature": "b"}],
                 "schemas": {"d1": "QUJD"}},
}


def _bad(model: type[Message], body: dict, field: str) -> str:
    with pytest.raises(InputError) as err:
        model.decode(json.dumps(body).encode())
    message = str(err.value)
    assert message.startswith(f"{model.KIND}: ") and repr(field) in message
    assert SECRET not in message and err.value.__cause__ is None
    return message


@pytest.mark.parametrize("model", GOOD, ids=lambda m: m.__name__)
def test_good_bodies_decode(model: type[Message]):
    decoded = model.decode(json.dumps(GOOD[model]).encode())
    first = next(iter(model.model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(decoded, first, "other")


@pytest.mark.parametrize("model", GOOD, ids=lambda m: m.__name__)
def test_every_field_of_the_wrong_type_is_named(model: type[Message]):
    for name, value in GOOD[model].items():
        wrong = 5 if isinstance(value, str) else SECRET
        _bad(model, {**GOOD[model], name: wrong}, name)


@pytest.mark.parametrize("model", GOOD, ids=lambda m: m.__name__)
def test_unknown_and_missing_fields_are_named(model: type[Message]):
    assert "not a known field" in _bad(model, {**GOOD[model], "extra": SECRET}, "extra")
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    for name in required:
        body = {k: v for k, v in GOOD[model].items() if k != name}
        assert "missing" in _bad(model, body, name)


def test_hex_fields_must_be_hex():
    assert "hex" in _bad(UploadRequest, {**GOOD[UploadRequest], "challenge": SECRET},
                         "challenge")
    assert UploadRequest.decode(json.dumps(GOOD[UploadRequest]).encode()).challenge == b"\xab"


def test_no_coercion():
    _bad(FlModel, {**GOOD[FlModel], "round": True}, "round")
    _bad(FlModel, {**GOOD[FlModel], "round": "1"}, "round")
    _bad(CreateTask, {**GOOD[CreateTask], "approvals": [{"signer": 5, "signature": []}]},
         "approvals.0.signer")
    _bad(CreateTask, {**GOOD[CreateTask], "schemas": {"d1": 5}}, "schemas.d1")


def test_capped_before_parsing():
    with pytest.raises(InputError, match="larger than"):
        UploadRequest.decode(b" " * (wire.MAX_MESSAGE + 1))
    with pytest.raises(InputError, match="not JSON"):
        UploadRequest.decode(b"{")
    with pytest.raises(InputError, match="JSON object"):
        UploadRequest.decode(b"[]")


def test_built_in_python_positionally():
    """As bench/ and the tests build them, field by field in order, with raw bytes."""
    up = UploadRequest("t1", "d1", b"\x01", b"\x02")
    assert (up.task_id, up.dataset, up.challenge, up.signature) == ("t1", "d1", b"\x01", b"\x02")
    fr = FlRequest("fl-update", "t1", "d1", 2, b"\x01", b"\x02")
    assert fr.round == 2 and fr.kind == "fl-update"
    assert FlUpdate.decode(json.dumps(GOOD[FlUpdate]).encode()).request().kind == "fl-update"
    assert FlModel.decode(json.dumps(GOOD[FlModel]).encode()).request().kind == "fl-model"
    with pytest.raises(TypeError):
        UploadRequest("t1", "d1", b"", b"", "extra")


# -- properties: any body is the model or a named InputError that echoes nothing -------------

VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                      | st.text(max_size=8) | st.just(SECRET),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(GOOD, key=lambda m: m.__name__)), st.data())
def test_any_mutation_of_a_body_decodes_or_is_named(model, data):
    body = dict(GOOD[model])
    for key in data.draw(st.lists(st.sampled_from(sorted(body)) | st.text(max_size=6),
                                  max_size=3)):
        if data.draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = data.draw(VALUES)
    try:
        assert isinstance(model.decode(json.dumps(body).encode()), model)
    except InputError as exc:
        assert SECRET not in str(exc) and exc.__cause__ is None


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(GOOD, key=lambda m: m.__name__)), st.binary(max_size=120))
def test_any_bytes_decode_or_are_an_input_error(model, data):
    try:
        model.decode(data)
    except InputError:
        pass
