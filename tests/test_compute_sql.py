"""The sql computation: aggregate queries match plaintext; the output policy refuses the rest."""

from __future__ import annotations

import json
import os
import zlib

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.datasets import load_diabetes

from teeflow.compute import sql
from teeflow.compute.sql import session as sql_session
from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch


@pytest.fixture(scope="module")
def diabetes() -> pd.DataFrame:
    """The diabetes data with an id, a sex label and an age band to group by."""
    df = load_diabetes(as_frame=True, scaled=False).frame
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    df["sex_group"] = np.where(df["sex"] == 1, "f", "m")
    df["age_band"] = pd.cut(df["age"], [0, 40, 50, 60, 100], labels=["<40", "40s", "50s", "60+"])
    df["age_band"] = df["age_band"].astype(str)
    return df


@pytest.fixture(scope="module")
def by_rows(diabetes) -> list[tuple[str, pa.Table]]:
    """Two hospitals holding different patients (rows)."""
    return [
        ("party_1", pa.Table.from_pandas(diabetes.iloc[:220], preserve_index=False)),
        ("party_2", pa.Table.from_pandas(diabetes.iloc[220:], preserve_index=False)),
    ]


@pytest.fixture(scope="module")
def by_columns(diabetes) -> list[tuple[str, pa.Table]]:
    """Two parties holding different facts (columns) about the same patients."""
    a = diabetes[["id", "sex_group", "age_band", "bmi"]]
    b = diabetes[["id", "bp", "target"]].iloc[::-1]
    return [
        ("clinic", pa.Table.from_pandas(a, preserve_index=False)),
        ("lab", pa.Table.from_pandas(b, preserve_index=False)),
    ]


def _run(inputs, query: str, **extra: str) -> dict:
    params = sql.check_params({"query": query, **extra})
    sql.check_schemas({ds: t.schema for ds, t in inputs}, params)
    out = sql.run(inputs, params)
    json.dumps(out)  # JSON-ready
    return out


# --- results equal plaintext ----------------------------------------------------------------


def test_whole_table_aggregate(by_rows, diabetes):
    got = _run(by_rows, "SELECT count(*) AS n, avg(bmi) AS mean_bmi, sum(target) AS total, "
                        "stddev_samp(bp) AS sd FROM party_1")
    part = diabetes.iloc[:220]
    assert got["columns"] == ["n", "mean_bmi", "total", "sd"]
    [[n, mean_bmi, total, sd]] = got["rows"]
    assert n == 220
    assert mean_bmi == pytest.approx(part["bmi"].mean())
    assert total == pytest.approx(part["target"].sum())
    assert sd == pytest.approx(part["bp"].std(ddof=1))
    assert got["spill"] in ("encrypted", "disabled")


def test_group_by_matches_pandas(by_rows, diabetes):
    got = _run(by_rows, """
        SELECT age_band, sex_group, count(*) AS n, avg(target) AS y, corr(bmi, target) AS r
        FROM party_2 WHERE bp > 70
        GROUP BY age_band, sex_group ORDER BY age_band, sex_group""", min_group_size="5")
    part = diabetes.iloc[220:]
    part = part[part["bp"] > 70]
    want = part.groupby(["age_band", "sex_group"]).agg(
        n=("target", "size"), y=("target", "mean"))
    want["r"] = part.groupby(["age_band", "sex_group"]).apply(
        lambda g: g["bmi"].corr(g["target"]), include_groups=False)
    want = want.reset_index().sort_values(["age_band", "sex_group"])
    assert [r[:2] for r in got["rows"]] == want[["age_band", "sex_group"]].values.tolist()
    assert [r[2] for r in got["rows"]] == want["n"].tolist()
    assert [r[3] for r in got["rows"]] == pytest.approx(want["y"].tolist())
    assert [r[4] for r in got["rows"]] == pytest.approx(want["r"].tolist())


def test_join_across_parties_matches_pandas(by_columns, diabetes):
    query = """
        SELECT c.sex_group, count(*) AS n, avg(l.target) AS y, corr(c.bmi, l.bp) AS r,
               avg(l.target * 2 + c.bmi / 10) AS mix
        FROM clinic AS c JOIN lab AS l ON c.id = l.id
        GROUP BY c.sex_group ORDER BY 1"""
    got = _run(by_columns, query)
    g = diabetes.groupby("sex_group")
    want = pd.DataFrame({
        "n": g.size(), "y": g["target"].mean(),
        "r": g.apply(lambda d: d["bmi"].corr(d["bp"]), include_groups=False),
        "mix": g.apply(lambda d: (d["target"] * 2 + d["bmi"] / 10).mean(), include_groups=False),
    }).reset_index()
    assert got["columns"] == ["sex_group", "n", "y", "r", "mix"]
    assert [r[0] for r in got["rows"]] == want["sex_group"].tolist()
    assert [r[1] for r in got["rows"]] == want["n"].tolist()
    for j, col in ((2, "y"), (3, "r"), (4, "mix")):
        assert [r[j] for r in got["rows"]] == pytest.approx(want[col].tolist())

    # and the same query straight on DuckDB over the plaintext tables agrees
    con = duckdb.connect()
    for name, table in by_columns:
        con.register(name, table)
    assert got["rows"] == [list(r) for r in con.execute(query).fetchall()]


@pytest.mark.parametrize("query", [
    "SELECT sex_group, count(*) FROM party_1 GROUP BY ALL ORDER BY ALL",
    "SELECT sex_group AS s, count(*) FROM party_1 GROUP BY s ORDER BY s",
    "SELECT sex_group, count(*) FROM party_1 GROUP BY 1 ORDER BY 1",
    'SELECT "sex_group", COUNT(*) FROM "party_1" GROUP BY sex_group ORDER BY 1 LIMIT 5',
])
def test_group_by_spellings(by_rows, diabetes, query):
    got = _run(by_rows, query)
    want = diabetes.iloc[:220].groupby("sex_group").size()
    assert got["rows"] == [[k, int(v)] for k, v in want.items()]


def test_group_keys_only_and_expressions(by_rows, diabetes):
    got = _run(by_rows, "SELECT age_band FROM party_1 GROUP BY age_band ORDER BY 1")
    assert [r[0] for r in got["rows"]] == sorted(diabetes.iloc[:220]["age_band"].unique())
    got = _run(by_rows, "SELECT bmi > 30 AS obese, round(avg(target), 1) AS y, "
                        "count(*) * 100.0 / 220 AS pct FROM party_1 GROUP BY bmi > 30 ORDER BY 1")
    part = diabetes.iloc[:220]
    want = part.groupby(part["bmi"] > 30)["target"].agg(["mean", "size"])
    assert [r[0] for r in got["rows"]] == [False, True]
    assert [r[1] for r in got["rows"]] == pytest.approx(want["mean"].round(1).tolist())
    assert [r[2] for r in got["rows"]] == pytest.approx((want["size"] * 100 / 220).tolist())


def test_rollup_groups_are_checked_too(by_rows):
    got = _run(by_rows, "SELECT sex_group, count(*) FROM party_1 GROUP BY ROLLUP (sex_group) "
                        "ORDER BY 1 NULLS LAST")
    assert got["rows"][-1] == [None, 220]
    with pytest.raises(ComputeError, match="fewer than min_group_size"):
        _run(by_rows, "SELECT id < 3 AS few, count(*) FROM party_1 GROUP BY ROLLUP (id < 3)")


# --- the group-size rule ------------------------------------------------------------------------


def test_small_group_refused_without_quoting_data(by_rows):
    with pytest.raises(ComputeError) as err:
        _run(by_rows, "SELECT id < 3 AS few, count(*), avg(target) FROM party_1 GROUP BY id < 3")
    assert str(err.value) == (
        "sql output policy: an output group counts fewer than min_group_size=10 input rows of "
        "dataset 'party_1'; nothing is returned"
    )
    # the same groups pass when the threshold allows them, or when HAVING drops the small one
    got = _run(by_rows, "SELECT id < 3 AS few, count(*) FROM party_1 GROUP BY id < 3 ORDER BY 1",
               min_group_size="3")
    assert got["rows"] == [[False, 217], [True, 3]]
    got = _run(by_rows, "SELECT id < 3, count(*) FROM party_1 GROUP BY id < 3 "
                        "HAVING count(*) >= 10")
    assert got["rows"] == [[False, 217]]


def test_query_without_group_by_is_one_group(by_rows):
    with pytest.raises(ComputeError, match="fewer than min_group_size=10"):
        _run(by_rows, "SELECT count(*), avg(bmi) FROM party_1 WHERE id < 5")
    with pytest.raises(ComputeError, match="fewer than min_group_size=10"):
        _run(by_rows, "SELECT avg(bmi) FROM party_1 WHERE id < 0")  # no row at all
    assert _run(by_rows, "SELECT count(*) FROM party_1 WHERE id < 10")["rows"] == [[10]]


def test_join_counts_rows_of_each_dataset(by_columns):
    # 442 joined rows per group, but all from only 2 rows of the lab: refused
    with pytest.raises(ComputeError, match=r"of dataset 'lab' \(as 'l'\)"):
        _run(by_columns, "SELECT c.sex_group, count(*), avg(l.target) FROM clinic c "
                         "JOIN lab l ON l.id < 2 GROUP BY c.sex_group")
    # a self-join counts each occurrence
    with pytest.raises(ComputeError, match=r"of dataset 'clinic' \(as 'b'\)"):
        _run(by_columns, "SELECT count(*) FROM clinic a, clinic b WHERE b.id = 7")


def test_empty_result_is_fine(by_rows):
    got = _run(by_rows, "SELECT sex_group, count(*) FROM party_1 WHERE id < 0 GROUP BY 1")
    assert got["rows"] == [] and got["columns"] == ["sex_group", "count_star()"]


# --- refusals before any data moves -------------------------------------------------------------


@pytest.mark.parametrize(("query", "why"), [
    ("SELECT * FROM party_1", r"\* and COLUMNS\(\) are not allowed"),
    ("SELECT bmi, target FROM party_1", "returns rows that are not aggregates: column 'bmi'"),
    ("SELECT 1 FROM party_1", "returns rows that are not aggregates"),
    ("SELECT sex_group, bmi, count(*) FROM party_1 GROUP BY sex_group",
     "column 'bmi' in SELECT is neither aggregated nor a GROUP BY key"),
    ("SELECT count(*) FROM party_1 ORDER BY bmi", "column 'bmi' in ORDER BY"),
    ("SELECT sex_group FROM party_1 GROUP BY sex_group HAVING bmi > 1", "column 'bmi' in HAVING"),
    ("COPY party_1 TO '/tmp/out.csv'", "only a SELECT statement is allowed, got COPY"),
    ("SELECT count(*) FROM read_csv('/etc/passwd')", "table functions"),
    ("ATTACH '/tmp/x.db' AS x", "got ATTACH"),
    ("INSTALL httpfs", "only a SELECT statement"),
    ("LOAD httpfs", "only a SELECT statement"),
    ("SET enable_external_access = true", "only a SELECT statement"),
    ("PRAGMA version", "only a (plain )?SELECT"),
    ("SELECT count(*) FROM party_1; SELECT count(*) FROM party_2",
     "exactly one statement is allowed, got 2"),
    ("SELECT sum(bmi) OVER () FROM party_1", "window functions are not allowed"),
    ("SELECT count(*), row_number() OVER () FROM party_1", "window functions"),
    ("SELECT count(*) FROM party_1 UNION ALL SELECT count(*) FROM party_2",
     "UNION, INTERSECT and EXCEPT are not allowed"),
    ("SELECT count(*) FROM (SELECT * FROM party_1 UNION ALL SELECT * FROM party_2)",
     "subqueries in FROM are not allowed"),
    ("WITH t AS (SELECT * FROM party_1) SELECT count(*) FROM t", "WITH"),
    ("SELECT count(*) FROM party_1 WHERE id IN (SELECT id FROM party_2)", "subqueries"),
    ("SELECT (SELECT count(*) FROM party_2) FROM party_1", "subqueries"),
    ("SELECT max(bmi) FROM party_1", r"aggregate max\(\) is not allowed"),
    ("SELECT median(bmi) FROM party_1", r"aggregate median\(\)"),
    ("SELECT list(bmi) FROM party_1", r"aggregate list\(\)"),
    ("SELECT string_agg(sex_group, ',') FROM party_1", r"aggregate string_agg\(\)"),
    ("SELECT arg_max(id, bmi) FROM party_1", r"aggregate arg_max\(\)"),
    ("SELECT geomean(bmi) FROM party_1", r"function geomean\(\) is not allowed"),
    ("SELECT sum(CASE WHEN id = 7 THEN bmi END) FROM party_1", "'case' is not allowed"),
    ("SELECT sum(bmi * (id = 7)::INT) FROM party_1", "not allowed"),
    ("SELECT sum(bmi * (id - 7)::BOOLEAN::INT) FROM party_1", "not BOOLEAN"),
    ("SELECT sum(bmi / (id - 7)) FROM party_1", "'/' is not allowed"),
    ("SELECT sum(bmi) FILTER (WHERE id = 7) FROM party_1", "FILTER"),
    ("SELECT count(*) FROM party_1 WHERE sum(bmi) > 0", "not allowed in WHERE"),
    ("SELECT max(bmi) AS m FROM party_1 GROUP BY m", r"aggregate max\(\) is not allowed"),
    ("SELECT sum(bmi) AS m FROM party_1 GROUP BY m", r"sum\(\) is not allowed in GROUP BY"),
    ("SELECT sum(bmi) FROM party_1 GROUP BY 1", r"sum\(\) is not allowed in GROUP BY"),
    ("SELECT DISTINCT sex_group FROM party_1", "SELECT DISTINCT is not allowed"),
    ("SELECT count(*) FROM party_1 USING SAMPLE 10", "SAMPLE"),
    ("SELECT count(*) FROM party_1 LIMIT 10%", "limit"),
    ("SELECT count(*) FROM main.party_1", "without a schema"),
    ("SELECT count(*) FROM party_1 AS p(a, b)", "column alias lists"),
    ("SELECT count(*) FROM party_1 POSITIONAL JOIN party_2", "POSITIONAL INNER joins"),
    ("SELECT count(*) FROM party_1 SEMI JOIN party_2 USING (id)", "joins are not allowed"),
    ("SELECT count(*) FROM (VALUES (1))", "not allowed"),
    ("SELECT count(*)", "the query reads no dataset"),
    ("SELECT count(__teeflow_rid_0) FROM party_1", "reserved"),
    ("SELECT count(*) FROM party_1 WHERE bmi > ?", "parameter expressions are not allowed"),
    ("SELECT count(*) FROM party_1 WHERE error('x')", r"function error\(\)"),
    ("SELEC count(*) FROM party_1", "does not parse"),
    ("SELECT count(*) FROM party_1 ORDER BY 2", "ORDER BY position 2 is not in the select list"),
    ("SELECT count(*) FROM party_1 WHERE " + " + ".join(["bmi"] * 900) + " > 0",
     "nested too deeply"),
])
def test_policy_refusals(query, why):
    with pytest.raises(ParameterError, match=why) as err:
        sql.check_params({"query": query})
    assert str(err.value).startswith("parameter 'query'")


def test_refusals_by_schema(by_rows):
    schemas = {ds: t.schema for ds, t in by_rows}
    params = sql.check_params({"query": "SELECT count(*) FROM hospital_x"})
    with pytest.raises(ParameterError, match="'hospital_x' is not a dataset of this task"):
        sql.check_schemas(schemas, params)
    params = sql.check_params({"query": "SELECT count(*) FROM '/etc/passwd'"})
    with pytest.raises(ParameterError, match="'/etc/passwd' is not a dataset of this task"):
        sql.check_schemas(schemas, params)
    params = sql.check_params({"query": "SELECT avg(weight) FROM party_1"})
    with pytest.raises(ParameterError, match="does not fit the datasets.*weight"):
        sql.check_schemas(schemas, params)
    params = sql.check_params({"query": "SELECT count(*) FROM party_1"})
    with pytest.raises(SchemaMismatch, match="same name up to case"):
        sql.check_schemas({"party_1": schemas["party_1"], "PARTY_1": schemas["party_2"]}, params)
    odd = pa.schema([("__teeflow_x", pa.int64())])
    with pytest.raises(SchemaMismatch, match="'__teeflow_x': names starting with __teeflow"):
        sql.check_schemas({"party_1": odd}, params)
    with pytest.raises(SchemaMismatch, match="'__teeflow_x': names starting with __teeflow"):
        sql.run([("party_1", odd.empty_table())], params)


def test_params():
    got = sql.check_params({"query": " SELECT count(*) FROM t "})
    assert got == {"query": "SELECT count(*) FROM t", "min_group_size": 10, "memory_limit": None,
                   "query_args": None}
    assert sql.check_params({"query": "SELECT count(*) FROM t", "min_group_size": "1",
                             "memory_limit": "512MB"})["memory_limit"] == "512MB"
    with pytest.raises(ParameterError, match="'min_group_size'"):
        sql.check_params({"query": "SELECT count(*) FROM t", "min_group_size": "0"})
    with pytest.raises(ParameterError, match="'memory_limit'"):
        sql.check_params({"query": "SELECT count(*) FROM t", "memory_limit": "1GB'; SET x=1"})
    with pytest.raises(ParameterError, match="'query': required"):
        sql.check_params({})
    with pytest.raises(ParameterError, match="unknown parameter"):
        sql.check_params({"query": "SELECT count(*) FROM t", "limit": "3"})
    with pytest.raises(ParameterError, match="longer than"):
        sql.check_params({"query": "SELECT count(*) FROM t -- " + "x" * sql.MAX_QUERY})


def test_dataset_names_are_quoted(diabetes):
    table = pa.Table.from_pandas(diabetes[["sex_group", "bmi"]], preserve_index=False)
    got = _run([("alice's data-1", table)],
               'SELECT count(*) FROM "alice\'s data-1"')
    assert got["rows"] == [[len(diabetes)]]


def test_runtime_error_gives_type_only(by_rows):
    with pytest.raises(ComputeError) as err:
        _run(by_rows, "SELECT sex_group::INT AS s, count(*) FROM party_1 GROUP BY 1")
    assert str(err.value) == "sql: the query failed (ConversionException)"


# --- bounded memory: encrypted spill ------------------------------------------------------------


def _marked(n: int) -> pa.Table:
    keys = pc.binary_join_element_wise(
        "SECRETMARKER-" + "x" * 20, pc.cast(pa.array(np.arange(n)), pa.string()), ""
    )
    return pa.table({"k": keys, "v": np.arange(n)})


def _spilled(directory: str) -> bytes:
    data = b""
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data += f.read()
    return data


def _compressibility(data: bytes) -> float:
    """Compressed size over size of the first 4 MiB: about 1 for ciphertext."""
    sample = data[: 4 << 20]
    return len(zlib.compress(sample, 1)) / len(sample)


def test_spill_is_encrypted_and_removed(tmp_path):
    if sql_session._httpfs_extension() is None:
        pytest.skip("duckdb-extension-httpfs for this DuckDB is not installed")
    big = _marked(1_000_000)
    session = sql_session._Session([("big", big)], "32MB", spill=True)
    try:
        assert session.spill == "encrypted"
        tempdir = session.tempdir
        assert tempdir and os.path.isdir(tempdir)
        pending = session.con.execute("SELECT k FROM big ORDER BY k")  # sorts on disk
        assert pending.fetchone() == ("SECRETMARKER-" + "x" * 20 + "0",)
        spilled = _spilled(tempdir)
        assert len(spilled) > 8 << 20  # it really spilled
        assert b"SECRETMARKER" not in spilled and b"x" * 20 not in spilled
        assert _compressibility(spilled) > 0.99  # looks random: encrypted
        with pytest.raises(duckdb.Error, match="locked"):
            session.con.execute("SET temp_file_encryption = false")
    finally:
        session.close()
    assert not os.path.exists(tempdir)

    # the same spill without encryption is very compressible, so the check above means something
    con = duckdb.connect()
    try:
        con.execute(f"SET temp_directory = '{tmp_path}'")
        con.execute("SET memory_limit = '32MB'")
        con.register("big", big)
        con.execute("SELECT k FROM big ORDER BY k").fetchone()
        assert _compressibility(_spilled(str(tmp_path))) < 0.5
    finally:
        con.close()


def test_query_beyond_memory_limit_spills():
    if sql_session._httpfs_extension() is None:
        pytest.skip("duckdb-extension-httpfs for this DuckDB is not installed")
    table = _marked(1_000_000).append_column("g", pa.array(np.arange(1_000_000) // 10))
    got = _run([("big", table)], "SELECT g, count(*) AS n, sum(v) AS s FROM big "
                                 "GROUP BY g ORDER BY g DESC LIMIT 2", memory_limit="24MB")
    assert got["rows"] == [[99_999, 10, sum(range(999_990, 1_000_000))],
                           [99_998, 10, sum(range(999_980, 999_990))]]
    assert got["spill"] == "encrypted"


def test_without_encryption_nothing_spills(monkeypatch):
    monkeypatch.setattr(sql_session, "_httpfs_extension", lambda: None)
    session = sql_session._Session([("big", _marked(1_000_000))], "32MB", spill=True)
    try:
        assert session.spill == "disabled" and session.tempdir is None
        with pytest.raises(duckdb.OutOfMemoryException):
            session.con.execute("SELECT k FROM big ORDER BY k DESC").fetchone()
    finally:
        session.close()
    params = sql.check_params({"query": "SELECT count(*) FROM t", "memory_limit": "4MB"})
    table = pa.table({"k": pc.cast(pa.array(np.arange(500_000)), pa.string())})
    with pytest.raises(ComputeError, match="spilling is disabled"):
        sql.run([("t", table)], {**params, "query": "SELECT k, count(*) FROM t GROUP BY k"})
