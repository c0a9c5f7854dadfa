"""Loading an appraisal policy and a provider config: good tables pass, bad fields are named."""

from __future__ import annotations

import copy
import re

import pytest

from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.core.errors import ConfigError
from teeflow.provider.config import ProviderConfig, check_config

M = "AB" * 32
GOOD = {
    "tee_types": ["simulated", "sgx"],
    "allow_simulated": True,
    "allow_debug": False,
    "accepted_tcb_status": ["UpToDate", "SWHardeningNeeded"],
    "refused_advisories": ["INTEL-SA-00615"],
    "simulated": {"measurement": [M]},
    "sgx": {"mrenclave": ["00" * 32, "11" * 32], "mrsigner": "22" * 32, "isv_prod_id": 3,
            "min_isv_svn": 2},
}


def test_good_policy():
    policy = load_policy(copy.deepcopy(GOOD))
    assert isinstance(policy, AppraisalPolicy)
    assert policy.tee_types == ("simulated", "sgx")
    assert policy.allow_simulated is True and policy.allow_debug is False
    assert policy.accepted_tcb_status == ("UpToDate", "SWHardeningNeeded")
    assert policy.refused_advisories == ("INTEL-SA-00615",)
    assert policy.measurements == {
        "simulated": {"measurement": (M.lower(),)},
        "sgx": {"mrenclave": ("00" * 32, "11" * 32), "mrsigner": ("22" * 32,)},
    }
    assert load_policy(policy.to_dict()) == policy


def test_defaults():
    policy = load_policy({"tee_types": ["sgx"], "sgx": {"mrenclave": ["00" * 32]}})
    assert policy.allow_simulated is False
    assert policy.allow_debug is False
    assert policy.accepted_tcb_status == ("UpToDate",)
    assert policy.refused_advisories == ()
    assert policy.isv_prod_id is None and policy.min_isv_svn == 0


def _bad(change: dict, drop: tuple[str, ...] = ()) -> dict:
    raw = copy.deepcopy(GOOD)
    for key in drop:
        raw.pop(key)
    raw.update(change)
    return raw


@pytest.mark.parametrize("raw,field", [
    (_bad({"allow_everything": True}), "policy.allow_everything"),
    (_bad({"tee_types": []}), "policy.tee_types"),
    (_bad({}, drop=("tee_types",)), "policy.tee_types"),
    (_bad({"tee_types": ["sgx", "trustzone"]}), "policy.tee_types"),
    (_bad({"tee_types": "sgx", "sgx": {"mrenclave": 5}}), "policy.sgx.mrenclave"),
    (_bad({"tee_types": [1]}), "policy.tee_types"),
    (_bad({"allow_debug": "no"}), "policy.allow_debug"),
    (_bad({"allow_debug": 0}), "policy.allow_debug"),
    (_bad({"allow_simulated": "yes"}), "policy.allow_simulated"),
    (_bad({"simulated": {"measurement": ["not hex"]}}), "policy.simulated.measurement"),
    (_bad({"sgx": {"mrenclave": ["00" * 32, "zz"]}}), "policy.sgx.mrenclave"),
    (_bad({"sgx": {"mrtd": ["00"]}}), "policy.sgx.mrtd"),
    (_bad({"sgx": ["00"]}), "policy.sgx"),
    (_bad({"allow_simulated": False}), "policy.tee_types"),
    (_bad({}, drop=("allow_simulated",)), "policy.tee_types"),
    (_bad({}, drop=("sgx",)), "policy.sgx"),
    (_bad({"tee_types": ["tdx"]}), "policy.tdx"),
    (_bad({"accepted_tcb_status": [True]}), "policy.accepted_tcb_status"),
    (_bad({"refused_advisories": 7}), "policy.refused_advisories"),
])
def test_bad_policy_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}(:|\s)"):
        load_policy(raw)


def test_policy_not_a_table():
    with pytest.raises(ConfigError, match=r"^exec\.policy: expected a table"):
        load_policy(["sgx"], "exec.policy")


def test_sgx_signer_identity_fields():
    policy = load_policy(copy.deepcopy(GOOD))
    assert (policy.isv_prod_id, policy.min_isv_svn) == (3, 2)
    for bad, field in (({"isv_prod_id": -1}, "isv_prod_id"), ({"min_isv_svn": "1"}, "min_isv_svn"),
                       ({"isv_prod_id": True}, "isv_prod_id")):
        raw = copy.deepcopy(GOOD)
        raw["sgx"].update(bad)
        with pytest.raises(ConfigError, match=rf"^policy\.sgx\.{field}:"):
            load_policy(raw)
    raw = copy.deepcopy(GOOD)
    del raw["sgx"]["isv_prod_id"]
    with pytest.raises(ConfigError, match=r"^policy\.sgx\.isv_prod_id: required with mrsigner"):
        load_policy(raw)
    raw = copy.deepcopy(GOOD)
    raw["accepted_tcb_status"] = ["UptoDate"]
    with pytest.raises(ConfigError, match="unknown status 'UptoDate'"):
        load_policy(raw)


def test_policy_where_prefix():
    with pytest.raises(ConfigError, match=r"^p\.allow_debug:"):
        load_policy(_bad({"allow_debug": "yes"}), "p")


# -- provider config -------------------------------------------------------------------------


@pytest.fixture
def config_doc(tmp_path) -> dict:
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.parquet").write_bytes(b"PAR1")
    return {
        "node": {"name": "alice", "key_file": "alice.key", "scheduler": "http://127.0.0.1:1",
                 "poll_wait": 5},
        "datasets": [{"name": "a", "path": "a.csv"},
                     {"name": "b", "path": str(tmp_path / "sub" / "b.parquet")}],
        "policy": {"tee_types": ["simulated"], "allow_simulated": True,
                   "simulated": {"measurement": [M]}},
    }


def test_good_config(config_doc, tmp_path):
    cfg = check_config(config_doc, base=tmp_path)
    assert isinstance(cfg, ProviderConfig)
    assert cfg.name == "alice"
    assert cfg.key_file == tmp_path / "alice.key"
    assert cfg.scheduler == "http://127.0.0.1:1"
    assert cfg.poll_wait == 5.0
    assert [(d.name, d.path) for d in cfg.datasets] == [
        ("a", tmp_path / "a.csv"), ("b", tmp_path / "sub" / "b.parquet")]
    assert cfg.dataset("b").path.name == "b.parquet"
    assert cfg.dataset("zzz") is None
    assert cfg.policy.tee_types == ("simulated",)


def test_config_defaults(config_doc, tmp_path):
    del config_doc["node"]["poll_wait"]
    del config_doc["datasets"]
    cfg = check_config(config_doc, base=tmp_path)
    assert cfg.poll_wait == 20.0 and cfg.datasets == ()


def _mutate(doc: dict, how: str) -> None:
    if how == "missing node.name":
        del doc["node"]["name"]
    elif how == "empty node.name":
        doc["node"]["name"] = ""
    elif how == "missing node.scheduler":
        del doc["node"]["scheduler"]
    elif how == "missing node":
        del doc["node"]
    elif how == "unknown section":
        doc["executor"] = {}
    elif how == "unknown node field":
        doc["node"]["colour"] = "red"
    elif how == "bad poll_wait":
        doc["node"]["poll_wait"] = 0
    elif how == "missing policy":
        del doc["policy"]
    elif how == "bad policy":
        doc["policy"]["allow_debug"] = "sometimes"
    elif how == "dataset without path":
        del doc["datasets"][1]["path"]
    elif how == "unknown dataset field":
        doc["datasets"][1]["owner"] = "bob"
    elif how == "dataset twice":
        doc["datasets"][1]["name"] = "a"
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how,field", [
    ("missing node.name", "node.name"),
    ("empty node.name", "node.name"),
    ("missing node.scheduler", "node.scheduler"),
    ("missing node", "node"),
    ("unknown section", "executor"),
    ("unknown node field", "node.colour"),
    ("bad poll_wait", "node.poll_wait"),
    ("missing policy", "policy"),
    ("bad policy", "policy.allow_debug"),
    # a path to a missing file is no config error: that dataset alone goes offline
    # (tests/test_dataset_changes.py)
    ("dataset without path", "datasets[1].path"),
    ("unknown dataset field", "datasets[1].owner"),
    ("dataset twice", "datasets"),
])
def test_bad_config_names_the_field(config_doc, tmp_path, how, field):
    _mutate(config_doc, how)
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}:"):
        check_config(config_doc, base=tmp_path)


def test_policy_defaults_are_the_dataclass_defaults():
    # load_policy takes what a table leaves out from AppraisalPolicy, nowhere else.
    policy = load_policy({"tee_types": ["sgx"], "sgx": {"mrenclave": ["00" * 32]}})
    default = AppraisalPolicy()
    assert policy.allow_simulated == default.allow_simulated is False
    assert policy.allow_debug == default.allow_debug is False
    assert policy.accepted_tcb_status == default.accepted_tcb_status == ("UpToDate",)
    assert policy.refused_advisories == default.refused_advisories == ()
    assert policy.min_isv_svn == default.min_isv_svn == 0
    assert policy.isv_prod_id is None


def test_policy_input_is_not_changed():
    raw = {"tee_types": ["sgx"], "sgx": {"mrenclave": ["00" * 32]}}
    before = copy.deepcopy(raw)
    load_policy(raw)
    assert raw == before
