"""Every TEE backend, from its device to an owner's appraisal, over real loopback servers.

For each of simulated, sgx, tdx and sev-snp: the production backend (made by
`registry.make_backend`, as `teeflow executor --tee ...` does) runs against a
stand-in for its device (tests/standins.py); the production `executor.server.build`
makes its RA-TLS identity and a real Flight executor on port 0; it registers
with a real scheduler process (`teeflow scheduler`, port 0), which lists the TEE
type and the measurements its certificate claims; then a client holding a policy
for that TEE appraises it with `attested_connect`.

What each case proves, and what it cannot:
- simulated: the whole path accepts: certificate evidence, key binding, and the
  fresh-nonce evidence asked over the pinned channel.
- sgx: real captured quote (../shared/attestation-vectors). Gramine's backend
  refuses it, since the quote is not over the report data it wrote (no SGX here
  can make one that is). A backend that replays the same quote stands in for the
  executor from there on: the scheduler registers it and lists its MRENCLAVE, the
  client's verifier accepts the quote at the vector's time, and the appraisal
  refuses at exactly the key binding (`tls_key`); the same claims pass the policy
  when bound to the quote's own report data, so binding is the only refusal.
- tdx: the configfs-tsm backend returns the real TDX vector (the kernel stand-in
  ignores the report data). Same as sgx from the certificate on, with MRTD.
- sev-snp: the real Milan report and its VCEK/ASK from PyPI `omne-attest`, framed
  by configfs-tsm with the host's certificate table (auxblob). The certificate
  carries that frame and gives it back byte for byte; the scheduler lists the
  SNP measurement; the verifier chains the report to AMD's Milan root at a time
  the VCEK is valid, and the appraisal refuses at the key binding (the report
  cannot be re-signed over our key). The guest ran with its debug bit set, so
  the policy allows debug: otherwise `debug` would be refused after the binding.
- sev-snp-own-root: the same path accepting in full. The kernel stand-in signs a
  report over the report data it is given with a throw-away ARK/ASK/VCEK chain
  (tests/test_sevsnp.py) that the client trusts instead of AMD's. It proves the
  SNP binding and fresh-nonce path end to end; it proves nothing about AMD's keys.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from teeflow.attestation.collateral import BundleCollateral
from teeflow.attestation.configfs_tsm import split_snp_evidence
from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import AppraisalPolicy, Verifier, appraise, load_policy
from teeflow.attestation.ratls import read_certificate_evidence
from teeflow.attestation.registry import TeeBackend, make_backend, make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import EvidenceFormatError, PolicyRefused, VerificationError
from teeflow.executor.server import ExecutorFlightServer, build
from teeflow.net.executor_client import attested_connect, fetch_certificate  # network client
from teeflow.net.scheduler_client import SchedulerClient  # network client
from tests.standins import FakeTsmKernel, attestation_dir

pytestmark = pytest.mark.e2e

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"
SGX_AT, TDX_AT, SNP_AT = 1751624924, 1751624655, 1790000000
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MRTD = ("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7")
SNP_MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                   "6bdf8a9ece31a5a608eb0cf2e4872b01")
SGX_STATUS = "ConfigurationAndSWHardeningNeeded"


def _vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"attestation vector {name} not found at {VECTORS} (../shared beside the repo)")
    return path.read_bytes()


def _snp_vectors() -> dict[str, bytes]:
    pytest.importorskip(
        "omne_attest", reason="SEV-SNP vectors come from the PyPI package omne-attest (dev extra)")
    d = resources.files("omne_attest") / "vectors"
    return {name: (d / f"{name}.der").read_bytes() if name != "report"
            else (d / "attestation.bin").read_bytes()
            for name in ("report", "kds_vcek", "milan_ask", "milan_ark")}


def _cert_table(vcek: bytes, ask: bytes) -> bytes:
    """A GHCB certificate table (what the host puts in auxblob): VCEK, ASK, terminator."""
    from teeflow.attestation.sevsnp import GUID_ASK, GUID_VCEK

    head = struct.pack("<16sII", GUID_VCEK.bytes, 72, len(vcek))
    head += struct.pack("<16sII", GUID_ASK.bytes, 72 + len(vcek), len(ask))
    return head + bytes(24) + vcek + ask


class ReplayBackend:
    """An executor that presents a fixed quote whatever report data it is asked for."""

    def __init__(self, tee: str, quote: bytes) -> None:
        self.tee = tee
        self.quote = quote

    def evidence(self, report_data: bytes) -> Evidence:
        return Evidence(tee=self.tee, quote=self.quote)


@dataclass
class Case:
    """One backend's run: how to make its executor, and what a client holds to judge it."""

    tee: str
    backend: TeeBackend
    policy: AppraisalPolicy
    verifiers: dict[str, Verifier]
    at: int
    measurements: dict[str, str]  # what the scheduler must list (a subset)
    full_accept: bool
    device: dict[str, Any] = field(default_factory=dict)


def _simulated(tmp: Path, kernel: Callable[..., FakeTsmKernel]) -> Case:
    m = code_measurement()
    return Case(
        tee="simulated", backend=make_backend("simulated"),
        policy=load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                            "simulated": {"measurement": [m]}}),
        verifiers=make_verifiers(), at=int(time.time()),
        measurements={"measurement": m}, full_accept=True)


def _sgx(tmp: Path, kernel: Callable[..., FakeTsmKernel]) -> Case:
    quote = _vector("sgx_quote")
    gramine = make_backend("sgx", attestation_dir=str(attestation_dir(tmp, quote)))
    with pytest.raises(EvidenceFormatError, match="does not carry the report data just written"):
        build(gramine)  # the real quote is over "Hello, world!", not over our key
    return Case(
        tee="sgx", backend=ReplayBackend("sgx", quote),
        policy=load_policy({"tee_types": ["sgx"], "accepted_tcb_status": [SGX_STATUS],
                            "sgx": {"mrenclave": [MRENCLAVE]}}),
        verifiers=make_verifiers(BundleCollateral(VECTORS / "sgx_quote_collateral.json")),
        at=SGX_AT, measurements={"mrenclave": MRENCLAVE, "mrsigner": MRSIGNER},
        full_accept=False, device={"quote": quote})


def _tdx(tmp: Path, kernel: Callable[..., FakeTsmKernel]) -> Case:
    quote = _vector("tdx_quote")
    root = tmp / "tsm" / "report"
    root.mkdir(parents=True)
    kernel(root, "tdx_guest", lambda inblob: (quote, None))
    return Case(
        tee="tdx", backend=make_backend("tdx", tsm_root=str(root)),
        policy=load_policy({"tee_types": ["tdx"], "tdx": {"mrtd": [MRTD]}}),
        verifiers=make_verifiers(BundleCollateral(VECTORS / "tdx_quote_collateral.json")),
        at=TDX_AT, measurements={"mrtd": MRTD}, full_accept=False, device={"quote": quote})


def _sev_snp(tmp: Path, kernel: Callable[..., FakeTsmKernel]) -> Case:
    v = _snp_vectors()
    table = _cert_table(v["kds_vcek"], v["milan_ask"])
    root = tmp / "tsm" / "report"
    root.mkdir(parents=True)
    kernel(root, "sev_guest", lambda inblob: (v["report"], table))
    return Case(
        tee="sev-snp", backend=make_backend("sev-snp", tsm_root=str(root)),
        policy=load_policy({"tee_types": ["sev-snp"], "allow_debug": True,
                            "sev-snp": {"measurement": [SNP_MEASUREMENT]}}),
        verifiers=make_verifiers(amd_root=v["milan_ark"]), at=SNP_AT,
        measurements={"measurement": SNP_MEASUREMENT}, full_accept=False,
        device={"report": v["report"], "auxblob": table})


def _sev_snp_own_root(tmp: Path, kernel: Callable[..., FakeTsmKernel]) -> Case:
    base = _snp_vectors()["report"]
    from tests.test_sevsnp import MILAN_SPL, Chain, _report

    chain = Chain("Milan")
    chip = b"\xc1" * 64
    table = _cert_table(chain.vcek(chip, MILAN_SPL), chain.ask_der)

    def respond(inblob: bytes) -> tuple[bytes, bytes | None]:
        report = bytearray(_report(base, chip=chip))  # not debug
        report[0x50:0x90] = inblob
        return chain.sign(bytes(report)), table

    root = tmp / "tsm" / "report"
    root.mkdir(parents=True)
    kernel(root, "sev_guest", respond)
    return Case(
        tee="sev-snp", backend=make_backend("sev-snp", tsm_root=str(root)),
        policy=load_policy({"tee_types": ["sev-snp"],
                            "sev-snp": {"measurement": [SNP_MEASUREMENT]}}),
        verifiers=make_verifiers(amd_root=chain.ark_der), at=SNP_AT,
        measurements={"measurement": SNP_MEASUREMENT}, full_accept=True)


CASES = {"simulated": _simulated, "sgx": _sgx, "tdx": _tdx, "sev-snp": _sev_snp,
         "sev-snp-own-root": _sev_snp_own_root}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("scheduler")) as cluster:
        cluster.start_scheduler()
        yield cluster


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeTsmKernel]]:
    kernels: list[FakeTsmKernel] = []

    def make(root: Path, provider: str, respond: Any) -> FakeTsmKernel:
        k = FakeTsmKernel(root, provider, respond)
        k.install(monkeypatch)
        kernels.append(k)
        return k

    yield make
    for k in kernels:
        k.stop()
        assert not k.errors, k.errors


@pytest.fixture
def serve() -> Iterator[Callable[[ExecutorFlightServer], str]]:
    running: list[tuple[ExecutorFlightServer, threading.Thread]] = []

    def start(server: ExecutorFlightServer) -> str:
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        running.append((server, thread))
        return f"127.0.0.1:{server.port}"

    yield start
    for server, thread in running:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.parametrize("name", list(CASES))
def test_backend_registers_and_is_appraised(
    name: str, tmp_path: Path, scheduler: LocalCluster, kernel: Callable[..., FakeTsmKernel],
    serve: Callable[[ExecutorFlightServer], str],
) -> None:
    case = CASES[name](tmp_path, kernel)
    tee = case.tee
    server = build(case.backend)
    address = serve(server)

    # The certificate carries the device's evidence, read back as it was made.
    found = read_certificate_evidence(fetch_certificate(address))
    assert (found.tee, found.format) == (tee, "dice")
    if "report" in case.device:
        assert split_snp_evidence(found.quote) == (case.device["report"], case.device["auxblob"])
    elif "quote" in case.device:
        assert found.quote == case.device["quote"]

    # A real scheduler registers it and lists what its certificate claims.
    identity = KeySigner.generate()
    with SchedulerClient(scheduler.scheduler_url, identity) as client:
        client.register_node(f"executor-{name}", scheduler.invite("executor_host"))
        registered = client.register_executor(
            address, *server.registration(address, identity.public_key()))
        listed = {e["address"]: e for e in client.executors()}
    assert registered["tee"] == tee and listed[address]["tee"] == tee
    for name, value in case.measurements.items():
        assert registered["measurements"][name] == value
        assert listed[address]["measurements"][name] == value

    # A client with a policy for this TEE appraises it.
    if case.full_accept:
        connection, claims = attested_connect(address, case.policy, case.verifiers, at=case.at)
        connection.close()
        assert claims.tee == tee and claims.measurements["measurement"] == case.measurements[
            "measurement"]
        assert claims.simulated == (tee == "simulated") and not claims.debug
        return
    with pytest.raises(PolicyRefused) as refused:
        attested_connect(address, case.policy, case.verifiers, at=case.at)
    assert refused.value.check == "tls_key"
    # Verified at the vector's time, the quote passes every other check of the policy:
    claims = appraise(found.evidence(), case.policy, case.verifiers,
                      expected_report_data=None, at=case.at)
    assert claims.report_data != found.report_data and not claims.simulated
    appraise(found.evidence(), case.policy, case.verifiers,
             expected_report_data=claims.report_data, at=case.at)
    # ...and the verifier really judged it: far from the vector's time it refuses.
    with pytest.raises(VerificationError):
        appraise(found.evidence(), case.policy, case.verifiers,
                 expected_report_data=None, at=case.at + 20 * 365 * 86400)
