"""The executor's computations against plaintext references, and their error reporting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.datasets import load_breast_cancer

from teeflow import compute
from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch
from teeflow.plaintext import plaintext_fedavg, plaintext_logistic_regression

LOGREG = compute.get("logistic_regression")
FEDAVG = compute.get("model_aggregation")


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    """Breast cancer data, features standardized, column names snake_case, label 0/1."""
    data = load_breast_cancer(as_frame=True)
    x = data.data
    x = (x - x.mean()) / x.std(ddof=0)
    x.columns = [c.replace(" ", "_") for c in x.columns]
    df = x.copy()
    df["target"] = data.target.astype("int64")
    return df


def _tables(df: pd.DataFrame, cut: int = 300) -> list[tuple[str, pa.Table]]:
    return [
        ("hospital_a", pa.Table.from_pandas(df.iloc[:cut], preserve_index=False)),
        ("hospital_b", pa.Table.from_pandas(df.iloc[cut:], preserve_index=False)),
    ]


def _run(comp: compute.Computation, inputs, raw: dict[str, str]) -> dict:
    params = comp.check_params(raw)
    comp.check_schemas({ds: t.schema for ds, t in inputs}, params)
    return comp.run(inputs, params)


# --- registry -----------------------------------------------------------------------------------


def test_registry():
    assert {
        "linear_regression", "logistic_regression", "model_aggregation", "vertical", "xgboost"
    } <= set(compute.names())
    assert compute.names() == sorted(compute.names())
    with pytest.raises(ParameterError, match="'nope'.*linear_regression, logistic_regression"):
        compute.get("nope")
    digest = LOGREG.code_digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest != FEDAVG.code_digest
    assert LOGREG.code_digest is digest  # computed once
    assert [LOGREG.layout, FEDAVG.layout, compute.get("vertical").layout] == [
        "rows", "rows", "columns"
    ]
    assert compute.get("vertical").min_datasets == 2 and LOGREG.min_datasets == 1
    assert compute._optional("no_such_computation") == []  # optional modules may be absent


def test_code_digest_covers_shared_code():
    src = Path(compute.__file__).parent
    shared = ["errors.py", "columns.py", "metrics.py", "params.py", "rows.py"]
    assert [Path(p).name for p in LOGREG.sources] == ["logreg.py", *shared]
    assert [Path(p).name for p in compute.get("vertical").sources] == [
        "vertical.py", "errors.py", "columns.py", "params.py", "logreg.py", "metrics.py",
        "rows.py",
        "linreg.py", "xgb.py"
    ]
    h = hashlib.sha256()
    for module, name in zip(LOGREG.modules, ("logreg.py", *shared), strict=True):
        data = (src / name).read_bytes()
        h.update(b"%d:%s%d:" % (len(module), module.encode(), len(data)) + data)
    assert LOGREG.code_digest == h.hexdigest()


def test_describe_is_json_ready():
    listing = compute.describe_all()
    assert [d["name"] for d in listing] == compute.names()
    json.dumps(listing)
    d = LOGREG.describe()
    assert d["layout"] == "rows" and d["code_digest"] == LOGREG.code_digest
    params = {p["name"]: p for p in d["params"]}
    assert params["label"]["required"] and params["label"]["type"] == "str"
    assert params["C"] == {
        "name": "C", "type": "float", "required": False, "default": 1.0,
        "help": "inverse regularisation strength, as in scikit-learn",
        "min": 0.0, "min_exclusive": True,
    }
    assert params["features"]["type"] == "list[str]" and params["features"]["default"] is None
    assert params["test_fraction"]["max"] == 1.0 and params["test_fraction"]["max_exclusive"]
    vertical = compute.get("vertical").describe()
    assert [p["name"] for p in vertical["params"]] == ["id", "model", "min_intersection"]
    assert set(vertical["model_params"]) == {"logistic_regression", "linear_regression", "xgboost"}
    assert [p["name"] for p in FEDAVG.describe()["params"]] == ["min_parties"]


def test_too_few_datasets():
    with pytest.raises(SchemaMismatch, match="model_aggregation needs at least 1 dataset"):
        FEDAVG.check_schemas({}, {})
    with pytest.raises(SchemaMismatch, match="model_aggregation needs at least 1 dataset"):
        FEDAVG.run([], {})


# --- logistic regression ------------------------------------------------------------------------


def test_logreg_matches_plaintext(cancer):
    inputs = _tables(cancer)
    got = _run(LOGREG, inputs, {"label": "target"})
    want = plaintext_logistic_regression(cancer, "target")

    assert got["features"] == want["features"] == [c for c in cancer.columns if c != "target"]
    assert got["classes"] == [0, 1]
    assert got["n_samples"] == len(cancer) == 569
    assert got["converged"]
    for f in want["features"]:
        assert got["coefficients"][f] == pytest.approx(want["coefficients"][f], abs=1e-6)
    assert got["intercept"] == pytest.approx(want["intercept"], abs=1e-6)
    for m in ("accuracy", "log_loss", "auc"):
        assert got["metrics"][m] == pytest.approx(want["metrics"][m], abs=1e-6)
    assert got["metrics"]["accuracy"] > 0.95 and got["metrics"]["auc"] > 0.99
    json.dumps(got)  # JSON-serializable

    # Independently of scikit-learn: the solution is a stationary point of
    # C * sum(log loss) + ||w||^2 / 2 (intercept unpenalized).
    x = cancer[want["features"]].to_numpy()
    y = cancer["target"].to_numpy()
    w = np.array([got["coefficients"][f] for f in want["features"]])
    p = 1 / (1 + np.exp(-(x @ w + got["intercept"])))
    assert np.abs(x.T @ (p - y) + w).max() < 1e-5
    assert abs((p - y).sum()) < 1e-5


def test_logreg_features_c_and_string_labels(cancer):
    features = ["mean_radius", "mean_texture", "worst_area"]
    df = cancer.assign(diagnosis=np.where(cancer["target"] == 1, "benign", "malignant"))
    df = df.drop(columns="target")
    raw = {"label": "diagnosis", "features": " mean_radius, mean_texture,worst_area", "C": "0.5"}
    got = _run(LOGREG, _tables(df, cut=100), raw)
    assert got["classes"] == ["benign", "malignant"]
    assert got["features"] == features

    ref = df.assign(y=(df["diagnosis"] == "malignant").astype("int64"))
    want = plaintext_logistic_regression(ref, "y", features=features, C=0.5)
    for f in features:
        assert got["coefficients"][f] == pytest.approx(want["coefficients"][f], abs=1e-6)
    assert got["intercept"] == pytest.approx(want["intercept"], abs=1e-6)


def test_logreg_tolerates_column_order_and_chunks(cancer):
    (a, ta), (b, tb) = _tables(cancer)
    tb = tb.select(list(reversed(tb.column_names)))
    ta = pa.concat_tables([ta.slice(0, 50), ta.slice(50)])  # multi-chunk columns
    got = _run(LOGREG, [(a, ta), (b, tb)], {"label": "target"})
    want = _run(LOGREG, _tables(cancer), {"label": "target"})
    assert got["coefficients"] == pytest.approx(want["coefficients"], abs=1e-9)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({}, "'label': required"),
        ({"label": "  "}, "'label': required"),
        ({"label": "target", "C": "abc"}, "'C': not a number"),
        ({"label": "target", "C": "0"}, "'C': must be a finite number > 0"),
        ({"label": "target", "C": "-1"}, "'C': must be a finite number > 0"),
        ({"label": "target", "C": "nan"}, "'C': must be a finite number > 0"),
        ({"label": "target", "max_iter": "1.5"}, "'max_iter': not an integer"),
        ({"label": "target", "max_iter": "0"}, "'max_iter': must be between"),
        ({"label": "target", "features": "a,,b"}, "'features': empty column name"),
        ({"label": "target", "features": "a,b,a"}, r"'features': duplicate column\(s\) \['a'\]"),
        ({"label": "target", "features": "a,target"}, "'features': includes the label"),
        ({"label": "target", "penalty": "l1"}, "'penalty': unknown parameter"),
    ],
)
def test_logreg_parameter_errors(raw, match):
    with pytest.raises(ParameterError, match=match):
        LOGREG.check_params(raw)


def test_logreg_unknown_columns_are_parameter_errors(cancer):
    schemas = {ds: t.schema for ds, t in _tables(cancer)}
    with pytest.raises(ParameterError, match="'label': no column 'outcome'"):
        LOGREG.check_schemas(schemas, LOGREG.check_params({"label": "outcome"}))
    params = LOGREG.check_params({"label": "target", "features": "mean_radius,bogus"})
    with pytest.raises(ParameterError, match="'features': no column 'bogus'"):
        LOGREG.check_schemas(schemas, params)


def test_logreg_schema_mismatch_between_parties(cancer):
    (a, ta), (b, tb) = _tables(cancer)
    params = LOGREG.check_params({"label": "target"})

    renamed = tb.rename_columns(["radius" if c == "mean_radius" else c for c in tb.column_names])
    with pytest.raises(SchemaMismatch, match=r"'hospital_b'.*missing.*'mean_radius'.*extra.*"):
        LOGREG.check_schemas({a: ta.schema, b: renamed.schema}, params)

    retyped = tb.set_column(
        tb.schema.get_field_index("target"), "target", tb["target"].cast(pa.int32())
    )
    with pytest.raises(SchemaMismatch, match="'hospital_b'.*column 'target' is int32, not int64"):
        LOGREG.check_schemas({a: ta.schema, b: retyped.schema}, params)
    with pytest.raises(SchemaMismatch, match="'hospital_b'"):  # run() checks received data too
        LOGREG.run([(a, ta), (b, retyped)], params)


def test_logreg_non_numeric_feature(cancer):
    df = cancer.assign(site=["x"] * len(cancer))
    params = LOGREG.check_params({"label": "target", "features": "mean_radius,site"})
    schemas = {ds: t.schema for ds, t in _tables(df)}
    with pytest.raises(SchemaMismatch, match="feature column 'site' has type (large_)?string"):
        LOGREG.check_schemas(schemas, params)
    # By default, non-numeric columns are simply not features.
    got = _run(LOGREG, _tables(df), {"label": "target"})
    assert "site" not in got["features"]


def test_logreg_non_binary_label(cancer):
    df = cancer.assign(target=np.arange(len(cancer)) % 3)
    with pytest.raises(ComputeError, match="'target' must have exactly two distinct values$"):
        _run(LOGREG, _tables(df), {"label": "target"})
    df = cancer.assign(target=1)
    with pytest.raises(ComputeError, match="'target' must have exactly two distinct values$"):
        _run(LOGREG, _tables(df), {"label": "target"})


def test_logreg_nulls_and_nan(cancer):
    (a, ta), (b, tb) = _tables(cancer)
    i = tb.schema.get_field_index("mean_radius")
    values = tb["mean_radius"].to_pylist()
    values[3] = None
    with_null = tb.set_column(i, "mean_radius", pa.array(values, pa.float64()))
    with pytest.raises(ComputeError, match="'hospital_b': column 'mean_radius' has null values$"):
        _run(LOGREG, [(a, ta), (b, with_null)], {"label": "target"})
    values[3] = float("nan")
    with_nan = tb.set_column(i, "mean_radius", pa.array(values, pa.float64()))
    with pytest.raises(ComputeError, match="'hospital_b': feature column 'mean_radius' has a non"):
        _run(LOGREG, [(a, ta), (b, with_nan)], {"label": "target"})


def test_logreg_non_convergence_is_reported(cancer):
    got = _run(LOGREG, _tables(cancer), {"label": "target", "max_iter": "3"})
    assert got["converged"] is False and got["n_iter"] == 3


# --- federated averaging ------------------------------------------------------------------------


def _party(names, values, n) -> pa.Table:
    return pa.table(
        {
            "name": pa.array(names, pa.string()),
            "value": pa.array(values, pa.float64()),
            "n_samples": pa.array([n] * len(names), pa.int64()),
        }
    )


def test_fedavg_matches_numpy():
    rng = np.random.default_rng(7)
    names = [f"w{i}" for i in range(50)] + ["bias"]
    counts = [120, 3400, 57]
    values = rng.normal(size=(3, len(names)))
    inputs = []
    for k, (n, v) in enumerate(zip(counts, values, strict=True)):
        perm = rng.permutation(len(names))  # row order differs between parties
        inputs.append((f"p{k}", _party([names[j] for j in perm], v[perm], n)))
    # The first party fixes the output order.
    first_order = inputs[0][1]["name"].to_pylist()

    got = _run(FEDAVG, inputs, {})
    expected = (np.array(counts, float)[:, None] * values).sum(axis=0) / sum(counts)
    assert list(got["parameters"]) == first_order
    for j, name in enumerate(names):
        assert got["parameters"][name] == pytest.approx(expected[j], abs=1e-9)
    assert got["n_samples"] == sum(counts) and got["parties"] == 3

    ref = plaintext_fedavg([t.to_pandas() for _, t in inputs])
    assert got["parameters"] == pytest.approx(ref["parameters"], abs=1e-9)
    assert ref["n_samples"] == got["n_samples"] and ref["parties"] == got["parties"]
    json.dumps(got)


def test_fedavg_mismatched_names():
    a = _party(["w0", "w1", "bias"], [1.0, 2.0, 3.0], 10)
    b = _party(["w0", "w2", "bias"], [1.0, 2.0, 3.0], 10)
    with pytest.raises(ComputeError, match="'b': parameter names differ from dataset 'a'$") as e:
        _run(FEDAVG, [("a", a), ("b", b)], {})
    assert "w1" not in str(e.value) and "w2" not in str(e.value)  # the other party's names


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (_party(["w0", "w0"], [1.0, 2.0], 5), "duplicate parameter names$"),
        (_party(["w0"], [1.0], 0), "n_samples must be positive$"),
        (
            pa.table(
                {
                    "name": ["w0", "w1"],
                    "value": [1.0, 2.0],
                    "n_samples": pa.array([5, 6], pa.int64()),
                }
            ),
            "n_samples must be the same in every row",
        ),
        (_party([], [], 5), "no rows"),
        (_party(["w0"], [float("inf")], 5), "non-finite parameter values$"),
    ],
)
def test_fedavg_bad_party(table, match):
    good = _party(["w0"], [1.0], 5)
    with pytest.raises(ComputeError, match=f"'bad'.*{match}"):
        _run(FEDAVG, [("good", good), ("bad", table)], {})


def test_fedavg_schema_and_params():
    with pytest.raises(ParameterError, match="'weights': unknown parameter"):
        FEDAVG.check_params({"weights": "1,2"})
    t = _party(["w0"], [1.0], 5)
    bad = t.set_column(1, "value", t["value"].cast(pa.float32()))
    with pytest.raises(SchemaMismatch, match="'q': column 'value' is float, need float64"):
        FEDAVG.check_schemas({"p": t.schema, "q": bad.schema}, {})
    with pytest.raises(SchemaMismatch, match="'q': missing column 'n_samples'"):
        FEDAVG.check_schemas({"p": t.schema, "q": t.drop_columns(["n_samples"]).schema}, {})
