"""Admission: one member's appraisal of every other would-be member of its pool.

Pure: no sockets, no files, no clocks (the verification time is an argument); the nonces
are chosen by the caller, one fresh one per peer. Each peer must show, against the spec's
policy (an AppraisalPolicy, whose `appraise` refuses simulated evidence unless it allows
simulation):
  1. a certificate whose RA-TLS evidence verifies and binds the certificate's own key,
  2. that the certificate cannot sign others (CA=false): it becomes a trust anchor,
  3. fresh evidence binding the same key and the nonce this member chose for it.
The result is the roster of admitted members, or MemberRefused naming the first peer that
failed and why. Nobody is admitted by default; a pool forms only if every peer passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from teeflow.attestation.evidence import Claims, Evidence, bind_report_data
from teeflow.attestation.policy import AppraisalPolicy, Verifier, appraise
from teeflow.attestation.ratls import read_certificate_evidence
from teeflow.core.crypto import load_cert
from teeflow.core.errors import (
    AttestationError,
    AuthError,
    EvidenceFormatError,
    MemberRefused,
    PolicyRefused,
    VerificationError,
)
from teeflow.executor.pool.identity import fingerprint

MAX_MEMBERS = 64
MAX_NAME = 64


@dataclass(frozen=True)
class Candidate:
    """A peer as this member sees it: its name, certificate, the nonce this member chose
    for it, and the evidence it answered with."""

    name: str
    cert_pem: bytes
    nonce: bytes
    answer: Evidence


@dataclass(frozen=True)
class Member:
    """An admitted member: its certificate is one of the pool's trust anchors."""

    name: str
    cert_pem: bytes
    fingerprint: str  # SHA-256 of the certificate's DER
    spki_sha256: bytes
    claims: Claims | None  # None for the appraising member itself


@dataclass(frozen=True)
class Roster:
    members: tuple[Member, ...]

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def trust_bundle(self) -> str:
        """The admitted certificates, concatenated PEM: the only anchors of a pinned link."""
        return "".join(m.cert_pem.decode("ascii") for m in self.members)

    def fingerprints(self) -> frozenset[str]:
        return frozenset(m.fingerprint for m in self.members)


def admit(self_name: str, self_cert: bytes, candidates: list[Candidate],
          policy: AppraisalPolicy, verifiers: Mapping[str, Verifier], *, at: int) -> Roster:
    """Appraise every candidate; the roster (this member first) or MemberRefused."""
    if not 1 <= len(candidates) < MAX_MEMBERS:
        raise MemberRefused("*", "size", f"a pool has 2 to {MAX_MEMBERS} members")
    names = [self_name, *(c.name for c in candidates)]
    for name in names:
        if not name or len(name) > MAX_NAME or not name.isascii() or not name.isprintable():
            raise MemberRefused(name[:MAX_NAME], "name", "not a short printable ASCII name")
    if len(set(names)) != len(names):
        raise MemberRefused(_first_repeat(names), "name", "two members give the same name")
    me = Member(self_name, self_cert, fingerprint(self_cert),
                read_certificate_evidence(self_cert).spki_sha256, None)
    members = [me]
    for candidate in candidates:
        try:
            member = _appraise(candidate, policy, verifiers, at)
        except (AttestationError, AuthError) as exc:
            check = exc.check if isinstance(exc, PolicyRefused) else _kind(exc)
            raise MemberRefused(candidate.name, check, str(exc)) from exc
        if any(m.spki_sha256 == member.spki_sha256 for m in members):
            raise MemberRefused(candidate.name, "tls_key",
                                "its key is already another member's: one key, one member")
        if any(_subject(m.cert_pem) == _subject(member.cert_pem) for m in members):
            raise MemberRefused(candidate.name, "subject", "its certificate's subject is "
                                "another member's (trust anchors are found by subject)")
        members.append(member)
    return Roster(tuple(members))


def _appraise(candidate: Candidate, policy: AppraisalPolicy,
              verifiers: Mapping[str, Verifier], at: int) -> Member:
    embedded = read_certificate_evidence(candidate.cert_pem)
    appraise(embedded.evidence(), policy, verifiers,
             expected_report_data=embedded.report_data, at=at)
    _check_not_a_ca(candidate.cert_pem)
    claims = appraise(candidate.answer, policy, verifiers,
                      expected_report_data=bind_report_data(embedded.spki_sha256,
                                                            candidate.nonce), at=at)
    return Member(candidate.name, candidate.cert_pem, fingerprint(candidate.cert_pem),
                  embedded.spki_sha256, claims)


def _check_not_a_ca(cert_pem: bytes) -> None:
    cert = load_cert(cert_pem)
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = None  # OpenSSL may treat a certificate without the extension as a CA
    if ca is not False:
        raise PolicyRefused("ca", "a member's certificate must say CA=false: as a trust "
                                  "anchor it could otherwise vouch for any other key")


def _subject(cert_pem: bytes) -> bytes:
    return load_cert(cert_pem).subject.public_bytes()


def _kind(exc: Exception) -> str:
    if isinstance(exc, EvidenceFormatError):
        return "evidence_format"
    if isinstance(exc, VerificationError):
        return "verification"
    return "certificate"


def _first_repeat(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return "*"
