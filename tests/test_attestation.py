"""Simulated evidence and its appraisal: good evidence, each refusal, tampered-input corpora."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teeflow.attestation import evidence as evidence_module
from teeflow.attestation.evidence import MAX_EVIDENCE, Evidence, bind_report_data
from teeflow.attestation.policy import AppraisalPolicy, appraise, load_policy
from teeflow.attestation.simulated import (
    QUOTE_LEN,
    SimulatedBackend,
    SimulatedVerifier,
    make_quote,
)
from teeflow.core.errors import (
    EvidenceFormatError,
    PolicyRefused,
    TeeflowError,
    VerificationError,
)

MEASUREMENT = hashlib.sha256(b"the executor code").hexdigest()
SPKI = hashlib.sha256(b"the executor TLS key").digest()
NONCE = b"n" * 32
AT = 1_700_000_000
VERIFIERS = {"simulated": SimulatedVerifier()}


def _policy(**overrides) -> AppraisalPolicy:
    raw = {"tee_types": ["simulated"], "allow_simulated": True,
           "simulated": {"measurement": [MEASUREMENT]}, **overrides}
    return load_policy(raw)


def _evidence(*, debug: bool = False, measurement: str = MEASUREMENT,
              spki: bytes = SPKI, nonce: bytes = NONCE) -> Evidence:
    backend = SimulatedBackend(debug=debug, measurement=measurement)
    return backend.evidence(bind_report_data(spki, nonce))


def _appraise(ev: Evidence, policy: AppraisalPolicy | None = None, *,
              spki: bytes = SPKI, nonce: bytes = NONCE):
    return appraise(ev, policy or _policy(), VERIFIERS,
                    expected_report_data=bind_report_data(spki, nonce), at=AT)


GOOD_QUOTE = _evidence().quote


# -- appraisal -------------------------------------------------------------------------------


def test_good_evidence_passes():
    claims = _appraise(_evidence())
    assert claims.simulated is True
    assert claims.tee == "simulated"
    assert claims.debug is False
    assert claims.measurements == {"measurement": MEASUREMENT}
    assert claims.report_data == bind_report_data(SPKI, NONCE)
    assert claims.to_dict()["simulated"] is True


def test_good_evidence_survives_encoding():
    claims = _appraise(Evidence.decode(_evidence().encode()))
    assert claims.simulated is True


def _refused(check: str, ev: Evidence, policy: AppraisalPolicy | None = None, **kw) -> None:
    with pytest.raises(PolicyRefused) as info:
        _appraise(ev, policy, **kw)
    assert info.value.check == check
    assert str(info.value).startswith(f"{check}: ")


def test_refused_tee_type_not_accepted():
    sgx_only = load_policy({"tee_types": ["sgx"], "sgx": {"mrenclave": ["00" * 32]}})
    _refused("tee_type", _evidence(), sgx_only)


def test_refused_evidence_that_lies_about_its_tee():
    _refused("tee_type", Evidence(tee="sgx", quote=GOOD_QUOTE),
             AppraisalPolicy(tee_types=("sgx",)))


def test_refused_simulated_without_allow_simulated():
    # load_policy refuses this combination, so build the object directly.
    policy = AppraisalPolicy(tee_types=("simulated",), allow_simulated=False,
                             measurements={"simulated": {"measurement": (MEASUREMENT,)}})
    _refused("allow_simulated", _evidence(), policy)


def test_refused_wrong_measurement():
    _refused("measurement.measurement", _evidence(measurement="ab" * 32))


def test_refused_stale_nonce():
    _refused("nonce", _evidence(nonce=b"o" * 32))


def test_refused_other_tls_key():
    _refused("tls_key", _evidence(), spki=hashlib.sha256(b"a different key").digest())


def test_debug_refused_unless_allowed():
    ev = _evidence(debug=True)
    assert make_quote(bytes.fromhex(MEASUREMENT), bind_report_data(SPKI, NONCE),
                      debug=True) == ev.quote
    _refused("debug", ev)
    claims = _appraise(ev, _policy(allow_debug=True))
    assert claims.debug is True


# -- tampered-input corpora ------------------------------------------------------------------


def _must_not_verify(quote: bytes) -> None:
    try:
        SimulatedVerifier().verify(quote, AT)
    except (EvidenceFormatError, VerificationError):
        return
    raise AssertionError(f"tampered quote verified: {quote.hex()}")


def test_genuine_quote_verifies():
    assert len(GOOD_QUOTE) == QUOTE_LEN
    assert SimulatedVerifier().verify(GOOD_QUOTE, AT).simulated


def test_every_single_bit_flip_is_refused():
    for i in range(len(GOOD_QUOTE) * 8):
        tampered = bytearray(GOOD_QUOTE)
        tampered[i // 8] ^= 1 << (i % 8)
        _must_not_verify(bytes(tampered))


def test_every_truncation_and_extension_is_refused():
    for n in range(len(GOOD_QUOTE)):
        _must_not_verify(GOOD_QUOTE[:n])
    _must_not_verify(GOOD_QUOTE + b"\x00")
    _must_not_verify(GOOD_QUOTE[1:])


def test_every_single_bit_flip_of_encoded_evidence_is_refused():
    """Flips in the JSON wrapper either break decoding or reach the verifier; none appraise."""
    encoded = _evidence().encode()
    for i in range(len(encoded) * 8):
        tampered = bytearray(encoded)
        tampered[i // 8] ^= 1 << (i % 8)
        try:
            _appraise(Evidence.decode(bytes(tampered)))
        except (EvidenceFormatError, VerificationError, PolicyRefused):
            continue
        # base64 has slack bits (padding) that can flip without changing the quote
        assert Evidence.decode(bytes(tampered)) == _evidence()


# -- properties ------------------------------------------------------------------------------


@settings(derandomize=True, max_examples=200)
@given(tee=st.text(min_size=1, max_size=40), quote=st.binary(max_size=2048))
def test_evidence_round_trip(tee, quote):
    ev = Evidence(tee=tee, quote=quote)
    assert Evidence.decode(ev.encode()) == ev


@settings(derandomize=True, max_examples=300)
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_into_decode_raise_only_teeflow_errors(data):
    try:
        Evidence.decode(data)
    except TeeflowError:
        pass


@settings(derandomize=True, max_examples=300)
@given(st.one_of(st.binary(max_size=512), st.binary(min_size=QUOTE_LEN, max_size=QUOTE_LEN)))
def test_arbitrary_bytes_into_verify_raise_only_teeflow_errors(data):
    with pytest.raises(TeeflowError):
        SimulatedVerifier().verify(data, AT)


@settings(derandomize=True, max_examples=100)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["tee", "quote", "x"]), inner, max_size=3),
                    max_leaves=20))
def test_arbitrary_json_into_decode_raises_only_teeflow_errors(value):
    import json

    try:
        Evidence.decode(json.dumps(value).encode())
    except TeeflowError:
        pass


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 50_000])
def test_deeply_nested_json_into_decode_is_a_format_error(data):
    assert len(data) <= MAX_EVIDENCE
    with pytest.raises(EvidenceFormatError):
        Evidence.decode(data)


def test_oversize_evidence_refused_before_parsing(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("oversize evidence was parsed")

    monkeypatch.setattr(evidence_module.json, "loads", no_parse)
    big = Evidence(tee="simulated", quote=b"\x00" * MAX_EVIDENCE).encode()
    assert len(big) > MAX_EVIDENCE
    with pytest.raises(EvidenceFormatError, match="larger than"):
        Evidence.decode(big)
    with pytest.raises(EvidenceFormatError, match="larger than"):
        Evidence.decode(b" " * (MAX_EVIDENCE + 1))


def test_evidence_at_the_limit_is_parsed():
    body = Evidence(tee="simulated", quote=GOOD_QUOTE).encode()
    padded = body + b" " * (MAX_EVIDENCE - len(body))
    assert Evidence.decode(padded).quote == GOOD_QUOTE


@pytest.mark.parametrize("data", [
    b"", b"null", b"[]", b"{}", b'{"tee": "simulated"}', b'{"quote": ""}',
    b'{"tee": "", "quote": ""}', b'{"tee": 1, "quote": ""}', b'{"tee": "x", "quote": 5}',
    b'{"tee": "x", "quote": "not base64!"}', b'{"tee": "x", "quote": "\xff"}', b"\xff\xfe",
])
def test_malformed_evidence(data):
    with pytest.raises(EvidenceFormatError):
        Evidence.decode(data)


# -- report data -----------------------------------------------------------------------------


def test_bind_report_data():
    rd = bind_report_data(SPKI, NONCE)
    assert len(rd) == 64 and rd[:32] == SPKI
    assert bind_report_data(SPKI, b"x" * 16) != bind_report_data(SPKI, b"x" * 17)
    assert len(bind_report_data(SPKI, b"x" * 64)) == 64


@pytest.mark.parametrize("spki_len,nonce_len", [
    (0, 32), (31, 32), (33, 32), (64, 32), (32, 0), (32, 15), (32, 65), (32, 1000)])
def test_bind_report_data_rejects_bad_lengths(spki_len, nonce_len):
    with pytest.raises(EvidenceFormatError):
        bind_report_data(b"k" * spki_len, b"n" * nonce_len)


@pytest.mark.parametrize("m_len,rd_len", [(31, 64), (33, 64), (32, 63), (32, 65)])
def test_make_quote_rejects_bad_lengths(m_len, rd_len):
    with pytest.raises(EvidenceFormatError):
        make_quote(b"m" * m_len, b"r" * rd_len)
