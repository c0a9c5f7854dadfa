"""Executor-side TEE backends against stand-ins for their kernel and library-OS interfaces.

Gramine: `/dev/attestation` is a directory of pseudo-files; a plain directory
with the same files stands in for it (a static `quote` file, holding the real
SGX vector when ../shared/attestation-vectors is there).

configfs-tsm: `FakeTsmKernel` (tests/standins.py) plays the kernel's part. The
backend under test is the production code, unchanged.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teeflow.attestation.configfs_tsm import (
    MAX_OUTBLOB,
    TsmBackend,
    join_snp_evidence,
    split_snp_evidence,
)
from teeflow.attestation.evidence import Evidence
from teeflow.attestation.gramine_sgx import MAX_QUOTE, GramineSgxBackend
from teeflow.core.errors import ConfigError, EvidenceFormatError, VerificationError
from tests.standins import FakeTsmKernel, Respond, attestation_dir

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"
SGX_REPORT_DATA_AT = 48 + 320  # quote v3: header, then the report body's last 64 bytes


def _vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"attestation vector {name} not found at {VECTORS} (../shared beside the repo)")
    return path.read_bytes()


# ---------------------------------------------------------------- Gramine /dev/attestation


def _sgx_quote() -> tuple[bytes, bytes]:
    """(quote, its report data): the real SGX vector, or a stand-in with the same layout."""
    path = VECTORS / "sgx_quote"
    if path.is_file():
        quote = path.read_bytes()
    else:
        body = bytearray(4600)
        struct.pack_into("<HHI", body, 0, 3, 2, 0)  # version 3, ECDSA-256, TEE type SGX
        body[SGX_REPORT_DATA_AT : SGX_REPORT_DATA_AT + 64] = b"stand-in report data".ljust(64)
        quote = bytes(body)
    return quote, quote[SGX_REPORT_DATA_AT : SGX_REPORT_DATA_AT + 64]


def _attestation_dir(tmp_path: Path, *, kind: bytes = b"dcap", quote: bytes | None = None) -> Path:
    return attestation_dir(tmp_path, _sgx_quote()[0] if quote is None else quote, kind=kind)


def test_gramine_writes_report_data_and_returns_quote(tmp_path: Path) -> None:
    quote, report_data = _sgx_quote()
    d = _attestation_dir(tmp_path)
    backend = GramineSgxBackend(d)
    assert backend.tee == "sgx"
    evidence = backend.evidence(report_data)
    assert evidence == Evidence("sgx", quote)
    assert (d / "user_report_data").read_bytes() == report_data
    assert Evidence.decode(evidence.encode()) == evidence


def test_gramine_real_vector_carries_hello_world(tmp_path: Path) -> None:
    quote = _vector("sgx_quote")
    report_data = quote[SGX_REPORT_DATA_AT : SGX_REPORT_DATA_AT + 64]
    assert report_data.startswith(b"Hello, world!")
    evidence = GramineSgxBackend(_attestation_dir(tmp_path)).evidence(report_data)
    assert evidence.quote == quote


def test_gramine_accepts_type_with_newline(tmp_path: Path) -> None:
    _, report_data = _sgx_quote()
    backend = GramineSgxBackend(_attestation_dir(tmp_path, kind=b"dcap\n"))
    assert backend.evidence(report_data).tee == "sgx"


@pytest.mark.parametrize("kind", [b"none", b"epid", b"", b"dcapx"])
def test_gramine_refuses_other_attestation_types(tmp_path: Path, kind: bytes) -> None:
    with pytest.raises(ConfigError, match=f"attestation_type is {kind.decode()!r}, need 'dcap'"):
        GramineSgxBackend(_attestation_dir(tmp_path, kind=kind))


def test_gramine_rechecks_type_on_each_call(tmp_path: Path) -> None:
    _, report_data = _sgx_quote()
    d = _attestation_dir(tmp_path)
    backend = GramineSgxBackend(d)
    (d / "attestation_type").write_bytes(b"epid")
    with pytest.raises(ConfigError, match="'epid'"):
        backend.evidence(report_data)
    assert (d / "user_report_data").read_bytes() == b""


def test_gramine_missing_dir_or_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not running under Gramine with remote attestation"):
        GramineSgxBackend(tmp_path / "nope")
    d = _attestation_dir(tmp_path)
    (d / "quote").unlink()
    with pytest.raises(ConfigError, match="lacks quote: not running under Gramine"):
        GramineSgxBackend(d)


@pytest.mark.parametrize("size", [0, 32, 63, 65, 128])
def test_gramine_report_data_must_be_64_bytes(tmp_path: Path, size: int) -> None:
    d = _attestation_dir(tmp_path)
    with pytest.raises(EvidenceFormatError, match="exactly 64 bytes"):
        GramineSgxBackend(d).evidence(b"x" * size)
    assert (d / "user_report_data").read_bytes() == b""


@pytest.mark.parametrize(
    ("quote", "message"),
    [
        (b"", "empty quote"),
        (b"\x03\x00" + b"\x00" * (MAX_QUOTE - 1), "more than 65536 bytes"),
        (b"\x03\x00\x02\x00", "shorter than a header"),
        (struct.pack("<HHI", 4, 2, 0x81) + bytes(600), "TEE type 0x81, not SGX"),
        (struct.pack("<HHI", 2, 2, 0) + bytes(600), "unknown version 2"),
    ],
)
def test_gramine_bad_quotes(tmp_path: Path, quote: bytes, message: str) -> None:
    _, report_data = _sgx_quote()
    backend = GramineSgxBackend(_attestation_dir(tmp_path, quote=quote))
    with pytest.raises(EvidenceFormatError, match=message):
        backend.evidence(report_data)


def test_gramine_quote_over_other_report_data(tmp_path: Path) -> None:
    backend = GramineSgxBackend(_attestation_dir(tmp_path))
    with pytest.raises(EvidenceFormatError, match="does not carry the report data just written"):
        backend.evidence(b"\xee" * 64)


def test_gramine_serialises_concurrent_calls(tmp_path: Path) -> None:
    quote, report_data = _sgx_quote()
    backend = GramineSgxBackend(_attestation_dir(tmp_path))
    results: list[Evidence] = []

    def run() -> None:
        for _ in range(5):
            results.append(backend.evidence(report_data))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 20 and all(e.quote == quote for e in results)
    assert not backend._lock.locked()


# ---------------------------------------------------------------- configfs-tsm


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def make_kernel(
    tsm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str, Respond], FakeTsmKernel]]:
    kernels: list[FakeTsmKernel] = []

    def make(provider: str, respond: Respond) -> FakeTsmKernel:
        kernel = FakeTsmKernel(tsm_root, provider, respond)
        kernel.install(monkeypatch)
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()
        assert not kernel.errors, kernel.errors


RD = bytes(range(64))


def test_tsm_tdx_returns_the_quote(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    quote = _vector("tdx_quote")
    kernel = make_kernel("tdx_guest", lambda inblob: (quote, None))
    evidence = TsmBackend("tdx", tsm_root).evidence(RD)
    assert evidence == Evidence("tdx", quote)
    assert kernel.inblobs == [RD]
    assert len(kernel.created) == 1 and not kernel.created[0].exists()
    assert list(tsm_root.iterdir()) == []


def test_tsm_sev_snp_frames_report_and_certificates(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    def respond(inblob: bytes) -> tuple[bytes, bytes | None]:
        report = bytearray(0x4A0)
        report[0x50:0x90] = inblob
        return bytes(report), b"certificate table"

    kernel = make_kernel("sev_guest", respond)
    evidence = TsmBackend("sev-snp", tsm_root, privlevel=0).evidence(RD)
    assert evidence.tee == "sev-snp"
    report, aux = split_snp_evidence(evidence.quote)
    assert report[0x50:0x90] == RD and len(report) == 0x4A0
    assert aux == b"certificate table"
    assert kernel.privlevels == [b"0\n"]
    assert list(tsm_root.iterdir()) == []


def test_tsm_sev_snp_without_certificates(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    make_kernel("sev_guest", lambda inblob: (b"r" * 0x4A0, None))
    evidence = TsmBackend("sev-snp", tsm_root).evidence(RD)
    assert split_snp_evidence(evidence.quote) == (b"r" * 0x4A0, b"")


def test_tsm_generation_mismatch_is_concurrent_use(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    kernel = make_kernel("tdx_guest", lambda inblob: (b"quote", None))
    kernel.extra_writes = 1
    with pytest.raises(VerificationError, match="generation changed: concurrent use"):
        TsmBackend("tdx", tsm_root).evidence(RD)
    assert list(tsm_root.iterdir()) == []


def test_tsm_wrong_provider(tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]) -> None:
    kernel = make_kernel("sev_guest", lambda inblob: (b"report", None))
    with pytest.raises(ConfigError, match="provider is 'sev_guest'; a tdx guest has 'tdx_guest'"):
        TsmBackend("tdx", tsm_root).evidence(RD)
    assert kernel.inblobs == []  # refused before asking for a report
    assert list(tsm_root.iterdir()) == []


@pytest.mark.parametrize(("outblob", "message"), [
    (b"", "outblob is empty"),
    (b"q" * (MAX_OUTBLOB + 1), "outblob is more than 65536 bytes"),
])
def test_tsm_bad_outblob(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel], outblob: bytes, message: str
) -> None:
    make_kernel("tdx_guest", lambda inblob: (outblob, None))
    with pytest.raises(EvidenceFormatError, match=message):
        TsmBackend("tdx", tsm_root).evidence(RD)
    assert list(tsm_root.iterdir()) == []


def test_tsm_report_data_must_be_64_bytes(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    kernel = make_kernel("tdx_guest", lambda inblob: (b"quote", None))
    for size in (0, 32, 65):
        with pytest.raises(EvidenceFormatError, match="exactly 64 bytes"):
            TsmBackend("tdx", tsm_root).evidence(b"x" * size)
    assert kernel.created == []


def test_tsm_concurrent_calls_use_separate_entries(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    kernel = make_kernel("tdx_guest", lambda inblob: (b"quote:" + inblob, None))
    backend = TsmBackend("tdx", tsm_root)
    results: dict[bytes, bytes] = {}

    def run(i: int) -> None:
        for j in range(3):
            rd = bytes([i, j]) * 32
            results[rd] = backend.evidence(rd).quote

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 12 and all(q == b"quote:" + rd for rd, q in results.items())
    assert len(set(kernel.created)) == 12
    assert list(tsm_root.iterdir()) == []


def test_tsm_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configfs-tsm is not available"):
        TsmBackend("tdx", tmp_path / "missing")
    with pytest.raises(ConfigError, match="not 'sgx'"):
        TsmBackend("sgx", tmp_path)
    with pytest.raises(ConfigError, match="privlevel applies to sev-snp only"):
        TsmBackend("tdx", tmp_path, privlevel=0)
    with pytest.raises(ConfigError, match="privlevel must be 0 to 3"):
        TsmBackend("sev-snp", tmp_path, privlevel=4)


def test_tsm_mkdir_failure_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()
    backend = TsmBackend("tdx", root)
    root.rmdir()  # configfs unmounted under us
    with pytest.raises(ConfigError, match="cannot create configfs-tsm report"):
        backend.evidence(RD)


def test_snp_evidence_framing() -> None:
    joined = join_snp_evidence(b"report", b"aux")
    assert split_snp_evidence(joined) == (b"report", b"aux")
    assert split_snp_evidence(join_snp_evidence(b"report")) == (b"report", b"")
    for bad, message in [
        (b"", "no TFSNPEV1 header"),
        (b"XXSNPEV1" + joined[8:], "no TFSNPEV1 header"),
        (joined[:10], "cut short before its report length"),
        (joined[:14], "cut short inside its report"),
        (joined[:-1], "cut short inside its certificate table"),
        (joined + b"!", "1 trailing bytes"),
        (joined[:8] + struct.pack(">I", 0) + struct.pack(">I", 0), "report is empty"),
        (joined[:8] + struct.pack(">I", 1 << 30), "more than 65536"),
    ]:
        with pytest.raises(EvidenceFormatError, match=message):
            split_snp_evidence(bad)
    with pytest.raises(EvidenceFormatError, match="report is empty"):
        join_snp_evidence(b"")


def test_tsm_sev_snp_evidence_verifies(
    tsm_root: Path, make_kernel: Callable[..., FakeTsmKernel]
) -> None:
    """A real SEV-SNP report (PyPI omne-attest) through configfs-tsm to the verifier."""
    pytest.importorskip(
        "omne_attest", reason="SEV-SNP vectors come from the PyPI package omne-attest (dev extra)")
    from importlib import resources

    from teeflow.attestation.sevsnp import GUID_ASK, GUID_VCEK, SevSnpVerifier

    d = resources.files("omne_attest") / "vectors"
    report = (d / "attestation.bin").read_bytes()
    vcek, ask = (d / "kds_vcek.der").read_bytes(), (d / "milan_ask.der").read_bytes()
    head = struct.pack("<16sII", GUID_VCEK.bytes, 72, len(vcek))
    head += struct.pack("<16sII", GUID_ASK.bytes, 72 + len(vcek), len(ask))
    table = head + bytes(24) + vcek + ask
    report_data = report[0x50:0x90]  # what that guest was asked for: 01 02 03 04 05 0...
    kernel = make_kernel("sev_guest", lambda inblob: (report, table))
    evidence = TsmBackend("sev-snp", tsm_root).evidence(report_data)
    assert kernel.inblobs == [report_data]
    verifier = SevSnpVerifier((d / "milan_ark.der").read_bytes())
    claims = verifier.verify(Evidence.decode(evidence.encode()).quote, 1790000000)
    assert claims.report_data == report_data and claims.tee == "sev-snp"
