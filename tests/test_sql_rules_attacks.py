"""Attacks on the SQL analysis rules, against the pure checker (compute/sql/analysis.py) and
the query's bind against empty tables; test_sql_rules_e2e.py runs a representative subset
inside the real executor. Each attack must be refused naming the rule and the clause, and
no error may hold a data value (here there is no data at all: the errors can quote only the
query's own text and the schema)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from teeflow.compute.sql import analysis, session
from teeflow.core.errors import ParameterError
from teeflow.core.rules import load_rules, query_digest

PATIENTS = pa.schema([("pid", pa.string()), ("region", pa.string()), ("age", pa.int32()),
                      ("cost", pa.float64()), ("name", pa.string()), ("visit", pa.date32())])
ACCOUNTS = pa.schema([("pid", pa.string()), ("segment", pa.string()),
                      ("spend", pa.float64()), ("balance", pa.int64()),
                      ("wide", pa.decimal128(38, 0))])
SCHEMAS = {"patients": PATIENTS, "accounts": ACCOUNTS}

PATIENT_RULES = {
    "aggregation": {
        "aggregates": {"count": ["*", "pid"], "count_distinct": ["pid"], "sum": ["cost"],
                       "avg": ["cost", "age"]},
        "join_columns": ["pid"], "dimension_columns": ["region", "age", "visit"],
        "scalar_functions": ["lower", "year", "date_trunc"], "identity": "pid",
        "min_identities": 5},
    "list": {"list_columns": ["region"], "join_columns": ["pid"]},
}
ACCOUNT_RULES = {
    "aggregation": {
        "aggregates": {"count": ["*"], "sum": ["spend", "wide"], "avg": ["spend"]},
        "join_columns": ["pid"], "dimension_columns": ["segment"], "identity": "pid",
        "min_identities": 5},
    "list": {"list_columns": ["segment"], "join_columns": ["pid"]},
}
RULES = {"patients": load_rules(PATIENT_RULES), "accounts": load_rules(ACCOUNT_RULES)}


def check(query: str, rules=None, args: str | None = None) -> analysis.RulesPlan:
    """The checker, then the bind on empty tables, as the executor runs both."""
    rules = RULES if rules is None else rules
    plan = analysis.plan(query, rules, SCHEMAS, args)
    session.check_binds(SCHEMAS, {"query": query, "_rules": rules, "query_args": args})
    return plan


ALLOWED = [
    "SELECT region, count(*), sum(cost), avg(age) FROM patients GROUP BY region",
    "SELECT lower(region) AS r, avg(cost) FROM patients WHERE region IN ('n', 's') "
    "AND age BETWEEN 20 AND 60 GROUP BY r ORDER BY 2 DESC LIMIT 5",
    "SELECT year(visit), count(DISTINCT pid) FROM patients GROUP BY year(visit)",
    "SELECT date_trunc('month', visit) AS m, count(pid) FROM patients GROUP BY m",
    "SELECT p.region, a.segment, sum(a.spend), count(*) FROM patients p "
    "JOIN accounts a ON p.pid = a.pid GROUP BY p.region, a.segment HAVING count(*) > 10",
    "SELECT region, count(*) FROM patients WHERE visit >= '2020-01-01' AND age <> 37 "
    "GROUP BY region",
    "SELECT count(*) FROM patients",
    "SELECT region, count(*) FROM patients p GROUP BY p.region",
    # comments and quoting do not survive the parse: the tree is checked, not the text
    'SELECT "REGION", count(*) FROM "PATIENTS" /* a comment */ GROUP BY "Region" -- end',
    # overlap analysis under the list rules
    "SELECT p.region, a.segment FROM patients p JOIN accounts a ON p.pid = a.pid",
    "SELECT DISTINCT p.region FROM patients p JOIN accounts a ON p.pid = a.pid "
    "WHERE a.segment = 'gold' ORDER BY 1 LIMIT 10",
]


@pytest.mark.parametrize("query", ALLOWED)
def test_allowed(query):
    check(query)


def test_aggregation_counts_identities_of_every_dataset_joined():
    plan = check("SELECT p.region, sum(a.spend) FROM patients p JOIN accounts a "
                 "ON p.pid = a.pid GROUP BY p.region")
    assert plan.mode == "aggregation"
    assert plan.floors == (("patients", 5), ("accounts", 5))
    assert "count(DISTINCT p.pid)" in plan.sql and "count(DISTINCT a.pid)" in plan.sql


# (attack, query, what the refusal must name: rule or clause and reason)
ATTACKS = [
    # self-joins
    ("self-join", "SELECT x.region, count(*) FROM patients x JOIN patients y "
     "ON x.pid = y.pid GROUP BY x.region", r"in FROM: .*self-joins"),
    ("self cross join", "SELECT x.region, count(*) FROM patients x, patients y "
     "GROUP BY x.region", r"in FROM: .*self-joins"),
    # CASE and arithmetic in select lists and GROUP BY
    ("CASE in aggregate", "SELECT sum(CASE WHEN pid = 'p7' THEN cost END) FROM patients",
     r"aggregation rule\), in SELECT: the argument of sum\(\) must be one column"),
    ("arithmetic in aggregate", "SELECT sum(cost * 1) FROM patients",
     r"in SELECT: the argument of sum\(\) must be one column"),
    ("CASE in GROUP BY", "SELECT count(*) FROM patients GROUP BY "
     "CASE WHEN pid = 'p7' THEN 1 ELSE 0 END", r"in GROUP BY: CASE expressions"),
    ("arithmetic in GROUP BY", "SELECT age + 0, count(*) FROM patients GROUP BY age + 0",
     r"in GROUP BY: '\+' is not allowed on a dimension value"),
    ("arithmetic on aggregates", "SELECT region, sum(cost) / count(*) FROM patients "
     "GROUP BY region", r"in SELECT: '/' is not allowed"),
    ("comparison as a key", "SELECT pid = 'p7', count(*) FROM patients GROUP BY pid = 'p7'",
     r"in GROUP BY: "),
    # non-dimension columns used to single out rows
    ("group by identity", "SELECT pid, count(*) FROM patients GROUP BY pid",
     r"rule of dataset 'patients'\), in GROUP BY: column 'pid' is not a dimension column"),
    ("filter on identity", "SELECT region, sum(cost) FROM patients WHERE pid = 'p7' "
     "GROUP BY region", r"in WHERE: column 'pid' is not a dimension column"),
    ("filter on a secret", "SELECT count(*) FROM patients WHERE name = 'Zebulon'",
     r"in WHERE: column 'name' is not a dimension column"),
    ("position of a secret", "SELECT name, count(*) FROM patients GROUP BY 1",
     r"in GROUP BY: column 'name' is not a dimension column"),
    ("alias shadowing", "SELECT name AS region, count(*) FROM patients GROUP BY region",
     r"in SELECT: column 'name' is neither aggregated nor a GROUP BY key"),
    ("aggregate of a column not granted", "SELECT sum(age) FROM patients",
     r"rule of dataset 'patients'\), in SELECT: sum\(age\) is not granted"),
    ("count(*) not granted by the other party", "SELECT count(*) FROM accounts a JOIN "
     "patients p ON a.pid = p.pid", None),  # allowed: both grant count(*) (checked below)
    # joins that pick one row of the other party
    ("join on a secret condition", "SELECT a.segment, sum(p.cost) FROM patients p JOIN "
     "accounts a ON p.pid = a.pid AND a.balance = 1234567 GROUP BY a.segment",
     r"rule of dataset 'accounts'\), in JOIN: column 'balance' is not a join column"),
    ("join on a constant", "SELECT count(*) FROM patients p JOIN accounts a "
     "ON p.pid = a.pid AND 1 = 1", r"in JOIN: a join condition compares two columns"),
    ("join on an inequality", "SELECT count(*) FROM patients p JOIN accounts a "
     "ON p.pid < a.pid", r"in JOIN: a join condition is one or more column = column"),
    ("join then filter the other party", "SELECT p.region, sum(p.cost) FROM patients p "
     "JOIN accounts a ON p.pid = a.pid WHERE a.balance > 1000000 GROUP BY p.region",
     r"rule of dataset 'accounts'\), in WHERE: column 'balance' is not a dimension"),
    ("join on a non-join column", "SELECT count(*) FROM patients p JOIN accounts a "
     "ON p.age = a.balance", r"in JOIN: column 'age' is not a join column"),
    ("outer join", "SELECT count(*) FROM patients p LEFT JOIN accounts a ON p.pid = a.pid",
     r"in JOIN: .*LEFT joins are not allowed"),
    ("cross join", "SELECT count(*) FROM patients p CROSS JOIN accounts a",
     r"in JOIN: CROSS INNER joins are not allowed"),
    ("using join", "SELECT count(*) FROM patients JOIN accounts USING (pid)",
     r"in JOIN: .*parse tree field 'using_columns'"),
    ("other party's value", "SELECT p.region, sum(a.balance) FROM patients p JOIN accounts a "
     "ON p.pid = a.pid GROUP BY p.region",
     r"rule of dataset 'accounts'\), in SELECT: sum\(balance\) is not granted"),
    # casts and overflow tricks
    ("cast in aggregate", "SELECT sum(CAST(cost AS INTEGER)) FROM patients",
     r"in SELECT: the argument of sum\(\) must be one column"),
    ("failing cast as an oracle", "SELECT count(*) FROM patients WHERE "
     "CAST(region AS INTEGER) = 1", r"in WHERE: casts \(a failing cast reveals a value\)"),
    ("try_cast", "SELECT count(*) FROM patients WHERE TRY_CAST(region AS INTEGER) = 1",
     r"in WHERE: casts"),
    ("implicit cast of a column", "SELECT count(*) FROM patients WHERE region = 5",
     r"in WHERE: compares values of different kinds"),
    ("implicit cast in IN", "SELECT count(*) FROM patients WHERE region IN (1, 2)",
     r"in WHERE: compares values of different kinds"),
    ("overflow", "SELECT sum(age * 100000000000) FROM patients",
     r"in SELECT: the argument of sum\(\) must be one column"),
    ("overflow of a wide decimal", "SELECT sum(wide) FROM accounts",
     r"rule of dataset 'accounts'\), in SELECT: sum\(\) of a DECIMAL column wider than 18"),
    ("date part failing on a row", "SELECT date_trunc('fortnight', visit), count(*) FROM "
     "patients GROUP BY date_trunc('fortnight', visit)",
     r"in GROUP BY: date_trunc\(\) takes a constant part"),
    ("overflow in a filter", "SELECT count(*) FROM patients WHERE age * 1000000000 > 1",
     r"in WHERE: '\*' is not allowed on a dimension value"),
    ("scalar on the wrong kind", "SELECT year(region), count(*) FROM patients "
     "GROUP BY year(region)", r"in GROUP BY: year\(\) takes a time value"),
    ("scalar not granted", "SELECT upper(region), count(*) FROM patients "
     "GROUP BY upper(region)", r"rule of dataset 'patients'\), in GROUP BY: scalar function "
     r"upper\(\) is not granted"),
    # string and list aggregates, one row's value
    ("string_agg", "SELECT string_agg(name, ',') FROM patients",
     r"in SELECT: aggregate string_agg\(\) is not grantable"),
    ("list", "SELECT list(name) FROM patients", r"aggregate list\(\) is not grantable"),
    ("array_agg", "SELECT region, array_agg(cost) FROM patients GROUP BY region",
     r"aggregate array_agg\(\) is not grantable"),
    ("first", "SELECT first(cost) FROM patients", r"aggregate first\(\) is not grantable"),
    ("min on identity", "SELECT min(pid) FROM patients", r"aggregate min\(\) is not"),
    ("max on identity", "SELECT region, max(pid) FROM patients GROUP BY region",
     r"aggregate max\(\) is not"),
    ("arg_max", "SELECT arg_max(name, cost) FROM patients", r"aggregate arg_max\(\) is not"),
    ("median", "SELECT median(cost) FROM patients", r"aggregate median\(\) is not"),
    ("mode", "SELECT mode(region) FROM patients", r"aggregate mode\(\) is not"),
    ("histogram", "SELECT histogram(age) FROM patients", r"aggregate histogram\(\) is not"),
    ("any_value", "SELECT any_value(name) FROM patients", r"aggregate any_value\(\) is not"),
    ("sum distinct", "SELECT sum(DISTINCT cost) FROM patients",
     r"sum\(DISTINCT \.\.\.\) is not allowed"),
    ("count distinct not granted", "SELECT count(DISTINCT region) FROM patients",
     r"count_distinct\(region\) is not granted"),
    ("filter clause", "SELECT sum(cost) FILTER (WHERE pid = 'p7') FROM patients",
     r"in SELECT: unsupported construct \(parse tree field 'filter'\)"),
    ("ordered aggregate", "SELECT sum(cost ORDER BY age) FROM patients",
     r"in SELECT: ORDER BY inside a function"),
    # HAVING on unique keys
    ("having on the identity", "SELECT region, sum(cost) FROM patients GROUP BY region "
     "HAVING max(pid) = 'p7'", r"in HAVING: aggregate max\(\) is not grantable"),
    ("having on a non-key", "SELECT region, sum(cost) FROM patients GROUP BY region "
     "HAVING pid = 'p7'", r"in HAVING: column 'pid' is neither aggregated nor a GROUP BY"),
    ("having on a secret aggregate", "SELECT region, count(*) FROM patients GROUP BY region "
     "HAVING sum(age) > 100", r"in HAVING: sum\(age\) is not granted"),
    # subqueries, windows, CTEs, set operations
    ("subquery in WHERE", "SELECT region, count(*) FROM patients WHERE pid IN "
     "(SELECT pid FROM accounts WHERE balance > 1000000) GROUP BY region",
     r"in WHERE: subqueries are not allowed"),
    ("subquery in FROM", "SELECT count(*) FROM (SELECT * FROM patients WHERE name = 'x')",
     r"in FROM: subqueries are not allowed"),
    ("scalar subquery", "SELECT (SELECT max(cost) FROM patients), count(*) FROM patients",
     r"in SELECT: subqueries are not allowed"),
    ("exists", "SELECT count(*) FROM patients WHERE EXISTS (SELECT 1 FROM accounts)",
     r"in WHERE: subqueries are not allowed"),
    ("window", "SELECT region, sum(cost) OVER (PARTITION BY region) FROM patients",
     r"in SELECT: window functions are not allowed"),
    ("row_number", "SELECT row_number() OVER (ORDER BY cost), count(*) FROM patients",
     r"in SELECT: window functions"),
    ("CTE", "WITH t AS (SELECT * FROM patients) SELECT count(*) FROM t",
     r"in WITH: common table expressions are not allowed"),
    ("recursive CTE", "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) "
     "SELECT count(*) FROM patients", r"in WITH"),
    ("UNION", "SELECT region, count(*) FROM patients GROUP BY region UNION ALL "
     "SELECT name, 1 FROM patients", r"UNION, INTERSECT and EXCEPT are not allowed"),
    ("EXCEPT", "SELECT count(*) FROM patients EXCEPT SELECT count(*) FROM patients",
     r"UNION, INTERSECT and EXCEPT"),
    # LIMIT and ORDER BY to pick a row
    ("top row of one dataset", "SELECT region, cost FROM patients ORDER BY cost DESC LIMIT 1",
     r"list rule\), in FROM: a list query lists rows that match across datasets"),
    ("order a listing by a secret", "SELECT p.region FROM patients p JOIN accounts a "
     "ON p.pid = a.pid ORDER BY a.balance DESC LIMIT 1",
     r"rule of dataset 'accounts'\), in ORDER BY: column 'balance' is not a list column"),
    ("order groups by max", "SELECT region, sum(cost) FROM patients GROUP BY region "
     "ORDER BY max(cost) DESC LIMIT 1", r"in ORDER BY: aggregate max\(\) is not grantable"),
    ("limit by expression", "SELECT region, count(*) FROM patients GROUP BY region LIMIT 1+1",
     r"in LIMIT: must be an integer constant"),
    ("limit percent", "SELECT region, count(*) FROM patients GROUP BY region LIMIT 10%",
     r"is not allowed"),
    # listing what the list rules do not grant
    ("list a secret", "SELECT p.name, a.segment FROM patients p JOIN accounts a "
     "ON p.pid = a.pid", r"list rule of dataset 'patients'\), in SELECT: column 'name' is "
     "not a list column"),
    ("list the join column", "SELECT p.pid FROM patients p JOIN accounts a ON p.pid = a.pid",
     r"in SELECT: column 'pid' is not a list column"),
    ("list with a function", "SELECT lower(p.region) FROM patients p JOIN accounts a "
     "ON p.pid = a.pid", r"list rule\), in SELECT: 'lower' is not allowed on a listed value"),
    ("list filtered by a secret", "SELECT p.region FROM patients p JOIN accounts a "
     "ON p.pid = a.pid WHERE a.balance > 5", r"in WHERE: column 'balance' is not a list"),
    ("star", "SELECT * FROM patients p JOIN accounts a ON p.pid = a.pid",
     r"in SELECT: \* and COLUMNS\(\) are not allowed"),
    # everything else the tree can hold
    ("GROUP BY ALL", "SELECT region, count(*) FROM patients GROUP BY ALL",
     r"in GROUP BY: GROUP BY ALL is not allowed"),
    ("ROLLUP", "SELECT region, count(*) FROM patients GROUP BY ROLLUP (region)",
     r"in GROUP BY: ROLLUP, CUBE and GROUPING SETS"),
    ("QUALIFY", "SELECT region, count(*) FROM patients GROUP BY region QUALIFY true",
     r"QUALIFY"),
    ("sample", "SELECT count(*) FROM patients USING SAMPLE 1", r"USING SAMPLE"),
    ("tablesample", "SELECT count(*) FROM patients TABLESAMPLE 10%", r"TABLESAMPLE"),
    ("table function", "SELECT count(*) FROM read_csv('/etc/passwd')",
     r"in FROM: table functions are not allowed"),
    ("schema-qualified", "SELECT count(*) FROM main.patients", r"in FROM: unsupported table"),
    ("unknown table", "SELECT count(*) FROM duckdb_settings", r"not a dataset of this task"),
    ("parameter", "SELECT count(*) FROM patients WHERE region = $1",
     r"\$parameters \(only in an approved analysis template\)"),
    ("two statements", "SELECT count(*) FROM patients; SELECT * FROM patients",
     r"exactly one statement"),
    ("not a select", "COPY patients TO '/tmp/x.csv'", r"only a SELECT statement"),
    ("LIKE", "SELECT count(*) FROM patients WHERE region LIKE 'n%'",
     r"in WHERE: .*is not an allowed condition"),
    ("reserved name", "SELECT count(__teeflow_rid_0) FROM patients", r"reserved"),
]


@pytest.mark.parametrize("attack, query, reason", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_naming_rule_and_clause(attack, query, reason):
    if reason is None:
        check(query)
        return
    with pytest.raises(ParameterError, match=reason) as info:
        check(query)
    assert str(info.value).startswith("parameter 'query'"), attack


def test_a_dataset_without_rules_cannot_join_a_query_under_rules():
    with pytest.raises(ParameterError, match="dataset 'accounts' has no analysis rules"):
        check("SELECT count(*) FROM patients", {**RULES, "accounts": None})


def test_a_rule_kind_not_granted_is_named():
    only_list = {"patients": load_rules({"list": PATIENT_RULES["list"]}),
                 "accounts": RULES["accounts"]}
    with pytest.raises(ParameterError, match=r"aggregation rule of dataset 'patients'\), in "
                       r"the query: .*grant no aggregation rule \(granted: list\)"):
        check("SELECT count(*) FROM patients", only_list)


def test_differencing_between_two_allowed_queries_is_not_stopped():
    """What a minimum of identities per row does not stop: two queries that each pass, whose
    difference is one person's value (here: the cost of the only 37-year-old of a region).
    This is the documented limit (README, "Analysis rules"); the variants that name the
    person directly are refused."""
    check("SELECT region, sum(cost) FROM patients GROUP BY region")
    check("SELECT region, sum(cost) FROM patients WHERE age <> 37 GROUP BY region")
    for variant in ("WHERE pid <> 'p7'", "WHERE name <> 'Zebulon'"):
        with pytest.raises(ParameterError, match="is not a dimension column"):
            check(f"SELECT region, sum(cost) FROM patients {variant} GROUP BY region")


def test_approved_analysis_template_binds_its_parameters():
    template = ("SELECT region, sum(cost) AS total FROM patients WHERE age >= $min_age "
                "GROUP BY region")
    approved = {"analyses": [{"name": "cost_over_age", "query": template,
                              "parameters": {"min_age": "int"}}]}
    rules = {"patients": load_rules({**PATIENT_RULES, **approved}),
             "accounts": load_rules({**ACCOUNT_RULES, **approved})}
    plan = check(template, rules, json.dumps({"min_age": 40}))
    assert plan.mode == "analysis" and plan.args == {"min_age": 40}
    for bad, why in ((None, "a JSON object"), ('{"min_age": "40"}', "must be a int"),
                     ('{"min_age": 4, "x": 1}', "exactly the parameters"),
                     ("[]", "exactly the parameters")):
        with pytest.raises(ParameterError, match=why):
            check(template, rules, bad)
    # approved by one owner only: checked as any other query (and $parameters refused)
    half = {**rules, "accounts": RULES["accounts"]}
    with pytest.raises(ParameterError, match="query_args"):
        check(template, half, json.dumps({"min_age": 40}))
    with pytest.raises(ParameterError, match=r"\$parameters"):
        check(template, half)
    # a text that differs by one character is another query
    with pytest.raises(ParameterError):
        check(template.replace(">=", ">"), rules, json.dumps({"min_age": 40}))
    assert query_digest(template + "  ") == query_digest(template)


@pytest.mark.parametrize("where", ["age = 'abc'", "age = '5'", "visit > 'soon'",
                                   "visit IN ('2020-01-01', 'x')"])
def test_a_text_constant_that_could_fail_to_cast_is_refused(where):
    """DuckDB casts the constant to the column's type when it meets a row, so `age = 'abc'`
    fails on a non-empty table only: an oracle for "some row passed the filter"."""
    with pytest.raises(ParameterError, match=r"in WHERE: (compares a number value with a "
                       r"text constant|a text constant that is not a DATE)"):
        check(f"SELECT count(*) FROM patients WHERE region = 'n' AND {where}")


def _tables():
    n = 12
    patients = pa.table({
        "pid": [f"p{i % 10}" for i in range(n)],  # p0 and p1 have two rows each
        "region": ["big"] * 10 + ["small"] * 2, "age": pa.array(range(n), pa.int32()),
        "cost": [float(i) for i in range(n)], "name": [f"n{i}" for i in range(n)],
        "visit": pa.array([0] * n, pa.date32())})
    accounts = pa.table({"pid": [f"p{i}" for i in range(10)], "segment": ["s"] * 10,
                         "spend": [1.0] * 10, "balance": list(range(10)),
                         "wide": pa.array([0] * 10, pa.decimal128(38, 0))})
    return [("patients", patients), ("accounts", accounts)]


def test_rows_below_the_minimum_of_distinct_identities_are_dropped():
    # "small" has two rows but they are p0 and p1, who are also in "big": 2 identities < 5
    out = session.run(_tables(), {"query": "SELECT region, count(*) AS n FROM patients "
                                           "GROUP BY region ORDER BY region",
                                  "_rules": RULES, "query_args": None})
    assert out["columns"] == ["region", "n"]
    assert out["rows"] == [["big", 10]]
    # five rows but three people (p0 and p1 twice): rows are not identities
    out = session.run(_tables(), {"query": "SELECT count(*) FROM patients "
                                           "WHERE age IN (0, 1, 2, 10, 11)",
                                  "_rules": RULES, "query_args": None})
    assert out["rows"] == []


def test_an_approved_analysis_never_shows_the_hidden_columns():
    query = "SELECT * FROM patients"
    approved = {"analyses": [{"name": "all", "query": query}]}
    rules = {"patients": load_rules({**PATIENT_RULES, **approved}),
             "accounts": load_rules({**ACCOUNT_RULES, **approved})}
    out = session.run(_tables(), {"query": query, "_rules": rules, "query_args": None})
    assert out["columns"] == ["pid", "region", "age", "cost", "name", "visit"]
    assert out["analysis_rules"] == {"mode": "analysis"}
