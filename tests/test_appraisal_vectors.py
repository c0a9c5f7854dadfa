"""Appraisal policy against real SGX and TDX quotes, and the `teeflow attest` CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from teeflow.attestation.collateral import BundleCollateral
from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import appraise, load_policy
from teeflow.attestation.registry import collateral_source, make_verifiers
from teeflow.core.errors import ConfigError, PolicyRefused
from tests.factories import run_cli

SGX_AT, TDX_AT = 1751624924, 1751624655
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MRTD = ("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7")
SGX_REPORT_DATA = b"Hello, world!".ljust(64, b"\0")
SGX_STATUS = "ConfigurationAndSWHardeningNeeded"


def _sgx(vectors: Path, **policy):
    raw = {"tee_types": ["sgx"], "accepted_tcb_status": [SGX_STATUS],
           "sgx": {"mrenclave": [MRENCLAVE]}}
    raw.update(policy)
    verifiers = make_verifiers(BundleCollateral(vectors / "sgx_quote_collateral.json"))
    evidence = Evidence("sgx", (vectors / "sgx_quote").read_bytes())
    return appraise(evidence, load_policy(raw), verifiers,
                    expected_report_data=SGX_REPORT_DATA, at=SGX_AT)


def test_sgx_quote_passes_a_policy_that_names_it(vectors):
    claims = _sgx(vectors)
    assert claims.measurements["mrenclave"] == MRENCLAVE and not claims.simulated


@pytest.mark.parametrize("change,check", [
    ({"sgx": {"mrenclave": ["00" * 32]}}, "measurement.mrenclave"),
    ({"accepted_tcb_status": ["UpToDate"]}, "tcb_status"),
    ({"refused_advisories": ["INTEL-SA-00615"]}, "advisories"),
    ({"sgx": {"mrsigner": [MRSIGNER], "isv_prod_id": 1}}, "isv_prod_id"),
    ({"sgx": {"mrsigner": [MRSIGNER], "isv_prod_id": 0, "min_isv_svn": 1}}, "isv_svn"),
    ({"sgx": {"mrsigner": ["11" * 32], "isv_prod_id": 0}}, "measurement.mrsigner"),
])
def test_sgx_policy_refusals_name_the_check(vectors, change, check):
    with pytest.raises(PolicyRefused) as info:
        _sgx(vectors, **change)
    assert info.value.check == check


def test_sgx_signer_identity_accepted(vectors):
    claims = _sgx(vectors, sgx={"mrsigner": [MRSIGNER], "isv_prod_id": 0, "min_isv_svn": 0})
    assert claims.extra["isv_svn"] == 0


def test_stale_nonce_and_unbound_key_refused(vectors):
    verifiers = make_verifiers(BundleCollateral(vectors / "sgx_quote_collateral.json"))
    policy = load_policy({"tee_types": ["sgx"], "accepted_tcb_status": [SGX_STATUS],
                          "sgx": {"mrenclave": [MRENCLAVE]}})
    evidence = Evidence("sgx", (vectors / "sgx_quote").read_bytes())
    with pytest.raises(PolicyRefused) as key:
        appraise(evidence, policy, verifiers, expected_report_data=b"\1" * 64, at=SGX_AT)
    assert key.value.check == "tls_key"
    with pytest.raises(PolicyRefused) as nonce:
        appraise(evidence, policy, verifiers,
                 expected_report_data=SGX_REPORT_DATA[:32] + b"\1" * 32, at=SGX_AT)
    assert nonce.value.check == "nonce"


def test_tdx_quote_with_mrtd(vectors):
    verifiers = make_verifiers(BundleCollateral(vectors / "tdx_quote_collateral.json"))
    quote = (vectors / "tdx_quote").read_bytes()
    policy = load_policy({"tee_types": ["tdx"], "tdx": {"mrtd": [MRTD]}})
    rd = verifiers["tdx"].verify(quote, TDX_AT).report_data
    claims = appraise(Evidence("tdx", quote), policy, verifiers, expected_report_data=rd,
                      at=TDX_AT)
    assert claims.tcb_status == "UpToDate"
    with pytest.raises(PolicyRefused, match="measurement.mrtd"):
        appraise(Evidence("tdx", quote), load_policy({"tee_types": ["tdx"],
                                                     "tdx": {"mrtd": ["00" * 48]}}),
                 verifiers, expected_report_data=rd, at=TDX_AT)


def test_no_collateral_means_no_sgx_verifier(vectors):
    policy = load_policy({"tee_types": ["sgx"], "sgx": {"mrenclave": [MRENCLAVE]}})
    with pytest.raises(PolicyRefused, match="no verifier configured"):
        appraise(Evidence("sgx", (vectors / "sgx_quote").read_bytes()), policy,
                 make_verifiers(), expected_report_data=SGX_REPORT_DATA, at=SGX_AT)


def test_collateral_config_fields(tmp_path):
    assert collateral_source(None, tmp_path) is None
    for raw, field in (({"bundel": "x"}, "collateral.bundel"),
                       ({"pccs_url": "ftp://x"}, "collateral.pccs_url"),
                       ({}, "collateral")):
        with pytest.raises(ConfigError, match=rf"^{field}"):
            collateral_source(raw, tmp_path)
    cached = collateral_source({"pccs_url": "https://pccs.example/", "cache_dir": "c"}, tmp_path)
    assert cached.cache_dir == tmp_path / "c"


def _teeflow(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=60)


def test_cli_attest_verify(vectors, tmp_path):
    quote, coll = str(vectors / "sgx_quote"), str(vectors / "sgx_quote_collateral.json")
    ok = _teeflow("attest", "verify", quote, "--collateral", coll, "--at", str(SGX_AT))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["measurements"]["mrenclave"] == MRENCLAVE
    now = _teeflow("attest", "verify", quote, "--collateral", coll, "--at", str(int(time.time())))
    assert now.returncode != 0 and "rejected" in now.stderr
    policy = tmp_path / "p.toml"
    policy.write_text(f'[policy]\ntee_types = ["sgx"]\n[policy.sgx]\nmrenclave = ["{MRENCLAVE}"]\n')
    refused = _teeflow("attest", "verify", quote, "--collateral", coll, "--at", str(SGX_AT),
                       "--policy", str(policy))
    assert refused.returncode != 0 and "tcb_status" in refused.stderr
    shown = _teeflow("attest", "show", str(vectors / "tdx_quote"))
    assert shown.returncode == 0 and json.loads(shown.stdout)["tee"] == "tdx"
    garbage = tmp_path / "g"
    garbage.write_bytes(b"\x03" * 100)
    bad = _teeflow("attest", "show", str(garbage))
    assert bad.returncode != 0 and "error" in bad.stderr
