"""An executor's answers (catalog, status, result envelope) are decoded once, at the edge:
whatever a broken or hostile executor sends is a model or a named PeerError, never a
KeyError or TypeError deep inside the scheduler, a provider or the SDK."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow import compute
from teeflow.core import answers
from teeflow.core.answers import Catalog, CatalogEntry, ResultEnvelope, TaskStatus
from teeflow.core.errors import PeerError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=20)
FIELDS = sorted(set(TaskStatus.model_fields) | set(ResultEnvelope.model_fields))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([Catalog, TaskStatus, ResultEnvelope]),
       st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=12))
def test_any_json_object_decodes_or_is_a_peer_error(model, body):
    try:
        assert isinstance(answers.decode(model, json.dumps(body), "answer"), model)
    except PeerError as exc:
        assert str(exc).startswith("answer:")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_a_peer_error(data):
    for model in (Catalog, TaskStatus, ResultEnvelope):
        try:
            answers.decode(model, data, "answer")
        except PeerError:
            pass


def test_the_error_names_the_field_not_the_value():
    with pytest.raises(PeerError, match="sealed") as caught:
        answers.decode(ResultEnvelope, json.dumps({"sealed": ["secret-value-7"]}), "result")
    assert "secret-value-7" not in str(caught.value)


def test_oversized_answers_are_refused_before_parsing():
    with pytest.raises(PeerError, match="larger than"):
        answers.decode(TaskStatus, b" " * (answers.MAX_ANSWER + 1), "status")


def test_the_executor_catalog_fits_its_model():
    listing = Catalog(computations=[CatalogEntry.model_validate(c)
                                    for c in compute.describe_all()])
    back = answers.decode(Catalog, listing.model_dump_json(), "catalog")
    assert [c.name for c in back.computations] == compute.names()
    assert all(c.code_digest == compute.get(c.name).code_digest for c in back.computations)
