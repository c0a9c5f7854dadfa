"""Rule 8: nothing derived from the data leaves the TEE except the sealed result.

Every value below is a marker (a unique string, or a number such as 7777.123456 that appears
nowhere else). Each case sends marker data down one failure path of one computation, through
the real Executor (and, for a few, through a real local cluster: scheduler, providers and
executor processes); then every error and status a client saw, every audit entry, every log
record, the scheduler's database file and every process log are searched for every marker.
None may appear.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.cli.cluster import LocalCluster, Party
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import TeeflowError
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.messages import FlRequest
from teeflow.executor.service import Executor, UploadRequest
from tests.factories import appraisal_policy, approval, challenge_for, make_spec
from tests.test_executor_service import SPKI, TLS_KEY

MARKERS: list[str] = []


def mark(text: str) -> str:
    """A marker string: never part of any message, name or code."""
    value = f"QZX{text}{len(MARKERS):03d}MRK"
    MARKERS.append(value)
    return value


def num(i: int) -> float:
    """A marker number: 7777.123456 style, its text appears nowhere else."""
    value = 7777.123456 + i * 1111.000101
    MARKERS.append(repr(value))
    MARKERS.append(f"{value:.4f}")
    return value


def bignum(i: int) -> int:
    value = 918273645 + 104729 * i
    MARKERS.append(str(value))
    return value


def _markers_in(text: str) -> list[str]:
    return [m for m in MARKERS if m in text]


@dataclass
class Case:
    """One failure path: two datasets' tables and the task's parameters."""

    name: str
    compute: str
    params: dict[str, str]
    tables: list[pa.Table]
    expect: str = ""  # a word the public error must still carry
    seen: list[str] = field(default_factory=list)


def _label_table(labels: list[Any], extra: dict[str, list[Any]] | None = None) -> pa.Table:
    n = len(labels)
    cols: dict[str, list[Any]] = {"x1": [num(100 + i) for i in range(n)],
                                  "x2": [float(i % 3) for i in range(n)], "y": labels}
    cols.update(extra or {})
    return pa.table(cols)


def _cases() -> list[Case]:
    three = [mark("labA"), mark("labB"), mark("labC")]
    one = mark("labOnly")
    nums3 = [num(1), num(2), num(3)]
    cases = [
        # -- logistic regression / xgboost: a label without exactly two values
        Case("logreg_three_string_labels", "logistic_regression", {"label": "y"},
             [_label_table([three[0], three[1]] * 4), _label_table([three[2]] * 8)], "two"),
        Case("logreg_one_label", "logistic_regression", {"label": "y"},
             [_label_table([one] * 6), _label_table([one] * 6)], "two"),
        Case("logreg_three_number_labels", "logistic_regression", {"label": "y"},
             [_label_table([nums3[0], nums3[1]] * 4), _label_table([nums3[2]] * 6)], "two"),
        Case("logreg_nan_feature", "logistic_regression", {"label": "y"},
             [_label_table([0, 1] * 4, {"x2": [num(10), math.nan] * 4}),
              _label_table([0, 1] * 4)], "non-finite"),
        Case("logreg_no_train_rows", "logistic_regression",
             {"label": "y", "test_fraction": "0.99"},
             [_label_table([0, 1] * 4), _label_table([0, 1] * 4)], "test_fraction"),
        Case("xgb_three_labels", "xgboost", {"label": "y", "n_estimators": "2"},
             [_label_table([three[0], three[1]] * 4), _label_table([three[2]] * 4)], "two"),
        Case("xgb_nan_label", "xgboost", {"label": "y", "n_estimators": "2",
                                          "objective": "reg:squarederror"},
             [_label_table([num(20), math.nan] * 4), _label_table([num(21)] * 4)],
             "non-finite"),
        # -- linear regression
        Case("linreg_null_feature", "linear_regression", {"label": "y"},
             [_label_table([num(30)] * 6, {"x2": [num(31), None] * 3}),
              _label_table([num(32)] * 6)], "null"),
        Case("linreg_inf_label", "linear_regression", {"label": "y"},
             [_label_table([num(33), math.inf] * 3), _label_table([num(34)] * 6)],
             "non-finite"),
    ]
    # -- model aggregation: parameter names are data too
    def params(names: list[str], values: list[float], n: list[int]) -> pa.Table:
        return pa.table({"name": names, "value": values, "n_samples": n},
                        schema=pa.schema([("name", pa.string()), ("value", pa.float64()),
                                          ("n_samples", pa.int64())]))
    a, b, c = mark("parA"), mark("parB"), mark("parC")
    cases += [
        Case("fedavg_duplicate_names", "model_aggregation", {},
             [params([a, a], [num(40), num(41)], [5, 5]), params([a], [num(42)], [5])],
             "duplicate"),
        Case("fedavg_names_differ", "model_aggregation", {},
             [params([a, b], [num(43), num(44)], [5, 5]), params([a, c], [1.0, 2.0], [7, 7])],
             "differ"),
        Case("fedavg_nan_value", "model_aggregation", {},
             [params([a, b], [math.nan, num(45)], [5, 5]), params([a, b], [1.0, 2.0], [7, 7])],
             "finite"),
        Case("fedavg_n_samples_vary", "model_aggregation", {},
             [params([a, b], [1.0, 2.0], [bignum(1), bignum(2)]),
              params([a, b], [1.0, 2.0], [7, 7])], "n_samples"),
        Case("fedavg_n_samples_negative", "model_aggregation", {},
             [params([a, b], [1.0, 2.0], [-bignum(3)] * 2), params([a, b], [1.0, 2.0], [7, 7])],
             "n_samples"),
        Case("fedavg_null_value", "model_aggregation", {},
             [params([a, b], [None, 1.0], [5, 5]), params([a, b], [1.0, 2.0], [7, 7])], "null"),
    ]
    # -- vertical: ids are data
    ids = [mark(f"id{i}") for i in range(6)]
    cases += [
        Case("vertical_duplicate_ids", "vertical",
             {"id": "pid", "model": "logistic_regression", "label": "y", "min_intersection": "1"},
             [pa.table({"pid": [ids[0], ids[0], ids[1]], "x1": [num(50), num(51), num(52)]}),
              pa.table({"pid": ids[:3], "y": [0, 1, 0]})], "duplicate"),
        Case("vertical_no_common_id", "vertical",
             {"id": "pid", "model": "logistic_regression", "label": "y", "min_intersection": "1"},
             [pa.table({"pid": ids[:3], "x1": [num(53), num(54), num(55)]}),
              pa.table({"pid": ids[3:], "y": [0, 1, 0]})], "minimum"),
        Case("vertical_null_joined", "vertical",
             {"id": "pid", "model": "logistic_regression", "label": "y", "min_intersection": "1"},
             [pa.table({"pid": ids[:3], "x1": [num(56), None, num(57)]}),
              pa.table({"pid": ids[:3], "y": [0, 1, 0]})], "null"),
        Case("vertical_three_labels", "vertical",
             {"id": "pid", "model": "logistic_regression", "label": "y", "min_intersection": "1"},
             [pa.table({"pid": ids[:3], "x1": [num(58), num(59), num(60)]}),
              pa.table({"pid": ids[:3], "y": three})], "two"),
        Case("vertical_below_minimum", "vertical",
             {"id": "pid", "model": "logistic_regression", "label": "y"},
             [pa.table({"pid": ids[:3], "x1": [num(65), num(66), num(67)]}),
              pa.table({"pid": ids[:3], "y": [0, 1, 0]})], "minimum"),
        Case("vertical_null_id", "vertical",
             {"id": "pid", "model": "linear_regression", "label": "y", "min_intersection": "1"},
             [pa.table({"pid": [ids[4], None], "x1": [num(61), num(62)]}),
              pa.table({"pid": ids[4:6], "y": [num(63), num(64)]})], "null"),
    ]
    # -- sql: failures at run time over marker data
    cat = [mark("catX"), mark("catY")]

    def cats(n: int) -> pa.Table:
        return pa.table({"cat": [cat[i % 2] for i in range(n)],
                         "amount": [num(70 + i) for i in range(n)]})
    cases += [
        Case("sql_cast_fails", "sql",
             {"query": "SELECT sum(CAST(cat AS INTEGER)) AS s FROM a_data"},
             [cats(20), cats(20)], "failed"),
        Case("sql_small_group", "sql",
             {"query": "SELECT cat, sum(amount) AS s FROM a_data GROUP BY cat",
              "min_group_size": "50"}, [cats(20), cats(20)], "min_group_size"),
    ]
    # -- user code: whatever it raises or prints stays inside
    code = ("def run(tables):\n"
            "    t = tables['a_data']\n"
            "    v = str(t.column(0).to_pylist())\n"
            "    print(v)\n"
            "    import sys\n"
            "    sys.stderr.write(v)\n"
            "    raise ValueError(v)\n")
    code_mine = code.replace("raise ValueError(v)", "class Mine(Exception): pass\n"
                             "    raise Mine(v)")
    for label, text in (("usercode_raises", code), ("usercode_own_exception", code_mine)):
        cases.append(Case(label, "user_code",
                          {"code": text, "code_sha256": hashlib.sha256(text.encode()).hexdigest(),
                           "cpu_seconds": "20"},
                          [pa.table({"s": [mark("uc0"), mark("uc1")]}),
                           pa.table({"s": [mark("uc2")]})], "raised"))
    return cases


def _upload(ex: Executor, spec: wire.TaskSpec, dataset: str, owner: KeySigner,
            table: pa.Table) -> None:
    challenge = challenge_for(ex, spec.digest(), owner)
    sig = owner.sign(wire.upload_message(spec.task_id, dataset, challenge, SPKI))

    def messages():
        for batch in table.to_batches(max_chunksize=2):
            yield batch, None
        yield None, wire.end_marker(table.num_rows, len(table.to_batches(max_chunksize=2)))

    ex.receive(UploadRequest(spec.task_id, dataset, challenge, sig), table.schema, messages())


def _run_case(ex: Executor, case: Case, index: int) -> str:
    """Run one case to its failure; returns everything a client could see, as text."""
    owners = [KeySigner.generate(), KeySigner.generate()]
    initiator = KeySigner.generate()
    names = ["a_data", "b_data"]
    spec = make_spec([(n, f"owner{i}", owners[i], schema_fingerprint(case.tables[i].schema))
                      for i, n in enumerate(names)], initiator, compute_name=case.compute,
                     params=case.params, task_id=f"leak{index:04d}")
    seen: list[str] = []
    try:
        ex.create_task(spec, [approval(spec, o) for o in owners])
        for i, n in enumerate(names):
            _upload(ex, spec, n, owners[i], case.tables[i])
        ex.run(spec.task_id, background=False)
    except TeeflowError as exc:  # refused before the run: the peer sees this string
        seen.append(f"{type(exc).__name__}: {exc}")
    status = ex.status(spec.task_id) if not seen else {}
    seen.append(repr(status))
    case.seen = seen
    if status and (status["status"] != "failed" or status["inputs_held"]
                   or case.expect not in str(status["error"])):
        seen.append(f"UNEXPECTED {status['status']}: {status['error']}")
    return "\n".join(seen)


def _federated_updates(ex: Executor) -> str:
    """federated_logistic_regression: an update that fails the executor's checks is answered
    without quoting another owner's features or counts."""
    owners = [KeySigner.generate(), KeySigner.generate()]
    initiator = KeySigner.generate()
    schema = pa.schema([("x", pa.float64()), ("y", pa.int64())])
    spec = make_spec([(f"p{i}", f"o{i}", o, schema_fingerprint(schema))
                      for i, o in enumerate(owners)], initiator,
                     compute_name="federated_logistic_regression",
                     params={"label": "y", "min_parties": "2"}, task_id="leakfl01")
    ex.create_task(spec, [approval(spec, o) for o in owners])
    feats = [mark("flA"), mark("flB")]

    def send(i: int, update: dict[str, Any]) -> str:
        challenge = challenge_for(ex, spec.digest(), owners[i])
        payload = wire.canonical(update)
        sig = owners[i].sign(wire.fl_message("fl-update", spec.task_id, f"p{i}", 0, challenge,
                                             SPKI, payload))
        request = FlRequest("fl-update", spec.task_id, f"p{i}", 0, challenge, sig)
        try:
            return repr(ex.fl_update(request, update))
        except TeeflowError as exc:
            return f"{type(exc).__name__}: {exc}"

    n = 12  # an owner's row count is in the audit log by design (`received`), like an upload's
    seen = [send(0, {"weights": [num(80), num(81), num(82)], "n_samples": n,
                     "loss": num(83), "features": feats})]
    for bad in ({"weights": [1.0, 2.0], "n_samples": 5, "loss": 0.1, "features": ["u", "v"]},
                {"weights": [1.0, 2.0], "n_samples": 5, "loss": 0.1, "features": feats},
                {"weights": [1.0, 2.0, 0.0], "n_samples": -5, "loss": 0.1,
                 "features": feats},
                {"weights": [1.0], "n_samples": 5, "loss": 0.1, "features": feats}):
        seen.append(send(1, bad))
    seen.append(repr(ex.status(spec.task_id)))
    return "\n".join(seen)


def test_no_marker_leaves_the_executor(caplog):
    caplog.set_level(logging.DEBUG)
    ex = Executor(SimulatedBackend(), TLS_KEY)
    cases = _cases()
    text = [_run_case(ex, case, i) for i, case in enumerate(cases)]
    text.append(_federated_updates(ex))
    text.append(caplog.text)
    text.extend(f"{r.getMessage()} {r.exc_text or ''} {r.exc_info!r}" for r in caplog.records)
    leaks = {}
    for case in cases:
        found = _markers_in("\n".join(case.seen))
        if found or "UNEXPECTED" in case.seen[-1]:
            leaks[case.name] = (found, case.seen[-1][:300])
    assert not leaks, "\n".join(f"{k}: {v}" for k, v in leaks.items())
    assert not _markers_in("\n".join(text))
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the host's log"


# -- the same through real processes ----------------------------------------------------------


def _wait_failed(client: Any, task_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.task(task_id)
        if task["state"] in ("failed", "released", "done", "cancelled"):
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never ended: {client.task(task_id)}")


@pytest.mark.e2e
def test_no_marker_reaches_the_scheduler_or_any_log(tmp_path: Path):
    from teeflow.sdk import Client

    labels = [mark("e2eLabA"), mark("e2eLabB"), mark("e2eLabC")]
    pa_names = [mark("e2eParA"), mark("e2eParB"), mark("e2eParC")]
    pq.write_table(_label_table([labels[0], labels[1]] * 5), tmp_path / "alice.parquet")
    pq.write_table(_label_table([labels[2]] * 10), tmp_path / "bob.parquet")
    schema = pa.schema([("name", pa.string()), ("value", pa.float64()),
                        ("n_samples", pa.int64())])
    pq.write_table(pa.table({"name": pa_names[:2], "value": [num(90), num(91)],
                             "n_samples": [bignum(20)] * 2}, schema=schema),
                   tmp_path / "carol.parquet")
    pq.write_table(pa.table({"name": [pa_names[0], pa_names[2]], "value": [num(92), num(93)],
                             "n_samples": [bignum(21), bignum(22)]}, schema=schema),
                   tmp_path / "dave.parquet")
    parties = [Party("alice", "leak_a", tmp_path / "alice.parquet"),
               Party("bob", "leak_b", tmp_path / "bob.parquet"),
               Party("carol", "leak_c", tmp_path / "carol.parquet"),
               Party("dave", "leak_d", tmp_path / "dave.parquet")]
    seen: list[str] = []
    work = tmp_path / "cluster"
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        for p in parties:  # the owners allow a small forest (default depth and weight)
            c.start_provider(p, bind={"xgboost": {"n_estimators": {"max": 2}}})
        c.wait_for_datasets([p.dataset for p in parties])
        c.wait_for_executor(c.executor_address)
        with Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy(),
                    name=c.initiator_name) as client:
            submitted = [
                client.submit(["leak_a", "leak_b"], None, "logistic_regression", {"label": "y"}),
                client.submit(["leak_a", "leak_b"], None, "xgboost",
                              {"label": "y", "n_estimators": "2"}),
                client.submit(["leak_c", "leak_d"], None, "model_aggregation", {}),
            ]
            for task in submitted:
                ended = _wait_failed(client, task["id"])
                assert ended["state"] == "failed", ended
                seen.append(repr(ended))
                try:
                    client.wait(task["id"], timeout=30)
                except TeeflowError as exc:
                    seen.append(f"{type(exc).__name__}: {exc}")
            seen.append(repr(client.tasks()) if hasattr(client, "tasks") else "")
    found = {"client": _markers_in("\n".join(seen))}
    files = [p for p in sorted(work.rglob("*")) if p.is_file()]
    assert any(p.name.startswith("scheduler.sqlite") for p in files)
    assert {"scheduler.log", "executor.log", "provider-alice.log"} <= {p.name for p in files}
    for path in files:
        if path.suffix not in (".parquet", ".csv"):
            data = path.read_bytes().decode("utf-8", "replace")
            hits = _markers_in(data)
            if hits:
                found[str(path.relative_to(work))] = hits
    assert found == {"client": []}, found


