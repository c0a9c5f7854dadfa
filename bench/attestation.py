"""Attestation costs: verifying real SGX and TDX quotes (dcap-qvl, offline collateral),
and connecting to a running simulated executor (read the RA-TLS certificate, appraise it,
pin it, appraise fresh evidence for a nonce)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import Options, Row, median_range
from bench.upload import executor_process
from teeflow.attestation.dcap import verify_quote
from teeflow.attestation.policy import load_policy
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.net.executor_client import attested_connect

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"
QUOTES = {"sgx": ("sgx_quote", 1751624924), "tdx": ("tdx_quote", 1751624655)}


def _median_ms(func, repeats: int) -> tuple[float, float, float]:
    func()  # warm-up, untimed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append((time.perf_counter() - t0) * 1000)
    return median_range(times)


def run(opts: Options) -> list[Row]:
    repeats = opts.repeats or (5 if opts.quick else 30)
    out: list[Row] = []
    if (VECTORS / "sgx_quote").exists():
        for tee, (name, at) in QUOTES.items():
            quote = (VECTORS / name).read_bytes()
            collateral = (VECTORS / f"{name}_collateral.json").read_bytes()
            med, lo, hi = _median_ms(lambda q=quote, c=collateral, t=at: verify_quote(q, c, t),
                                     repeats)
            out.append(Row(f"verify {tee.upper()} quote", f"{med:.2f} ms",
                           f"median of {repeats}, range {lo:.2f}-{hi:.2f}"))
    else:
        out.append(Row("verify SGX/TDX quote", "skipped", f"no vectors at {VECTORS}"))
    policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                          "simulated": {"measurement": [code_measurement()]}})
    verifiers = make_verifiers()
    with tempfile.TemporaryDirectory() as tmp, executor_process(Path(tmp)) as address:

        def connect() -> None:
            client, _ = attested_connect(address, policy, verifiers)
            client.action("info")  # one call over the pinned channel
            client.close()

        med, lo, hi = _median_ms(connect, repeats)
        out.append(Row("connect, attest (certificate + nonce), pin: simulated executor",
                       f"{med:.1f} ms", f"median of {repeats}, range {lo:.1f}-{hi:.1f}"))
    return out
