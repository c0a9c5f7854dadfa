"""RA-TLS: the executor's evidence inside its self-signed TLS certificate, in Gramine's format.

Pure: no sockets, no files (the clock only when `make_ratls_identity` is not
given `now`). Reading a certificate only extracts and cross-checks; it
believes nothing. The quote must still be verified and its report data
compared with `CertEvidence.report_data` (all 64 bytes) by the appraisal.

The format, as Gramine (>= v1.8) writes and reads it. Sources, in
github.com/gramineproject/gramine: tools/sgx/ra-tls/ra_tls_attest.c
(generate_serialized_claims, generate_quote_with_claims_hash,
combine_quote_and_claims_in_evidence, generate_x509), ra_tls_verify_common.c
(extract_standard_quote_and_verify_claims,
cmp_crt_pk_against_cbor_claim_hash_entry, extract_legacy_quote_and_verify_pubkey,
find_oid_in_cert_extensions), ra_tls.h and ra_tls_common.h (OIDs, tag, hash ids).

* Standard extension, OID 2.23.133.5.4.9 (TCG DICE "tagged evidence"),
  non-critical. Its value is the CBOR item
      60000([ bstr quote, bstr claims ])
  i.e. tag 60000 (TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG) over a
  definite array of two definite byte strings.
* `claims` is a serialized CBOR map with text keys:
      { "pubkey-hash": bstr(serialized [ uint hash-alg-id, bstr hash ]),
        ? "nonce": bstr }
  The hash entry is itself CBOR-serialized and wrapped in a byte string (not
  an inline array). hash-alg-id is the IANA named-information id: Gramine
  writes 1 (SHA-256); its verifier also accepts 7 (SHA-384) and 8 (SHA-512),
  with the digest length checked. The hash covers the DER
  SubjectPublicKeyInfo (mbedtls_pk_write_pubkey_der). Gramine never writes
  "nonce" (a TODO) and ignores claims it does not know.
* Report data: SHA-256 over the exact claims bytes in the first 32 bytes of
  the 64-byte report data, the other 32 zero (Gramine starts from a zeroed
  sgx_report_data_t). Gramine's verifier compares only the first 32; this
  module expects all 64, which every Gramine-made certificate satisfies.
* Legacy extension: the raw quote, with report data = SHA-256 of the DER
  SubjectPublicKeyInfo in the first 32 bytes, the rest zero. Gramine meant
  OID 1.2.840.113741.1337.6 but passes the DER bytes 06 09 2A 86 48 86 F8 4D
  8A 39 06 *including* the tag and length as the OID body, so its
  certificates really carry 0.6.9.42.840.113741.1337.6 (a comment in
  ra_tls_common.h keeps this "for backwards-compatibility"). Both are read
  here. (1.2.840.113741.1.13.1.6 is not RA-TLS: it is the Platform Instance
  ID inside Intel's PCK certificates.) Gramine writes both extensions into
  each certificate and its verifier prefers the standard one; if that is
  present but wrong it fails rather than fall back. So does this module.
* Gramine's own certificate: P-384 key, CN=RATLS,O=GramineDevelopers,C=US,
  BasicConstraints CA=false; its verifier accepts P-256 and P-384 keys. Ours:
  P-256, CN/SAN `EXECUTOR_TLS_NAME`, CA=true with path length 0 (gRPC must
  accept the pinned self-signed certificate as its own root); only the
  standard extension is written.

The "quote" is the evidence of whichever TEE made it, named by
`formats.evidence_tee` (the certificate says nothing else about it): an SGX
or TDX DCAP quote, a simulated quote, or for SEV-SNP the configfs-tsm frame
holding the ATTESTATION_REPORT and the host's certificate table, so the
verifier finds the VCEK and ASK in the certificate itself (Gramine has no
SEV-SNP; the frame is this project's). Each is capped at MAX_QUOTE here.

Stricter than Gramine's verifier: "pubkey-hash" is required (Gramine would
accept a claims map without it), duplicate map keys, indefinite lengths,
floats and trailing bytes are refused. Decoding uses a small strict CBOR
reader rather than a general library, so no semantic tag (regex, MIME,
shared references, ...) is ever interpreted on untrusted input.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import REPORT_DATA_LEN, Evidence
from teeflow.attestation.formats import evidence_tee
from teeflow.core.crypto import self_signed_certificate
from teeflow.core.errors import EvidenceFormatError, PolicyRefused

if TYPE_CHECKING:
    from teeflow.attestation.registry import TeeBackend

__all__ = [
    "DICE_EVIDENCE_OID",
    "LEGACY_QUOTE_OIDS",
    "CertEvidence",
    "evidence_extension",
    "legacy_report_data",
    "make_claims",
    "make_ratls_identity",
    "read_certificate_evidence",
    "report_data_for_claims",
]

DICE_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
# What Gramine's certificates really carry, then the OID it meant (see above).
LEGACY_QUOTE_OIDS = (
    x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6"),
    x509.ObjectIdentifier("1.2.840.113741.1337.6"),
)
CBOR_TAG_TEE_QUOTE = 60000
CLAIM_PUBKEY_HASH = "pubkey-hash"
CLAIM_NONCE = "nonce"
HASH_SHA256 = 1
# IANA named-information hash ids Gramine's verifier accepts: id -> (hashlib name, length)
_HASH_ALGS = {1: ("sha256", 32), 7: ("sha384", 48), 8: ("sha512", 64)}

MAX_CERT = 64 * 1024
MAX_QUOTE = 64 * 1024
MAX_CLAIMS = 4 * 1024
MAX_NONCE = 64
_MAX_DEPTH = 8


@dataclass(frozen=True)
class CertEvidence:
    """What an RA-TLS certificate says, extracted and cross-checked but not yet believed."""

    format: str  # "dice" (2.23.133.5.4.9) or "legacy" (raw quote)
    tee: str  # "simulated", "sgx", "tdx" or "sev-snp", by `formats.evidence_tee`
    quote: bytes
    report_data: bytes  # the 64 bytes the verified quote must carry
    spki_sha256: bytes  # SHA-256 of this certificate's DER SubjectPublicKeyInfo
    claims: dict[str, Any]  # the decoded claims map; empty for the legacy format
    claims_cbor: bytes = b""  # the exact claims bytes the report data hashes
    nonce: bytes | None = None  # the "nonce" claim, when there is one

    def evidence(self) -> Evidence:
        return Evidence(tee=self.tee, quote=self.quote)


# --- writing ---------------------------------------------------------------------------


def make_claims(spki_der: bytes, *, nonce: bytes | None = None) -> bytes:
    """The serialized claims map binding a DER SubjectPublicKeyInfo (and optionally a nonce)."""
    if not spki_der:
        raise EvidenceFormatError("public key to bind is empty")
    hash_entry = cbor2.dumps([HASH_SHA256, hashlib.sha256(spki_der).digest()])
    claims: dict[str, bytes] = {CLAIM_PUBKEY_HASH: hash_entry}
    if nonce is not None:
        if not 1 <= len(nonce) <= MAX_NONCE:
            raise EvidenceFormatError(f"nonce must be 1 to {MAX_NONCE} bytes")
        claims[CLAIM_NONCE] = bytes(nonce)
    return cbor2.dumps(claims, canonical=True)


def report_data_for_claims(claims: bytes) -> bytes:
    """The 64 bytes of report data for serialized claims: SHA-256 of them, then zeros."""
    digest = hashlib.sha256(claims).digest()
    return digest + bytes(REPORT_DATA_LEN - len(digest))


def legacy_report_data(spki_der: bytes) -> bytes:
    """The report data of Gramine's legacy extension: SHA-256 of the SPKI, then zeros."""
    digest = hashlib.sha256(spki_der).digest()
    return digest + bytes(REPORT_DATA_LEN - len(digest))


def evidence_extension(tee: str, quote: bytes, claims_cbor: bytes) -> x509.UnrecognizedExtension:
    """The standard RA-TLS extension: 60000([quote, claims]) under 2.23.133.5.4.9."""
    _check_sizes(quote, claims_cbor)
    found = evidence_tee(quote)
    if found != tee:
        raise EvidenceFormatError(f"evidence says TEE {tee!r} but the quote is {found!r}")
    value = cbor2.dumps(cbor2.CBORTag(CBOR_TAG_TEE_QUOTE, [bytes(quote), bytes(claims_cbor)]))
    return x509.UnrecognizedExtension(DICE_EVIDENCE_OID, value)


Certify = Callable[[ec.EllipticCurvePrivateKey, x509.ExtensionType, datetime.datetime | None],
                  x509.Certificate]


def _executor_certificate(key: ec.EllipticCurvePrivateKey, extension: x509.ExtensionType,
                          now: datetime.datetime | None) -> x509.Certificate:
    return self_signed_certificate(key, [extension], now=now)


def make_ratls_identity(
    backend: TeeBackend, *, now: datetime.datetime | None = None,
    certify: Certify = _executor_certificate,
) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a self-signed certificate carrying evidence for it: PEMs.
    `certify` makes the certificate from the key and the evidence extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = make_claims(spki)
    evidence = backend.evidence(report_data_for_claims(claims))
    if evidence.tee != backend.tee:
        raise EvidenceFormatError(
            f"backend {backend.tee!r} produced evidence for {evidence.tee!r}")
    cert = certify(key, evidence_extension(evidence.tee, evidence.quote, claims), now)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    read_certificate_evidence(cert_pem)  # what we emit must be what we accept
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


# --- reading ---------------------------------------------------------------------------


def read_certificate_evidence(cert: bytes) -> CertEvidence:
    """Extract an RA-TLS certificate's evidence and check its claims bind this certificate.

    Raises EvidenceFormatError for anything malformed or oversized and
    PolicyRefused("tls_key", ...) when the claimed key hash is not this
    certificate's. The returned report data must still be matched by a
    verified quote.
    """
    certificate = _load_certificate(cert)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        extensions = certificate.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise EvidenceFormatError(f"certificate extensions do not parse: {exc}") from exc
    values: dict[x509.ObjectIdentifier, bytes] = {}
    for ext in extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            values[ext.oid] = ext.value.value
    if DICE_EVIDENCE_OID in values:
        return _read_dice(values[DICE_EVIDENCE_OID], spki)
    for oid in LEGACY_QUOTE_OIDS:
        if oid in values:
            return _read_legacy(values[oid], spki)
    raise EvidenceFormatError("certificate carries no RA-TLS evidence")


def _load_certificate(cert: bytes) -> x509.Certificate:
    if not isinstance(cert, bytes | bytearray):
        raise EvidenceFormatError(f"certificate must be bytes, not {type(cert).__name__}")
    if len(cert) > MAX_CERT:
        raise EvidenceFormatError(f"certificate is {len(cert)} bytes, more than {MAX_CERT}")
    data = bytes(cert)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise EvidenceFormatError("not an X.509 certificate") from exc


def _check_sizes(quote: bytes, claims: bytes) -> None:
    if not quote:
        raise EvidenceFormatError("RA-TLS quote is empty")
    if len(quote) > MAX_QUOTE:
        raise EvidenceFormatError(f"RA-TLS quote is {len(quote)} bytes, more than {MAX_QUOTE}")
    if not claims:
        raise EvidenceFormatError("RA-TLS claims are empty")
    if len(claims) > MAX_CLAIMS:
        raise EvidenceFormatError(
            f"RA-TLS claims are {len(claims)} bytes, more than {MAX_CLAIMS}")


def _read_dice(value: bytes, spki: bytes) -> CertEvidence:
    if len(value) > MAX_QUOTE + MAX_CLAIMS + 16:
        raise EvidenceFormatError(f"RA-TLS evidence extension is {len(value)} bytes, too large")
    top = _decode(value, "RA-TLS evidence")
    if not isinstance(top, _Tag):
        raise EvidenceFormatError("RA-TLS evidence is not a tagged CBOR item")
    if top.tag != CBOR_TAG_TEE_QUOTE:
        raise EvidenceFormatError(
            f"RA-TLS evidence has CBOR tag {top.tag}, not {CBOR_TAG_TEE_QUOTE} (TEE quote)")
    body = top.value
    if not isinstance(body, list) or len(body) != 2:
        raise EvidenceFormatError("RA-TLS evidence is not a CBOR array [quote, claims]")
    quote, claims_cbor = body
    if not isinstance(quote, bytes):
        raise EvidenceFormatError("RA-TLS evidence: the quote is not a byte string")
    if not isinstance(claims_cbor, bytes):
        raise EvidenceFormatError("RA-TLS evidence: the claims are not a byte string")
    _check_sizes(quote, claims_cbor)
    claims = _decode(claims_cbor, "RA-TLS claims")
    if not isinstance(claims, dict) or not claims:
        raise EvidenceFormatError("RA-TLS claims are not a non-empty CBOR map")
    for name in claims:
        if not isinstance(name, str) or not name:
            raise EvidenceFormatError(f"RA-TLS claims: key {name!r} is not a non-empty text string")
    if CLAIM_PUBKEY_HASH not in claims:
        raise EvidenceFormatError(f"RA-TLS claims have no {CLAIM_PUBKEY_HASH!r}")
    _check_pubkey_hash(claims[CLAIM_PUBKEY_HASH], spki)
    nonce = claims.get(CLAIM_NONCE)
    if CLAIM_NONCE in claims and (not isinstance(nonce, bytes) or not 1 <= len(nonce) <= MAX_NONCE):
        raise EvidenceFormatError(f"RA-TLS claims: nonce is not a 1 to {MAX_NONCE} byte string")
    return CertEvidence(
        format="dice",
        tee=evidence_tee(quote),
        quote=quote,
        report_data=report_data_for_claims(claims_cbor),
        spki_sha256=hashlib.sha256(spki).digest(),
        claims=claims,
        claims_cbor=claims_cbor,
        nonce=nonce,
    )


def _check_pubkey_hash(entry_cbor: Any, spki: bytes) -> None:
    if not isinstance(entry_cbor, bytes) or not entry_cbor:
        raise EvidenceFormatError(f"RA-TLS claims: {CLAIM_PUBKEY_HASH!r} is not a byte string")
    entry = _decode(entry_cbor, f"RA-TLS claim {CLAIM_PUBKEY_HASH!r}")
    if not isinstance(entry, list) or len(entry) != 2:
        raise EvidenceFormatError(
            f"RA-TLS claims: {CLAIM_PUBKEY_HASH!r} is not a CBOR array [hash-alg, hash]")
    alg, digest = entry
    if type(alg) is not int or alg not in _HASH_ALGS:
        raise EvidenceFormatError(
            f"RA-TLS claims: {CLAIM_PUBKEY_HASH!r} names unsupported hash algorithm {alg!r}")
    name, size = _HASH_ALGS[alg]
    if not isinstance(digest, bytes) or len(digest) != size:
        raise EvidenceFormatError(
            f"RA-TLS claims: {CLAIM_PUBKEY_HASH!r} is not a {size}-byte {name} digest")
    if hashlib.new(name, spki).digest() != digest:
        raise PolicyRefused(
            "tls_key", "the RA-TLS evidence binds another key than this certificate's")


def _read_legacy(quote: bytes, spki: bytes) -> CertEvidence:
    if not quote:
        raise EvidenceFormatError("RA-TLS quote is empty")
    if len(quote) > MAX_QUOTE:
        raise EvidenceFormatError(f"RA-TLS quote is {len(quote)} bytes, more than {MAX_QUOTE}")
    return CertEvidence(
        format="legacy",
        tee=evidence_tee(quote),
        quote=quote,
        report_data=legacy_report_data(spki),
        spki_sha256=hashlib.sha256(spki).digest(),
        claims={},
    )


# --- a strict CBOR reader for untrusted bytes -------------------------------------------


@dataclass(frozen=True)
class _Tag:
    tag: int
    value: Any


_SIMPLE = {20: False, 21: True, 22: None}


class _Reader:
    """Definite-length CBOR: integers, byte and text strings, arrays, maps, tags,
    false/true/null. Nothing is allocated beyond the input's own size."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, message: str) -> EvidenceFormatError:
        return EvidenceFormatError(f"{self.what}: {message} (at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail("CBOR ends early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def item(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail(f"CBOR nested deeper than {_MAX_DEPTH}")
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info == 31:
            raise self.fail("indefinite-length CBOR is not accepted")
        if info > 27:
            raise self.fail(f"reserved CBOR additional information {info}")
        arg = info if info < 24 else int.from_bytes(self.take(1 << (info - 24)), "big")
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self.take(arg)
        if major == 3:
            try:
                return self.take(arg).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail("CBOR text string is not UTF-8") from exc
        if major == 4:
            if arg > len(self.data) - self.pos:
                raise self.fail("CBOR array longer than the input")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > len(self.data) - self.pos:
                raise self.fail("CBOR map longer than the input")
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                if not isinstance(key, int | str | bytes):
                    raise self.fail("CBOR map key is not an integer or a string")
                if key in out:
                    raise self.fail(f"CBOR map repeats key {key!r}")
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            return _Tag(arg, self.item(depth + 1))
        if info in _SIMPLE:
            return _SIMPLE[info]
        raise self.fail("floating-point and other simple CBOR values are not accepted")


def _decode(data: bytes, what: str) -> Any:
    reader = _Reader(data, what)
    value = reader.item(0)
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} trailing bytes after the CBOR item")
    return value
