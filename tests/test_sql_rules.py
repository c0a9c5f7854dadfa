"""Analysis rules (core/rules.py): loading and their errors, the digest the spec carries, the
executor's check of what it is given against that digest, and the config/catalog plumbing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import AuthError, ConfigError, InputError, ParameterError
from teeflow.core.rules import given_rules, load_rules, query_digest
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.inputs import MemoryBudget
from teeflow.executor.notary import Notary
from teeflow.executor.tasks import Tasks
from teeflow.provider.config import check_config
from tests.factories import approval, make_spec

AGG = {"aggregates": {"count": ["*", "pid"], "sum": ["cost"]}, "join_columns": ["pid"],
       "dimension_columns": ["region"], "identity": "pid", "min_identities": 3}


def test_rules_load_and_publish_canonically():
    r = load_rules({"aggregation": AGG, "list": {"list_columns": ["region"],
                                                  "join_columns": ["pid"]},
                    "analyses": [{"name": "q", "query": " SELECT 1 "}]})
    assert r.kinds() == ["aggregation", "list", "analyses"]
    assert r.computations == ("sql",)
    assert r.analyses[0].sha256 == query_digest("SELECT 1")
    again = load_rules(r.to_dict())
    assert again == r and again.digest() == r.digest()
    other = load_rules({"aggregation": {**AGG, "min_identities": 2}})
    assert other.digest() != load_rules({"aggregation": AGG}).digest()


@pytest.mark.parametrize("raw, field", [
    ({"aggregation": {**AGG, "aggregates": {"max": ["cost"]}}}, "aggregation.aggregates.max"),
    ({"aggregation": {**AGG, "aggregates": {"string_agg": ["cost"]}}},
     "aggregation.aggregates.string_agg"),
    ({"aggregation": {**AGG, "aggregates": {"sum": ["*"]}}}, "aggregation.aggregates.sum[0]"),
    ({"aggregation": {**AGG, "min_identities": 0}}, "aggregation.min_identities"),
    ({"aggregation": {**AGG, "min_identities": True}}, "aggregation.min_identities"),
    ({"aggregation": {k: v for k, v in AGG.items() if k != "identity"}}, "aggregation.identity"),
    ({"aggregation": {**AGG, "scalar_functions": ["abs"]}}, "aggregation.scalar_functions[0]"),
    ({"aggregation": {**AGG, "scalar_functions": ["+"]}}, "aggregation.scalar_functions[0]"),
    ({"aggregation": {**AGG, "bogus": 1}}, "aggregation.bogus"),
    ({"list": {"list_columns": ["a"]}}, "list.join_columns"),
    ({"analyses": [{"name": "q"}]}, "analyses[0]"),
    ({"analyses": [{"name": "q", "query": "SELECT 1", "sha256": "0" * 64}]},
     "analyses[0].sha256"),
    ({"analyses": [{"name": "q", "sha256": "x"}]}, "analyses[0].sha256"),
    ({"analyses": [{"name": "q", "sha256": "0" * 64, "parameters": {"z": "blob"}}]},
     "analyses[0].parameters.z"),
    ({}, "rules"),
    ({"computations": []}, "computations"),
])
def test_bad_rules_name_the_field(raw, field):
    where = "datasets[0].rules" + ("" if field == "rules" else "." + field)
    with pytest.raises(ConfigError) as info:
        load_rules(raw, "datasets[0].rules")
    assert str(info.value).startswith(where), str(info.value)


def test_provider_config_reads_rules(tmp_path: Path):
    data = tmp_path / "d.csv"
    data.write_text("pid,region,cost\n1,a,2\n")
    doc = {"node": {"name": "a", "key_file": "a.key", "scheduler": "https://x#sha256:00"},
           "datasets": [{"name": "d", "path": str(data), "rules": {"aggregation": AGG}}],
           "policy": {"tee_types": ["simulated"], "allow_simulated": True,
                      "simulated": {"measurement": ["00" * 32]}}}
    cfg = check_config(doc, tmp_path)
    assert cfg.datasets[0].rules is not None
    assert cfg.datasets[0].rules.aggregation.min_identities == 3
    doc["datasets"][0]["rules"] = {"aggregation": {**AGG, "min_identities": -1}}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.rules\.aggregation\.min_identities"):
        check_config(doc, tmp_path)
    doc["datasets"][0]["rules"] = {"aggregation": {**AGG, "dimension_columns": ["regoin"]}}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.rules\.aggregation\."
                       "dimension_columns: the dataset has no column 'regoin'"):
        check_config(doc, tmp_path)
    doc["datasets"][0]["rules"] = {"aggregation": AGG, "computations": ["sql", "nope"]}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.rules\.computations: unknown "
                       "computation 'nope'"):
        check_config(doc, tmp_path)
    doc["datasets"][0]["rules"] = {"aggregation": AGG}
    doc["datasets"][0]["privacy"] = {"epsilon_budget": 1.0, "required": True}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.rules\.computations: .*DP"):
        check_config(doc, tmp_path)
    doc["datasets"][0]["rules"] = {"aggregation": AGG, "computations": ["sql", "dp_aggregate"]}
    assert check_config(doc, tmp_path).datasets[0].rules.computations == ("dp_aggregate", "sql")


def test_dataset_ref_keeps_old_digests_and_carries_rules():
    ref = wire.DatasetRef("d", "a", "k", "f")
    assert "rules" not in ref.to_dict()
    ruled = wire.DatasetRef("d", "a", "k", "f", "ab" * 32)
    assert wire.DatasetRef.from_dict(ruled.to_dict()) == ruled
    with pytest.raises(InputError, match="rules"):
        wire.DatasetRef.from_dict({**ref.to_dict(), "rules": 5})


SCHEMA = pa.schema([("pid", pa.string()), ("region", pa.string()), ("cost", pa.float64())])


def _executor_task(rules_digest: str | None, query: str = "SELECT region, count(*) FROM d "
                   "GROUP BY region", compute: str = "sql"):
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = make_spec([("d", "alice", owner, schema_fingerprint(SCHEMA))], initiator,
                     compute, {"query": query} if compute == "sql" else {"label": "cost"})
    refs = tuple(wire.DatasetRef(d.name, d.owner, d.owner_key, d.fingerprint, rules_digest)
                 for d in spec.datasets)
    spec = dataclasses.replace(spec, datasets=refs)
    tasks = Tasks(Notary(ec.generate_private_key(ec.SECP256R1())), MemoryBudget(2**30))
    return tasks, spec, [approval(spec, owner)]


RULES = load_rules({"aggregation": AGG})


def test_given_rules_must_be_the_signed_ones():
    tasks, spec, _ = _executor_task(RULES.digest())
    assert given_rules(spec, {"d": RULES.to_dict()}) == {"d": RULES}
    with pytest.raises(AuthError, match="none were given"):
        given_rules(spec, {})
    weaker = load_rules({"aggregation": {**AGG, "min_identities": 1}}).to_dict()
    with pytest.raises(AuthError, match="not the ones its owner signed"):
        given_rules(spec, {"d": weaker})
    _, bare, _ = _executor_task(None)
    with pytest.raises(AuthError, match="signed a spec without any"):
        given_rules(bare, {"d": RULES.to_dict()})
    with pytest.raises(InputError, match="not a dataset of the task"):
        given_rules(spec, {"e": RULES.to_dict()})


def test_executor_create_task_enforces_the_signed_rules():
    tasks, spec, approvals = _executor_task(RULES.digest())
    schemas = {"d": SCHEMA}
    weaker = load_rules({"aggregation": {**AGG, "min_identities": 1}}).to_dict()
    with pytest.raises(AuthError, match="not the ones its owner signed"):
        tasks.create(spec, approvals, schemas, rules={"d": weaker})
    with pytest.raises(InputError, match="needs their catalogued schemas"):
        tasks.create(spec, approvals, None, rules={"d": RULES.to_dict()})
    tasks.create(spec, approvals, schemas, rules={"d": RULES.to_dict()})
    # a query the rules do not grant is refused at create-task, before any data moves
    tasks, spec, approvals = _executor_task(RULES.digest(), "SELECT max(cost) FROM d")
    with pytest.raises(ParameterError, match=r"aggregation rule\), in SELECT: aggregate max"):
        tasks.create(spec, approvals, schemas, rules={"d": RULES.to_dict()})
    # a computation the rules do not list is refused
    tasks, spec, approvals = _executor_task(RULES.digest(), compute="linear_regression")
    with pytest.raises(ParameterError, match="allow only sql, not linear_regression"):
        tasks.create(spec, approvals, schemas, rules={"d": RULES.to_dict()})


# -- the scheduler publishes rules and relays them ----------------------------------------


def test_scheduler_publishes_checks_and_relays_the_rules():
    import json

    from teeflow.core.schemas import schema_to_b64
    from teeflow.scheduler.service import Scheduler
    from teeflow.scheduler.store import Store
    from tests.factories import scheduler_app, submit_signature
    from tests.test_scheduler_api import SCHEMA as API_SCHEMA
    from tests.test_scheduler_api import FakeExecutor, World

    store = Store(":memory:")
    fake = FakeExecutor()
    scheduler = Scheduler(store, connect=fake.connect)
    with scheduler_app(store, scheduler) as api:
        world = World(api, store, scheduler, fake)
        world.register()
        bad = world.call("alice", "POST", "/v1/datasets", {
            "name": "a_data", "owner": "alice", "schema": schema_to_b64(API_SCHEMA),
            "rows": 2, "rules": {"aggregation": {**AGG, "aggregates": {"max": ["value"]}}}})
        assert bad.status_code == 400 and "rules.aggregation.aggregates.max" in bad.text
        rules = load_rules({"aggregation": {**AGG, "identity": "name"}})
        r = world.call("alice", "POST", "/v1/datasets", {
            "name": "a_data", "owner": "alice", "schema": schema_to_b64(API_SCHEMA),
            "rows": 2, "rules": rules.to_dict()})
        assert r.status_code == 200, r.text
        listed = {d["name"]: d for d in world.call("carol", "GET", "/v1/datasets").json()}
        assert listed["a_data"]["rules"] == rules.to_dict()
        assert listed["a_data"]["rules_digest"] == rules.digest()
        assert listed["b_data"]["rules"] is None and listed["b_data"]["rules_digest"] is None

        bare = world.spec()  # no rules digest for a_data: refused at submit
        r = world.submit(bare)
        assert r.status_code == 400 and "analysis rules digest" in r.text
        refs = tuple(dataclasses.replace(d, rules=rules.digest()) if d.name == "a_data" else d
                     for d in bare.datasets)
        spec = world.spec(datasets=refs)
        r = world.submit(spec, submit_signature(spec, world.initiator))
        assert r.status_code == 201, r.text
        for who in ("alice", "bob"):
            assert world.decide(who, spec).status_code == 200
        created = json.loads(fake.kinds("create-task")[-1])
        assert created["rules"] == {"a_data": rules.to_dict()}
    store.close()


def test_cli_summarises_published_rules():
    from teeflow.cli.initiator import rules_summary

    assert rules_summary(None) == "-"
    text = rules_summary(load_rules({"aggregation": AGG, "list": {
        "list_columns": ["region"], "join_columns": ["pid"]}}).to_dict())
    assert "aggregation: count(*|pid), sum(cost); by region; join on pid; >= 3 pid per row" \
        in text
    assert "list: region (join on pid)" in text
