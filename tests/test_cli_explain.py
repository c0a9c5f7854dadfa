"""The CLI explains itself: computations and their parameters, datasets with columns,
`wait`, `approve` showing what it signs, `--json` / `--version` / full ids / global options
after the subcommand, named errors instead of tracebacks, the executor's measurement, who
signed each audit entry, training-set metrics, and `teeflow doctor`.

Real processes (LocalCluster) where a scheduler is needed; the CLI runs as a subprocess,
as a user runs it, or through click's CliRunner where no server is involved.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from teeflow import compute
from teeflow.attestation.simulated import code_measurement
from teeflow.cli.cluster import LocalCluster, Party, policy_toml
from teeflow.cli.common import hoist_global_options, metrics_lines, signer_label
from teeflow.cli.demo import make_party_data
from teeflow.cli.main import cli
from teeflow.core.errors import ConfigError
from teeflow.files.keys import load_key
from teeflow.sdk import Client
from tests.factories import appraisal_policy, run_cli, wait_task_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _named_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error" in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """alice approves by rule; bob has no rule and signs by hand (`teeflow approve`)."""
    work = tmp_path_factory.mktemp("explain")
    make_party_data(work / "alice.csv", 400, seed=1)
    make_party_data(work / "bob.csv", 300, seed=2)
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        c.start_provider(Party("alice", "ex_alice", work / "alice.csv"))
        c.start_provider(Party("bob", "ex_bob", work / "bob.csv"), approve=False)
        c.wait_for_datasets(["ex_alice", "ex_bob"])
        c.wait_for_executor(c.executor_address)
        policy = work / "policy.toml"
        policy.write_text(policy_toml(code_measurement()))
        c.env = {"TEEFLOW_SCHEDULER": c.scheduler_url, "TEEFLOW_KEY": str(c.initiator_key),
                 "TEEFLOW_POLICY": str(policy)}
        yield c


def _submit(c: LocalCluster, *datasets: str) -> str:
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()) as client:
        return str(client.submit(list(datasets), None, "logistic_regression",
                                 {"label": "y"})["id"])


# -- 1. computations -------------------------------------------------------------------------
def test_computations_lists_the_catalog_with_parameters_and_what_reveals():
    runner = CliRunner()
    listing = runner.invoke(cli, ["computations"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    for name in compute.names():
        assert name in listing.output
    one = runner.invoke(cli, ["computations", "sql"], env={"COLUMNS": "200"})
    assert one.exit_code == 0
    assert "query (str, required)  [REVEALING]" in one.output
    assert "min_group_size (int, default 10; >= 1" in one.output
    assert "reveals: query, min_group_size" in one.output
    as_json = json.loads(runner.invoke(cli, ["computations", "--json"]).output)
    assert [e["name"] for e in as_json] == compute.names()
    xgb = next(e for e in as_json if e["name"] == "xgboost")
    depth = next(p for p in xgb["params"] if p["name"] == "max_depth")
    assert depth == {**depth, "type": "int", "default": 6, "min": 1, "max": 20}
    assert "max_depth" in xgb["revealing"]
    vertical = json.loads(runner.invoke(cli, ["computations", "vertical", "--json"]).output)
    assert {"id", "model", "max_depth"} <= {p["name"] for p in vertical["params"]}
    unknown = run_cli("computations", "nope")
    _named_error(unknown, "unknown computation 'nope'")


# -- 2. datasets with columns ------------------------------------------------------------------
def test_datasets_show_columns_and_types(cluster):
    shown = run_cli("datasets", env=cluster.env, columns=200)
    assert shown.returncode == 0, shown.stderr
    assert "ex_alice" in shown.stdout and "y: int64" in shown.stdout
    assert "x0: double" in shown.stdout
    entries = json.loads(run_cli("datasets", "--json", env=cluster.env).stdout)
    alice = next(d for d in entries if d["name"] == "ex_alice")
    assert any(col["name"] == "y" and col["type"] == "int64" for col in alice["columns"])
    assert alice["rows"] == 400 and alice["owner"] == "alice"


# -- 3. wait, 4. approve -------------------------------------------------------------------------
def test_approve_shows_the_spec_and_refusing_signs_nothing(cluster):
    c = cluster
    task_id = _submit(c, "ex_alice", "ex_bob")
    bob = str(c.workdir / "bob.key")
    refused = run_cli("approve", task_id, "--key", bob, env=c.env, input="n\n", columns=200)
    assert refused.returncode != 0
    assert "not signed" in refused.stderr and "Traceback" not in refused.stderr
    out = refused.stdout
    assert "'logistic_regression'" in out and "param label = 'y'" in out
    assert "param C = 1.0 (default)" in out
    assert "input 'ex_alice' owned by 'alice'" in out and "owned by 'bob'" in out
    assert "result sealed to initiator (initiator)" in out
    assert "executor policy: tee simulated; simulated allowed; no debug" in out
    assert code_measurement()[:16] in out and "spec digest" in out
    closed_stdin = run_cli("approve", task_id, "--key", bob, env=c.env, input="")
    assert closed_stdin.returncode != 0 and "not signed" in closed_stdin.stderr
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()) as client:
        task = wait_task_state(client, task_id, {"submitted"})
        bob_key = load_key(Path(bob)).public_key()
        assert bob_key not in [a["owner_key"] for a in task["approvals"]]  # nothing signed
        signed = run_cli("approve", task_id, "--key", bob, env=c.env, input="y\n")
        assert signed.returncode == 0, signed.stderr
        assert "approved; task is now" in signed.stdout
        assert bob_key in [a["owner_key"] for a in client.task(task_id)["approvals"]]


def test_wait_resumes_a_task_submitted_with_no_wait(cluster, tmp_path):
    c = cluster
    sent = run_cli("submit", "--datasets", "ex_alice", "--compute", "logistic_regression",
                "--param", "label=y", "--no-wait", env=c.env, columns=200)
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.split("task ", 1)[1].split()[0]
    assert f"teeflow wait {task_id}" in sent.stdout
    out = tmp_path / "model.json"
    waited = run_cli("wait", task_id, "--out", str(out), env=c.env, columns=200)
    assert waited.returncode == 0, waited.stderr
    assert "rows uploaded" in waited.stderr  # the same progress as submit
    assert json.loads(out.read_text())["task_id"] == task_id
    # 7: the metrics printed say which rows they were measured on
    assert "accuracy (training set)" in waited.stdout
    again = json.loads(run_cli("wait", task_id, "--json", env=c.env).stdout)
    assert again["id"] == task_id and again["state"] in ("done", "released")
    rejected = _submit(c, "ex_bob")
    assert run_cli("reject", rejected, "--yes", "--key", str(c.workdir / "bob.key"),
                env=c.env).returncode == 0
    failed = run_cli("wait", rejected, env=c.env)
    _named_error(failed, "rejected")


# -- 5. --json, --version, full ids, global options after the subcommand ------------------------
def test_json_version_full_ids_and_options_after_the_subcommand(cluster):
    c = cluster
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("teeflow, version ")
    task_id = _submit(c, "ex_alice")
    listing = run_cli("tasks", env=c.env, columns=80)
    assert listing.returncode == 0 and task_id in listing.stdout  # whole, at 80 columns
    rows = json.loads(run_cli("tasks", "--json", env=c.env).stdout)
    assert task_id in [t["id"] for t in rows]
    assert json.loads(run_cli("status", task_id, "--json", env=c.env).stdout)["id"] == task_id
    executors = json.loads(run_cli("executors", "--json", env=c.env).stdout)
    assert executors[0]["verdict"] == "accepted"
    entries = json.loads(run_cli("audit", "show", task_id, "--json", env=c.env).stdout)
    assert entries[0]["kind"] == "submitted"
    assert json.loads(run_cli("audit", "checkpoint", "--json", env=c.env).stdout)["note"]
    # the group's options after the subcommand, as the README writes them
    bare = {k: v for k, v in c.env.items() if k not in ("TEEFLOW_SCHEDULER", "TEEFLOW_KEY")}
    after = run_cli("status", task_id, "--json", "--scheduler", c.scheduler_url,
                 f"--key={c.initiator_key}", env=bare)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["id"] == task_id


def test_hoisting_moves_only_the_group_options():
    assert hoist_global_options(["approve", "ID", "--key", "a.key", "--yes"]) == \
        ["--key", "a.key", "approve", "ID", "--yes"]
    assert hoist_global_options(["tasks", "--scheduler=https://x"]) == \
        ["--scheduler=https://x", "tasks"]
    assert hoist_global_options(["submit", "--", "--key", "v"]) == \
        ["submit", "--", "--key", "v"]
    # no subcommand may own an option of these names, or it would be taken from it
    for name, command in cli.commands.items():
        group = [command, *getattr(command, "commands", {}).values()]
        for cmd in group:
            for param in cmd.params:
                assert not {"--key", "--scheduler"} & set(param.opts), (name, param.opts)


# -- 6. named errors instead of tracebacks ------------------------------------------------------
def _held_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


@pytest.mark.parametrize("args,words", [
    (["scheduler", "--db", "{tmp}/s.sqlite", "--listen", "127.0.0.1:{held}"],
     ["already in use"]),
    (["executor", "--listen", "127.0.0.1:{held}"], ["already in use"]),
    (["scheduler", "--db", "{tmp}/s.sqlite", "--listen", "nonsense"], ["--listen", "HOST:PORT"]),
    (["executor", "--listen", "nonsense"], ["--listen", "HOST:PORT"]),
    (["scheduler", "--db", "/proc/teeflow.sqlite", "--listen", "127.0.0.1:0"],
     ["--db", "cannot write"]),
    (["scheduler", "--db", "{tmp}/no/such/dir/s.sqlite", "--listen", "127.0.0.1:0"],
     ["--db", "does not exist"]),
    (["scheduler", "--db", "{tmp}", "--listen", "127.0.0.1:0"], ["--db", "is a directory"]),
    (["executor", "--listen", "127.0.0.1:0", "--spill-dir", "/proc/teeflow-spill"],
     ["--spill-dir", "cannot create"]),
    (["executor", "--listen", "127.0.0.1:0", "--tee", "sgx", "--attestation-dir",
      "{tmp}/gone"], ["--attestation-dir", "no such directory"]),
])
def test_daemon_mistakes_are_named_errors(tmp_path, args, words):
    sock, held = _held_port()
    try:
        proc = run_cli(*(a.format(tmp=tmp_path, held=held) for a in args))
    finally:
        sock.close()
    _named_error(proc, *words)


def test_a_mistyped_key_is_an_error_never_a_new_key(cluster, tmp_path):
    typo = tmp_path / "initator.key"
    proc = run_cli("tasks", "--key", str(typo), env=cluster.env)
    _named_error(proc, "--key", str(typo), "no such key file")
    default = run_cli("tasks", env={**cluster.env, "TEEFLOW_KEY": "", "HOME": str(tmp_path)})
    _named_error(default, "no such key file")
    assert not typo.exists() and not (tmp_path / ".config").exists()
    with pytest.raises(ConfigError, match="no such file"):
        Client(cluster.scheduler_url, key=typo)
    assert not typo.exists()
    # a provider makes its key only on the start that spends an invitation
    from teeflow.provider.config import ProviderConfig
    from teeflow.provider.node import Provider

    config = ProviderConfig(name="zed", key_file=typo, scheduler=cluster.scheduler_url,
                            datasets=(), policy=appraisal_policy())
    with pytest.raises(ConfigError, match="no such file"):
        Provider(config)
    assert not typo.exists()
    made = run_cli("init", "--key", str(typo), "--json")
    assert made.returncode == 0 and json.loads(made.stdout)["made"] is True
    assert typo.exists() and (typo.stat().st_mode & 0o777) == 0o600


def test_a_stale_policy_variable_breaks_only_what_needs_a_policy(cluster, tmp_path):
    stale = {**cluster.env, "TEEFLOW_POLICY": str(tmp_path / "moved.toml")}
    assert run_cli("tasks", env=stale).returncode == 0
    assert run_cli("datasets", env=stale).returncode == 0
    _named_error(run_cli("executors", env=stale), "TEEFLOW_POLICY", "moved.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[policy\n")
    _named_error(run_cli("executors", env={**cluster.env, "TEEFLOW_POLICY": str(broken)}),
                 "TEEFLOW_POLICY", "broken.toml")
    # an error quoting text that looks like console markup is printed as it is
    odd = tmp_path / "p[" / "x]policy.toml"
    _named_error(run_cli("executors", env={**cluster.env, "TEEFLOW_POLICY": str(odd)}),
                 "p[/x]policy.toml")


def test_ctrl_c_while_waiting_says_how_to_resume(cluster):
    c = cluster
    task_id = _submit(c, "ex_alice", "ex_bob")  # waits for bob, who has no rule
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT / "src"), **c.env}
    proc = subprocess.Popen([sys.executable, "-m", "teeflow.cli.main", "wait", task_id],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()) as cl:
            wait_task_state(cl, task_id, {"submitted"})
            assert proc.stderr is not None
            assert proc.stderr.readline().startswith(f"waiting for task {task_id}")
            time.sleep(0.5)  # into the polling loop; not a duration asserted
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err
            assert "Traceback" not in err and f"teeflow wait {task_id}" in err
            assert cl.task(task_id)["state"] == "submitted"  # the task goes on
            cl.cancel(task_id)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 7. the executor's measurement, who signed, training-set metrics ----------------------------
def test_executor_prints_its_measurement(cluster):
    log = (cluster.workdir / "logs" / "executor.log").read_text()
    assert f"measurement = {code_measurement()}" in log


def test_audit_and_status_say_who_signed(cluster):
    c = cluster
    task_id = _submit(c, "ex_alice")
    with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()) as client:
        wait_task_state(client, task_id, {"done", "released"}, timeout=120)
    shown = run_cli("audit", "show", task_id, env=c.env, columns=200)
    assert shown.returncode == 0, shown.stderr
    assert "submitted by initiator (initiator)" in shown.stdout
    assert "approved by alice (owner)" in shown.stdout
    assert "computed by the executor" in shown.stdout
    assert "ed25519" not in shown.stdout
    status = run_cli("status", task_id, env=c.env, columns=200)
    assert "by alice (owner)" in status.stdout and "(by ed25519" not in status.stdout


def test_metrics_say_where_they_were_measured():
    lines = metrics_lines({"metrics": {"accuracy": 0.9}, "test_metrics": {"accuracy": 0.8}})
    assert lines == ["accuracy (training set): 0.9000",
                     "accuracy (held-out test set): 0.8000"]
    only_train = metrics_lines({"metrics": {"rmse": 1.0}})
    assert "rmse (training set): 1.0000" in only_train and "no rows held out" in only_train[-1]
    assert signer_label("ed25519:AAAA", {}) == "an unknown member"
    assert signer_label("p256:BBBB", {}) == "the executor"


# -- 8. doctor -------------------------------------------------------------------------------
def test_doctor_checks_a_node(cluster, tmp_path):
    c = cluster
    good = run_cli("doctor", "--config", str(c.workdir / "alice.toml"), "--json", env=c.env)
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads(good.stdout)
    by_name = {ch["name"]: ch for ch in report["checks"]}
    assert report["ok"] and {"config", "key", "scheduler", "clock", "membership"} <= set(by_name)
    assert by_name[f"executor {c.executor_address}"]["detail"].startswith("accepted")

    refusing = tmp_path / "refusing.toml"
    refusing.write_text((c.workdir / "alice.toml").read_text().replace(
        code_measurement(), "ab" * 32))
    bad = run_cli("doctor", "--config", str(refusing), env=c.env, columns=200)
    assert bad.returncode == 1 and "refused" in bad.stdout and "measurement" in bad.stdout

    wrong_pin = c.scheduler_url.split("#")[0] + "#sha256:" + "0" * 64
    unpinned = run_cli("doctor", "--scheduler", wrong_pin, env=c.env, columns=200)
    assert unpinned.returncode == 1 and "FAIL scheduler" in unpinned.stdout
    assert "not the pinned" in unpinned.stdout

    nokey = run_cli("doctor", "--key", str(tmp_path / "missing.key"), env=c.env, columns=200)
    assert nokey.returncode == 1 and "FAIL key" in nokey.stdout
    assert not (tmp_path / "missing.key").exists()

    broken = tmp_path / "broken.toml"
    broken.write_text("[node]\nname = 1\n")
    assert run_cli("doctor", "--config", str(broken), env=c.env).returncode == 1

    initiator = run_cli("doctor", env=c.env, columns=200)  # --key/--scheduler/TEEFLOW_POLICY
    assert initiator.returncode == 0, initiator.stdout
    assert "accepted" in initiator.stdout


def test_doctor_names_a_clock_off_by_minutes(cluster, monkeypatch):
    """The clock check compares with the scheduler's Date header; only doctor's own reading
    of the time is moved here, so the signed requests still go out on time."""
    import types

    from teeflow.cli import doctor

    real = time.time
    monkeypatch.setattr(doctor, "time", types.SimpleNamespace(time=lambda: real() + 120))
    env = {**cluster.env, "COLUMNS": "200"}
    out = CliRunner().invoke(cli, ["doctor", "--json"], env=env)
    assert out.exit_code == 1
    checks = {ch["name"]: ch for ch in json.loads(out.output)["checks"]}
    assert not checks["clock"]["ok"] and "ahead of the scheduler" in checks["clock"]["detail"]
    assert checks["scheduler"]["ok"] and checks["membership"]["ok"]


def test_a_catalog_schema_that_is_not_its_fingerprint_is_refused():
    import pyarrow as pa

    from teeflow.cli.initiator import columns_of
    from teeflow.core.errors import InputError
    from teeflow.core.schemas import schema_fingerprint, schema_to_b64

    schema = pa.schema([("age", pa.int64()), ("bmi", pa.float64())])
    entry = {"name": "d", "schema_b64": schema_to_b64(schema),
             "fingerprint": schema_fingerprint(schema)}
    assert columns_of(entry) == [{"name": "age", "type": "int64", "nullable": True},
                                 {"name": "bmi", "type": "double", "nullable": True}]
    other = pa.schema([("age", pa.string())])
    with pytest.raises(InputError, match="does not match its fingerprint"):
        columns_of({**entry, "schema_b64": schema_to_b64(other)})


def test_invite_prints_json(tmp_path):
    out = CliRunner().invoke(cli, ["scheduler", "invite", "--db", str(tmp_path / "s.sqlite"),
                                   "--role", "owner", "--name", "ann", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["invitation"].startswith("tfi_") and doc["roles"] == ["owner"]
    assert doc["scheduler_certificate"].startswith("sha256:")


class _SwappingScheduler:
    """A scheduler that shows one spec and, asked again, serves another under the same id."""

    def __init__(self, shown: dict, swapped: dict) -> None:
        self.answers = [shown, swapped]
        self.decided: list[str] = []

    def task(self, task_id: str) -> dict:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def nodes(self) -> list:
        return []

    def decide(self, task_id: str, decision: str, signature: str) -> dict:
        self.decided.append(signature)
        return {"state": "submitted"}

    def close(self) -> None:
        pass


def test_approve_signs_only_the_spec_it_showed(monkeypatch, tmp_path):
    """A scheduler that swaps the spec between the display and the signature gets none."""
    from teeflow.cli import initiator
    from teeflow.core.crypto import KeySigner
    from teeflow.core.errors import AuthError
    from tests.factories import make_spec

    owner, initiator_key = KeySigner.generate(), KeySigner.generate()
    data = [("d1", "ann", owner, "fp")]
    shown = make_spec(data, initiator_key, "logistic_regression", {"label": "y"}, "task0001")
    other = make_spec(data, initiator_key, "logistic_regression", {"label": "x"}, "task0001")

    def task(spec):
        return {"id": "task0001", "spec": spec.to_dict(), "spec_digest": spec.digest(),
                "executor": "127.0.0.1:1"}

    fake = _SwappingScheduler(task(shown), task(other))
    c = Client("https://127.0.0.1:1#sha256:" + "0" * 64, key=owner, specs=tmp_path / "s.db")
    c.scheduler = fake  # type: ignore[assignment]
    monkeypatch.setattr(initiator, "client", lambda *a, **k: c)
    out = CliRunner().invoke(cli, ["approve", "task0001", "--yes"], env={"COLUMNS": "200"})
    assert out.exit_code == 1 and isinstance(out.exception, AuthError)
    assert "spec changed after it was shown" in str(out.exception)
    assert "param label = 'y'" in out.output and fake.decided == []
    with pytest.raises(AuthError, match="changed after it was shown"):
        fake.answers = [task(other)]
        c.decide("task0001", "approved", expect_digest=shown.digest())
    assert fake.decided == []


def test_approve_shows_the_pool_an_owner_signs_for():
    """An owner signing a pool task sees how many executors hold a part of its rows, and
    which (pure: spec_lines over a task as the scheduler lists it)."""
    from teeflow.cli.initiator import spec_lines
    from teeflow.core.crypto import KeySigner
    from tests.factories import make_spec

    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = make_spec([("d", "alice", owner, "f" * 64)], initiator, "linear_regression",
                     {"label": "y"})
    body = {**spec.to_dict(), "pool": 3}
    task = {"id": spec.task_id, "spec": body, "executor": "127.0.0.1:1",
            "spec_digest": "0" * 64, "pool": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    lines = spec_lines(task, {})
    assert ("  runs across a pool of 3 executors, each holding a part of every input: "
            "'127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3'") in lines
    del body["pool"]
    assert not any("pool" in line for line in spec_lines({**task, "pool": None}, {}))
