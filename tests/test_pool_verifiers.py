"""How an executor appraises the other members of a pool: with the verifiers its operator
configures (`teeflow executor --collateral-bundle / --pccs-url / --amd-ark`), not only the
simulated one. A bad collateral option stops the executor before it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import appraise, load_policy
from teeflow.attestation.registry import make_backend
from teeflow.cli.daemons import peer_verifiers
from teeflow.core.errors import ConfigError, VerificationError
from teeflow.executor.service import Executor
from tests.factories import run_cli

SGX_AT = 1751624924  # when the SGX vector's collateral is current (its README)
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def test_without_collateral_a_member_appraises_simulated_peers_only():
    assert set(peer_verifiers(None, None, None)) == {"simulated"}


def test_a_collateral_bundle_gives_members_a_real_sgx_verifier(vectors: Path):
    verifiers = peer_verifiers(str(vectors / "sgx_quote_collateral.json"), None, None)
    assert {"simulated", "sgx", "tdx"} <= set(verifiers)
    quote = Evidence(tee="sgx", quote=(vectors / "sgx_quote").read_bytes())
    policy = load_policy({"tee_types": ["sgx"],
                          "accepted_tcb_status": ["ConfigurationAndSWHardeningNeeded"],
                          "sgx": {"mrenclave": [MRENCLAVE]}})
    claims = appraise(quote, policy, verifiers, expected_report_data=None, at=SGX_AT)
    assert claims.tee == "sgx" and not claims.simulated
    with pytest.raises(VerificationError):  # the verifier judges: long after, it refuses
        appraise(quote, policy, verifiers, expected_report_data=None,
                 at=SGX_AT + 20 * 365 * 86400)


def test_the_executor_hands_its_verifiers_to_its_pool_seat():
    verifiers = peer_verifiers(None, None, None)
    from cryptography.hazmat.primitives.asymmetric import ec

    executor = Executor(make_backend("simulated"), ec.generate_private_key(ec.SECP256R1()),
                        verifiers=verifiers)
    try:
        assert executor._seats.verifiers is verifiers
    finally:
        executor.close()


@pytest.mark.parametrize("args,named", [
    (["--collateral-bundle", "no-such-bundle.json"], "no-such-bundle.json"),
    (["--pccs-url", "ftp://pccs.example"], "pccs_url"),
    (["--collateral-bundle", "b.json", "--pccs-url", "https://pccs.example"], "not both"),
    (["--amd-ark", "no-such-ark.pem"], "amd_ark"),
])
def test_a_bad_collateral_option_stops_the_executor_naming_it(args, named, tmp_path: Path):
    port_file = tmp_path / "port"
    done = run_cli("executor", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                   *args, timeout=60)
    assert done.returncode != 0
    assert named in done.stderr + done.stdout
    assert not port_file.exists()  # it never served


def test_peer_verifiers_names_a_bad_bundle(tmp_path: Path):
    bad = tmp_path / "bundle.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bundle.json"):
        peer_verifiers(str(bad), None, None)
