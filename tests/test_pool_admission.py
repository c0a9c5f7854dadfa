"""Pool admission (executor/pool/admission.py): every peer appraised with a nonce of the
appraising member's own, against the spec's policy; one failure names the member and stops
the pool from forming. Pure: no sockets."""

from __future__ import annotations

import secrets
import time

import pytest

from teeflow.attestation.policy import AppraisalPolicy
from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import SimulatedBackend, code_measurement
from teeflow.core.errors import MemberRefused
from teeflow.executor.pool.admission import Candidate, admit
from teeflow.executor.pool.identity import (
    MemberIdentity,
    answer_nonce,
    fingerprint,
    make_member_identity,
)
from tests.pool_forge import other_key_identity

HONEST = SimulatedBackend()
POLICY = AppraisalPolicy(tee_types=("simulated",), allow_simulated=True,
                         measurements={"simulated": {"measurement": (code_measurement(),)}})
NOW = int(time.time())


def candidate(name: str, identity: MemberIdentity, backend=HONEST, nonce: bytes | None = None,
              answered: bytes | None = None) -> Candidate:
    """A peer that answered `answered` (default: the nonce it was sent)."""
    nonce = nonce or secrets.token_bytes(32)
    return Candidate(name, identity.cert_pem, nonce,
                     answer_nonce(backend, identity, answered or nonce))


def refused(candidates: list[Candidate], policy: AppraisalPolicy = POLICY) -> MemberRefused:
    me = make_member_identity(HONEST)
    with pytest.raises(MemberRefused) as info:
        admit("m1", me.cert_pem, candidates, policy, make_verifiers(), at=NOW)
    return info.value


def test_honest_members_are_admitted_and_only_their_certificates_are_trusted():
    me, two, three = (make_member_identity(HONEST) for _ in range(3))
    roster = admit("m1", me.cert_pem, [candidate("m2", two), candidate("m3", three)], POLICY,
                   make_verifiers(), at=NOW)
    assert roster.names() == ["m1", "m2", "m3"]
    assert roster.fingerprints() == {fingerprint(i.cert_pem) for i in (me, two, three)}
    assert roster.trust_bundle().count("BEGIN CERTIFICATE") == 3
    assert all(m.claims is not None and m.claims.simulated for m in roster.members[1:])


def test_a_wrong_measurement_is_refused_naming_the_member():
    rogue = SimulatedBackend(measurement="00" * 32)
    err = refused([candidate("m2", make_member_identity(HONEST)),
                   candidate("m3", make_member_identity(rogue), rogue)])
    assert (err.member, err.check) == ("m3", "measurement.measurement")


def test_simulated_evidence_is_refused_unless_the_policy_allows_simulation():
    strict = AppraisalPolicy(tee_types=("simulated",), allow_simulated=False,
                             measurements=POLICY.measurements)
    err = refused([candidate("m2", make_member_identity(HONEST))], strict)
    assert (err.member, err.check) == ("m2", "allow_simulated")
    sgx_only = AppraisalPolicy(tee_types=("sgx",), measurements={"sgx": {"mrenclave": ("aa",)}})
    assert refused([candidate("m2", make_member_identity(HONEST))], sgx_only).check == "tee_type"


def test_an_answer_to_another_nonce_is_refused():
    """Replayed evidence: made for a nonce someone else chose, not the one this member sent."""
    err = refused([candidate("m2", make_member_identity(HONEST),
                             answered=secrets.token_bytes(32))])
    assert (err.member, err.check) == ("m2", "nonce")


def test_fresh_evidence_for_another_key_is_refused():
    """m2 shows its certificate but relays the answer of another TEE's key."""
    shown, relayed = make_member_identity(HONEST), make_member_identity(HONEST)
    nonce = secrets.token_bytes(32)
    forged = Candidate("m2", shown.cert_pem, nonce, answer_nonce(HONEST, relayed, nonce))
    assert (refused([forged]).member, refused([forged]).check) == ("m2", "tls_key")


def test_a_certificate_whose_evidence_binds_another_key_is_refused():
    err = refused([candidate("m2", make_member_identity(HONEST)),
                   candidate("m3", other_key_identity(HONEST))])
    assert (err.member, err.check) == ("m3", "tls_key")


def test_a_certificate_that_could_sign_others_is_refused():
    """The executor's own RA-TLS certificate says CA=true: as a pool trust anchor its key
    could vouch for any other key (test_pool_links shows OpenSSL accepting such a child)."""
    cert_pem, key_pem = make_ratls_identity(HONEST)
    err = refused([candidate("m2", MemberIdentity(cert_pem, key_pem))])
    assert (err.member, err.check) == ("m2", "ca")


def test_one_key_counts_once_and_names_are_unique():
    two = make_member_identity(HONEST)
    err = refused([candidate("m2", two), candidate("m3", two)])
    assert (err.member, err.check) == ("m3", "tls_key")
    err = refused([candidate("m2", two), candidate("m2", make_member_identity(HONEST))])
    assert (err.member, err.check) == ("m2", "name")


def test_a_pool_of_one_is_not_a_pool():
    assert refused([]).check == "size"


def test_an_identity_never_shows_its_key():
    identity = make_member_identity(HONEST)
    assert b"PRIVATE KEY" in identity.key_pem
    assert "PRIVATE" not in repr(identity) and identity.key_pem.decode() not in repr(identity)
