"""Approval rules that bind parameters (provider/consent.py): a pure function of the rule, the
spec and the owner's key. Every constraint kind, matching and not; every revealing parameter
of every computation left unbound (no match); receivers pinned by both keys; and the config
errors, each naming its field."""

from __future__ import annotations

import hashlib
import re
import types
from typing import Any

import pytest

from teeflow import compute
from teeflow.compute import _from_module
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import ConfigError
from teeflow.provider.consent import ApprovalRule, load_rules
from tests.factories import make_spec, receiver

OWNER, OTHER, INITIATOR, STRANGER = (KeySigner.generate() for _ in range(4))
FP = "f" * 64
QUERY = "SELECT ward, count(*) AS n FROM mine GROUP BY ward"
CODE = "def run(tables):\n    return b'ok'\n"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# One valid task per computation, setting every revealing parameter it can.
SAMPLES: dict[str, dict[str, str]] = {
    "sql": {"query": QUERY, "min_group_size": "20"},
    "user_code": {"code": CODE, "code_sha256": sha(CODE)},
    "logistic_regression": {"label": "y"},
    "linear_regression": {"label": "y"},
    "xgboost": {"label": "y", "max_depth": "3", "min_child_weight": "2", "n_estimators": "10"},
    "vertical": {"id": "pid", "model": "xgboost", "label": "y", "min_intersection": "20",
                 "max_depth": "3", "min_child_weight": "2", "n_estimators": "10"},
    "model_aggregation": {"min_parties": "2"},
    "federated_logistic_regression": {"label": "y", "min_parties": "4"},
    "dp_aggregate": {"statistic": "mean", "column": "age", "lower": "0", "upper": "100",
                     "epsilon": "0.5", "identity": "pid", "max_contributions": "2",
                     "group_by": "ward", "categories": "a,b"},
    "dp_linear_regression": {"label": "y", "features": "a,b", "feature_bounds": "0:1",
                             "label_lower": "0", "label_upper": "1", "epsilon": "1",
                             "identity": "pid", "max_contributions": "1"},
}


def spec(name: str, params: dict[str, str] | None = None,
         receivers: list[wire.Receiver] | None = None, dataset: str = "mine") -> wire.TaskSpec:
    s = make_spec([(dataset, "alice", OWNER, FP), ("theirs", "bob", OTHER, FP)], INITIATOR,
                  name, SAMPLES[name] if params is None else params)
    if receivers is not None:
        s = wire.TaskSpec(**{**s.__dict__, "receivers": tuple(receivers)})
    return s


ME = {"sign_key": INITIATOR.public_key(), "enc_key": INITIATOR.encryption_public_key()}


def rule(name: str | list[str], params: dict[str, Any] | None = None,
         **fields: Any) -> ApprovalRule:
    """A rule loaded from its config form, as a provider reads it."""
    raw = {"compute": [name] if isinstance(name, str) else name, "datasets": ["mine"],
           "receivers": [ME], "params": params or {}, **fields}
    (loaded,) = load_rules([raw])
    return loaded


def binding(name: str, values: dict[str, str]) -> dict[str, Any]:
    """Every revealing parameter of `name` bound to exactly the value in `values` (a text by
    digest), or to its default if `values` leaves it out."""
    comp = compute.get(name)
    out: dict[str, Any] = {}
    for r in comp.revealing:
        param = comp.param(r)
        assert param is not None
        if r not in values:
            out[r] = {"default": True}
        elif param.type == "str" and r in ("query", "code"):
            out[f"{r}_sha256"] = sha(values[r])
        else:
            out[r] = {"values": [values[r]]}
    return out


def matches(r: ApprovalRule, s: wire.TaskSpec) -> bool:
    return r.matches(s, OWNER.public_key())


# -- every computation declares what can reveal rows -------------------------------------------
def test_every_computation_has_a_sample_and_declares_revealing():
    assert sorted(SAMPLES) == compute.names()
    expected = {"sql": {"query", "min_group_size"}, "user_code": {"code"},
                "vertical": {"min_intersection"}, "federated_logistic_regression":
                {"min_parties"}, "model_aggregation": {"min_parties"},
                "dp_aggregate": {"epsilon", "identity", "max_contributions", "column",
                                 "lower", "upper"},
                "dp_linear_regression": {"epsilon", "identity", "max_contributions",
                                         "features", "feature_bounds"}}
    for name in compute.names():
        comp = compute.get(name)
        assert isinstance(comp.revealing, tuple)
        assert expected.get(name, set()) <= set(comp.revealing), name


def test_a_module_without_revealing_is_refused_at_registration():
    from teeflow.compute import logreg

    bare = types.ModuleType("teeflow.compute.bare")
    for attr in ("NAME", "DESCRIPTION", "PARAMS", "check_params", "check_schemas", "run"):
        setattr(bare, attr, getattr(logreg, attr))
    with pytest.raises(ValueError, match="REVEALING"):
        _from_module(bare)
    bare.REVEALING = ("no_such_param",)
    with pytest.raises(ValueError, match="unknown parameter"):
        _from_module(bare)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_rule_binding_every_revealing_parameter_matches(name):
    assert matches(rule(name, binding(name, SAMPLES[name])), spec(name))


@pytest.mark.parametrize("name,param", [(n, r) for n in sorted(SAMPLES)
                                        for r in compute.get(n).revealing])
def test_each_revealing_parameter_left_unbound_means_no_match(name, param):
    full = binding(name, SAMPLES[name])
    partial = {k: v for k, v in full.items() if k.removesuffix("_sha256") != param}
    assert len(partial) == len(full) - 1
    assert not matches(rule(name, partial), spec(name))


def test_a_rule_with_no_params_matches_only_what_reveals_nothing():
    for name in compute.names():
        assert matches(rule(name), spec(name)) == (not compute.get(name).revealing), name


# -- each kind of constraint -------------------------------------------------------------------
def test_values_list_or_table():
    r = rule("sql", {"query": [QUERY, "SELECT 1"], "min_group_size": {"values": [20, 50]}})
    assert matches(r, spec("sql"))
    assert matches(r, spec("sql", {"query": "SELECT 1", "min_group_size": "50"}))
    assert not matches(r, spec("sql", {"query": QUERY, "min_group_size": "21"}))
    assert not matches(r, spec("sql", {"query": QUERY + " AND 1", "min_group_size": "20"}))
    # compared as converted: the surrounding blanks the computation strips do not count
    assert matches(r, spec("sql", {"query": QUERY + " ", "min_group_size": "20"}))
    assert not matches(r, spec("sql", {"query": QUERY}))  # default 10 is not among them


def test_values_are_compared_as_the_computation_converts_them():
    r = rule("federated_logistic_regression", {"min_parties": [4], "final_only": [True]})
    p = {"label": "y", "min_parties": "04", "final_only": "yes"}
    assert matches(r, spec("federated_logistic_regression", p))
    assert not matches(r, spec("federated_logistic_regression", {**p, "final_only": "no"}))
    r = rule("dp_linear_regression", {**binding("dp_linear_regression", SAMPLES[
        "dp_linear_regression"]), "features": [["a", "b"], ["a"]]})
    assert matches(r, spec("dp_linear_regression"))
    assert matches(r, spec("dp_linear_regression", {**SAMPLES["dp_linear_regression"],
                                                    "features": "a"}))
    assert not matches(r, spec("dp_linear_regression", {**SAMPLES["dp_linear_regression"],
                                                        "features": "b,a"}))


def test_digest_of_the_text_as_signed():
    r = rule("sql", {"query_sha256": sha(QUERY), "min_group_size": {"min": 10}})
    assert matches(r, spec("sql"))
    assert not matches(r, spec("sql", {"query": QUERY.replace("count", "sum"),
                                       "min_group_size": "20"}))
    assert not matches(r, spec("sql", {"query": " " + QUERY, "min_group_size": "20"}))
    several = rule("sql", {"query_sha256": [sha("SELECT 1"), sha(QUERY).upper()],
                           "min_group_size": {"min": 10}})
    assert matches(several, spec("sql"))
    code = rule("user_code", {"code_sha256": sha(CODE)})  # binds `code` by its digest
    assert matches(code, spec("user_code"))
    other = "def run(tables):\n    return tables\n"
    assert not matches(code, spec("user_code", {"code": other, "code_sha256": sha(other)}))


def test_any_query_under_the_owners_analysis_rules():
    """`query = {analysis_rules = true}`: any query, but only where each of this owner's
    datasets in the spec carries its analysis rules' digest (which the provider checks is
    its own, and the executor enforces)."""
    r = rule("sql", {"query": {"analysis_rules": True}, "min_group_size": {"default": True}})
    free = spec("sql", {"query": QUERY})
    assert not matches(r, free)  # no rules travel with the spec: nothing to enforce
    ruled = wire.TaskSpec(**{**free.__dict__, "datasets": tuple(
        d if d.owner_key != OWNER.public_key() else wire.DatasetRef(
            **{**d.__dict__, "rules": "a" * 64}) for d in free.datasets)})
    assert matches(r, ruled)
    assert not matches(r, wire.TaskSpec(**{**ruled.__dict__,
                                           "params": {"query": QUERY, "min_group_size": "1"}}))
    with pytest.raises(ConfigError, match=r"^approve\[0\]\.params\.min_group_size"):
        rule("sql", {"query": {"analysis_rules": True},
                     "min_group_size": {"analysis_rules": True}})
    with pytest.raises(ConfigError, match=r"^approve\[0\]\.params\.query"):
        rule("sql", {"query": {"analysis_rules": False}})


def test_bounds():
    base = binding("dp_aggregate", SAMPLES["dp_aggregate"])
    capped = rule("dp_aggregate", {**base, "epsilon": {"max": 0.5}})
    assert matches(capped, spec("dp_aggregate"))
    over = {**SAMPLES["dp_aggregate"], "epsilon": "0.51"}
    assert not matches(capped, spec("dp_aggregate", over))
    floor = rule("sql", {"query_sha256": sha(QUERY), "min_group_size": {"min": 20}})
    assert matches(floor, spec("sql"))
    assert matches(floor, spec("sql", {"query": QUERY, "min_group_size": "1000"}))
    assert not matches(floor, spec("sql", {"query": QUERY, "min_group_size": "19"}))
    assert not matches(floor, spec("sql", {"query": QUERY}))  # default 10 is below
    window = rule("logistic_regression", {"test_fraction": {"min": 0.1, "max": 0.3}})
    assert matches(window, spec("logistic_regression", {"label": "y", "test_fraction": "0.2"}))
    assert not matches(window, spec("logistic_regression", {"label": "y"}))  # default 0
    rounds = rule("federated_logistic_regression", {"min_parties": {"min": 3},
                                                    "rounds": {"max": 20}})
    assert matches(rounds, spec("federated_logistic_regression"))
    assert not matches(rounds, spec("federated_logistic_regression",
                                    {**SAMPLES["federated_logistic_regression"],
                                     "rounds": "21"}))
    # a bound on a parameter left out without a default does not hold
    lower = rule("dp_aggregate", {**base, "lower": {"min": 0}})
    count = {"statistic": "count", "epsilon": "0.5", "identity": "pid",
             "max_contributions": "2"}
    assert not matches(lower, spec("dp_aggregate", count))


def test_subset():
    base = binding("dp_linear_regression", SAMPLES["dp_linear_regression"])
    r = rule("dp_linear_regression", {**base, "features": {"subset": ["a", "b", "c"]}})
    assert matches(r, spec("dp_linear_regression"))
    wider = {**SAMPLES["dp_linear_regression"], "features": "a,d"}
    assert not matches(r, spec("dp_linear_regression", wider))
    models = rule("logistic_regression", {"features": {"subset": ["x1", "x2"]}})
    assert matches(models, spec("logistic_regression", {"label": "y", "features": "x2"}))
    # default features (every numeric column) is not within a subset
    assert not matches(models, spec("logistic_regression", {"label": "y"}))


def test_default():
    r = rule("federated_logistic_regression", {"min_parties": {"default": True}})
    assert matches(r, spec("federated_logistic_regression", {"label": "y"}))
    assert matches(r, spec("federated_logistic_regression", {"label": "y", "min_parties": "3"}))
    assert not matches(r, spec("federated_logistic_regression",
                               {"label": "y", "min_parties": "2"}))
    dp = rule("dp_aggregate", {k: {"default": True} for k in compute.get(
        "dp_aggregate").revealing})
    assert not matches(dp, spec("dp_aggregate"))  # epsilon given: not the (absent) default


def test_a_value_the_computation_refuses_matches_nothing():
    r = rule("sql", {"query_sha256": sha(QUERY), "min_group_size": {"min": 10}})
    assert not matches(r, spec("sql", {"query": QUERY, "min_group_size": "many"}))


def test_constraints_on_other_computations_parameters_are_ignored():
    r = rule(["logistic_regression", "sql"], {"query_sha256": sha(QUERY),
                                              "min_group_size": {"min": 20}})
    assert matches(r, spec("logistic_regression"))
    assert matches(r, spec("sql"))


# -- receivers, datasets, computations ---------------------------------------------------------
def test_receivers_are_pinned_by_both_keys():
    r = rule("logistic_regression")
    good = receiver(INITIATOR)
    assert matches(r, spec("logistic_regression", receivers=[good]))
    swapped_enc = wire.Receiver(good.sign_key, STRANGER.encryption_public_key())
    assert not matches(r, spec("logistic_regression", receivers=[swapped_enc]))
    swapped_sign = wire.Receiver(STRANGER.public_key(), good.enc_key)
    assert not matches(r, spec("logistic_regression", receivers=[swapped_sign]))
    assert not matches(r, spec("logistic_regression", receivers=[good, receiver(STRANGER)]))


def test_computation_dataset_and_code_digest():
    r = rule("logistic_regression")
    assert not matches(r, spec("linear_regression"))
    assert not matches(r, spec("logistic_regression", dataset="another"))
    assert matches(r, spec("logistic_regression"))  # bob's dataset is bob's to approve
    pinned = rule("logistic_regression", code_digests=["0" * 64])
    assert not matches(pinned, spec("logistic_regression"))
    ours = rule("logistic_regression",
                code_digests=[compute.get("logistic_regression").code_digest])
    assert matches(ours, spec("logistic_regression"))


def test_matching_is_pure():
    r = rule("sql", {"query_sha256": sha(QUERY), "min_group_size": {"min": 10}})
    s = spec("sql")
    before = (r, s.to_dict())
    assert [matches(r, s) for _ in range(3)] == [True] * 3
    assert (r, s.to_dict()) == before


# -- config errors name the field --------------------------------------------------------------
@pytest.mark.parametrize("params,compute_names,field", [
    ({"colour": [1]}, ["sql"], "approve[0].params.colour"),
    ({"nothing_sha256": "0" * 64}, ["sql"], "approve[0].params.nothing_sha256"),
    ({"query": "SELECT 1"}, ["sql"], "approve[0].params.query"),  # bare string: not a list
    ({"query": {"min": 1}}, ["sql"], "approve[0].params.query"),
    ({"min_group_size": {"min": "ten"}}, ["sql"], "approve[0].params.min_group_size.min"),
    ({"min_group_size": {"min": 5, "max": 1}}, ["sql"], "approve[0].params.min_group_size"),
    ({"min_group_size": {"min": 5, "values": [6]}}, ["sql"],
     "approve[0].params.min_group_size"),
    ({"min_group_size": ["ten"]}, ["sql"], "approve[0].params.min_group_size.values[0]"),
    ({"min_group_size": []}, ["sql"], "approve[0].params.min_group_size.values"),
    ({"min_group_size": {"subset": [1]}}, ["sql"], "approve[0].params.min_group_size"),
    ({"features": {"subset": [1]}}, ["logistic_regression"],
     "approve[0].params.features.subset"),
    ({"min_parties": {"default": False}}, ["model_aggregation"],
     "approve[0].params.min_parties.default"),
    ({"query_sha256": "not hex"}, ["sql"], "approve[0].params.query_sha256"),
    ({"min_group_size_sha256": "0" * 64}, ["sql"], "approve[0].params.min_group_size_sha256"),
    ({"query": ["SELECT 1"], "query_sha256": "0" * 64}, ["sql"],
     "approve[0].params.query_sha256"),
    ({"query_sha256": "0" * 64}, ["logistic_regression"], "approve[0].params.query_sha256"),
    ("query", ["sql"], "approve[0].params"),
])
def test_bad_params_are_named(params, compute_names, field):
    raw = {"compute": compute_names, "datasets": ["mine"], "receivers": [ME], "params": params}
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
        load_rules([raw])


@pytest.mark.parametrize("receivers,field", [
    ([INITIATOR.public_key()], "approve[0].receivers[0]"),
    ([{"sign_key": INITIATOR.public_key()}], "approve[0].receivers[0]"),
    ([{**ME, "colour": "red"}], "approve[0].receivers[0]"),
    ([], "approve[0].receivers"),
])
def test_receivers_need_both_keys(receivers, field):
    raw = {"compute": ["logistic_regression"], "datasets": ["mine"], "receivers": receivers}
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
        load_rules([raw])


def test_unknown_computation_is_named():
    with pytest.raises(ConfigError, match=r"^approve\[0\]\.compute: unknown computation"):
        load_rules([{"compute": ["sum"], "datasets": ["mine"], "receivers": [ME]}])


def test_a_toml_rule_loads():
    import tomllib

    text = f"""
[[approve]]
compute = ["sql"]
datasets = ["mine"]
receivers = [{{sign_key = "{ME['sign_key']}", enc_key = "{ME['enc_key']}"}}]

[approve.params]
query_sha256 = "{sha(QUERY)}"
min_group_size = {{min = 20}}
"""
    (r,) = load_rules(tomllib.loads(text)["approve"])
    assert matches(r, spec("sql"))


def test_a_mismatch_says_why_naming_no_value():
    me = OWNER.public_key()
    r = rule("sql", {"query_sha256": sha(QUERY)})
    assert r.mismatch(spec("sql"), me) == (
        "parameter 'min_group_size' can reveal rows and the rule does not bind it")
    floor = rule("sql", {"query_sha256": sha(QUERY), "min_group_size": {"min": 50}})
    assert floor.mismatch(spec("sql"), me) == (
        "parameter 'min_group_size' is outside the rule's range bound")
    swapped = wire.Receiver(INITIATOR.public_key(), STRANGER.encryption_public_key())
    assert rule("logistic_regression").mismatch(
        spec("logistic_regression", receivers=[swapped]), me) == (
        "receiver 0: its enc_key is not the pinned one")
    assert rule("logistic_regression").mismatch(spec("xgboost"), me) == (
        "computation 'xgboost' is not in the rule")
    assert QUERY not in str(floor.mismatch(spec("sql", {"query": QUERY + " x"}), me))


def test_a_constraint_of_unknown_kind_allows_nothing():
    from teeflow.provider.consent import Constraint

    param = compute.get("sql").param("min_group_size")
    assert param is not None
    assert not Constraint("rnage").allows(param, "20")
    assert Constraint("range").allows(param, "20")  # no bounds: any number


def test_generated_rules_never_approve_free_text_and_hold_the_rest_to_defaults():
    import tomllib

    from teeflow.cli.cluster import approve_toml

    me = (ME["sign_key"], ME["enc_key"])
    rules = load_rules(tomllib.loads(approve_toml(["mine"], [me]))["approve"])
    named = {n for r in rules for n in r.compute}
    assert "sql" not in named and "user_code" not in named
    for name in compute.names():
        s = spec(name)
        approved = any(matches(r, s) for r in rules)
        # the samples set every revealing parameter away from its default
        assert approved == (not compute.get(name).revealing), name
    assert any(matches(r, spec("federated_logistic_regression", {"label": "y"}))
               for r in rules)
    bound = load_rules(tomllib.loads(approve_toml(["mine"], [me], {"sql": {
        "query_sha256": sha(QUERY), "min_group_size": {"min": 10}}}))["approve"])
    assert any(matches(r, spec("sql")) for r in bound)
    other = spec("sql", {"query": "SELECT * FROM mine", "min_group_size": "20"})
    assert not any(matches(r, other) for r in bound)


def test_a_rule_approves_a_pool_only_up_to_its_max_pool():
    """Each pool member holds a part of the owner's rows: a rule opts in with max_pool."""
    single = spec("linear_regression")
    pooled = wire.TaskSpec(**{**single.__dict__, "pool": 3})
    rule = ApprovalRule(("linear_regression",), ("mine",), (receiver(INITIATOR),))
    assert rule.matches(single, OWNER.public_key())
    assert rule.mismatch(pooled, OWNER.public_key()) == (
        "the task runs across a pool of 3 executors; the rule's max_pool is 1")
    three = ApprovalRule(("linear_regression",), ("mine",), (receiver(INITIATOR),), max_pool=3)
    assert three.matches(pooled, OWNER.public_key()) and three.matches(single,
                                                                       OWNER.public_key())
    four = wire.TaskSpec(**{**single.__dict__, "pool": 4})
    assert not three.matches(four, OWNER.public_key())


@pytest.mark.parametrize("value", [0, 17, "3", True, 2.0])
def test_a_bad_max_pool_is_named(value):
    raw = [{"compute": ["linear_regression"], "datasets": ["mine"],
            "receivers": [{"sign_key": INITIATOR.public_key(),
                           "enc_key": INITIATOR.encryption_public_key()}],
            "params": {}, "code_digests": [], "max_pool": value}]
    with pytest.raises(ConfigError, match=r"approve\[0\]\.max_pool"):
        load_rules(raw)
