"""End to end: SQL under the owners' analysis rules, through real scheduler, executor and
provider processes. The rules travel with the catalog entry, their digest in the signed
spec; the executor refuses what they do not grant at create-task, before any data moves,
naming the rule and the clause and no value; and drops output rows with too few distinct
identities. A representative subset of test_sql_rules_attacks.py runs here."""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import pandas as pd
import pytest

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.core import audit, wire
from teeflow.core.errors import InputError, TaskFailed
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli

pytestmark = pytest.mark.e2e

SECRET_NAME = "Zebulon Quux"
SECRET_COST = 98765.4321
SECRET_BALANCE = 7654321

TEMPLATE = ("SELECT region, count(*) AS n FROM patients WHERE age >= $min_age "
            "GROUP BY region ORDER BY region")

PATIENT_RULES = f"""[datasets.rules]
[datasets.rules.aggregation]
aggregates = {{ count = ["*", "pid"], sum = ["cost"], avg = ["cost", "age"] }}
join_columns = ["pid"]
dimension_columns = ["region", "age"]
identity = "pid"
min_identities = 5
[datasets.rules.list]
list_columns = ["region"]
join_columns = ["pid"]
[[datasets.rules.analyses]]
name = "count_over_age"
query = "{TEMPLATE}"
parameters = {{ min_age = "int" }}
"""
ACCOUNT_RULES = f"""[datasets.rules]
[datasets.rules.aggregation]
aggregates = {{ count = ["*"], sum = ["spend"] }}
join_columns = ["pid"]
dimension_columns = ["segment"]
identity = "pid"
min_identities = 5
[datasets.rules.list]
list_columns = ["segment"]
join_columns = ["pid"]
[[datasets.rules.analyses]]
name = "count_over_age"
query = "{TEMPLATE}"
parameters = {{ min_age = "int" }}
"""


# the owners sign any query their analysis rules grant (the executor enforces them)
UNDER_RULES = {"sql": {"query": {"analysis_rules": True}}}


def _patients(path):
    # north: 30 people, south: 26, tiny: 3 (below min_identities = 5); the last of south
    # is the one whose values an attacker wants
    rows = ([("north", 30 + i % 40) for i in range(30)] + [("south", 25 + i) for i in range(25)]
            + [("tiny", 50 + i) for i in range(3)])
    df = pd.DataFrame({"pid": [f"p{i}" for i in range(len(rows))],
                       "region": [r for r, _ in rows], "age": [a for _, a in rows],
                       "cost": [100.0 + i for i in range(len(rows))],
                       "name": [f"person {i}" for i in range(len(rows))]})
    secret = pd.DataFrame({"pid": ["p999"], "region": ["south"], "age": [77],
                           "cost": [SECRET_COST], "name": [SECRET_NAME]})
    pd.concat([df, secret], ignore_index=True).to_csv(path, index=False)


def _accounts(path):
    pids = [f"p{i}" for i in range(0, 58, 2)] + ["p999"]
    pd.DataFrame({"pid": pids, "segment": ["gold" if i % 3 else "basic" for i in range(len(pids))],
                  "spend": [10.0 * i for i in range(len(pids))],
                  "balance": [1000 + i for i in range(len(pids) - 1)] + [SECRET_BALANCE]}
                 ).to_csv(path, index=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("rules")
    _patients(work / "patients.csv")
    _accounts(work / "accounts.csv")
    c = LocalCluster(work)
    try:
        c.start_scheduler()
        c.start_executor()
        c.start_provider(Party("alice", "patients", work / "patients.csv"),
                         dataset_toml=PATIENT_RULES, bind=UNDER_RULES)
        c.start_provider(Party("bob", "accounts", work / "accounts.csv"),
                         dataset_toml=ACCOUNT_RULES, bind=UNDER_RULES)
        c.wait_for_datasets(["patients", "accounts"])
        c.wait_for_executor(c.executor_address)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.scheduler_url, key=cluster.initiator_key, policy=appraisal_policy(),
                name=cluster.initiator_name) as c:
        yield c


def _run(client, query, datasets=("patients", "accounts"), **params):
    task = client.submit(list(datasets), None, "sql", {"query": query, **params})
    client.wait(task["id"], timeout=120)
    return client.result(task["id"]).value


def _refused(client, query, datasets=("patients", "accounts"), compute="sql", **params):
    """The task's error; the task must have failed before any upload."""
    task = client.submit(list(datasets), None, compute,
                         {"query": query, **params} if compute == "sql" else params)
    with pytest.raises(TaskFailed):
        client.wait(task["id"], timeout=120)
    detail = client.task(task["id"])
    error = detail["error"] or ""
    for value in (SECRET_NAME, str(SECRET_COST), str(SECRET_BALANCE), "person 1", "p999"):
        assert value not in error
    # no provider began to send: refused at create-task, before any assignment started
    assert all(a["state"] == "pending" and a["rows"] == 0 for a in detail["assignments"])
    assert "accepted" not in [e["event"] for e in detail["events"]]
    return error


def test_rules_are_published_with_the_catalog(client):
    catalog = {d["name"]: d for d in client.datasets()}
    rules = catalog["patients"]["rules"]
    assert rules["aggregation"]["min_identities"] == 5
    assert rules["aggregation"]["identity"] == "pid"
    assert rules["analyses"][0]["query"] == TEMPLATE
    assert len(catalog["patients"]["rules_digest"]) == 64
    spec = client.build_spec(["patients", "accounts"], "sql", {"query": "SELECT 1"})
    assert spec.dataset("patients").rules == catalog["patients"]["rules_digest"]


def test_an_aggregate_the_rules_grant_drops_rows_below_the_minimum(client):
    value = _run(client, "SELECT p.region, count(*) AS n, sum(a.spend) AS s FROM patients p "
                         "JOIN accounts a ON p.pid = a.pid GROUP BY p.region ORDER BY 1")
    regions = [row[0] for row in value["rows"]]
    assert regions == ["north", "south"]  # tiny joins 1 or 2 people: dropped, not shown
    assert value["analysis_rules"] == {"mode": "aggregation",
                                       "min_identities": {"patients": 5, "accounts": 5},
                                       "rows_below_minimum": "dropped"}
    assert value["columns"] == ["region", "n", "s"]  # the identity counts are removed
    # HAVING count(*) = 1 picks single people: every such row is below the minimum
    value = _run(client, "SELECT age, count(*) FROM patients GROUP BY age "
                         "HAVING count(*) = 1", datasets=("patients",))
    assert value["rows"] == []


def test_overlap_listing_and_an_approved_template(client):
    value = _run(client, "SELECT DISTINCT p.region, a.segment FROM patients p JOIN accounts a "
                         "ON p.pid = a.pid ORDER BY 1, 2")
    assert value["analysis_rules"] == {"mode": "list"}
    assert ["north", "gold"] in value["rows"]
    assert not any(SECRET_NAME in str(r) for r in value["rows"])
    value = _run(client, TEMPLATE, datasets=("patients",),
                 query_args=json.dumps({"min_age": 40}))
    assert value["analysis_rules"] == {"mode": "analysis"}


ATTACKS = [
    ("SELECT x.region, count(*) FROM patients x JOIN patients y ON x.pid = y.pid "
     "GROUP BY x.region", r"in FROM: .*self-joins"),
    ("SELECT sum(CASE WHEN name = 'Zebulon Quux' THEN cost END) FROM patients",
     r"aggregation rule\), in SELECT: the argument of sum\(\) must be one column"),
    ("SELECT age + 0, count(*) FROM patients GROUP BY age + 0",
     r"in GROUP BY: '\+' is not allowed"),
    ("SELECT p.region, sum(p.cost) FROM patients p JOIN accounts a ON p.pid = a.pid "
     "WHERE a.balance = 7654321 GROUP BY p.region",
     r"rule of dataset 'accounts'\), in WHERE: column 'balance' is not a dimension"),
    ("SELECT count(*) FROM patients WHERE CAST(name AS INTEGER) = 1", r"in WHERE: casts"),
    ("SELECT string_agg(name, ',') FROM patients", r"string_agg\(\) is not grantable"),
    ("SELECT region, max(pid) FROM patients GROUP BY region", r"max\(\) is not grantable"),
    ("SELECT region, sum(cost) FROM patients GROUP BY region HAVING pid = 'p999'",
     r"in HAVING: column 'pid' is neither aggregated nor a GROUP BY key"),
    ("SELECT region, count(*) FROM patients WHERE pid IN (SELECT pid FROM accounts) "
     "GROUP BY region", r"in WHERE: subqueries"),
    ("SELECT region, cost FROM patients ORDER BY cost DESC LIMIT 1",
     r"list rule\), in FROM: a list query lists rows that match across datasets"),
    ("SELECT p.name, a.segment FROM patients p JOIN accounts a ON p.pid = a.pid",
     r"list rule of dataset 'patients'\), in SELECT: column 'name' is not a list column"),
]


@pytest.mark.parametrize("query, reason", ATTACKS)
def test_attacks_are_refused_inside_the_executor(client, query, reason):
    datasets = ("patients", "accounts")
    error = _refused(client, query, datasets)
    assert re.search(reason, error), error


def test_differencing_two_allowed_queries_still_works(client):
    """The documented limit: both pass the rules (every row counts >= 5 people), and their
    difference is the cost of the one 77-year-old in south."""
    q = "SELECT region, sum(cost) AS total FROM patients {} GROUP BY region ORDER BY region"
    every = dict((r[0], r[1]) for r in _run(client, q.format(""), ("patients",))["rows"])
    but = dict((r[0], r[1]) for r in _run(client, q.format("WHERE age <> 77"),
                                          ("patients",))["rows"])
    assert every["south"] - but["south"] == pytest.approx(SECRET_COST)
    error = _refused(client, q.format("WHERE pid <> 'p999'"), ("patients",))
    assert "column 'pid' is not a dimension column" in error


def test_a_computation_the_rules_do_not_list_is_refused(client):
    error = _refused(client, "", ("patients",), compute="linear_regression", label="cost",
                     features="age")
    assert "its analysis rules allow only sql, not linear_regression" in error


def test_a_spec_without_the_published_rules_digest_is_refused(client):
    spec = client.build_spec(["patients"], "sql", {"query": "SELECT count(*) FROM patients"},
                             code_digest=client.executor_catalog(
                                 client.choose_executor())["sql"].code_digest)
    bare = dataclasses.replace(spec, datasets=tuple(
        dataclasses.replace(d, rules=None) for d in spec.datasets))
    payload = audit.signed_payload(bare.task_id, "submitted",
                                   {"spec": bare.to_dict(), "spec_digest": bare.digest()})
    signature = base64.b64encode(client.identity.sign(payload)).decode()
    with pytest.raises(InputError, match="analysis rules digest is not the one its owner "
                       "published"):
        client.scheduler.submit(bare.to_dict(), signature, client.choose_executor())
    assert isinstance(bare, wire.TaskSpec)


def test_the_cli_shows_the_published_rules(cluster, tmp_path):

    from teeflow.attestation.simulated import code_measurement
    from teeflow.cli.cluster import policy_toml

    pol = tmp_path / "policy.toml"
    pol.write_text(policy_toml(code_measurement()))
    env = {"TEEFLOW_SCHEDULER": cluster.scheduler_url,
           "TEEFLOW_KEY": str(cluster.initiator_key), "TEEFLOW_POLICY": str(pol)}

    def cli(*args):
        proc = run_cli(*args, env=env, columns=250, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    table = cli("datasets")
    assert ">= 5 pid per row" in table and "count_over_age" in table
    listed = {d["name"]: d for d in json.loads(cli("datasets", "--json"))}
    assert listed["accounts"]["rules"]["list"]["list_columns"] == ["segment"]
