"""DCAP verification against real SGX/TDX quotes and a deterministic corpus of tampered ones.

The vectors live beside the repository (../shared/attestation-vectors); tests
that need them skip when the folder is missing.

Which bytes the corpus flips: only those dcap-qvl 0.7.0 actually checks. An
exhaustive single-bit scan of both genuine quotes showed these are NOT
checked, so they are left out: the copy of Intel's root certificate that ends
the quote's PEM chain (the built-in root is used instead), PEM whitespace and
the bytes between PEM blocks, the certificate-data length (shortening it only
cuts into that unused root copy), and for v4 quotes the outer
certification-data type, the signature-data length when made larger, and the
70 trailing bytes after the TDX quote's signed end. In the collateral,
`pck_crl_issuer_chain` and the root copies at the end of the issuer chains are
not used either.
"""

from __future__ import annotations

import base64
import json
import random
import re
import struct
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import dcap_qvl
import pytest

from teeflow.attestation.collateral import (
    BundleCollateral,
    CachedPcsCollateral,
    CollateralRequest,
    dcap_qvl_fetch,
)
from teeflow.attestation.dcap import (
    MAX_COLLATERAL,
    MAX_QUOTE,
    DcapVerifier,
    inspect_quote,
    verify_quote,
)
from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import AppraisalPolicy, appraise
from teeflow.core.errors import (
    ConfigError,
    EvidenceFormatError,
    InputError,
    PolicyRefused,
    VerificationError,
)

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"

SGX_AT = 1751624924  # 2025-07-04T10:28:44Z
TDX_AT = 1751624655  # 2025-07-04T10:24:15Z
OUTDATED_AT = 1772707833  # 2026-03-05T10:50:33Z
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
TDX_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
SGX_FMSPC = "00A067110000"
TDX_FMSPC = "B0C06F000000"


@dataclass(frozen=True)
class Vector:
    quote: bytes
    collateral: bytes
    at: int


@lru_cache(maxsize=1)
def _load() -> dict[str, Vector] | None:
    if not VECTORS.is_dir():
        return None
    return {
        "sgx": Vector(
            (VECTORS / "sgx_quote").read_bytes(),
            (VECTORS / "sgx_quote_collateral.json").read_bytes(),
            SGX_AT,
        ),
        "tdx": Vector(
            (VECTORS / "tdx_quote").read_bytes(),
            (VECTORS / "tdx_quote_collateral.json").read_bytes(),
            TDX_AT,
        ),
        "tdx_outdated": Vector(
            (VECTORS / "tdx_quote_outdated").read_bytes(),
            (VECTORS / "tdx_quote_outdated_collateral.json").read_bytes(),
            OUTDATED_AT,
        ),
    }


@pytest.fixture
def vectors() -> dict[str, Vector]:
    loaded = _load()
    if loaded is None:
        pytest.skip(
            f"attestation vectors not found at {VECTORS} (genuine DCAP quotes expected in "
            "../shared/attestation-vectors beside the repository)"
        )
    return loaded


# --- genuine quotes ---------------------------------------------------------------


@pytest.mark.vectors
def test_sgx_quote_verifies_with_readme_claims(vectors: dict[str, Vector]) -> None:
    v = vectors["sgx"]
    claims = verify_quote(v.quote, v.collateral, v.at)
    assert claims.tee == "sgx"
    assert claims.measurements == {"mrenclave": SGX_MRENCLAVE, "mrsigner": SGX_MRSIGNER}
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert len(claims.report_data) == 64
    assert claims.report_data.startswith(b"Hello, world!")
    assert claims.debug is False
    assert claims.simulated is False
    assert claims.extra["isv_prod_id"] == 0
    assert claims.extra["isv_svn"] == 0
    assert claims.extra["attributes"] == "0500000000000000e700000000000000"
    assert claims.extra["fmspc"] == SGX_FMSPC
    assert claims.extra["quote_version"] == 3


@pytest.mark.vectors
def test_tdx_quote_verifies_with_readme_claims(vectors: dict[str, Vector]) -> None:
    v = vectors["tdx"]
    claims = verify_quote(v.quote, v.collateral, v.at)
    assert claims.tee == "tdx"
    assert set(claims.measurements) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    assert claims.measurements["mrtd"] == TDX_MRTD
    assert all(re.fullmatch("[0-9a-f]{96}", m) for m in claims.measurements.values())
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.debug is False
    assert claims.extra["td_attributes"] == "0000001000000000"
    assert claims.extra["fmspc"] == TDX_FMSPC
    assert claims.extra["quote_version"] == 4
    # As dcap-qvl 0.7.0 reports it (the README names no TDX report data).
    assert claims.report_data.hex().startswith("9a9d48e7f6799642d3d1b34e1e5e1742")
    assert len(claims.report_data) == 64


@pytest.mark.vectors
def test_verifier_objects_with_bundles(vectors: dict[str, Vector]) -> None:
    sgx = DcapVerifier("sgx", BundleCollateral(VECTORS / "sgx_quote_collateral.json"))
    tdx = DcapVerifier("tdx", BundleCollateral(VECTORS / "tdx_quote_collateral.json"))
    assert sgx.tee == "sgx" and tdx.tee == "tdx"
    assert sgx.verify(vectors["sgx"].quote, SGX_AT).measurements["mrenclave"] == SGX_MRENCLAVE
    assert tdx.verify(vectors["tdx"].quote, TDX_AT).measurements["mrtd"] == TDX_MRTD
    with pytest.raises(EvidenceFormatError, match="TDX quote; this verifier checks SGX"):
        sgx.verify(vectors["tdx"].quote, TDX_AT)
    with pytest.raises(EvidenceFormatError, match="SGX quote; this verifier checks TDX"):
        tdx.verify(vectors["sgx"].quote, SGX_AT)


@pytest.mark.vectors
def test_inspect_quote(vectors: dict[str, Vector]) -> None:
    sgx = inspect_quote(vectors["sgx"].quote)
    assert (sgx.tee, sgx.version, sgx.fmspc, sgx.ca) == ("sgx", 3, SGX_FMSPC, "processor")
    tdx = inspect_quote(vectors["tdx"].quote)
    assert (tdx.tee, tdx.version, tdx.fmspc, tdx.ca) == ("tdx", 4, TDX_FMSPC, "platform")
    assert inspect_quote(vectors["tdx_outdated"].quote).version == 5


@pytest.mark.vectors
def test_outdated_tdx_quote_is_rejected(vectors: dict[str, Vector]) -> None:
    v = vectors["tdx_outdated"]
    with pytest.raises(VerificationError, match="No matching TCB level found"):
        verify_quote(v.quote, v.collateral, v.at)


@pytest.mark.vectors
@pytest.mark.parametrize("name", ["sgx", "tdx", "tdx_outdated"])
def test_verifying_now_fails_on_expired_collateral(vectors: dict[str, Vector], name: str) -> None:
    v = vectors[name]
    with pytest.raises(VerificationError, match="(?i)expired") as info:
        verify_quote(v.quote, v.collateral, int(time.time()))
    assert info.value.__cause__ is not None


@pytest.mark.vectors
def test_verification_window_is_the_collateral_validity(vectors: dict[str, Vector]) -> None:
    v = vectors["sgx"]
    # TCB info issued 2025-06-19T10:56:11Z, QE identity next update 2025-07-19T10:01:18Z.
    verify_quote(v.quote, v.collateral, 1750330571)
    verify_quote(v.quote, v.collateral, 1752919278)
    with pytest.raises(VerificationError, match="issue date is in the future"):
        verify_quote(v.quote, v.collateral, 1750330570)
    with pytest.raises(VerificationError, match="QE Identity expired"):
        verify_quote(v.quote, v.collateral, 1752919279)


@pytest.mark.vectors
def test_appraisal_with_dcap_verifier(vectors: dict[str, Vector]) -> None:
    v = vectors["sgx"]
    verifier = DcapVerifier("sgx", BundleCollateral(VECTORS / "sgx_quote_collateral.json"))
    expected = b"Hello, world!".ljust(64, b"\0")
    policy = AppraisalPolicy(
        tee_types=("sgx",),
        accepted_tcb_status=("ConfigurationAndSWHardeningNeeded",),
        measurements={"sgx": {"mrenclave": (SGX_MRENCLAVE,)}},
    )
    evidence = Evidence(tee="sgx", quote=v.quote)
    claims = appraise(evidence, policy, {"sgx": verifier}, expected_report_data=expected, at=v.at)
    assert claims.measurements["mrsigner"] == SGX_MRSIGNER
    strict = AppraisalPolicy(tee_types=("sgx",), measurements=policy.measurements)
    with pytest.raises(PolicyRefused, match="tcb_status"):
        appraise(evidence, strict, {"sgx": verifier}, expected_report_data=expected, at=v.at)


# --- input limits and error translation (no vectors needed) ------------------------


def test_oversized_inputs_are_refused_before_parsing() -> None:
    with pytest.raises(EvidenceFormatError, match=f"more than {MAX_QUOTE}"):
        verify_quote(b"\0" * (MAX_QUOTE + 1), b"{}", SGX_AT)
    with pytest.raises(EvidenceFormatError, match=f"more than {MAX_COLLATERAL}"):
        verify_quote(b"\3\0\2\0", b" " * (MAX_COLLATERAL + 1), SGX_AT)
    with pytest.raises(EvidenceFormatError, match="empty"):
        verify_quote(b"", b"{}", SGX_AT)
    with pytest.raises(EvidenceFormatError, match="must be bytes"):
        verify_quote("not bytes", b"{}", SGX_AT)  # type: ignore[arg-type]


@pytest.mark.parametrize("at", [-1, 2**64, True, 1.5, "1751624924", None])
def test_bad_verification_time(at: object) -> None:
    with pytest.raises(InputError, match="verification time"):
        verify_quote(b"\3\0", b"{}", at)  # type: ignore[arg-type]


def test_unknown_tee_for_verifier() -> None:
    class NoCollateral:
        def collateral(self, request: CollateralRequest, quote: bytes, at: int) -> bytes:
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="sev-snp"):
        DcapVerifier("sev-snp", NoCollateral())


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException, which derives from BaseException."""


def test_panic_while_parsing_becomes_format_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(raw: bytes) -> None:
        raise FakePanic("index out of bounds")

    monkeypatch.setattr(dcap_qvl, "parse_quote", boom)
    with pytest.raises(EvidenceFormatError, match="FakePanic: index out of bounds") as info:
        inspect_quote(b"\3\0\2\0")
    assert isinstance(info.value.__cause__, FakePanic)


@pytest.mark.vectors
def test_panic_while_verifying_becomes_verification_error(
    vectors: dict[str, Vector], monkeypatch: pytest.MonkeyPatch
) -> None:
    v = vectors["sgx"]

    def boom(*args: object) -> None:
        raise FakePanic("attempt to subtract with overflow")

    monkeypatch.setattr(dcap_qvl, "verify", boom)
    with pytest.raises(VerificationError, match="FakePanic") as info:
        verify_quote(v.quote, v.collateral, v.at)
    assert isinstance(info.value.__cause__, FakePanic)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dcap_qvl, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify_quote(v.quote, v.collateral, v.at)


# --- the tampered corpus -------------------------------------------------------------

PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\n(.*?)\n-----END CERTIFICATE-----\n", re.S)


def _pem(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def _pem_str(ders: list[bytes]) -> str:
    return b"".join(_pem(d) for d in ders).decode()


def quote_layout(raw: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """Byte ranges of a v3 (SGX) or v4 (TDX) quote's checked parts, and its signed end."""
    version = struct.unpack_from("<H", raw, 0)[0]
    body = {3: 384, 4: 584}[version]
    regions = {"header": (0, 48), "report_body": (48, 48 + body)}
    off = 48 + body
    sig_len = struct.unpack_from("<I", raw, off)[0]
    end = off + 4 + sig_len
    off += 4
    regions["quote_signature"] = (off, off + 64)
    regions["attestation_key"] = (off + 64, off + 128)
    off += 128
    if version >= 4:
        off += 6  # certification data (type 6, QE report): its type is not checked
    regions["qe_report"] = (off, off + 384)
    regions["qe_report_signature"] = (off + 384, off + 448)
    off += 448
    auth_len = struct.unpack_from("<H", raw, off)[0]
    regions["qe_auth_data"] = (off + 2, off + 2 + auth_len)
    off += 2 + auth_len
    regions["cert_data_type"] = (off, off + 2)  # must be 5 (PEM chain); every change rejected
    off += 2
    cert_len = struct.unpack_from("<I", raw, off)[0]
    off += 4
    blocks = list(PEM_BLOCK.finditer(raw, off, off + cert_len))
    assert len(blocks) == 3, "expected PCK leaf, PCK CA and root certificates"
    for name, block in zip(("pck_leaf_cert", "pck_ca_cert"), blocks[:2], strict=True):
        regions[name] = block.span()  # flipped as DER, re-encoded; the root copy is unused
    return regions, end


@dataclass(frozen=True)
class Case:
    label: str
    quote: bytes
    collateral: bytes
    at: int


def _flip(data: bytes, i: int, bit: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 1 << bit
    return bytes(out)


# (stride over bytes, bits flipped per byte) for each region
SAMPLING = {
    "header": (1, 8),
    "report_body": (2, 1),
    "quote_signature": (1, 1),
    "attestation_key": (1, 1),
    "qe_report": (4, 1),
    "qe_report_signature": (1, 1),
    "qe_auth_data": (1, 1),
    "cert_data_type": (1, 8),
    "pck_leaf_cert": (8, 1),
    "pck_ca_cert": (8, 1),
}
QUOTE_CATEGORIES = [*SAMPLING, "truncation"]
COLLATERAL_FIELDS_FLIPPED = {  # field -> (how it is encoded, stride)
    "root_ca_crl": ("hex", 13),
    "pck_crl": ("hex", 29),
    "tcb_info": ("text", 97),
    "tcb_info_signature": ("hex", 4),
    "tcb_info_issuer_chain": ("pem", 31),
    "qe_identity": ("text", 43),
    "qe_identity_signature": ("hex", 4),
    "qe_identity_issuer_chain": ("pem", 31),
}
CATEGORIES = [
    *(f"{tee}:{c}" for tee in ("sgx", "tdx") for c in QUOTE_CATEGORIES),
    *(f"{tee}:collateral" for tee in ("sgx", "tdx")),
    "swapped_collateral",
    "garbage",
]


def _quote_cases(tee: str, v: Vector) -> list[Case]:
    regions, signed_end = quote_layout(v.quote)
    cases = []
    for region, (stride, nbits) in SAMPLING.items():
        start, end = regions[region]
        label = f"{tee}:{region}"
        if region.endswith("_cert"):
            der = base64.b64decode(b"".join(v.quote[start:end].splitlines()[1:-1]))
            assert _pem(der) == v.quote[start:end]
            for i in range(0, len(der), stride):
                pem = _pem(_flip(der, i, i % 8))
                quote = v.quote[:start] + pem + v.quote[end:]
                cases.append(Case(f"{label} DER byte {i}", quote, v.collateral, v.at))
            continue
        for i in range(start, end, stride):
            for k in range(nbits):
                bit = (i + 3 * k) % 8
                quote = _flip(v.quote, i, bit)
                cases.append(Case(f"{label} byte {i} bit {bit}", quote, v.collateral, v.at))
    # Cuts anywhere before the signed end (bytes after it, as in the TDX vector, are unsigned).
    cuts = {0, 1, 47, 48, 49, signed_end - 1, signed_end - 2}
    for start, end in regions.values():
        cuts.update({start - 1, start, start + 1, end - 1, end})
    cuts.update(range(0, signed_end, max(1, signed_end // 24)))
    for n in sorted(c for c in cuts if 0 <= c < signed_end):
        cases.append(Case(f"{tee}:truncation to {n} bytes", v.quote[:n], v.collateral, v.at))
    return cases


def _collateral_cases(tee: str, v: Vector) -> list[Case]:
    base = json.loads(v.collateral)
    label = f"{tee}:collateral"
    variants: list[tuple[str, object]] = []
    for field, (encoding, stride) in COLLATERAL_FIELDS_FLIPPED.items():
        value = base[field]
        if encoding == "hex":
            raw = bytes.fromhex(value)
            for i in range(0, len(raw), stride):
                variants.append((f"{field} byte {i}", {**base, field: _flip(raw, i, i % 8).hex()}))
        elif encoding == "text":
            for i in range(0, len(value), stride):
                text = value[:i] + chr(ord(value[i]) ^ (1 << (i % 7))) + value[i + 1 :]
                variants.append((f"{field} char {i}", {**base, field: text}))
        else:  # only the signing certificate: the root copy after it is not used
            ders = [base64.b64decode(m.group(1)) for m in PEM_BLOCK.finditer(value.encode())]
            assert _pem_str(ders) == value
            for i in range(0, len(ders[0]), stride):
                changed = [_flip(ders[0], i, i % 8), *ders[1:]]
                variants.append((f"{field} leaf DER byte {i}", {**base, field: _pem_str(changed)}))
    # Edits an attacker would want: longer validity, better TCB status, other platform.
    tcb = json.loads(base["tcb_info"])
    qe = json.loads(base["qe_identity"])
    sep = (",", ":")
    edits = {
        "tcb_info nextUpdate": {**tcb, "nextUpdate": "2099-01-01T00:00:00Z"},
        "tcb_info all UpToDate": {
            **tcb,
            "tcbLevels": [
                {**lvl, "tcbStatus": "UpToDate", "advisoryIDs": []} for lvl in tcb["tcbLevels"]
            ],
        },
        "tcb_info other fmspc": {**tcb, "fmspc": "000000000000"},
        "tcb_info first level dropped": {**tcb, "tcbLevels": tcb["tcbLevels"][1:]},
    }
    for name, doc in edits.items():
        variants.append((name, {**base, "tcb_info": json.dumps(doc, separators=sep)}))
    variants.append(("tcb_info re-serialized with spaces", {**base, "tcb_info": json.dumps(tcb)}))
    variants.append(
        ("qe_identity nextUpdate", {**base, "qe_identity": json.dumps(
            {**qe, "nextUpdate": "2099-01-01T00:00:00Z"}, separators=sep)})
    )
    variants.append(
        ("signatures swapped", {**base, "tcb_info_signature": base["qe_identity_signature"],
                                "qe_identity_signature": base["tcb_info_signature"]})
    )
    for field in base:
        variants.append((f"{field} missing", {k: x for k, x in base.items() if k != field}))
        variants.append((f"{field} a number", {**base, field: 12345}))
        if field != "pck_crl_issuer_chain":  # unused by dcap-qvl 0.7.0: empty is accepted
            variants.append((f"{field} empty", {**base, field: ""}))
    assert all(doc != base for _, doc in variants), "a collateral variant changed nothing"
    cases = [
        Case(f"{label} {name}", v.quote, json.dumps(doc).encode(), v.at) for name, doc in variants
    ]
    for name, blob in [("empty", b""), ("not JSON", b"{"), ("not UTF-8", b"\xff\xfe{}"),
                       ("a list", b"[]"), ("null", b"null"), ("nested", b"[" * 5000)]:
        cases.append(Case(f"{label} {name}", v.quote, blob, v.at))
    return cases


@lru_cache(maxsize=1)
def tampered_corpus() -> tuple[Case, ...]:
    vectors = _load()
    assert vectors is not None
    sgx, tdx, old = vectors["sgx"], vectors["tdx"], vectors["tdx_outdated"]
    cases: list[Case] = []
    for tee, v in (("sgx", sgx), ("tdx", tdx)):
        cases += _quote_cases(tee, v)
        cases += _collateral_cases(tee, v)
    swaps = [
        ("sgx quote, tdx collateral", sgx.quote, tdx.collateral, sgx.at),
        ("sgx quote, tdx collateral at tdx time", sgx.quote, tdx.collateral, tdx.at),
        ("tdx quote, sgx collateral", tdx.quote, sgx.collateral, tdx.at),
        ("tdx quote, sgx collateral at sgx time", tdx.quote, sgx.collateral, sgx.at),
        ("tdx quote, newer tdx collateral", tdx.quote, old.collateral, old.at),
        ("newer tdx quote, older tdx collateral", old.quote, tdx.collateral, tdx.at),
        ("sgx quote, newer tdx collateral", sgx.quote, old.collateral, old.at),
    ]
    cases += [Case(f"swapped_collateral: {n}", q, c, at) for n, q, c, at in swaps]
    rng = random.Random(20250704)
    for n in range(24):
        size = rng.choice([1, 47, 48, 100, 432, 1000, 4600, 5006])
        junk = bytes(rng.randrange(256) for _ in range(size))
        cases.append(Case(f"garbage: {n} ({size} random bytes)", junk, sgx.collateral, sgx.at))
    for tee, v in (("sgx", sgx), ("tdx", tdx)):  # a genuine header over random bytes
        junk = v.quote[:48] + bytes(rng.randrange(256) for _ in range(len(v.quote) - 48))
        cases.append(Case(f"garbage: {tee} header, random rest", junk, v.collateral, v.at))
    return tuple(cases)


def _rejection_problem(case: Case) -> str | None:
    """None if `case` is rejected the right way, else what went wrong."""
    try:
        claims = verify_quote(case.quote, case.collateral, case.at)
    except (EvidenceFormatError, VerificationError) as exc:
        return None if str(exc) else f"{case.label}: empty error message"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return f"{case.label}: raised {type(exc).__name__}: {exc}"
    return f"{case.label}: ACCEPTED with status {claims.tcb_status}"


@pytest.mark.vectors
def test_corpus_is_large_deterministic_and_all_different(vectors: dict[str, Vector]) -> None:
    corpus = tampered_corpus()
    assert len(corpus) >= 500
    originals = {(v.quote, v.collateral, v.at) for v in vectors.values()}
    assert not [c.label for c in corpus if (c.quote, c.collateral, c.at) in originals]
    counts = {cat: sum(c.label.startswith(cat + " ") or c.label.startswith(cat + ":")
                       for c in corpus) for cat in CATEGORIES}
    assert all(counts.values()), counts


@pytest.mark.vectors
@pytest.mark.parametrize("category", CATEGORIES)
def test_tampered_corpus_is_rejected(vectors: dict[str, Vector], category: str) -> None:
    del vectors
    cases = [
        c for c in tampered_corpus()
        if c.label.startswith(category + " ") or c.label.startswith(category + ":")
    ]
    assert cases
    problems = [p for p in map(_rejection_problem, cases) if p]
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:20])


@pytest.mark.vectors
def test_rejections_name_what_failed(vectors: dict[str, Vector]) -> None:
    sgx = vectors["sgx"]
    regions, _ = quote_layout(sgx.quote)
    body = regions["report_body"][0] + 64
    with pytest.raises(VerificationError, match="SGX quote rejected: .*signature is invalid"):
        verify_quote(_flip(sgx.quote, body, 0), sgx.collateral, sgx.at)
    qe = regions["qe_report"][0] + 100
    with pytest.raises(VerificationError, match="qe_report"):
        verify_quote(_flip(sgx.quote, qe, 0), sgx.collateral, sgx.at)
    with pytest.raises(EvidenceFormatError, match="quote does not parse"):
        verify_quote(sgx.quote[:300], sgx.collateral, sgx.at)
    with pytest.raises(EvidenceFormatError, match="collateral is not DCAP collateral JSON"):
        verify_quote(sgx.quote, b'{"tcb_info": 1}', sgx.at)
    doc = json.loads(sgx.collateral)
    assert "ConfigurationAndSWHardeningNeeded" in doc["tcb_info"]
    doc["tcb_info"] = doc["tcb_info"].replace("ConfigurationAndSWHardeningNeeded", "UpToDate")
    with pytest.raises(VerificationError, match="Signature is invalid for tcb_info"):
        verify_quote(sgx.quote, json.dumps(doc).encode(), sgx.at)


# --- collateral sources ----------------------------------------------------------------


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.vectors
def test_bundle_keyed_by_fmspc(vectors: dict[str, Vector], tmp_path: Path) -> None:
    sgx_doc = json.loads(vectors["sgx"].collateral)
    tdx_doc = json.loads(vectors["tdx"].collateral)
    flat = _write(tmp_path / "flat.json", {SGX_FMSPC: sgx_doc, TDX_FMSPC.lower(): tdx_doc})
    nested = _write(tmp_path / "nested.json", {TDX_FMSPC: {"tdx": tdx_doc}})
    for path in (flat, nested):
        bundle = BundleCollateral(path)
        claims = DcapVerifier("tdx", bundle).verify(vectors["tdx"].quote, TDX_AT)
        assert claims.measurements["mrtd"] == TDX_MRTD
    assert BundleCollateral(flat).available() == [("sgx", SGX_FMSPC), ("tdx", TDX_FMSPC)]
    only_sgx = DcapVerifier("tdx", BundleCollateral(VECTORS / "sgx_quote_collateral.json"))
    with pytest.raises(VerificationError, match=f"no tdx collateral for FMSPC {TDX_FMSPC}"):
        only_sgx.verify(vectors["tdx"].quote, TDX_AT)


@pytest.mark.vectors
def test_bad_bundles_are_config_errors(vectors: dict[str, Vector], tmp_path: Path) -> None:
    sgx_doc = json.loads(vectors["sgx"].collateral)
    bad = {
        "wrong_key.json": {TDX_FMSPC: sgx_doc},
        "not_fmspc.json": {"sgx": sgx_doc},
        "twice.json": {SGX_FMSPC: {"sgx": sgx_doc}, SGX_FMSPC.lower(): sgx_doc},
        "list.json": [sgx_doc],
        "broken.json": {**sgx_doc, "tcb_info": "{"},
    }
    for name, doc in bad.items():
        with pytest.raises(ConfigError, match=name):
            BundleCollateral(_write(tmp_path / name, doc))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ConfigError, match="not JSON"):
        BundleCollateral(tmp_path / "text.json")
    with pytest.raises(ConfigError, match="cannot read"):
        BundleCollateral(tmp_path / "missing.json")


class RecordingFetch:
    def __init__(self, result: bytes | Exception) -> None:
        self.result = result
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, url: str, quote: bytes) -> bytes:
        self.calls.append((url, quote))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


URL = "https://pccs.example.invalid"


@pytest.mark.vectors
def test_cached_collateral_is_used_offline(vectors: dict[str, Vector], tmp_path: Path) -> None:
    v = vectors["tdx"]
    offline = RecordingFetch(OSError("network unreachable"))
    source = CachedPcsCollateral(URL, tmp_path, fetch=offline)
    request = CollateralRequest(tee="tdx", fmspc=TDX_FMSPC, ca="platform")
    source.cache_path(request).write_bytes(v.collateral)
    claims = DcapVerifier("tdx", source).verify(v.quote, v.at)
    assert claims.measurements["mrtd"] == TDX_MRTD
    assert offline.calls == []


@pytest.mark.vectors
def test_fetched_collateral_is_cached(vectors: dict[str, Vector], tmp_path: Path) -> None:
    v = vectors["sgx"]
    fetch = RecordingFetch(v.collateral)
    verifier = DcapVerifier("sgx", CachedPcsCollateral(URL, tmp_path / "cache", fetch=fetch))
    assert verifier.verify(v.quote, v.at).tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verifier.verify(v.quote, v.at).measurements["mrenclave"] == SGX_MRENCLAVE
    assert fetch.calls == [(URL, v.quote)]
    assert (tmp_path / "cache" / f"sgx-processor-{SGX_FMSPC}.json").read_bytes() == v.collateral


@pytest.mark.vectors
def test_stale_cache_offline_fails_as_expired(vectors: dict[str, Vector], tmp_path: Path) -> None:
    v = vectors["sgx"]
    offline = RecordingFetch(OSError("network unreachable"))
    source = CachedPcsCollateral(URL, tmp_path, fetch=offline)
    request = CollateralRequest(tee="sgx", fmspc=SGX_FMSPC, ca="processor")
    source.cache_path(request).write_bytes(v.collateral)
    later = 1752919278 + 86400  # a day after the QE identity's nextUpdate
    with pytest.raises(VerificationError, match="expired"):
        DcapVerifier("sgx", source).verify(v.quote, later)
    assert len(offline.calls) == 1  # it tried to refresh, then fell back to the cache


@pytest.mark.vectors
def test_no_cache_and_no_network(vectors: dict[str, Vector], tmp_path: Path) -> None:
    v = vectors["sgx"]
    offline = DcapVerifier(
        "sgx", CachedPcsCollateral(URL, tmp_path, fetch=RecordingFetch(OSError("unreachable")))
    )
    with pytest.raises(VerificationError, match="no cached sgx collateral .* fetching failed"):
        offline.verify(v.quote, v.at)
    wrong = DcapVerifier(
        "sgx", CachedPcsCollateral(URL, tmp_path, fetch=RecordingFetch(vectors["tdx"].collateral))
    )
    with pytest.raises(VerificationError, match="got tdx collateral"):
        wrong.verify(v.quote, v.at)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.vectors
def test_corrupt_cache_is_refetched(vectors: dict[str, Vector], tmp_path: Path) -> None:
    v = vectors["sgx"]
    fetch = RecordingFetch(v.collateral)
    source = CachedPcsCollateral(URL, tmp_path, fetch=fetch)
    path = source.cache_path(CollateralRequest(tee="sgx", fmspc=SGX_FMSPC, ca="processor"))
    path.write_bytes(b"{half a file")
    DcapVerifier("sgx", source).verify(v.quote, v.at)
    assert len(fetch.calls) == 1
    assert path.read_bytes() == v.collateral


def test_default_fetch_needs_get_collateral(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(dcap_qvl, "get_collateral")
    with pytest.raises(ConfigError, match="no get_collateral"):
        dcap_qvl_fetch(URL, b"quote")
