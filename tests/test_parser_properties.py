"""Property tests for the encoders and parsers on the wire (beyond the spec, see
test_wire_properties.py): each round-trips what it encodes, and on any other input either
decodes or raises its own named error, never a foreign exception."""

from __future__ import annotations

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow.attestation import formats, ratls
from teeflow.attestation.evidence import Evidence
from teeflow.compute.params import PARAM_TYPES, Param
from teeflow.core import auth, seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import (
    AuthError,
    EvidenceFormatError,
    InputError,
    ParameterError,
    TeeflowError,
)
from teeflow.core.schemas import MAX_SCHEMA, schema_fingerprint, schema_from_b64, schema_to_b64

SETTINGS = settings(max_examples=150, deadline=None)
SIGNER = KeySigner.generate()
X25519 = x25519.X25519PrivateKey.generate()

TYPES = st.sampled_from([pa.int8(), pa.int64(), pa.uint32(), pa.float32(), pa.float64(),
                         pa.bool_(), pa.string(), pa.large_string(), pa.binary(),
                         pa.date32(), pa.timestamp("us"), pa.decimal128(10, 2),
                         pa.list_(pa.int64()), pa.struct([("a", pa.int32())]),
                         pa.dictionary(pa.int32(), pa.string())])
SCHEMAS = st.lists(st.tuples(st.text(min_size=1, max_size=20), TYPES, st.booleans()),
                   max_size=12).map(lambda fs: pa.schema(
                       [pa.field(n, t, nullable=null) for n, t, null in fs]))


# -- Arrow schemas ----------------------------------------------------------------------------

@SETTINGS
@given(SCHEMAS)
def test_schema_round_trips_with_its_fingerprint(schema):
    back = schema_from_b64(schema_to_b64(schema))
    assert back.equals(schema)
    assert schema_fingerprint(back) == schema_fingerprint(schema)


@SETTINGS
@given(st.text(max_size=300))
def test_schema_parser_names_its_error(text):
    try:
        schema_from_b64(text)
    except InputError:
        pass


def test_schema_parser_caps_its_input():
    with pytest.raises(InputError, match="larger than"):
        schema_from_b64("A" * (MAX_SCHEMA + 1))


# -- upload end marker ------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 2**40), st.integers(0, 2**20), st.integers(0, 2**40),
       st.integers(0, 2**20))
def test_end_marker_accepts_exactly_its_counts(rows, batches, got_rows, got_batches):
    marker = wire.parse_json(wire.end_marker(rows, batches), "end marker")
    if (rows, batches) == (got_rows, got_batches):
        wire.check_end_marker(marker, got_rows, got_batches, "d")
    else:
        with pytest.raises(InputError, match="end marker says"):
            wire.check_end_marker(marker, got_rows, got_batches, "d")


@SETTINGS
@given(st.binary(max_size=200))
def test_json_parser_names_its_error(data):
    try:
        assert isinstance(wire.parse_json(data, "message"), dict)
    except InputError:
        pass


# -- evidence, its format and RA-TLS certificates ---------------------------------------------

@SETTINGS
@given(st.text(min_size=1, max_size=10), st.binary(max_size=500))
def test_evidence_round_trips(tee, quote):
    assert Evidence.decode(Evidence(tee, quote).encode()) == Evidence(tee, quote)


@SETTINGS
@given(st.binary(max_size=500))
def test_evidence_parsers_name_their_errors(data):
    for parse in (Evidence.decode, formats.evidence_tee, ratls.read_certificate_evidence):
        try:
            result = parse(data)
        except EvidenceFormatError:
            continue
        except TeeflowError as exc:  # a certificate parser may say more precisely
            assert type(exc).__module__.startswith("teeflow")
            continue
        if parse is formats.evidence_tee:
            assert result in formats.TEES


@SETTINGS
@given(st.sampled_from(sorted(formats._MAGICS)), st.binary(max_size=100))
def test_a_magic_alone_is_not_evidence_of_anything_else(magic, rest):
    try:
        assert formats.evidence_tee(magic + rest) == formats._MAGICS[magic]
    except EvidenceFormatError:
        pass


# -- sealed results ---------------------------------------------------------------------------

def _enc_key() -> str:
    import base64

    from cryptography.hazmat.primitives import serialization

    raw = X25519.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@SETTINGS
@given(st.binary(max_size=2000), st.text(min_size=1, max_size=64), st.text(max_size=64))
def test_seal_opens_only_for_its_task(plaintext, digest, other):
    sealed = seal.seal(plaintext, _enc_key(), digest)
    assert seal.open_sealed(sealed, X25519, digest) == plaintext
    if other != digest:
        with pytest.raises(AuthError):
            seal.open_sealed(sealed, X25519, other)


@SETTINGS
@given(st.binary(max_size=300))
def test_open_names_its_error_on_any_bytes(data):
    with pytest.raises(AuthError):
        seal.open_sealed(data, X25519, "d")


# -- signed requests --------------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE"])


@SETTINGS
@given(METHODS, st.text(min_size=1, max_size=80), st.binary(max_size=500),
       st.sampled_from([auth.KEY, auth.TIME, auth.NONCE, auth.SIGNATURE, "body", "target"]),
       st.text(max_size=40))
def test_signed_request_verifies_once_and_only_untampered(method, target, body, field, junk):
    now = 1_700_000_000
    headers = auth.sign_request(SIGNER, method, target, body, now)
    seen: set[str] = set()

    def fresh(key: str, nonce: str, expires: int) -> bool:
        new = nonce not in seen
        seen.add(nonce)
        return new

    tampered = dict(headers)
    t_target, t_body = target, body
    if field == "body":
        t_body = body + b"x"
    elif field == "target":
        t_target = target + "x"
    else:
        tampered[field] = junk if junk != headers[field] else junk + "x"
    with pytest.raises(AuthError):
        auth.verify_request(method, t_target, tampered, t_body, now, fresh)
    assert auth.verify_request(method, target, headers, body, now, fresh) == \
        SIGNER.public_key()
    with pytest.raises(AuthError, match="replay"):
        auth.verify_request(method, target, headers, body, now, fresh)


# -- computation parameters (strings on the wire) ---------------------------------------------

PARAMS = st.builds(
    Param, name=st.just("p"), type=st.sampled_from(PARAM_TYPES),
    low=st.none() | st.floats(-1e6, 1e6), high=st.none() | st.floats(-1e6, 1e6),
    low_open=st.booleans(), high_open=st.booleans())


@SETTINGS
@given(PARAMS, st.one_of(st.text(max_size=40), st.integers(), st.none(), st.floats(),
                         st.lists(st.text(max_size=5), max_size=3)))
def test_param_parser_converts_or_names_the_parameter(param, raw):
    try:
        value = param.parse(raw)
    except ParameterError as exc:
        assert str(exc).startswith("parameter 'p'")
        return
    assert isinstance(raw, str)
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list}
    assert isinstance(value, kind[param.type])
