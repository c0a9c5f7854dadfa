"""The models (logistic and linear regression, XGBoost) and vertical training against the same
computation done in plaintext in one process, on datasets shipped with scikit-learn that nobody
here made: breast cancer split by rows between two hospitals, diabetes split by rows and by
columns.

Tolerances, stated once:
- logistic regression (L-BFGS, tol 1e-10): coefficients, intercept, metrics within 1e-6 absolute;
- linear regression (streamed normal equations vs scikit-learn's lstsq/Cholesky): coefficients,
  intercept, RMSE, R² within 1e-6 relative (1e-9 absolute for values near zero);
- XGBoost (one thread, hist): predictions of the booster restored from the returned JSON and of
  the plaintext booster within 1e-6; metrics within 1e-9.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import xgboost
from sklearn.datasets import load_breast_cancer, load_diabetes

from teeflow import compute
from teeflow import plaintext as reference
from teeflow.compute.params import Param, parse_params
from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch

LOGREG_TOL = 1e-6
LINREG_REL = 1e-6
LINREG_ABS = 1e-9
XGB_PRED_TOL = 1e-6
XGB_METRIC_TOL = 1e-9


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    """Breast cancer data, features standardized, column names snake_case, label 0/1."""
    data = load_breast_cancer(as_frame=True)
    x = data.data
    x = (x - x.mean()) / x.std(ddof=0)
    x.columns = [c.replace(" ", "_") for c in x.columns]
    return x.assign(target=data.target.astype("int64"))


@pytest.fixture(scope="module")
def diabetes() -> pd.DataFrame:
    """Diabetes data in its original units (age in years, sex 1/2, ...), target a float."""
    return load_diabetes(as_frame=True, scaled=False).frame.astype("float64")


def _by_rows(df: pd.DataFrame, cut: int) -> list[tuple[str, pa.Table]]:
    return [
        ("hospital_a", pa.Table.from_pandas(df.iloc[:cut], preserve_index=False)),
        ("hospital_b", pa.Table.from_pandas(df.iloc[cut:], preserve_index=False)),
    ]


def _run(name: str, inputs, raw: dict[str, str]) -> dict:
    comp = compute.get(name)
    params = comp.check_params(raw)
    comp.check_schemas({ds: t.schema for ds, t in inputs}, params)
    result = comp.run(inputs, params)
    json.loads(json.dumps(result, allow_nan=False))  # JSON-ready
    return result


def _close(got: float, want: float) -> bool:
    return got == pytest.approx(want, rel=LINREG_REL, abs=LINREG_ABS)


def _assert_linreg(got: dict, want: dict) -> None:
    assert got["features"] == want["features"]
    for f in want["features"]:
        assert _close(got["coefficients"][f], want["coefficients"][f]), f
    assert _close(got["intercept"], want["intercept"])
    for part in ("metrics", "test_metrics"):
        assert (part in got) == (part in want)
        if part in want:
            assert got[part].keys() == want[part].keys()
            for m, v in want[part].items():
                assert _close(got[part][m], v), (part, m)
    assert (got["n_samples"], got["n_train"], got["n_test"]) == (
        want["n_samples"], want["n_train"], want["n_test"]
    )


def _restore(model: dict):
    booster = xgboost.Booster()
    booster.load_model(bytearray(json.dumps(model), "utf-8"))
    return booster


def _assert_xgb(got: dict, want: dict) -> None:
    assert got["features"] == want["features"]
    pred = _restore(got["model"]).predict(xgboost.DMatrix(want["x"]))
    assert np.abs(pred - want["predictions"]).max() <= XGB_PRED_TOL
    for part in ("metrics", "test_metrics"):
        assert got[part] == pytest.approx(want[part], abs=XGB_METRIC_TOL)
    assert (got["n_samples"], got["n_train"], got["n_test"]) == (
        want["n_samples"], want["n_train"], want["n_test"]
    )


# --- declarative parameters -----------------------------------------------------------------


def test_param_types_and_bounds():
    params = (
        Param("n", "int", default=3, low=1, high=10),
        Param("f", "float", default=0.0, low=0.0, high=1.0, high_open=True),
        Param("k", "int", default=1, low=0),
        Param("b", "bool", default=False),
        Param("s", "str", default="x", choices=("x", "y")),
        Param("cols", "list[str]"),
        Param("odd", "int", default=1, check=lambda v: None if v % 2 else "must be odd"),
    )
    assert parse_params("t", params, {}) == {
        "n": 3, "f": 0.0, "k": 1, "b": False, "s": "x", "cols": None, "odd": 1
    }
    got = parse_params(
        "t", params,
        {"n": " 10", "f": "0.25", "b": "Yes", "s": "y", "cols": "a, b", "odd": "7"},
    )
    assert got == {"n": 10, "f": 0.25, "k": 1, "b": True, "s": "y", "cols": ["a", "b"], "odd": 7}
    for raw, match in [
        ({"n": "11"}, "'n': must be between 1 and 10, got 11"),
        ({"n": "x"}, "'n': not an integer"),
        ({"k": "-1"}, "'k': must be an integer >= 0, got -1"),
        ({"f": "1"}, r"'f': must be a finite number >= 0 and < 1, got '1'"),
        ({"f": "inf"}, "'f': must be a finite number"),
        ({"b": "maybe"}, "'b': not a boolean"),
        ({"s": "z"}, "'s': must be one of x, y; got 'z'"),
        ({"cols": "a,,b"}, "'cols': empty column name"),
        ({"odd": "4"}, "'odd': must be odd"),
        ({"n": 3}, "'n': must be a string, got int"),
        ({"zz": "1"}, r"'zz': unknown parameter for t \(accepted: n, f, k, b, s, cols, odd\)"),
    ]:
        with pytest.raises(ParameterError, match=match):
            parse_params("t", params, raw)
    with pytest.raises(ValueError, match="unknown type"):
        Param("x", "complex")


@pytest.mark.parametrize("name", ["logistic_regression", "linear_regression", "xgboost"])
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"label": "y", "test_fraction": "1"}, "'test_fraction': must be a finite number >= 0"),
        ({"label": "y", "test_fraction": "-0.1"}, "'test_fraction'"),
        ({"label": "y", "seed": "-1"}, "'seed': must be between 0 and"),
        ({"label": "y", "features": "a,y"}, "'features': includes the label"),
        ({"features": "a"}, "'label': required"),
    ],
)
def test_model_parameter_errors(name, raw, match):
    with pytest.raises(ParameterError, match=match):
        compute.get(name).check_params(raw)


def test_model_specific_parameter_errors():
    with pytest.raises(ParameterError, match="'alpha': must be a finite number >= 0"):
        compute.get("linear_regression").check_params({"label": "y", "alpha": "-1"})
    xgb = compute.get("xgboost")
    with pytest.raises(ParameterError, match="'objective': must be one of binary:logistic"):
        xgb.check_params({"label": "y", "objective": "multi:softmax"})
    with pytest.raises(ParameterError, match="'eta': must be a finite number > 0 and <= 1"):
        xgb.check_params({"label": "y", "eta": "0"})
    with pytest.raises(ParameterError, match="'max_depth': must be between 1 and 20"):
        xgb.check_params({"label": "y", "max_depth": "50"})
    with pytest.raises(ParameterError, match="'C': unknown parameter for xgboost"):
        xgb.check_params({"label": "y", "C": "1"})
    assert xgb.check_params({"label": "y"})["n_estimators"] == 100


# --- logistic regression, breast cancer by rows ---------------------------------------------


def test_logreg_held_out_split_matches_plaintext(cancer):
    got = _run("logistic_regression", _by_rows(cancer, 300),
               {"label": "target", "test_fraction": "0.25", "seed": "7", "C": "0.5"})
    want = reference.plaintext_logistic_regression(
        cancer, "target", C=0.5, test_fraction=0.25, seed=7
    )
    assert (got["n_samples"], got["n_train"], got["n_test"]) == (569, 426, 143)
    assert got["coefficients"] == pytest.approx(want["coefficients"], abs=LOGREG_TOL)
    assert got["intercept"] == pytest.approx(want["intercept"], abs=LOGREG_TOL)
    for part in ("metrics", "test_metrics"):
        assert got[part] == pytest.approx(want[part], abs=LOGREG_TOL)
    assert got["test_metrics"]["accuracy"] > 0.93 and got["test_metrics"]["auc"] > 0.98
    # Another seed holds out other rows.
    other = _run("logistic_regression", _by_rows(cancer, 300),
                 {"label": "target", "test_fraction": "0.25", "seed": "8", "C": "0.5"})
    assert other["intercept"] != got["intercept"]
    # No split: no test metrics, all rows train.
    full = _run("logistic_regression", _by_rows(cancer, 300), {"label": "target"})
    assert "test_metrics" not in full and full["n_train"] == 569 and full["n_test"] == 0


def test_split_must_leave_training_rows(cancer):
    tiny = cancer.iloc[:4]
    with pytest.raises(ComputeError, match="test_fraction 0.9 leaves no rows to train on"):
        _run("logistic_regression", _by_rows(tiny, 2), {"label": "target", "test_fraction": "0.9"})


# --- linear regression, diabetes by rows ----------------------------------------------------


def test_linreg_matches_sklearn(diabetes):
    got = _run("linear_regression", _by_rows(diabetes, 200), {"label": "target"})
    want = reference.plaintext_linear_regression(diabetes, "target")
    _assert_linreg(got, want)
    assert got["rank"] == 10 and got["alpha"] == 0.0
    assert 0.5 < got["metrics"]["r2"] < 0.53  # the well-known fit of this data set


def test_linreg_ridge_and_split_match_sklearn(diabetes):
    raw = {"label": "target", "features": "bmi,bp,s5,age", "alpha": "2.5",
           "test_fraction": "0.2", "seed": "11"}
    got = _run("linear_regression", _by_rows(diabetes, 100), raw)
    want = reference.plaintext_linear_regression(
        diabetes, "target", ["bmi", "bp", "s5", "age"], alpha=2.5, test_fraction=0.2, seed=11
    )
    _assert_linreg(got, want)
    assert got["n_test"] == 89


def test_linreg_streams_batches(diabetes):
    """Many small record batches (and an empty one) give the same fit as one batch."""
    whole = _run("linear_regression", _by_rows(diabetes, 200),
                 {"label": "target", "test_fraction": "0.3"})
    tables = []
    for ds, t in _by_rows(diabetes, 200):
        batches = t.to_batches(max_chunksize=17)
        tables.append((ds, pa.Table.from_batches([batches[0].slice(0, 0), *batches])))
    assert tables[0][1].column(0).num_chunks > 10
    streamed = _run("linear_regression", tables, {"label": "target", "test_fraction": "0.3"})
    _assert_linreg(streamed, whole)


def test_linreg_collinear_features_min_norm(diabetes):
    df = diabetes.assign(bmi2=diabetes["bmi"], bias=1.0)
    got = _run("linear_regression", _by_rows(df, 200), {"label": "target"})
    want = reference.plaintext_linear_regression(df, "target")
    assert got["rank"] == 10  # bmi2 duplicates bmi; a constant adds nothing to the intercept
    assert _close(got["coefficients"]["bmi"], got["coefficients"]["bmi2"])
    _assert_linreg(got, want)


def test_linreg_bad_data(diabetes):
    df = diabetes.assign(target=diabetes["target"].astype("float64"))
    df.loc[250, "target"] = np.inf
    with pytest.raises(ComputeError, match="'hospital_b': label column 'target' has a non-finite"):
        _run("linear_regression", _by_rows(df, 200), {"label": "target"})
    strings = diabetes.assign(target=diabetes["target"].astype(str))
    with pytest.raises(SchemaMismatch, match="label column 'target' has type (large_)?string"):
        _run("linear_regression", _by_rows(strings, 200), {"label": "target"})


# --- XGBoost, breast cancer and diabetes by rows --------------------------------------------


def test_xgboost_binary_matches_plaintext(cancer):
    raw = {"label": "target", "n_estimators": "15", "max_depth": "3", "eta": "0.5",
           "test_fraction": "0.2", "seed": "5"}
    got = _run("xgboost", _by_rows(cancer, 300), raw)
    want = reference.plaintext_xgboost(
        cancer, "target", n_estimators=15, max_depth=3, eta=0.5, test_fraction=0.2, seed=5
    )
    _assert_xgb(got, want)
    assert got["classes"] == [0, 1] and got["objective"] == "binary:logistic"
    assert int(got["model"]["learner"]["gradient_booster"]["model"]["gbtree_model_param"][
        "num_trees"]) == 15
    assert got["test_metrics"]["auc"] > 0.97


def test_xgboost_regression_matches_plaintext(diabetes):
    raw = {"label": "target", "objective": "reg:squarederror", "n_estimators": "10",
           "max_depth": "2", "subsample": "0.8", "seed": "3"}
    got = _run("xgboost", _by_rows(diabetes, 150), raw)
    want = reference.plaintext_xgboost(
        diabetes, "target", objective="reg:squarederror", n_estimators=10, max_depth=2,
        subsample=0.8, seed=3,
    )
    assert "test_metrics" not in got and set(got["metrics"]) == {"rmse", "r2"}
    want["test_metrics"] = got["test_metrics"] = {}
    _assert_xgb(got, want)


def test_xgboost_string_label_is_schema_checked(cancer):
    df = cancer.assign(target=np.where(cancer["target"] == 1, "benign", "malignant"))
    got = _run("xgboost", _by_rows(df, 300), {"label": "target", "n_estimators": "2"})
    assert got["classes"] == ["benign", "malignant"]
    with pytest.raises(SchemaMismatch, match="'hospital_a': label column 'target'.*need an int"):
        _run("xgboost", _by_rows(df, 300),
             {"label": "target", "objective": "reg:squarederror"})


# --- vertical: diabetes by columns ------------------------------------------------------------

A_COLS = ["age", "sex", "bmi", "bp", "target"]
B_COLS = ["s1", "s2", "s3", "s4", "s5", "s6"]


def _parties(diabetes: pd.DataFrame, ids: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clinic A holds demographics and the outcome, lab B the blood serum measurements, for
    overlapping but different sets of patients, each in its own row order."""
    rng = np.random.default_rng(42)
    df = diabetes.assign(pid=ids)
    in_a = rng.random(len(df)) < 0.9
    in_b = rng.random(len(df)) < 0.85
    a = df.loc[in_a, ["pid", *A_COLS]].sample(frac=1.0, random_state=1)
    b = df.loc[in_b, [*B_COLS, "pid"]].sample(frac=1.0, random_state=2)
    return a, b


def _vtables(a: pd.DataFrame, b: pd.DataFrame) -> list[tuple[str, pa.Table]]:
    return [("clinic", pa.Table.from_pandas(a, preserve_index=False)),
            ("lab", pa.Table.from_pandas(b, preserve_index=False))]


@pytest.fixture(scope="module")
def vertical_parties(diabetes):
    ids = [f"patient-{i:05d}" for i in np.random.default_rng(0).permutation(len(diabetes))]
    return _parties(diabetes, ids)


def test_vertical_linear_regression(vertical_parties):
    a, b = vertical_parties
    raw = {"id": "pid", "model": "linear_regression", "label": "target",
           "test_fraction": "0.2", "seed": "1"}
    got = _run("vertical", _vtables(a, b), raw)
    want = reference.plaintext_vertical(
        [a, b], "pid", "linear_regression", label="target", test_fraction=0.2, seed=1
    )
    expected_n = len(set(a["pid"]) & set(b["pid"]))
    assert got["intersection_size"] == want["intersection_size"] == expected_n
    assert len(a) > expected_n and len(b) > expected_n  # some IDs are not shared
    assert got["model_name"] == "linear_regression"
    assert got["features"] == ["age", "sex", "bmi", "bp", *B_COLS]
    _assert_linreg(got, want)
    assert "patient-" not in json.dumps(got)  # no ID leaves


def test_vertical_logistic_regression_integer_ids(diabetes):
    df = diabetes.assign(target=(diabetes["target"] > diabetes["target"].median()).astype(int))
    ids = (np.random.default_rng(5).permutation(len(df)) * 7 + 1000).tolist()
    a, b = _parties(df, ids)
    b = b.astype({"pid": "int32"})  # integer widths may differ between parties
    features = "bmi,bp,s1,s5"
    got = _run("vertical", _vtables(a, b),
               {"id": "pid", "model": "logistic_regression", "label": "target",
                "features": features, "C": "0.1"})
    want = reference.plaintext_vertical(
        [a, b.astype({"pid": "int64"})], "pid", "logistic_regression", label="target",
        features=features.split(","), C=0.1,
    )
    assert got["intersection_size"] == want["intersection_size"]
    assert got["coefficients"] == pytest.approx(want["coefficients"], abs=LOGREG_TOL)
    assert got["intercept"] == pytest.approx(want["intercept"], abs=LOGREG_TOL)
    assert got["metrics"] == pytest.approx(want["metrics"], abs=LOGREG_TOL)


def test_vertical_xgboost_three_parties(vertical_parties):
    a, b = vertical_parties
    c = b[["pid", "s5", "s6"]].iloc[::2]  # a third party: fewer patients, two of the columns
    b = b.drop(columns=["s5", "s6"])
    raw = {"id": "pid", "model": "xgboost", "label": "target",
           "objective": "reg:squarederror", "n_estimators": "8", "max_depth": "3",
           "test_fraction": "0.25"}
    inputs = [*_vtables(a, b), ("biobank", pa.Table.from_pandas(c, preserve_index=False))]
    got = _run("vertical", inputs, raw)
    want = reference.plaintext_vertical(
        [a, b, c], "pid", "xgboost", label="target", objective="reg:squarederror",
        n_estimators=8, max_depth=3, test_fraction=0.25,
    )
    assert got["intersection_size"] == want["intersection_size"] == len(
        set(a["pid"]) & set(b["pid"]) & set(c["pid"])
    )
    _assert_xgb(got, want)
    assert "patient-" not in json.dumps(got)


def test_vertical_parameter_errors():
    v = compute.get("vertical")
    for raw, match in [
        ({"model": "xgboost", "label": "y"}, "'id': required"),
        ({"id": "pid", "label": "y"}, "'model': required"),
        ({"id": "pid", "model": "kmeans", "label": "y"}, "'model': must be one of logistic"),
        ({"id": "pid", "model": "xgboost"}, "'label': required"),
        ({"id": "pid", "model": "linear_regression", "label": "y", "C": "1"},
         "'C': unknown parameter for linear_regression"),
        ({"id": "pid", "model": "xgboost", "label": "pid"}, "'label': is the id column"),
        ({"id": "pid", "model": "xgboost", "label": "y", "features": "a,pid"},
         "'features': includes the id column"),
    ]:
        with pytest.raises(ParameterError, match=match):
            v.check_params(raw)
    checked = v.check_params({"id": "pid", "model": "xgboost", "label": "y"})
    assert checked["id"] == "pid" and checked["model_params"]["max_depth"] == 6


def test_vertical_schema_errors(vertical_parties):
    a, b = vertical_parties
    v = compute.get("vertical")
    params = v.check_params({"id": "pid", "model": "linear_regression", "label": "target"})

    def schemas(*frames, names=("clinic", "lab", "third")):
        return {n: pa.Schema.from_pandas(f, preserve_index=False)
                for n, f in zip(names, frames, strict=False)}

    with pytest.raises(SchemaMismatch, match="vertical needs at least 2 dataset"):
        v.check_schemas(schemas(a), params)
    with pytest.raises(SchemaMismatch, match="column 'bp' is in both dataset 'clinic' and dataset "
                                             "'lab'"):
        v.check_schemas(schemas(a, b.assign(bp=1.0)), params)
    with pytest.raises(SchemaMismatch, match="'lab': missing the id column 'pid'"):
        v.check_schemas(schemas(a, b.rename(columns={"pid": "patient"})), params)
    with pytest.raises(ParameterError, match="'id': no column 'pid' in any dataset"):
        v.check_schemas(schemas(a.rename(columns={"pid": "x"}), b.rename(columns={"pid": "x"})),
                        params)
    with pytest.raises(SchemaMismatch, match="'lab': id column 'pid' is int64 but"):
        v.check_schemas(schemas(a, b.assign(pid=np.arange(len(b)))), params)
    with pytest.raises(SchemaMismatch, match="'lab': id column 'pid' has type double"):
        v.check_schemas(schemas(a, b.assign(pid=0.5)), params)
    with pytest.raises(ParameterError, match="'label': no column 'target'"):
        v.check_schemas(schemas(a.drop(columns="target"), b), params)
    with pytest.raises(SchemaMismatch, match="'lab': feature column 's1' has type (large_)?str"):
        v.check_schemas(schemas(a, b.assign(s1="x")),
                        v.check_params({"id": "pid", "model": "linear_regression",
                                        "label": "target", "features": "bmi,s1"}))


def test_vertical_data_errors_name_no_id(vertical_parties):
    a, b = vertical_parties
    raw = {"id": "pid", "model": "linear_regression", "label": "target"}
    dup = pd.concat([b, b.iloc[:3]])
    with pytest.raises(ComputeError, match="'lab': id column 'pid' has duplicate values") as e:
        _run("vertical", _vtables(a, dup), raw)
    assert "patient-" not in str(e.value)
    nulls = b.assign(pid=[None, *b["pid"].iloc[1:]])
    with pytest.raises(ComputeError, match="'lab': column 'pid' has null values$"):
        _run("vertical", _vtables(a, nulls), raw)
    disjoint = b.assign(pid=[f"other-{i}" for i in range(len(b))])
    with pytest.raises(ComputeError, match="fewer IDs than the owners' minimum of 10; "
                                           "nothing is released$"):
        _run("vertical", _vtables(a, disjoint), raw)
    shared = next(iter(set(a["pid"]) & set(b["pid"])))
    outside = next(iter(set(b["pid"]) - set(a["pid"])))
    # nulls are refused in the whole table, inside the intersection or not: the error must
    # not say whether an ID is the other party's
    for pid in (shared, outside):
        bad = b.assign(s3=np.where(b["pid"] == pid, np.nan, b["s3"]))  # NaN → Arrow null
        with pytest.raises(ComputeError, match="'lab': column 's3' has null values$"):
            _run("vertical", _vtables(a, bad), raw)
    bad = b.assign(s3=np.where(b["pid"] == shared, np.inf, b["s3"]))
    with pytest.raises(ComputeError, match="'lab': feature column 's3' has a non-finite value "
                                           r"\(NaN or infinity\)$"):
        _run("vertical", _vtables(a, bad), raw)
    # A bad value outside the intersection is never used.
    ok = b.assign(s3=np.where(b["pid"] == outside, np.inf, b["s3"]))
    assert _run("vertical", _vtables(a, ok), raw)["intersection_size"] > 0
