"""A provider config in three steps: read (capped), defaults (one table), check (named field)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from teeflow.attestation.policy import load_policy
from teeflow.core.errors import ConfigError
from teeflow.core.wire import Receiver
from teeflow.provider.config import (
    DEFAULTS,
    MAX_CONFIG,
    DatasetConfig,
    ProviderConfig,
    check_config,
    check_fields,
    load_config,
    read_config,
    with_defaults,
)
from teeflow.provider.consent import ApprovalRule

M = "AB" * 32
POLICY = {"tee_types": ["simulated"], "allow_simulated": True,
          "simulated": {"measurement": [M]}}
RULE = {"compute": ["logistic_regression"], "datasets": ["a"],
        "receivers": [{"sign_key": "k1", "enc_key": "e1"}]}


@pytest.fixture
def doc(tmp_path) -> dict:
    (tmp_path / "a.csv").write_text("x\n1\n")
    return {
        "node": {"name": "alice", "key_file": "alice.key", "scheduler": "http://127.0.0.1:1"},
        "datasets": [{"name": "a", "path": "a.csv"}],
        "policy": copy.deepcopy(POLICY),
        "approve": [copy.deepcopy(RULE)],
    }


TOML = f"""
[node]
name = "alice"
key_file = "keys/alice.pem"
scheduler = "http://127.0.0.1:1"
upload_rows_per_second = 1000

[[datasets]]
name = "a"
path = "a.csv"

[policy]
tee_types = ["simulated"]
allow_simulated = true

[policy.simulated]
measurement = ["{M}"]

[[approve]]
compute = "logistic_regression"
datasets = ["a"]
receivers = [{{sign_key = "k1", enc_key = "e1"}}]
"""


# -- 1. read -----------------------------------------------------------------------------------
def test_load_config_from_a_file(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    path = tmp_path / "alice.toml"
    path.write_text(TOML)
    cfg = load_config(path)
    assert cfg.name == "alice"
    assert cfg.key_file == tmp_path / "keys" / "alice.pem"
    assert cfg.datasets == (DatasetConfig("a", tmp_path / "a.csv"),)
    assert cfg.poll_wait == 20.0
    assert cfg.upload_rows_per_second == 1000.0
    assert cfg.collateral is None and cfg.amd_ark is None
    assert cfg.approve == (ApprovalRule(("logistic_regression",), ("a",),
                                        (Receiver("k1", "e1"),), ()),)
    assert cfg.policy == load_policy(POLICY)


def test_read_is_capped(tmp_path):
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * (MAX_CONFIG + 1))
    with pytest.raises(ConfigError, match=r"^config .*: larger than"):
        read_config(path)


@pytest.mark.parametrize("body", [b"[node\n", b"\xff\xfe = 1\n"])
def test_read_refuses_what_is_not_toml(tmp_path, body):
    path = tmp_path / "bad.toml"
    path.write_bytes(body)
    with pytest.raises(ConfigError, match=r"^config .*: not valid TOML"):
        read_config(path)


def test_read_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config .*nope\.toml"):
        read_config(tmp_path / "nope.toml")


# -- 2. defaults -------------------------------------------------------------------------------
def test_defaults_fill_what_is_left_out(doc):
    del doc["datasets"], doc["approve"]
    filled = with_defaults(doc)
    assert filled["node"]["poll_wait"] == 20.0
    assert filled["datasets"] == [] and filled["approve"] == []


def test_defaults_reach_each_table_of_an_array(doc):
    doc["approve"].append({**RULE, "code_digests": ["cd"]})
    filled = with_defaults(doc)
    assert [r["code_digests"] for r in filled["approve"]] == [[], ["cd"]]


def test_defaults_keep_what_is_given_and_change_no_input(doc):
    doc["node"]["poll_wait"] = 5
    before = copy.deepcopy(doc)
    filled = with_defaults(doc)
    assert doc == before
    assert filled["node"]["poll_wait"] == 5
    filled["approve"].append("x")
    assert with_defaults({})["approve"] == [] == DEFAULTS["approve"]


def test_defaults_do_not_make_a_missing_required_table(doc):
    del doc["node"]
    assert "node" not in with_defaults(doc)
    with pytest.raises(ConfigError, match=r"^node: required table"):
        check_config(doc, base=Path("."))


def test_defaults_leave_wrong_types_for_the_check(doc):
    doc["node"] = "alice"
    doc["approve"] = ["not a table"]
    filled = with_defaults(doc)
    assert filled["node"] == "alice" and filled["approve"] == ["not a table"]


def test_file_defaults_match_a_config_built_in_code(doc, tmp_path):
    del doc["approve"]
    from_file = check_config(doc, base=tmp_path)
    in_code = ProviderConfig(name=from_file.name, key_file=from_file.key_file,
                             scheduler=from_file.scheduler, datasets=from_file.datasets,
                             policy=from_file.policy)
    assert from_file == in_code


# -- 3. check ----------------------------------------------------------------------------------
def test_check_wants_defaults_given(doc, tmp_path):
    # check_fields alone is the third step: it relies on with_defaults having run.
    cfg = check_fields(with_defaults(doc), tmp_path)
    assert cfg == check_config(doc, base=tmp_path)


@pytest.mark.parametrize("change,field", [
    (lambda d: d["node"].update(upload_rows_per_second=0), "node.upload_rows_per_second"),
    (lambda d: d["node"].update(upload_rows_per_second="fast"), "node.upload_rows_per_second"),
    (lambda d: d["node"].update(poll_wait=61), "node.poll_wait"),
    (lambda d: d["node"].update(poll_wait="5"), "node.poll_wait"),
    (lambda d: d["node"].update(key_file=""), "node.key_file"),
    (lambda d: d.update(datasets={"name": "a"}), "datasets"),
    (lambda d: d.update(datasets=["a.csv"]), "datasets[0]"),
    (lambda d: d["datasets"][0].update(name=3), "datasets[0].name"),
    (lambda d: d.update(approve={"compute": "sum"}), "approve"),
    (lambda d: d.update(approve=["sum"]), "approve[0]"),
    (lambda d: d["approve"][0].update(compute=["sum"]), "approve[0].compute"),
    (lambda d: d["approve"][0].update(receivers=["k1"]), "approve[0].receivers[0]"),
    (lambda d: d["approve"][0].update(params={"colour": [1]}), "approve[0].params.colour"),
    (lambda d: d["approve"][0].update(colour="red"), "approve[0].colour"),
    (lambda d: d["approve"][0].pop("compute"), "approve[0].compute"),
    (lambda d: d["approve"][0].update(datasets=[]), "approve[0].datasets"),
    (lambda d: d["approve"][0].update(receivers=[1]), "approve[0].receivers[0]"),
    (lambda d: d["approve"][0].update(receivers=[]), "approve[0].receivers"),
    (lambda d: d["approve"][0].update(code_digests="cd", compute=["xgboost", 2]),
     "approve[0].compute"),
    (lambda d: d["approve"][0].update(code_digests=[1]), "approve[0].code_digests"),
    (lambda d: d["policy"].update(tee_types=[]), "policy.tee_types"),
])
def test_bad_field_is_named(doc, tmp_path, change, field):
    change(doc)
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}:"):
        check_config(doc, base=tmp_path)


def test_a_rule_may_give_code_digests_as_one_string(doc, tmp_path):
    doc["approve"][0]["code_digests"] = "cd"
    assert check_config(doc, base=tmp_path).approve[0].code_digests == ("cd",)
