"""Results as data: tables as Arrow / pandas with their types, models in column order and as
fitted scikit-learn estimators (and an XGBoost booster), list parameters as lists.

The pure tests run a computation as the executor does, put its result through the sealed
plaintext's encoding (sorted-key JSON) and open it as the SDK does; the e2e test goes through
real scheduler, executor and provider processes."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from teeflow import compute
from teeflow import plaintext as reference
from teeflow.attestation.evidence import Claims
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.compute.params import FEATURES, LABEL, param_text
from teeflow.core import wire
from teeflow.core.errors import MissingPackage, ParameterError, ResultKindError
from teeflow.sdk import Client, Result
from teeflow.sdk.results import ordered
from tests.factories import appraisal_policy

FEATS = [f"x{i}" for i in range(12)]  # string order would be x0, x1, x10, x11, x2, ...
CLAIMS = Claims(tee="simulated", measurements={}, debug=False, report_data=b"", simulated=True)


def _opened(name: str, inputs: list[tuple[str, pa.Table]], raw: dict[str, str]) -> Result:
    """Run `name` as the executor does, and open its result as the SDK does."""
    comp = compute.get(name)
    checked = comp.check_params(raw)
    comp.check_schemas({ds: t.schema for ds, t in inputs}, checked)
    value = comp.run(inputs, checked)
    plaintext = wire.compact_json({"compute": name, "result": value})  # as release.py seals
    opened = json.loads(plaintext)
    return Result("t", ordered(opened["result"]), True, "simulated", CLAIMS, plaintext,
                  compute=opened["compute"])


def _model_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATS)))
    w = np.linspace(-1.5, 2.0, len(FEATS))
    y = (x @ w + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    return pd.DataFrame(x, columns=FEATS).assign(y=y)


def _tables(df: pd.DataFrame) -> list[tuple[str, pa.Table]]:
    half = len(df) // 2
    return [(f"party_{i}", pa.Table.from_pandas(part, preserve_index=False))
            for i, part in enumerate((df.iloc[:half], df.iloc[half:]), 1)]


# -- tables -----------------------------------------------------------------------------------

def _typed_inputs() -> list[tuple[str, pa.Table]]:
    """Ward b's ages are all missing; `big` does not fit a double."""
    n = 40
    return [("people", pa.table({
        "ward": pa.array(["a", "b"] * (n // 2)),
        "age": pa.array([20 + i if i % 2 == 0 else None for i in range(n)], pa.int64()),
        "big": pa.array([2**53 + 1] * n, pa.int64()),
    }))]


def test_sql_result_is_its_table_with_types_and_nulls():
    query = ("SELECT ward, count(*) AS n, CAST(sum(age) AS BIGINT) AS total, sum(big) AS big "
             "FROM people GROUP BY ward ORDER BY ward")
    result = _opened("sql", _typed_inputs(), {"query": query, "min_group_size": "5"})
    table = result.to_arrow()
    assert table.column_names == ["ward", "n", "total", "big"]
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("total").type == pa.int64()
    assert table.column("total").to_pylist() == [780, None]
    exact = 20 * (2**53 + 1)  # the JSON rows hold it as a double, the Arrow copy exactly
    assert result.value["rows"][0][3] != exact and table.column("big").to_pylist() == [exact] * 2
    frame = result.to_pandas()
    assert list(frame.columns) == ["ward", "n", "total", "big"]
    assert frame["ward"].tolist() == ["a", "b"] and frame["n"].tolist() == [20, 20]
    assert frame["n"].dtype == np.int64  # no nulls: numpy's int64
    assert str(frame["total"].dtype) == "Int64"  # nulls: still ints, the null missing
    assert frame["total"][0] == 780 and pd.isna(frame["total"][1])
    assert isinstance(result.to_pandas(arrow_dtypes=True)["n"].dtype, pd.ArrowDtype)
    assert result.value["spill"] in ("encrypted", "disabled")  # the run's own note stays


def test_a_table_without_its_arrow_copy_still_reads_from_json():
    result = _opened("sql", _typed_inputs(),
                     {"query": "SELECT ward, count(*) AS n FROM people GROUP BY ward",
                      "min_group_size": "5"})
    old = Result("t", {k: v for k, v in result.value.items() if k != "arrow"}, True,
                 "simulated", CLAIMS, b"", compute="sql")
    assert old.to_arrow().column_names == ["ward", "n"]
    assert sorted(old.to_pandas()["n"].tolist()) == [20, 20]


def test_a_tampered_arrow_copy_is_a_named_error():
    result = _opened("sql", _typed_inputs(),
                     {"query": "SELECT ward, count(*) AS n FROM people GROUP BY ward",
                      "min_group_size": "5"})
    bad = Result("t", {**result.value, "arrow": "bm90IGFycm93"}, True, "simulated", CLAIMS,
                 b"", compute="sql")
    with pytest.raises(Exception, match="'arrow': not an Arrow IPC stream"):
        bad.to_arrow()


def test_a_user_code_table_reads_back_and_bytes_are_not_a_table():
    from teeflow.compute.usercode import table_json

    table = pa.table({"k": pa.array([1, None, 3], pa.int32()), "s": ["a", None, "c"]})
    value = {"kind": "table", **table_json(table), "code_sha256": "00"}
    result = Result("t", value, True, "simulated", CLAIMS, b"", compute="user_code")
    assert result.to_arrow().equals(table)
    assert str(result.to_pandas()["k"].dtype) == "Int32"
    raw = Result("t", {"kind": "bytes", "base64": "AA=="}, True, "simulated", CLAIMS, b"",
                 compute="user_code")
    with pytest.raises(ResultKindError, match="not a table"):
        raw.to_arrow()


def test_polars_when_installed_or_a_named_error(monkeypatch):
    result = _opened("sql", _typed_inputs(),
                     {"query": "SELECT ward, count(*) AS n FROM people GROUP BY ward",
                      "min_group_size": "5"})
    real_import = builtins.__import__

    def no_polars(name, *args, **kwargs):
        if name == "polars":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_polars)
    with pytest.raises(MissingPackage, match="polars"):
        result.to_polars()


def test_a_model_is_not_a_table_and_a_table_not_a_model():
    df = _model_frame(200, 1)
    model = _opened("logistic_regression", _tables(df), {"label": "y"})
    with pytest.raises(ResultKindError, match="not a table"):
        model.to_arrow()
    table = _opened("sql", _typed_inputs(),
                    {"query": "SELECT count(*) AS n FROM people", "min_group_size": "5"})
    with pytest.raises(ResultKindError, match="not a model"):
        table.to_sklearn()
    with pytest.raises(ResultKindError, match="not an xgboost model"):
        model.to_booster()


# -- models -----------------------------------------------------------------------------------

def test_coefficients_in_column_order_after_sorted_json():
    df = _model_frame(400, 2)
    result = _opened("logistic_regression", _tables(df), {"label": "y"})
    assert list(result.value["coefficients"]) == FEATS
    assert result.to_pandas()["name"].tolist() == [*FEATS, "intercept"]
    assert result.features() == FEATS
    fed = ordered({"parameters": {"b": 1.0, "a": 2.0}, "names": ["b", "a"]})
    assert list(fed["parameters"]) == ["b", "a"]
    # names that do not match the mapping leave it as it is
    odd = ordered({"coefficients": {"a": 1.0, "b": 2.0}, "features": ["b"]})
    assert list(odd["coefficients"]) == ["a", "b"]


def test_logistic_regression_to_sklearn_predicts_as_the_plaintext_model():
    df = _model_frame(600, 3)
    result = _opened("logistic_regression", _tables(df), {"label": "y"})
    est = result.to_sklearn()
    assert list(est.feature_names_in_) == FEATS and est.coef_.shape == (1, len(FEATS))
    assert est.classes_.tolist() == [0, 1]
    from sklearn.linear_model import LogisticRegression

    oracle = LogisticRegression(C=1.0, solver="lbfgs", tol=1e-10, max_iter=1000)
    oracle.fit(df[FEATS].to_numpy(), df["y"].to_numpy())
    np.testing.assert_allclose(est.predict_proba(df[FEATS])[:, 1],
                               oracle.predict_proba(df[FEATS].to_numpy())[:, 1], atol=1e-6)
    # columns given in another order are refused by scikit-learn, not silently misread
    with pytest.raises(ValueError):
        est.predict(df[list(reversed(FEATS))])


def test_linear_regression_to_sklearn():
    df = _model_frame(300, 4)
    df["t"] = df[FEATS].to_numpy() @ np.arange(len(FEATS)) + 0.5
    tables = _tables(df.drop(columns="y"))
    result = _opened("linear_regression", tables, {"label": "t"})
    est = result.to_sklearn()
    np.testing.assert_allclose(est.predict(df[FEATS]), df["t"], atol=1e-6)
    ref = reference.plaintext_linear_regression(df.drop(columns="y"), "t")
    assert list(ref["features"]) == FEATS == list(est.feature_names_in_)


def test_xgboost_to_booster_and_classifier():
    xgboost = pytest.importorskip("xgboost")
    df = _model_frame(300, 5)
    result = _opened("xgboost", _tables(df), {"label": "y", "n_estimators": "8"})
    booster = result.to_booster()
    assert booster.feature_names == FEATS
    ref = reference.plaintext_xgboost(df, "y", n_estimators=8)
    frame = df[FEATS]
    probs = booster.predict(xgboost.DMatrix(frame))
    np.testing.assert_allclose(probs, ref["predictions"], atol=1e-6)
    clf = result.to_sklearn()
    assert isinstance(clf, xgboost.XGBClassifier)
    np.testing.assert_allclose(clf.predict_proba(frame)[:, 1], probs, atol=1e-7)
    assert set(clf.predict(frame).tolist()) <= {0, 1}


def test_a_dp_aggregate_by_category_is_a_row_per_category():
    df = _model_frame(200, 6).assign(ward=["a", "b"] * 100)
    result = _opened("dp_aggregate", _tables(df),
                     {"statistic": "count", "group_by": "ward", "categories": "b,a",
                      "epsilon": "1"})
    frame = result.to_pandas()
    assert frame["category"].tolist() == ["b", "a"] and "count" in frame.columns


# -- parameters -------------------------------------------------------------------------------

def test_list_and_native_parameters_become_spec_text():
    assert param_text("features", ["age", "bmi"], FEATURES) == "age,bmi"
    assert param_text("features", ("age",), FEATURES) == "age"
    assert param_text("features", pd.Index(["age", "bmi"]), FEATURES) == "age,bmi"
    assert param_text("features", np.array(["age", "bmi"]), FEATURES) == "age,bmi"
    assert param_text("features", "age,bmi", FEATURES) == "age,bmi"
    assert FEATURES.parse(param_text("features", ["age", "bmi"], FEATURES)) == ["age", "bmi"]
    assert param_text("C", 0.1) == "0.1" and param_text("max_iter", 200) == "200"
    assert param_text("C", np.float64(1e-12)) == "1e-12"
    assert param_text("seed", np.int64(7)) == "7"
    assert param_text("final_only", True) == "true"


@pytest.mark.parametrize("name, value, param, message", [
    ("label", ["y"], LABEL, "a list was given, but it takes a str"),
    ("features", "", None, None),  # a string passes through: the parser judges it
    ("features", ["age", 3], FEATURES, "item 1 is a int"),
    ("features", ["age,bmi"], FEATURES, "item 0 is empty or holds a comma"),
    ("features", [], FEATURES, "an empty list"),
    ("features", 3, FEATURES, "takes a list of names, got a int"),
    ("C", float("nan"), None, "not a finite number"),
    ("C", {"a": 1}, None, "a dict is not a parameter value"),
    ("C", None, None, "a NoneType is not a parameter value"),
])
def test_a_parameter_of_the_wrong_shape_is_named(name, value, param, message):
    if message is None:
        assert param_text(name, value, param) == value
        return
    with pytest.raises(ParameterError, match=f"parameter '{name}': {message}"):
        param_text(name, value, param)


def test_the_sdk_signs_list_parameters_as_lists(tmp_path):
    """build_spec through a real scheduler is in the e2e test; here the spec text itself."""
    comp = compute.get("logistic_regression")
    raw = {k: param_text(k, v, comp.param(k)) for k, v in
           {"label": "y", "features": ["x0", "x10", "x2"], "C": 0.5}.items()}
    checked = comp.check_params(raw)
    assert checked["features"] == ["x0", "x10", "x2"] and checked["C"] == 0.5


# -- end to end -------------------------------------------------------------------------------

QUERY = "SELECT ward, count(*) AS n, avg(x0) AS mean_x0 FROM alice_ds GROUP BY ward ORDER BY ward"
BIND = {"sql": {"query_sha256": hashlib.sha256(QUERY.encode()).hexdigest(),
                "min_group_size": {"min": 10}}}


@pytest.mark.e2e
def test_results_as_data_through_a_cluster(tmp_path):
    frames = {"alice": _model_frame(300, 11), "bob": _model_frame(300, 12)}
    parties = []
    for node, df in frames.items():
        path = tmp_path / f"{node}.csv"
        df.assign(ward=np.where(np.arange(len(df)) % 3 == 0, "a", "b")).to_csv(path,
                                                                                index=False)
        parties.append(Party(node, f"{node}_ds", path))
    c = LocalCluster(tmp_path / "cluster")
    try:
        c.start_scheduler()
        c.start_executor()
        for p in parties:
            c.start_provider(p, bind=BIND, poll_wait=1)
        c.wait_for_datasets([p.dataset for p in parties])
        c.wait_for_executor(c.executor_address)
        with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                    name=c.initiator_name) as client:
            sql_task = client.submit(["alice_ds"], None, "sql", {"query": QUERY})
            model_task = client.submit(["alice_ds", "bob_ds"], None, "logistic_regression",
                                       {"label": "y", "features": FEATS})
            assert client.task(model_task["id"])["spec"]["params"]["features"] == \
                ",".join(FEATS)
            client.wait(sql_task["id"], timeout=120)
            table = client.result(sql_task["id"])
            client.wait(model_task["id"], timeout=120)
            model = client.result(model_task["id"])
    finally:
        for proc in c.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        c.stop()

    alice = pd.read_csv(parties[0].path)
    expected = alice.groupby("ward").agg(n=("x0", "size"), mean_x0=("x0", "mean")).reset_index()
    got = table.to_pandas()
    assert list(got.columns) == ["ward", "n", "mean_x0"]
    assert got["ward"].tolist() == expected["ward"].tolist()
    assert got["n"].tolist() == expected["n"].tolist() and got["n"].dtype == np.int64
    np.testing.assert_allclose(got["mean_x0"], expected["mean_x0"], atol=1e-9)
    assert table.to_arrow().schema.field("n").type == pa.int64()

    both = pd.concat([pd.read_csv(p.path) for p in parties], ignore_index=True)
    ref = reference.plaintext_logistic_regression(both, "y", features=FEATS)
    assert list(model.value["coefficients"]) == FEATS == model.features()
    from sklearn.linear_model import LogisticRegression

    oracle = LogisticRegression(C=1.0, solver="lbfgs", tol=1e-10, max_iter=1000)
    oracle.fit(both[FEATS].to_numpy(), both["y"].to_numpy())
    np.testing.assert_allclose(oracle.coef_[0], [ref["coefficients"][f] for f in FEATS])
    est = model.to_sklearn()
    np.testing.assert_allclose(est.predict_proba(both[FEATS])[:, 1],
                               oracle.predict_proba(both[FEATS].to_numpy())[:, 1], atol=1e-6)
    assert (est.predict(both[FEATS]) == oracle.predict(both[FEATS].to_numpy())).all()


def test_a_log_level_that_is_not_one_is_named(monkeypatch):
    from teeflow.cli.common import setup_logging
    from teeflow.core.errors import ConfigError

    monkeypatch.setenv("TEEFLOW_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="TEEFLOW_LOG_LEVEL: one of DEBUG, INFO"):
        setup_logging(False)


def test_every_test_the_threat_model_names_exists():
    """docs/threat-model.md cites `file.py::test`, `::test` (the file named before it) and
    bare `test_name` after a file: each must be a test of that file."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent

    def tests_in(name: str) -> set[str]:
        tree = ast.parse((root / name).read_text())
        return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}

    text = (root.parent / "docs" / "threat-model.md").read_text()
    last, named = None, 0
    for token in re.findall(r"`([^`]+)`", text):
        m = re.fullmatch(r"(test_\w+\.py)?(?:::)?(test_\w+)?", token)
        if not m or not any(m.groups()):
            continue
        file, name = m.groups()
        if file:
            assert (root / file).is_file(), f"threat model names {file}, which does not exist"
            last = file
        if name:
            assert last is not None and name in tests_in(last), \
                f"threat model names {last}::{name}, which is not a test"
            named += 1
    assert named >= 40
