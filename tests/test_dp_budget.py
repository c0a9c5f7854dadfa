"""The owner's privacy budget: its config table, the pure charging rule, the SQLite ledger
(atomic, by spec digest, across threads, processes and restarts) and the provider's signing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teeflow.core.crypto import KeySigner
from teeflow.core.errors import ConfigError, InputError, OverBudget
from teeflow.core.schemas import schema_fingerprint
from teeflow.provider.budget import (
    Charge,
    Ledger,
    PrivacyConfig,
    load_privacy,
    privacy_charges,
)
from teeflow.provider.config import DatasetConfig, ProviderConfig, check_config
from teeflow.provider.consent import ApprovalRule, Constraint
from teeflow.provider.node import Provider
from tests.factories import appraisal_policy, make_spec, receiver

OWNER, OTHER, INITIATOR = KeySigner.generate(), KeySigner.generate(), KeySigner.generate()
TABLE = pa.table({"pid": ["a", "b", "c"], "v": [1.0, 2.0, 3.0]})
FP = schema_fingerprint(TABLE.schema)
PATIENTS = PrivacyConfig(epsilon_budget=3.0, max_epsilon_per_task=1.0, required=True,
                         identity="pid")
COUNT = {"statistic": "count", "identity": "pid"}


def _spec(compute_name="dp_aggregate", params=None, task_id="task0001", datasets=("patients",)):
    refs = [(d, "alice", OWNER, FP) for d in datasets] + [("theirs", "bob", OTHER, FP)]
    return make_spec(refs, INITIATOR, compute_name,
                     params if params is not None else {**COUNT, "epsilon": "1"},
                     task_id=task_id)


# -- config ------------------------------------------------------------------------------------
def _doc(tmp_path: Path, privacy) -> dict:
    (tmp_path / "a.csv").write_text("pid,v\na,1\n")
    return {"node": {"name": "alice", "key_file": "alice.key", "scheduler": "http://x"},
            "datasets": [{"name": "a", "path": "a.csv", "privacy": privacy}],
            "policy": {"tee_types": ["simulated"], "allow_simulated": True,
                       "simulated": {"measurement": "ab" * 32}}}


def test_privacy_table_from_toml(tmp_path):
    import tomllib
    doc = tomllib.loads(textwrap.dedent("""
        [[datasets]]
        name = "a"
        path = "a.csv"
        [datasets.privacy]
        epsilon_budget = 3.0
        max_epsilon_per_task = 1
        required = true
        identity = "pid"
    """))
    base = _doc(tmp_path, None)
    base["datasets"] = doc["datasets"]
    cfg = check_config(base, tmp_path)
    assert cfg.datasets[0].privacy == PrivacyConfig(3.0, 1.0, True, "pid")
    assert cfg.budget_path == tmp_path / "alice.key.budget.sqlite"
    base["node"]["budget_file"] = "state/b.sqlite"
    assert check_config(base, tmp_path).budget_path == tmp_path / "state/b.sqlite"


@pytest.mark.parametrize("privacy,field", [
    ({}, "privacy.epsilon_budget"),
    ({"epsilon_budget": 0}, "privacy.epsilon_budget"),
    ({"epsilon_budget": -1.0}, "privacy.epsilon_budget"),
    ({"epsilon_budget": True}, "privacy.epsilon_budget"),
    ({"epsilon_budget": float("inf")}, "privacy.epsilon_budget"),
    ({"epsilon_budget": 1, "max_epsilon_per_task": 2}, "privacy.max_epsilon_per_task"),
    ({"epsilon_budget": 1, "required": "yes"}, "privacy.required"),
    ({"epsilon_budget": 1, "identity": ""}, "privacy.identity"),
    ({"epsilon_budget": 1, "delta_budget": 1}, "privacy.delta_budget"),
    ("3.0", "datasets[0].privacy"),
])
def test_bad_privacy_tables_name_the_field(tmp_path, privacy, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        check_config(_doc(tmp_path, privacy), tmp_path)


def test_cap_defaults_to_the_budget():
    assert load_privacy({"epsilon_budget": 2}, "p").max_epsilon_per_task == 2.0


# -- the pure rule -----------------------------------------------------------------------------
def test_dp_task_is_charged_its_epsilon_on_each_of_my_datasets_only():
    spec = _spec(datasets=("patients", "visits"))
    charges = privacy_charges(spec, OWNER.public_key(),
                              {"patients": PATIENTS, "visits": PATIENTS, "theirs": PATIENTS})
    assert charges == [Charge("patients", 1.0, 0.0, 3.0), Charge("visits", 1.0, 0.0, 3.0)]


def test_non_dp_computation_on_a_required_dataset_is_refused():
    spec = _spec("linear_regression", {"label": "v"})
    with pytest.raises(InputError, match="dataset 'patients' requires differential privacy"):
        privacy_charges(spec, OWNER.public_key(), {"patients": PATIENTS})
    loose = PrivacyConfig(3.0, 1.0, required=False)
    assert privacy_charges(spec, OWNER.public_key(), {"patients": loose}) == []
    assert privacy_charges(spec, OWNER.public_key(), {"patients": None}) == []


def test_over_the_per_task_cap_is_refused():
    spec = _spec(params={**COUNT, "epsilon": "1.5"})
    with pytest.raises(InputError, match="dataset 'patients': epsilon 1.5 is over its per-task"):
        privacy_charges(spec, OWNER.public_key(), {"patients": PATIENTS})


@pytest.mark.parametrize("params", [
    {"statistic": "count", "epsilon": "1"},  # each row its own identity: unbounded people
    {"statistic": "count", "epsilon": "1", "identity": "v"},
])
def test_contributions_must_be_bounded_by_the_declared_identity(params):
    with pytest.raises(InputError, match="identity column 'pid'"):
        privacy_charges(_spec(params=params), OWNER.public_key(), {"patients": PATIENTS})


def test_bad_dp_params_are_refused_before_any_charge():
    with pytest.raises(InputError, match="'epsilon'"):
        privacy_charges(_spec(params={**COUNT, "epsilon": "0"}), OWNER.public_key(),
                        {"patients": PATIENTS})


# -- the ledger --------------------------------------------------------------------------------
def _charge(eps=1.0, dataset="patients", budget=3.0):
    return [Charge(dataset, eps, 0.0, budget)]


def test_debit_refuses_an_overdraw_naming_the_dataset(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite")
    for i in range(3):
        ledger.debit(f"d{i}", f"t{i}", _charge())
    with pytest.raises(OverBudget, match="dataset 'patients': privacy budget would be "
                                         r"overdrawn \(epsilon 1 asked, 0 of 3 left\)"):
        ledger.debit("d3", "t3", _charge())
    assert sum(s["epsilon"] for s in ledger.spends("patients")) == 3.0


def test_the_same_spec_digest_is_debited_once(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite")
    for _ in range(5):
        ledger.debit("same", "t", _charge())
    assert len(ledger.spends("patients")) == 1


def test_a_spec_over_two_datasets_debits_both_or_neither(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite")
    ledger.debit("d0", "t0", _charge(2.5, "b"))
    with pytest.raises(OverBudget, match="'b'"):
        ledger.debit("d1", "t1", [*_charge(1.0, "a"), *_charge(1.0, "b")])
    assert ledger.spends("a") == []


def test_many_small_spends_fill_the_budget_exactly(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite")
    for i in range(10):
        ledger.debit(f"d{i}", "t", _charge(0.1, budget=1.0))
    with pytest.raises(OverBudget):
        ledger.debit("d10", "t", _charge(0.1, budget=1.0))


def test_concurrent_signing_threads_never_overdraw(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite")
    ok, refused = [], []
    barrier = threading.Barrier(16)

    def sign(i: int) -> None:
        barrier.wait()
        try:
            ledger.debit(f"d{i}", f"t{i}", _charge())
            ok.append(i)
        except OverBudget:
            refused.append(i)

    threads = [threading.Thread(target=sign, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 3 and len(refused) == 13


_DEBIT = """
import sys
from pathlib import Path
from teeflow.core.errors import OverBudget
from teeflow.provider.budget import Charge, Ledger
ledger = Ledger(Path(sys.argv[1]))
sys.stdin.read()  # start together
try:
    ledger.debit(sys.argv[2], "t", [Charge("patients", 1.0, 0.0, 3.0)])
    print("ok")
except OverBudget:
    print("refused")
"""


def test_concurrent_provider_processes_and_restarts_never_overdraw(tmp_path):
    """Eight processes on one budget file at once (as two providers, or one restarted
    mid-way, would share it): three debits fit, and a fresh process after them sees them."""
    path = tmp_path / "b.sqlite"
    env_path = str(Path(__file__).resolve().parents[1] / "src")
    procs = [subprocess.Popen([sys.executable, "-c", _DEBIT, str(path), f"d{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": env_path})
             for i in range(8)]
    outs = [p.communicate("", timeout=120)[0].strip() for p in procs]
    assert sorted(outs) == ["ok"] * 3 + ["refused"] * 5
    again = subprocess.run([sys.executable, "-c", _DEBIT, str(path), "d-new"], input="",
                           capture_output=True, text=True, env={"PYTHONPATH": env_path},
                           timeout=120)
    assert again.stdout.strip() == "refused"
    assert len(Ledger(path).spends("patients")) == 3


# -- the provider's signing ----------------------------------------------------------------------
class _Scheduler:
    def log_key(self) -> None:  # specs here name no scheduler (make_spec's default)
        return None

    def __init__(self) -> None:
        self.decisions: list[tuple[str, str]] = []

    def decide(self, task_id: str, decision: str, signature: str) -> None:
        self.decisions.append((task_id, decision))


def _provider(tmp_path: Path, rule: bool = True) -> Provider:
    path = tmp_path / "patients.parquet"
    pq.write_table(TABLE, path)
    bound = {"epsilon": Constraint("range", high=1.0), "identity": Constraint("values", ("pid",)),
             **{n: Constraint("default") for n in ("max_contributions", "column", "lower",
                                                    "upper", "group_by")}}
    rules = (ApprovalRule(("dp_aggregate", "linear_regression"), ("patients",),
                          (receiver(INITIATOR),), (), tuple(bound.items())),) if rule else ()
    cfg = ProviderConfig(name="alice", key_file=tmp_path / "alice.key",
                         scheduler="https://x#sha256:" + "0" * 64,
                         datasets=(DatasetConfig("patients", path, PATIENTS),),
                         policy=appraisal_policy(), approve=rules)
    node = Provider(cfg, identity=OWNER)
    node.scheduler = _Scheduler()  # type: ignore[assignment]
    return node


def _item(spec) -> dict:
    return {"kind": "approve", "task_id": spec.task_id, "spec": spec.to_dict(),
            "spec_digest": spec.digest()}


def test_provider_signs_within_budget_then_rejects_and_a_restart_keeps_the_spend(tmp_path):
    node = _provider(tmp_path)
    for i in range(3):
        assert node.consider(_item(_spec(task_id=f"task000{i}"))) == "approved"
    assert node.consider(_item(_spec(task_id="task0000"))) == "approved"  # same digest: no debit
    assert node.consider(_item(_spec(task_id="task0003"))) == "rejected"
    restarted = _provider(tmp_path)  # a new process on the same state
    assert restarted.consider(_item(_spec(task_id="task0004"))) == "rejected"
    spent = restarted.privacy.ledger.report({"patients": PATIENTS})[0]
    assert spent["spent"] == 3.0 and spent["remaining"] == 0.0
    assert {s["task_id"] for s in spent["spends"]} == {"task0000", "task0001", "task0002"}


def test_provider_rejects_non_dp_and_over_cap_without_debit(tmp_path):
    node = _provider(tmp_path)
    assert node.consider(_item(_spec("linear_regression", {"label": "v"}))) == "rejected"
    assert node.consider(_item(_spec(params={**COUNT, "epsilon": "1.5"}))) == "rejected"
    assert node.privacy.ledger.spends("patients") == []


def test_task_waiting_for_a_person_is_not_debited_until_its_upload(tmp_path):
    node = _provider(tmp_path, rule=False)
    spec = _spec()
    assert node.consider(_item(spec)) is None  # waits for `teeflow approve`
    assert node.privacy.ledger.spends("patients") == []
    node.privacy.charge(spec)  # what handle() does before a byte leaves
    node.privacy.charge(spec)
    assert len(node.privacy.ledger.spends("patients")) == 1


# -- `teeflow budget` --------------------------------------------------------------------------
def test_budget_command_shows_total_spent_remaining_and_tasks(tmp_path):
    import json

    from click.testing import CliRunner

    from teeflow.cli.main import cli

    (tmp_path / "p.csv").write_text("pid,v\na,1\n")
    (tmp_path / "o.csv").write_text("pid,v\na,1\n")
    config = tmp_path / "alice.toml"
    config.write_text(textwrap.dedent(f"""
        [node]
        name = "alice"
        key_file = "alice.key"
        scheduler = "http://127.0.0.1:1"
        [[datasets]]
        name = "patients"
        path = "p.csv"
        [datasets.privacy]
        epsilon_budget = 3.0
        max_epsilon_per_task = 1.0
        required = true
        identity = "pid"
        [[datasets]]
        name = "open"
        path = "o.csv"
        [policy]
        tee_types = ["simulated"]
        allow_simulated = true
        [policy.simulated]
        measurement = "{'ab' * 32}"
    """))
    runner = CliRunner()
    fresh = runner.invoke(cli, ["budget", "--config", str(config), "--json"])
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.output)["datasets"][0]["remaining"] == 3.0
    assert not (tmp_path / "alice.key.budget.sqlite").exists()  # reading creates nothing
    ledger = Ledger(tmp_path / "alice.key.budget.sqlite")
    ledger.debit("ab" * 32, "task0001", _charge(0.75))
    ledger.close()
    out = json.loads(runner.invoke(cli, ["budget", "--config", str(config), "--json"]).output)
    patients, other = out["datasets"]
    assert (patients["epsilon_budget"], patients["spent"], patients["remaining"]) == \
        (3.0, 0.75, 2.25)
    assert patients["spends"][0]["spec_digest"] == "ab" * 32
    assert other["epsilon_budget"] is None and other["spends"] == []
    text = runner.invoke(cli, ["budget", "--config", str(config)], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "patients" in text.output and "2.25" in text.output
    assert "task0001" in text.output


def test_upload_of_a_hand_signed_non_dp_task_on_a_required_dataset_is_refused(tmp_path):
    node = _provider(tmp_path, rule=False)
    with pytest.raises(InputError, match="'patients' requires differential privacy"):
        node.privacy.charge(_spec("linear_regression", {"label": "v"}))


class _Reports:
    def log_key(self) -> None:  # specs here name no scheduler (make_spec's default)
        return None

    def __init__(self) -> None:
        self.reports: list[tuple] = []

    def report(self, task_id, dataset, state, **extra):
        self.reports.append((state, extra))


def test_a_scheduler_reassigning_a_signed_dp_task_gets_no_second_upload(tmp_path):
    """The scheduler's operator hands the same signed DP task to a second executor, to
    average two noised releases: the dataset goes out once per spec."""
    from tests.factories import approval

    node = _provider(tmp_path)
    node.scheduler = _Reports()  # type: ignore[assignment]
    spec = _spec()
    signed = approval(spec, OWNER)
    node.signed.record(spec, "owner")  # signed with this node's key, as `teeflow approve` does
    item = {"kind": "upload", "task_id": spec.task_id, "dataset": "patients",
            "executor": "127.0.0.1:1", "spec": spec.to_dict(),
            "approvals": [{"owner_key": OWNER.public_key(), "decision": "approved",
                           "signature": signed["signature"]}]}
    node.handle(item)  # the first executor (unreachable here): the send is claimed
    first = [e for s, e in node.scheduler.reports if s == "failed"]
    assert first and "already sent" not in first[-1]["error"]
    assert len(node.privacy.ledger.spends("patients")) == 1  # reached the debit, then failed
    node.handle({**item, "executor": "127.0.0.1:2"})
    second = [e for s, e in node.scheduler.reports if s == "failed"][-1]["error"]
    assert "dataset 'patients': already sent once for this DP task" in second
    assert len(node.privacy.ledger.spends("patients")) == 1


def test_non_dp_tasks_may_be_sent_again(tmp_path):
    node = _provider(tmp_path)
    loose = PrivacyConfig(3.0, 1.0, required=False)
    node.privacy.privacy = {"patients": loose}
    spec = _spec("linear_regression", {"label": "v"})
    node.privacy.before_upload(spec, "patients")
    node.privacy.before_upload(spec, "patients")
