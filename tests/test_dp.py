"""The DP computations: parameters, contribution bounds, and noise whose mean over many draws
is the truth (pure: no network, no files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from teeflow import compute
from teeflow.compute import dp, dp_aggregate, dp_linreg
from teeflow.core.errors import ParameterError, SchemaMismatch

AGG = compute.get("dp_aggregate")
LIN = compute.get("dp_linear_regression")


def _table(n: int = 400, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"v": rng.uniform(0, 10, n), "g": rng.choice(["a", "b", "c"], n),
                     "pid": [f"p{i % (n // 4)}" for i in range(n)]})


def test_catalog_marks_dp_and_cost():
    assert AGG.differentially_private and LIN.differentially_private
    assert not compute.get("linear_regression").differentially_private
    p = AGG.check_params({"statistic": "count", "epsilon": "0.5"})
    assert AGG.privacy_cost(p) == (0.5, 0.0)


@pytest.mark.parametrize("raw,param", [
    ({"statistic": "count"}, "epsilon"),
    ({"statistic": "count", "epsilon": "0"}, "epsilon"),
    ({"statistic": "count", "epsilon": "-1"}, "epsilon"),
    ({"statistic": "count", "epsilon": "nan"}, "epsilon"),
    ({"statistic": "count", "epsilon": "10.5"}, "epsilon"),  # over the cap
    ({"statistic": "sum", "epsilon": "1", "column": "v"}, "lower"),
    ({"statistic": "sum", "epsilon": "1", "column": "v", "lower": "5", "upper": "5"}, "upper"),
    ({"statistic": "sum", "epsilon": "1", "column": "v", "lower": "0", "upper": "1e13"},
     "upper"),
    ({"statistic": "count", "epsilon": "1", "group_by": "g"}, "categories"),
    ({"statistic": "histogram", "epsilon": "1", "column": "g"}, "categories"),
    ({"statistic": "count", "epsilon": "1", "categories": "a"}, "categories"),
    ({"statistic": "count", "epsilon": "1", "group_by": "g",
      "categories": ",".join(str(i) for i in range(101))}, "categories"),
    ({"statistic": "count", "epsilon": "1", "max_contributions": "3"}, "max_contributions"),
    ({"statistic": "count", "epsilon": "1", "identity": "pid", "max_contributions": "101"},
     "max_contributions"),
    ({"statistic": "median", "epsilon": "1"}, "statistic"),
])
def test_aggregate_bad_params_name_the_parameter(raw, param):
    with pytest.raises(ParameterError, match=f"'{param}'"):
        AGG.check_params(raw)


def test_aggregate_schema_checks_name_the_column():
    schema = _table().schema
    p = AGG.check_params({"statistic": "sum", "epsilon": "1", "column": "g", "lower": "0",
                          "upper": "1"})
    with pytest.raises(SchemaMismatch, match="'g' must be numeric"):
        AGG.precheck({"statistic": "sum", "epsilon": "1", "column": "g", "lower": "0",
                      "upper": "1"}, {"d": schema})
    p = AGG.check_params({"statistic": "count", "epsilon": "1", "identity": "nope"})
    with pytest.raises(SchemaMismatch, match="'nope'"):
        AGG.check_schemas({"d": schema}, p)


def _draws(params: dict[str, str], inputs, n: int) -> list[dict]:
    checked = AGG.check_params(params)
    return [AGG.run(inputs, checked) for _ in range(n)]


def test_noised_count_is_unbiased_with_the_scale_epsilon_asks():
    t = _table()
    results = _draws({"statistic": "count", "epsilon": "1"}, [("a", t), ("b", t)], 400)
    counts = np.array([r["count"] for r in results])
    assert abs(counts.mean() - 800) < 0.3  # se ≈ 1.41/sqrt(400) = 0.07
    assert 0.5 < counts.std() < 3  # discrete Laplace, scale 1: std ≈ 1.4
    assert len(set(counts.tolist())) > 3  # really noised
    assert results[0]["privacy"]["epsilon"] == 1.0
    assert results[0]["privacy"]["differentially_private"] is True


def test_noised_sum_and_mean_are_close_to_the_clamped_truth():
    t = _table(2000)
    v = np.clip(t["v"].to_numpy(), 2, 8)
    sums = [r["sum"] for r in _draws({"statistic": "sum", "epsilon": "2", "column": "v",
                                      "lower": "2", "upper": "8"}, [("a", t)], 300)]
    # Laplace scale 8/2 = 4: se of the mean of 300 draws ≈ 4*1.41/17 = 0.33
    assert abs(np.mean(sums) - v.sum()) < 2.0
    means = [r["mean"] for r in _draws({"statistic": "mean", "epsilon": "1", "column": "v",
                                        "lower": "2", "upper": "8"}, [("a", t)], 100)]
    assert abs(np.mean(means) - v.mean()) < 0.05


def test_histogram_declares_every_category_and_only_those():
    t = _table()
    results = _draws({"statistic": "histogram", "epsilon": "1", "column": "g",
                      "categories": "a,b,zz"}, [("a", t)], 200)
    for r in results:
        assert [g["category"] for g in r["groups"]] == ["a", "b", "zz"]
    truth = {c: int(np.sum(np.asarray(t["g"]) == c)) for c in "ab"}
    for i, cat in enumerate("ab"):
        assert abs(np.mean([r["groups"][i]["count"] for r in results]) - truth[cat]) < 0.5
    assert abs(np.mean([r["groups"][2]["count"] for r in results])) < 0.5  # absent: noise


def test_grouped_mean():
    t = _table(3000)
    r = AGG.run([("a", t)], AGG.check_params({
        "statistic": "mean", "epsilon": "5", "column": "v", "lower": "0", "upper": "10",
        "group_by": "g", "categories": "a,b,c"}))
    assert [g["category"] for g in r["groups"]] == ["a", "b", "c"]
    assert all(4 < g["mean"] < 6 for g in r["groups"])


def test_contributions_are_bounded_per_identity_across_parties():
    # one identity with 1000 rows in each party, and 100 others with one row each
    heavy = pa.table({"pid": ["x"] * 1000 + [f"o{i}" for i in range(100)]})
    bounded = dp.bound_contributions(pa.concat_tables([heavy, heavy]), "pid", 3)
    pids = bounded["pid"].to_pylist()
    assert pids.count("x") == 3 and len(pids) == 3 + 200
    # nulls cannot be bounded: dropped
    nulls = pa.table({"pid": pa.array([None] * 50 + ["a"], pa.string())})
    assert dp.bound_contributions(nulls, "pid", 5).num_rows == 1


def test_outlier_identity_moves_the_count_by_at_most_k():
    base = pa.table({"pid": [f"p{i}" for i in range(500)]})
    attack = pa.concat_tables([base, pa.table({"pid": ["victim"] * 2_000})])
    params = {"statistic": "count", "epsilon": "1", "identity": "pid",
              "max_contributions": "2"}
    # discrete Laplace, scale 2 (k / epsilon): variance about 7.8, so the difference of two
    # means of 1200 draws has sd 0.11; 0.6 is over 5 sd, and still tells k=2 from 1 or 3.
    with_victim = np.mean([r["count"] for r in _draws(params, [("a", attack)], 1200)])
    without = np.mean([r["count"] for r in _draws(params, [("a", base)], 1200)])
    assert abs(with_victim - without - 2) < 0.6


def test_bad_values_never_raise_and_are_left_out():
    t = pa.table({"v": pa.array([1.0, None, float("nan"), float("inf"), 3.0])})
    r = AGG.run([("a", t)], AGG.check_params({"statistic": "sum", "epsilon": "10",
                                              "column": "v", "lower": "0", "upper": "4"}))
    assert isinstance(r["sum"], float)
    empty = t.slice(0, 0)
    r = AGG.run([("a", empty)], AGG.check_params({"statistic": "count", "epsilon": "1"}))
    assert isinstance(r["count"], int)


def test_noise_comes_from_opendp_with_its_accounting():
    # The vector Laplace spends epsilon at sensitivity k whatever the vector's length.
    d = dp.opendp()
    meas = d.m.make_laplace(d.vector_domain(d.atom_domain(T=int)), d.l1_distance(T=int),
                            dp._scale(3, 0.5))
    assert meas.map(3) <= 0.5 * (1 + 1e-6)
    assert dp.sum_sensitivity(-2.0, 5.0, 3) >= 15.0


# -- the DP model ------------------------------------------------------------------------------
def _regression(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 2))
    y = x @ [2.0, -1.0] + 0.5 + rng.normal(0, 0.1, n)
    return pa.table({"x1": x[:, 0], "x2": x[:, 1], "y": y})


LIN_PARAMS = {"label": "y", "features": "x1,x2", "feature_bounds": "-1:1",
              "label_lower": "-4", "label_upper": "4", "alpha": "0"}


def test_dp_linear_regression_recovers_a_strong_signal():
    r = LIN.run([("a", _regression(50_000))], LIN.check_params({**LIN_PARAMS,
                                                                "epsilon": "1"}))
    assert r["coefficients"]["x1"] == pytest.approx(2.0, abs=0.15)
    assert r["coefficients"]["x2"] == pytest.approx(-1.0, abs=0.15)
    assert r["intercept"] == pytest.approx(0.5, abs=0.15)
    assert r["privacy"] == dp.privacy_note(LIN.check_params({**LIN_PARAMS, "epsilon": "1"}),
                                           "laplace")
    assert "metrics" not in r  # metrics over the rows would not be DP


def test_dp_linear_regression_is_noised():
    checked = LIN.check_params({**LIN_PARAMS, "epsilon": "0.5"})
    t = _regression(500)
    coefs = {LIN.run([("a", t)], checked)["coefficients"]["x1"] for _ in range(5)}
    assert len(coefs) == 5


@pytest.mark.parametrize("raw,param", [
    ({"feature_bounds": "1:-1"}, "feature_bounds"),
    ({"feature_bounds": "a:b"}, "feature_bounds"),
    ({"feature_bounds": "-1:1,-1:1,-1:1"}, "feature_bounds"),
    ({"label_lower": "5"}, "label_upper"),
    ({"features": "x1,y"}, "features"),
    ({"epsilon": "20"}, "epsilon"),
])
def test_dp_linear_regression_bad_params(raw, param):
    with pytest.raises(ParameterError, match=f"'{param}'"):
        LIN.check_params({**LIN_PARAMS, "epsilon": "1", **raw})


def test_modules_are_in_the_digest_of_their_shared_code():
    assert "teeflow.compute.dp" in AGG.modules and "teeflow.compute.dp" in LIN.modules
    assert dp_aggregate.NAME == AGG.name and dp_linreg.NAME == LIN.name
