"""Property tests for the canonical encoding (RFC 8785, core/wire.py) and the task spec codec.

Everything signed or hashed goes through `wire.canonical`; these pin that it is JCS, that
it is a function of the value alone, and that a spec survives encoding and decoding while
any field of a wrong type or an unknown field is refused with InputError.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow.core import wire
from teeflow.core.errors import InputError

SETTINGS = settings(derandomize=True, max_examples=200, deadline=None)

_text = st.text(max_size=10)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_ints = st.integers(-wire.MAX_SAFE_INTEGER, wire.MAX_SAFE_INTEGER)
_scalars = st.none() | st.booleans() | _ints | _finite | _text
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_text, inner, max_size=4), max_leaves=12)
_bad_numbers = st.sampled_from([math.nan, math.inf, -math.inf])


# -- RFC 8785 itself -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, encoded", [
    # RFC 8785 section 3.2.2 and appendix B (numbers as ECMAScript writes a double)
    (0.0, b"0"), (-0.0, b"0"), (1.0, b"1"), (-1.5, b"-1.5"), (1e21, b"1e+21"),
    (1e-7, b"1e-7"), (333333333.3333333, b"333333333.3333333"), (5e-324, b"5e-324"),
    (1.7976931348623157e308, b"1.7976931348623157e+308"), (9007199254740991, b"9007199254740991"),
    ({"b": 1, "a": [True, None, "\u20ac\n"]}, '{"a":[true,null,"\u20ac\\n"],"b":1}'.encode()),
    # keys sort by UTF-16 code units: U+1F600 (a surrogate pair, D83D..) before U+FB33
    ({"\ufb33": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ufb33":1}'.encode()),
])
def test_rfc8785_vectors(value, encoded):
    assert wire.canonical(value) == encoded


@SETTINGS
@given(_json)
def test_canonical_round_trips_through_json(value):
    encoded = wire.canonical(value)
    # JCS numbers are doubles: 1e17 is written "100000000000000000", which only a reader that
    # takes big integers as doubles (wire.loads) gives back exactly
    assert wire.loads(encoded) == value
    assert json.loads(encoded, parse_int=wire.jcs_int) == value
    assert wire.canonical(wire.loads(encoded)) == encoded  # a fixed point
    assert b"\n" not in encoded.replace(b"\\n", b"")


@SETTINGS
@given(st.recursive(_scalars.filter(lambda v: not isinstance(v, float) or abs(v) < 2**53),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(_text, inner, max_size=4), max_leaves=12))
def test_canonical_round_trips_through_plain_json_loads(value):
    assert json.loads(wire.canonical(value)) == value


@SETTINGS
@given(st.dictionaries(_text, _json, max_size=8), st.randoms())
def test_canonical_ignores_dict_order(value, rnd):
    items = list(value.items())
    rnd.shuffle(items)
    assert wire.canonical(dict(items)) == wire.canonical(value)
    assert wire.canonical(value) == wire.canonical(value)


def _plant(value, bad, where: int):
    """`value` with `bad` put somewhere inside it (`where` picks the place)."""
    if isinstance(value, dict) and value and where % 3:
        key = sorted(value)[where % len(value)]
        return {**value, key: _plant(value[key], bad, where // 3)}
    if isinstance(value, list) and value and where % 3:
        i = where % len(value)
        return [*value[:i], _plant(value[i], bad, where // 3), *value[i + 1:]]
    return [value, bad] if where % 2 else {"x": value, "y": bad}


@SETTINGS
@given(_json, _bad_numbers, st.integers(0, 10**6))
def test_canonical_refuses_nan_and_infinity_at_any_depth(value, bad, where):
    with pytest.raises(InputError, match="NaN or infinity"):
        wire.canonical(_plant(value, bad, where))


@pytest.mark.parametrize("bad", [2**53, -(2**53), 10**30])
def test_canonical_refuses_integers_a_double_does_not_hold(bad):
    with pytest.raises(InputError, match="integer"):
        wire.canonical({"a": [bad]})


@pytest.mark.parametrize("bad", [{1: "x"}, {"a": b"bytes"}, {"a": {1, 2}}, "\ud800"])
def test_canonical_refuses_what_is_not_json(bad):
    with pytest.raises(InputError):
        wire.canonical(bad)


def test_compact_json_keeps_nan_for_what_is_not_signed():
    assert wire.compact_json({"b": math.nan, "a": 1.0}) == b'{"a":1.0,"b":NaN}'


# -- the task spec ------------------------------------------------------------------------------

_alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_refs = st.lists(st.builds(wire.DatasetRef, _text, _text, _text, _text), min_size=1,
                 max_size=4, unique_by=lambda d: d.name)
_specs = st.builds(
    wire.TaskSpec,
    task_id=st.text(_alnum, min_size=8, max_size=64),
    compute=_text, code_digest=_text,
    params=st.dictionaries(_text, _text, max_size=4),
    datasets=_refs.map(tuple),
    executor_policy=st.dictionaries(_text, _json, max_size=4),
    receivers=st.lists(st.builds(wire.Receiver, _text, _text), min_size=1,
                       max_size=3).map(tuple),
    initiator_key=_text)


@SETTINGS
@given(_specs)
def test_spec_round_trips(spec):
    assert wire.TaskSpec.from_dict(spec.to_dict()) == spec
    assert wire.TaskSpec.decode(spec.encode()) == spec
    assert wire.TaskSpec.decode(spec.encode()).digest() == spec.digest()


@SETTINGS
@given(_specs, _bad_numbers, st.integers(0, 10**6))
def test_spec_with_nan_in_its_policy_is_refused(spec, bad, where):
    body = spec.to_dict()
    body["executor_policy"] = {"p": _plant(body["executor_policy"], bad, where)}
    with pytest.raises(InputError):
        wire.TaskSpec.from_dict(body).digest()


# where a field sits in a spec dict, and the JSON types it may have
_STR, _LIST, _DICT = (str,), (list,), (dict,)
_TOP = {"version": (int,), "task_id": _STR, "compute": _STR, "code_digest": _STR,
        "params": _DICT, "datasets": _LIST, "executor_policy": _DICT, "receivers": _LIST,
        "initiator_key": _STR}
_DATASET = {"name": _STR, "owner": _STR, "owner_key": _STR, "fingerprint": _STR}
_RECEIVER = {"sign_key": _STR, "enc_key": _STR}


def _wrong(allowed: tuple[type, ...]):
    return _json.filter(lambda v: not isinstance(v, allowed) or isinstance(v, bool))


@SETTINGS
@given(_specs, st.data())
def test_spec_field_of_a_wrong_type_is_an_input_error(spec, data):
    body = spec.to_dict()
    where = data.draw(st.sampled_from(["top", "dataset", "receiver", "param", "entry"]))
    if where == "top":
        name = data.draw(st.sampled_from(sorted(_TOP)))
        body[name] = data.draw(_wrong(_TOP[name]))
    elif where == "dataset":
        i = data.draw(st.integers(0, len(body["datasets"]) - 1))
        name = data.draw(st.sampled_from(sorted(_DATASET)))
        body["datasets"][i][name] = data.draw(_wrong(_STR))
    elif where == "receiver":
        i = data.draw(st.integers(0, len(body["receivers"]) - 1))
        name = data.draw(st.sampled_from(sorted(_RECEIVER)))
        body["receivers"][i][name] = data.draw(_wrong(_STR))
    elif where == "param":
        body["params"][data.draw(_text)] = data.draw(_wrong(_STR))
    else:  # an entry of a list that must hold objects
        name = data.draw(st.sampled_from(["datasets", "receivers"]))
        body[name].append(data.draw(_wrong(_DICT)))
    with pytest.raises(InputError):
        wire.TaskSpec.from_dict(body)


@SETTINGS
@given(_specs, _text, _json, st.sampled_from(["top", "dataset", "receiver"]))
def test_spec_with_an_unknown_field_is_an_input_error(spec, name, value, where):
    body = spec.to_dict()
    target = {"top": body, "dataset": body["datasets"][0],
              "receiver": body["receivers"][0]}[where]
    if name in target:
        name += "_extra"
    target[name] = value
    with pytest.raises(InputError):
        wire.TaskSpec.from_dict(body)


@SETTINGS
@given(_json.filter(lambda v: not isinstance(v, dict)))
def test_spec_that_is_not_an_object_is_an_input_error(value):
    with pytest.raises(InputError):
        wire.TaskSpec.from_dict(value)
    with pytest.raises(InputError):
        wire.TaskSpec.decode(json.dumps(value).encode())
