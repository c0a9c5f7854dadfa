"""RA-TLS certificates in Gramine's format: round trip, binding, tampering, legacy, gRPC."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cbor2
import pyarrow.flight as fl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation import ratls
from teeflow.attestation.ratls import (
    DICE_EVIDENCE_OID,
    LEGACY_QUOTE_OIDS,
    evidence_extension,
    legacy_report_data,
    make_claims,
    make_ratls_identity,
    read_certificate_evidence,
    report_data_for_claims,
)
from teeflow.attestation.simulated import SimulatedBackend, SimulatedVerifier
from teeflow.core.crypto import (
    EXECUTOR_TLS_NAME,
    make_tls_identity,
    self_signed_certificate,
    spki_sha256,
)
from teeflow.core.errors import (
    EvidenceFormatError,
    PolicyRefused,
    VerificationError,
)

ALLOWED = (EvidenceFormatError, PolicyRefused, VerificationError)


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _raw_cert(key: ec.EllipticCurvePrivateKey, oid: x509.ObjectIdentifier, value: bytes) -> bytes:
    """A certificate for `key` whose extension `oid` holds exactly `value`."""
    ext = x509.UnrecognizedExtension(oid, value)
    return _pem(self_signed_certificate(key, [ext]))


def _dice_value(quote: bytes, claims: bytes, tag: int = 60000) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, [quote, claims]))


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return make_ratls_identity(SimulatedBackend())


def _extension_value(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    value = cert.extensions.get_extension_for_oid(DICE_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def test_round_trip(identity):
    cert_pem, key_pem = identity
    ev = read_certificate_evidence(cert_pem)
    assert ev.format == "dice" and ev.tee == "simulated"
    claims = SimulatedVerifier().verify(ev.quote, 0)
    assert claims.report_data == report_data_for_claims(ev.claims_cbor) == ev.report_data
    assert ev.report_data[32:] == bytes(32)
    # the claims' key hash is this certificate's key
    entry = cbor2.loads(ev.claims["pubkey-hash"])
    assert entry == [1, spki_sha256(cert_pem)] and ev.spki_sha256 == spki_sha256(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert _spki(key) == x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ev.evidence().tee == "simulated" and ev.nonce is None
    # DER reads the same
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert read_certificate_evidence(der) == ev


def test_certificate_shape(identity):
    cert = x509.load_pem_x509_certificate(identity[0])
    assert cert.subject.rfc4514_string() == f"CN={EXECUTOR_TLS_NAME}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [EXECUTOR_TLS_NAME]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ev = cert.extensions.get_extension_for_oid(DICE_EVIDENCE_OID)
    assert not ev.critical  # Gramine's verifier and TLS stacks refuse it critical
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    ref_cert = x509.load_pem_x509_certificate(make_tls_identity()[0])
    assert lifetime == ref_cert.not_valid_after_utc - ref_cert.not_valid_before_utc


def test_bytes_are_gramines_layout(identity):
    """Byte for byte what Gramine's libcbor code produces for the same inputs."""
    cert_pem, _ = identity
    digest = spki_sha256(cert_pem)
    value = _extension_value(cert_pem)
    ev = read_certificate_evidence(cert_pem)
    claims = b"\xa1\x6bpubkey-hash\x58\x24\x82\x01\x58\x20" + digest
    assert ev.claims_cbor == claims
    q = ev.quote
    assert value == b"\xd9\xea\x60\x82" + b"\x58" + bytes([len(q)]) + q + b"\x58\x33" + claims
    assert make_claims(b"spki") == b"\xa1\x6bpubkey-hash\x58\x24\x82\x01\x58\x20" + \
        hashlib.sha256(b"spki").digest()


def test_nonce_claim_is_read():
    key = ec.generate_private_key(ec.SECP256R1())
    claims = make_claims(_spki(key), nonce=b"n" * 32)
    quote = SimulatedBackend().evidence(report_data_for_claims(claims)).quote
    cert = _pem(self_signed_certificate(key, [evidence_extension("simulated", quote, claims)]))
    ev = read_certificate_evidence(cert)
    assert ev.nonce == b"n" * 32 and ev.report_data == report_data_for_claims(claims)
    assert SimulatedVerifier().verify(ev.quote, 0).report_data == ev.report_data


def test_extension_copied_onto_another_key_is_refused(identity):
    value = _extension_value(identity[0])
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PolicyRefused) as err:
        read_certificate_evidence(_raw_cert(other, DICE_EVIDENCE_OID, value))
    assert err.value.check == "tls_key"


def test_other_hash_algorithms_are_checked():
    key = ec.generate_private_key(ec.SECP256R1())
    for alg, name in ((7, "sha384"), (8, "sha512")):
        good = cbor2.dumps([alg, hashlib.new(name, _spki(key)).digest()])
        claims = cbor2.dumps({"pubkey-hash": good})
        quote = SimulatedBackend().evidence(report_data_for_claims(claims)).quote
        cert = _raw_cert(key, DICE_EVIDENCE_OID, _dice_value(quote, claims))
        assert read_certificate_evidence(cert).claims_cbor == claims
        zeros = bytes(hashlib.new(name).digest_size)
        bad = cbor2.dumps({"pubkey-hash": cbor2.dumps([alg, zeros])})
        with pytest.raises(PolicyRefused):
            read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, _dice_value(quote, bad)))


def test_no_extension():
    cert, _, _ = make_tls_identity()
    with pytest.raises(EvidenceFormatError, match="carries no RA-TLS evidence"):
        read_certificate_evidence(cert)


def test_not_a_certificate():
    for junk in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(EvidenceFormatError):
            read_certificate_evidence(junk)


def test_oversize():
    with pytest.raises(EvidenceFormatError, match="more than"):
        read_certificate_evidence(b"\x30" * (ratls.MAX_CERT + 1))
    key = ec.generate_private_key(ec.SECP256R1())
    claims = make_claims(_spki(key))
    quote = SimulatedBackend().evidence(report_data_for_claims(claims)).quote
    big_claims = cbor2.dumps({"pubkey-hash": cbor2.loads(claims)["pubkey-hash"],
                              "x": b"\0" * ratls.MAX_CLAIMS})
    with pytest.raises(EvidenceFormatError, match="claims are .* more than"):
        read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, _dice_value(quote, big_claims)))
    with pytest.raises(EvidenceFormatError, match="more than"):
        evidence_extension("simulated", quote + b"\0" * ratls.MAX_QUOTE, claims)
    with pytest.raises(EvidenceFormatError, match="more than"):
        evidence_extension("simulated", quote, b"\0" * (ratls.MAX_CLAIMS + 1))


@pytest.mark.parametrize(("value", "message"), [
    (cbor2.dumps([b"q", b"c"]), "not a tagged CBOR item"),
    (cbor2.dumps(cbor2.CBORTag(60001, [b"q", b"c"])), "CBOR tag 60001"),
    (cbor2.dumps(cbor2.CBORTag(60000, [b"q"])), r"array \[quote, claims\]"),
    (cbor2.dumps(cbor2.CBORTag(60000, {"q": b"c"})), r"array \[quote, claims\]"),
    (cbor2.dumps(cbor2.CBORTag(60000, ["q", b"c"])), "quote is not a byte string"),
    (cbor2.dumps(cbor2.CBORTag(60000, [b"q", "c"])), "claims are not a byte string"),
    (cbor2.dumps(cbor2.CBORTag(60000, [b"q", b""])), "claims are empty"),
    (cbor2.dumps(cbor2.CBORTag(60000, [b"", b"c"])), "quote is empty"),
    (cbor2.dumps(cbor2.CBORTag(60000, [b"q", b"c"])) + b"\0", "trailing bytes"),
    (b"\xd9\xea\x60\x9f\x41q\x41c\xff", "indefinite-length"),
    (b"\xd9\xea\x60\x82\x5a\xff\xff\xff\xff", "ends early"),
    (b"\xd9\xea\x60\x9b" + b"\xff" * 8, "longer than the input"),
    (b"\xd9\xea\x60\xfb" + b"\0" * 8, "floating-point"),
    (b"\xc1" * 20 + b"\x00", "nested deeper"),
    (b"\x81" * 20 + b"\x00", "nested deeper"),
])
def test_malformed_evidence(value, message):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceFormatError, match=message):
        read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, value))


def _claims_cases(spki: bytes) -> list[tuple[bytes, str]]:
    digest = hashlib.sha256(spki).digest()
    entry = cbor2.dumps([1, digest])
    return [
        (cbor2.dumps([entry]), "not a non-empty CBOR map"),
        (cbor2.dumps({}), "not a non-empty CBOR map"),
        (cbor2.dumps({1: entry}), "is not a non-empty text string"),
        (cbor2.dumps({"": entry}), "is not a non-empty text string"),
        (cbor2.dumps({"nonce": b"n"}), "have no 'pubkey-hash'"),
        (cbor2.dumps({"pubkey-hash": [1, digest]}), "'pubkey-hash' is not a byte string"),
        (cbor2.dumps({"pubkey-hash": b""}), "'pubkey-hash' is not a byte string"),
        (cbor2.dumps({"pubkey-hash": cbor2.dumps({1: digest})}), "is not a CBOR array"),
        (cbor2.dumps({"pubkey-hash": cbor2.dumps([2, digest])}), "unsupported hash algorithm"),
        (cbor2.dumps({"pubkey-hash": cbor2.dumps([True, digest])}), "unsupported hash algorithm"),
        (cbor2.dumps({"pubkey-hash": cbor2.dumps([1, digest[:31]])}), "32-byte sha256"),
        (cbor2.dumps({"pubkey-hash": cbor2.dumps([1, digest.hex()])}), "32-byte sha256"),
        (cbor2.dumps({"pubkey-hash": entry + b"\0"}), "trailing bytes"),
        (cbor2.dumps({"pubkey-hash": entry, "nonce": "text"}), "nonce"),
        (cbor2.dumps({"pubkey-hash": entry, "nonce": b"n" * 65}), "nonce"),
        (b"\xa2\x6bpubkey-hash" + cbor2.dumps(entry) + b"\x6bpubkey-hash" + cbor2.dumps(entry),
         "repeats key"),
        (b"\xa1\x6bpubkey-has\xff" + cbor2.dumps(entry), "not UTF-8"),
    ]


def test_malformed_claims():
    key = ec.generate_private_key(ec.SECP256R1())
    for claims, message in _claims_cases(_spki(key)):
        quote = SimulatedBackend().evidence(report_data_for_claims(claims)).quote
        with pytest.raises(EvidenceFormatError, match=message):
            read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, _dice_value(quote, claims)))


def _check_tampered(cert: bytes) -> None:
    try:
        ev = read_certificate_evidence(cert)
    except ALLOWED:
        return
    # it still parsed: then the quote must not vouch for these claims
    try:
        claims = SimulatedVerifier().verify(ev.quote, 0)
    except ALLOWED:
        return
    assert claims.report_data == ev.report_data  # untouched quote and claims only


def test_every_bit_flip_of_the_extension(identity):
    """Flip each bit of the extension value inside the DER (signature left stale)."""
    der = x509.load_pem_x509_certificate(identity[0]).public_bytes(serialization.Encoding.DER)
    value = _extension_value(identity[0])
    start = der.index(value)
    kinds: set[str] = set()
    for i in range(len(value)):
        for bit in range(8):
            tampered = bytearray(der)
            tampered[start + i] ^= 1 << bit
            try:
                ev = read_certificate_evidence(bytes(tampered))
            except ALLOWED as exc:
                kinds.add(type(exc).__name__)
                continue
            try:
                claims = SimulatedVerifier().verify(ev.quote, 0)
            except ALLOWED as exc:
                kinds.add(type(exc).__name__)
                continue
            # only a flip that leaves quote and claims intact may still be consistent
            assert claims.report_data == ev.report_data
            kinds.add("consistent")
    assert {"EvidenceFormatError", "PolicyRefused", "VerificationError"} <= kinds


def test_truncations_and_extensions(identity):
    key = ec.generate_private_key(ec.SECP256R1())
    value = _extension_value(identity[0])
    for n in range(len(value)):
        with pytest.raises(ALLOWED):
            read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, value[:n]))
    for extra in (b"\0", b"\xff", value):
        with pytest.raises(ALLOWED):
            read_certificate_evidence(_raw_cert(key, DICE_EVIDENCE_OID, value + extra))


def test_random_values_raise_only_our_errors():
    import random

    rng = random.Random(1234)
    key = ec.generate_private_key(ec.SECP256R1())
    for _ in range(300):
        prefix = bytes(rng.choice([b"\xd9\xea\x60\x82", b"\xd9\xea\x60", b""]))
        body = rng.randbytes(rng.randrange(0, 64))
        _check_tampered(_raw_cert(key, DICE_EVIDENCE_OID, prefix + body))


@pytest.mark.parametrize("oid", LEGACY_QUOTE_OIDS)
def test_legacy_format(oid):
    key = ec.generate_private_key(ec.SECP256R1())
    quote = SimulatedBackend().evidence(legacy_report_data(_spki(key))).quote
    cert = _raw_cert(key, oid, quote)
    ev = read_certificate_evidence(cert)
    assert ev.format == "legacy" and ev.tee == "simulated" and ev.claims == {}
    assert ev.report_data == hashlib.sha256(_spki(key)).digest() + bytes(32)
    assert SimulatedVerifier().verify(ev.quote, 0).report_data == ev.report_data


def test_gramines_legacy_oid_bytes():
    """Gramine passes 06 09 2A 86 48 86 F8 4D 8A 39 06 as the OID body: that is this OID."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = x509.load_pem_x509_certificate(
        _raw_cert(key, LEGACY_QUOTE_OIDS[0], b"q" * 200)).public_bytes(serialization.Encoding.DER)
    assert b"\x06\x0b\x06\x09\x2a\x86\x48\x86\xf8\x4d\x8a\x39\x06" in der


def test_dice_preferred_and_not_fallen_back_from():
    key = ec.generate_private_key(ec.SECP256R1())
    claims = make_claims(_spki(key))
    quote = SimulatedBackend().evidence(report_data_for_claims(claims)).quote
    legacy = SimulatedBackend().evidence(legacy_report_data(_spki(key))).quote
    both = [evidence_extension("simulated", quote, claims),
            x509.UnrecognizedExtension(LEGACY_QUOTE_OIDS[0], legacy)]
    assert read_certificate_evidence(_pem(self_signed_certificate(key, both))).format == "dice"
    broken = [x509.UnrecognizedExtension(DICE_EVIDENCE_OID, b"\x00"),
              x509.UnrecognizedExtension(LEGACY_QUOTE_OIDS[0], legacy)]
    with pytest.raises(EvidenceFormatError):
        read_certificate_evidence(_pem(self_signed_certificate(key, broken)))


def test_extension_tee_must_match_the_quote():
    # which TEE a quote is from is formats.evidence_tee's (tests/test_formats.py)
    with pytest.raises(EvidenceFormatError, match="evidence says TEE 'sgx'"):
        evidence_extension("sgx", SimulatedBackend().evidence(bytes(64)).quote, b"\xa0")


@pytest.mark.vectors
def test_real_quotes_are_typed(vectors: Path):
    key = ec.generate_private_key(ec.SECP256R1())
    claims = make_claims(_spki(key))
    for name, tee in (("sgx_quote", "sgx"), ("tdx_quote", "tdx")):
        quote = (vectors / name).read_bytes()
        cert = _pem(self_signed_certificate(key, [evidence_extension(tee, quote, claims)]))
        ev = read_certificate_evidence(cert)
        assert (ev.tee, ev.quote, ev.format) == (tee, quote, "dice")
        assert read_certificate_evidence(_raw_cert(key, LEGACY_QUOTE_OIDS[0], quote)).tee == tee


class _Ping(fl.FlightServerBase):
    def do_action(self, context, action):
        return [fl.Result(b"pong:" + action.body.to_pybytes())]


def test_grpc_accepts_the_ratls_certificate(identity, serve):
    cert_pem, key_pem = identity
    server = serve(_Ping("grpc+tls://127.0.0.1:0",
                         tls_certificates=[fl.CertKeyPair(cert_pem, key_pem)]))
    client = fl.FlightClient(f"grpc+tls://{server.address}", tls_root_certs=cert_pem,
                             override_hostname=EXECUTOR_TLS_NAME)
    with client:
        results = list(client.do_action(fl.Action("ping", b"x")))
    assert [r.body.to_pybytes() for r in results] == [b"pong:x"]
    # pinning matters: another self-signed certificate is not accepted as root
    other, _ = make_ratls_identity(SimulatedBackend())
    stranger = fl.FlightClient(f"grpc+tls://{server.address}", tls_root_certs=other,
                               override_hostname=EXECUTOR_TLS_NAME)
    with stranger, pytest.raises(fl.FlightUnavailableError):
        list(stranger.do_action(fl.Action("ping", b"x"), fl.FlightCallOptions(timeout=5)))
