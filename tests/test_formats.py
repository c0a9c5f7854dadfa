"""formats.evidence_tee: the one place that names the TEE of evidence bytes, fail closed."""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path

import pytest

from teeflow.attestation import describe, formats
from teeflow.attestation.configfs_tsm import join_snp_evidence, split_snp_evidence
from teeflow.attestation.evidence import MAX_EVIDENCE
from teeflow.attestation.formats import evidence_tee, require_tee
from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core.errors import EvidenceFormatError

SRC = Path(__file__).resolve().parents[1] / "src" / "teeflow" / "attestation"


def _header(version: int, tee_type: int) -> bytes:
    return struct.pack("<HHI", version, 2, tee_type) + bytes(40)


def test_quote_tee():  # moved from test_ratls.py with ratls.quote_tee
    assert evidence_tee(SimulatedBackend().evidence(bytes(64)).quote) == "simulated"
    header = bytearray(48)
    header[0] = 3
    assert evidence_tee(bytes(header)) == "sgx"
    header[0], header[4] = 4, 0x81
    assert evidence_tee(bytes(header)) == "tdx"
    header[0] = 3
    with pytest.raises(EvidenceFormatError, match="TEE type 0x81"):
        evidence_tee(bytes(header))
    header[0], header[4] = 2, 0
    with pytest.raises(EvidenceFormatError, match="version 2"):
        evidence_tee(bytes(header))
    with pytest.raises(EvidenceFormatError, match="neither simulated nor"):
        evidence_tee(b"short")


def test_every_allowed_format() -> None:
    assert evidence_tee(join_snp_evidence(b"r" * 0x4A0, b"aux")) == "sev-snp"
    for version in (3, 4, 5):
        assert evidence_tee(_header(version, formats.TEE_TYPE_SGX)) == "sgx"
    for version in (4, 5):
        assert evidence_tee(_header(version, formats.TEE_TYPE_TDX)) == "tdx"
    assert evidence_tee(bytearray(_header(3, 0))) == "sgx"
    assert set(formats.TEES) == {"simulated", "sgx", "tdx", "sev-snp"}


@pytest.mark.parametrize(("evidence", "message"), [
    (b"", "0 bytes: neither simulated nor SEV-SNP"),
    (b"TFSIMQ0", "7 bytes"),  # a magic cut short is no magic
    (b"TFSNPEV", "7 bytes"),
    (b"tfsnpev1" + bytes(60), "unknown"),  # magics are case-sensitive
    (bytes(0x4A0), "unknown version 0"),  # a raw SEV-SNP report, unframed
    (_header(3, 0x81), "unknown version 3 for TEE type 0x81"),  # TDX has no v3 quote
    (_header(6, 0), "unknown version 6 for TEE type 0x0"),
    (_header(4, 0x80), "unknown TEE type 0x80"),
    (b"\x30\x82\x01\x00" + bytes(60), "unknown"),  # a DER certificate is not evidence
])
def test_unknown_formats_are_refused(evidence: bytes, message: str) -> None:
    with pytest.raises(EvidenceFormatError, match=message):
        evidence_tee(evidence)


def test_input_is_capped_and_typed() -> None:
    with pytest.raises(EvidenceFormatError, match=f"more than {MAX_EVIDENCE}"):
        evidence_tee(formats.SIMULATED_MAGIC + bytes(MAX_EVIDENCE))
    with pytest.raises(EvidenceFormatError, match="must be bytes, not str"):
        evidence_tee("TFSIMQ01")  # type: ignore[arg-type]
    with pytest.raises(EvidenceFormatError, match="must be bytes, not memoryview"):
        evidence_tee(memoryview(b"TFSIMQ01"))  # type: ignore[arg-type]


def test_require_tee_names_both_formats() -> None:
    snp = join_snp_evidence(b"r" * 0x4A0)
    assert require_tee(bytearray(snp), "sev-snp") == snp
    with pytest.raises(EvidenceFormatError, match=r"not SEV-SNP evidence \(no TFSNPEV1 header\): "
                                                  "it is SGX evidence"):
        require_tee(_header(3, 0), "sev-snp")
    with pytest.raises(EvidenceFormatError, match=r"not TDX evidence .*: it is SEV-SNP evidence"):
        require_tee(snp, "tdx")
    with pytest.raises(EvidenceFormatError, match=r"not SGX evidence .*: evidence is 3 bytes"):
        require_tee(b"abc", "sgx")
    with pytest.raises(EvidenceFormatError, match="unknown TEE type 'nitro'"):
        require_tee(snp, "nitro")


def test_split_snp_evidence_goes_through_formats() -> None:
    with pytest.raises(EvidenceFormatError, match="it is simulated evidence"):
        split_snp_evidence(SimulatedBackend().evidence(bytes(64)).quote)


def test_no_other_sniffer_in_the_attestation_package() -> None:
    """The magics and the DCAP header layout are spelled out in formats.py only."""
    needles = ('b"TFSIMQ01"', 'b"TFSNPEV1"', '"<HHI"', "quote[:8]", "0x00000081")
    for path in sorted(SRC.glob("*.py")):
        if path.name != "formats.py":
            text = path.read_text()
            found = [n for n in needles if n in text]
            assert not found, f"{path.name} tells formats apart itself: {found}"


def test_describe_and_claimed_measurements_for_sev_snp() -> None:
    pytest.importorskip(
        "omne_attest", reason="SEV-SNP vectors come from the PyPI package omne-attest (dev extra)")
    report = (resources.files("omne_attest") / "vectors" / "attestation.bin").read_bytes()
    quote = join_snp_evidence(report, b"")
    shown = describe.describe_quote(quote)
    assert shown["tee"] == "sev-snp" and shown["measurement"] == report[0x90:0xC0].hex()
    assert describe.claimed_measurements("sev-snp", quote) == {
        "measurement": report[0x90:0xC0].hex()}
    with pytest.raises(EvidenceFormatError, match="evidence says TEE 'sgx' but the quote is"):
        describe.claimed_measurements("sgx", quote)
    with pytest.raises(EvidenceFormatError, match="must be 1184 bytes"):
        describe.claimed_measurements("sev-snp", join_snp_evidence(report[:-1]))


@pytest.mark.vectors
def test_real_vectors(vectors: Path) -> None:
    for name, tee in (("sgx_quote", "sgx"), ("tdx_quote", "tdx"), ("tdx_quote_outdated", "tdx")):
        quote = (vectors / name).read_bytes()
        assert evidence_tee(quote) == tee
        assert describe.describe_quote(quote)["tee"] == tee
    sgx = describe.claimed_measurements("sgx", (vectors / "sgx_quote").read_bytes())
    assert sgx["mrenclave"].startswith("33d8736d")
