"""Computations: each one inside the executor versus the same computation in plain Python on
the same data, as a ratio (executor time / plain time).

Data: ROWS rows (1e6; 1e5 with --quick) x 20 float64 features f00..f19, a binary label
y_bin (int64 0/1, from a logistic model), a continuous label y_lin (linear model plus noise),
an int64 id and an int64 group g with GROUPS values; one fixed seed. Two parties: by rows
(party a the first half, party b the second), or, for `vertical` and `sql`, by columns with
the id (a: id, g, f00..f09, y_lin; b: id, f10..f19 with its rows shuffled).

Three paths, interleaved within each repeat in a rotating order:

- plain: the straightforward computation in one process on all rows, with no executor: the
  `reference.py` functions on one pandas DataFrame (the parties' rows already pooled),
  DuckDB on the two pandas DataFrames, numpy for the parameter average;
- executor, compute: the executor's own code on Arrow tables exactly as `Executor._compute`
  calls it (`check_schemas`, then `run`, on `Table.from_batches` of 64K-row batches);
- executor, whole path: a real in-process `Executor` (SimulatedBackend, generated P-256 TLS
  key): `create_task` with both owners' signed approvals, each party's batches (each read
  back from its own IPC message, as Flight delivers them) through `receive` (signed
  challenge, end marker), `run(background=False)` (waits for the input digests, computes,
  seals to the receiver, signs the audit entries) and `take_result`. No network: the upload
  bench measures the transfer.
  Opening the sealed result (receiver side) is not timed; it is checked.

Before timing, every path runs once on WARMUP_ROWS rows (imports, caches), untimed. The
executor's and the plain results must agree (within a tolerance per computation) or the
section raises, so the ratios cannot compare different work.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric import ec

from bench import Options, Row, median_range
from teeflow import compute
from teeflow import plaintext as reference
from teeflow.attestation.policy import load_policy
from teeflow.attestation.simulated import SimulatedBackend, code_measurement
from teeflow.compute import federated
from teeflow.core import audit, seal, wire
from teeflow.core.crypto import KeySigner
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.service import Executor, FlRequest, UploadRequest
from teeflow.files.datasets import BATCH_ROWS

FULL_ROWS = 1_000_000
QUICK_ROWS = 100_000
WARMUP_ROWS = 5_000
FULL_REPEATS = 3
QUICK_REPEATS = 2
N_FEATURES = 20
FEATURES = [f"f{j:02d}" for j in range(N_FEATURES)]
GROUPS = 8
N_PARAMS = 1_000  # model_aggregation: parameters per party
XGB_PARAMS = {"n_estimators": 20, "max_depth": 6}
FED_PARAMS = {"rounds": 10, "local_epochs": 5, "min_parties": 2}  # the bench has two owners
MIN_SAMPLE = 0.2  # seconds: a faster path is run back to back until this, and averaged
SEED = 20240611

SQL_QUERY = (
    "SELECT a.g, count(*) AS n, avg(a.y_lin) AS mean_y, sum(a.f00 * b.f10) AS dot, "
    "stddev_samp(b.f11) AS sd, corr(a.f01, b.f12) AS r "
    "FROM a JOIN b ON a.id = b.id GROUP BY a.g ORDER BY a.g"
)
SQL_GROUP_QUERY = (
    "SELECT g, count(*) AS n, avg(y_lin) AS mean_y, sum(f00 * f01) AS dot, "
    "stddev_samp(f02) AS sd, corr(f03, y_lin) AS r FROM ab GROUP BY g ORDER BY g"
)


# -- data -------------------------------------------------------------------------------------
def make_columns(rows: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Every column, as contiguous numpy arrays, from a fixed seed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_FEATURES, rows))  # one contiguous row per feature
    w = rng.uniform(-1.0, 1.0, N_FEATURES)
    z = w @ x
    cols: dict[str, np.ndarray] = {"id": np.arange(rows, dtype=np.int64),
                                   "g": rng.integers(0, GROUPS, rows, dtype=np.int64)}
    cols.update({name: x[j] for j, name in enumerate(FEATURES)})
    cols["y_bin"] = (rng.random(rows) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    cols["y_lin"] = z + 0.5 + rng.standard_normal(rows)
    return cols


def _arrow(cols: dict[str, np.ndarray], names: list[str], rows: Any = slice(None)) -> pa.Table:
    return pa.table({n: cols[n][rows] for n in names})


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas()


@dataclass
class Case:
    """One computation: the executor's inputs and params, and the plain computation."""

    name: str
    compute: str
    params: dict[str, str]
    parties: list[tuple[str, pa.Table]]  # (dataset, table): the executor's inputs
    plain: Callable[[], Any]
    agree: Callable[[dict[str, Any], Any], None]  # raises if the results differ
    note: str
    compute_path: bool = True  # False: no uploads (federated), the whole path only
    fed_parts: list[tuple[np.ndarray, np.ndarray]] | None = None


def _differ(name: str, what: str, a: Any, b: Any, rtol: float, atol: float) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
        diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else "shapes differ"
        raise RuntimeError(f"{name}: executor and plain {what} differ (max |diff| {diff}; "
                           f"rtol {rtol}, atol {atol})")


def _same(name: str, what: str, a: Any, b: Any) -> None:
    if a != b:
        raise RuntimeError(f"{name}: executor and plain {what} differ: {a!r} vs {b!r}")


def _agree_linear(name: str, rtol: float, atol: float) -> Callable[[dict, Any], None]:
    def agree(ex: dict[str, Any], plain: dict[str, Any]) -> None:
        _same(name, "n_samples", ex["n_samples"], plain["n_samples"])
        _same(name, "features", list(ex["coefficients"]), list(plain["coefficients"]))
        _differ(name, "coefficients", [*ex["coefficients"].values(), ex["intercept"]],
                [*plain["coefficients"].values(), plain["intercept"]], rtol, atol)
    return agree


def _agree_xgb(ex: dict[str, Any], plain: dict[str, Any]) -> None:
    _same("xgboost", "n_samples", ex["n_samples"], plain["n_samples"])
    keys = sorted(plain["metrics"])
    _same("xgboost", "metric names", sorted(ex["metrics"]), keys)
    _differ("xgboost", "training metrics", [ex["metrics"][k] for k in keys],
            [plain["metrics"][k] for k in keys], 1e-6, 1e-9)


def _agree_fedavg(ex: dict[str, Any], plain: dict[str, float]) -> None:
    _same("model_aggregation", "parameter names", list(ex["parameters"]), list(plain))
    _differ("model_aggregation", "parameters", list(ex["parameters"].values()),
            list(plain.values()), 1e-12, 1e-12)


def _agree_sql(name: str) -> Callable[[dict, Any], None]:
    def agree(ex: dict[str, Any], plain: tuple[list[str], list[tuple]]) -> None:
        columns, rows = plain
        _same(name, "columns", ex["columns"], columns)
        _same(name, "row count", len(ex["rows"]), len(rows))
        _differ(name, "rows", ex["rows"], [list(r) for r in rows], 1e-9, 1e-9)
    return agree


def _plain_sql(query: str, frames: dict[str, pd.DataFrame]) -> tuple[list[str], list[tuple]]:
    con = duckdb.connect(":memory:")
    try:
        for name, frame in frames.items():
            con.register(name, frame)
        cursor = con.execute(query)
        return [d[0] for d in cursor.description], cursor.fetchall()
    finally:
        con.close()


def _plain_fedavg(parties: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, float]:
    """Align each party's values to the first party's names, weighted mean by sample count."""
    order = parties[0][0]
    aligned = []
    for names, values, _ in parties:
        by_name = np.argsort(names)
        aligned.append(values[by_name[np.searchsorted(names, order, sorter=by_name)]])
    means = np.average(np.vstack(aligned), axis=0, weights=[n for _, _, n in parties])
    return dict(zip(order.tolist(), means.tolist(), strict=True))


def make_cases(rows: int) -> list[Case]:
    cols = make_columns(rows)
    half = rows // 2
    first, second = slice(0, half), slice(half, rows)
    features = ",".join(FEATURES)
    cases: list[Case] = []

    def by_rows(label: str) -> tuple[list[tuple[str, pa.Table]], pd.DataFrame]:
        names = [*FEATURES, label]
        parties = [("a", _arrow(cols, names, first)), ("b", _arrow(cols, names, second))]
        return parties, _frame(_arrow(cols, names))

    parties, df = by_rows("y_bin")
    cases.append(Case(
        "logistic_regression", "logistic_regression", {"label": "y_bin", "features": features},
        parties, lambda df=df: reference.plaintext_logistic_regression(df, "y_bin", FEATURES),
        _agree_linear("logistic_regression", 1e-4, 1e-6),
        "L-BFGS, C=1, tol 1e-10 (scikit-learn both sides); plain: "
        "reference.plaintext_logistic_regression"))

    parties, df = by_rows("y_lin")
    cases.append(Case(
        "linear_regression", "linear_regression", {"label": "y_lin", "features": features},
        parties, lambda df=df: reference.plaintext_linear_regression(df, "y_lin", FEATURES),
        _agree_linear("linear_regression", 1e-8, 1e-10),
        "executor: streamed normal equations; plain: scikit-learn LinearRegression"))

    parties, df = by_rows("y_bin")
    xgb_params = {k: str(v) for k, v in XGB_PARAMS.items()}
    cases.append(Case(
        "xgboost", "xgboost", {"label": "y_bin", "features": features, **xgb_params},
        parties, lambda df=df: reference.plaintext_xgboost(df, "y_bin", FEATURES, **XGB_PARAMS),
        _agree_xgb,
        f"binary:logistic, {XGB_PARAMS['n_estimators']} trees, max_depth "
        f"{XGB_PARAMS['max_depth']}, hist, 1 thread both sides; checked: training metrics"))

    # model_aggregation: N_PARAMS parameters per party, party b's rows in another order.
    rng = np.random.default_rng(SEED + 1)
    pnames = np.array([f"w{i:05d}" for i in range(N_PARAMS)], dtype=object)
    plain_parties = []
    agg_parties = []
    for ds, n, perm in (("a", half, np.arange(N_PARAMS)), ("b", rows - half,
                                                        rng.permutation(N_PARAMS))):
        names, values = pnames[perm], rng.standard_normal(N_PARAMS)
        plain_parties.append((names, values, n))
        agg_parties.append((ds, pa.table({
            "name": pa.array(names.tolist(), pa.string()), "value": values,
            "n_samples": np.full(N_PARAMS, n, dtype=np.int64)})))
    cases.append(Case(
        "model_aggregation", "model_aggregation", {}, agg_parties,
        lambda: _plain_fedavg(plain_parties), _agree_fedavg,
        f"{N_PARAMS:,} parameters per party (not ROWS), weighted by each party's row count; "
        "plain: numpy align + np.average"))

    # By columns: a holds id, g, f00..f09, y_lin; b holds id, f10..f19, rows shuffled.
    shuffle = np.random.default_rng(SEED + 2).permutation(rows)
    a_table = _arrow(cols, ["id", "g", *FEATURES[:10], "y_lin"])
    b_table = _arrow(cols, ["id", *FEATURES[10:]], shuffle)
    a_vert, b_vert = a_table.drop_columns(["g"]), b_table
    frames = [_frame(a_vert), _frame(b_vert)]
    cases.append(Case(
        "vertical (linear_regression)", "vertical",
        {"id": "id", "model": "linear_regression", "label": "y_lin", "features": features},
        [("a", a_vert), ("b", b_vert)],
        lambda: reference.plaintext_vertical(frames, "id", "linear_regression",
                                             label="y_lin", features=FEATURES),
        _agree_linear("vertical", 1e-8, 1e-10),
        "join on id (b shuffled), then least squares; plain: reference.plaintext_vertical "
        "(pandas merge + scikit-learn)"))

    sql_frames = {"a": _frame(a_table), "b": _frame(b_table)}
    cases.append(Case(
        "sql (join of a and b, GROUP BY)", "sql", {"query": SQL_QUERY},
        [("a", a_table), ("b", b_table)], lambda: _plain_sql(SQL_QUERY, sql_frames),
        _agree_sql("sql"),
        f"a JOIN b ON id, GROUP BY g ({GROUPS} groups), 5 aggregates; executor adds "
        "count(DISTINCT row id) per dataset; plain: DuckDB on the pandas DataFrames"))

    one = _arrow(cols, ["g", *FEATURES[:4], "y_lin"])
    one_frame = {"ab": _frame(one)}
    cases.append(Case(
        "sql (one dataset, GROUP BY)", "sql", {"query": SQL_GROUP_QUERY}, [("ab", one)],
        lambda: _plain_sql(SQL_GROUP_QUERY, one_frame), _agree_sql("sql"),
        "all rows as one dataset (a single SELECT cannot union two); executor adds count(*)"))

    fed_checked = compute.get("federated_logistic_regression").check_params(
        {"label": "y_bin", "features": features, **{k: str(v) for k, v in FED_PARAMS.items()}})
    xs = np.column_stack([cols[f] for f in FEATURES])
    y = cols["y_bin"].astype(np.float64)
    parts = [(xs[first], y[first]), (xs[second], y[second])]
    fed_schema = _arrow(cols, [*FEATURES, "y_bin"], slice(0, 0))
    cases.append(Case(
        "federated_logistic_regression", "federated_logistic_regression",
        {"label": "y_bin", "features": features, **{k: str(v) for k, v in FED_PARAMS.items()}},
        [("a", fed_schema), ("b", fed_schema)],
        lambda: reference.plaintext_federated(parts, FEATURES, fed_checked),
        _agree_linear("federated", 1e-12, 1e-12),
        f"{FED_PARAMS['rounds']} rounds x {FED_PARAMS['local_epochs']} local epochs; no "
        "upload, so no compute-only path; whole path: both providers' local steps in-process "
        "+ signed fl-model/fl-update through Executor; plain: reference.plaintext_federated",
        compute_path=False, fed_parts=parts))
    return cases


# -- the executor paths -----------------------------------------------------------------------
class Harness:
    """One in-process executor, two data owners and a receiver; a fresh task per run."""

    def __init__(self) -> None:
        self.ex = Executor(SimulatedBackend(), ec.generate_private_key(ec.SECP256R1()))
        self.owners = [KeySigner.generate(), KeySigner.generate()]
        self.initiator = KeySigner.generate()
        self.policy = load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                                   "simulated": {"measurement": [code_measurement()]}}
                                  ).to_dict()
        self.ids = itertools.count()

    def _spec(self, case: Case) -> wire.TaskSpec:
        refs = tuple(wire.DatasetRef(ds, f"owner{i}", self.owners[i].public_key(),
                                     schema_fingerprint(t.schema))
                     for i, (ds, t) in enumerate(case.parties))
        return wire.TaskSpec(
            f"bench{next(self.ids):08d}", case.compute, compute.get(case.compute).code_digest,
            dict(case.params), refs, self.policy,
            (wire.Receiver(self.initiator.public_key(),
                           self.initiator.encryption_public_key()),),
            self.initiator.public_key())

    def _approvals(self, spec: wire.TaskSpec) -> list[dict[str, str]]:
        out = []
        for owner in self.owners[: len(spec.datasets)]:
            sig = owner.sign(audit.signed_payload(spec.task_id, "approved",
                                                  {"spec_digest": spec.digest()}))
            out.append({"signer": audit.ed25519_signer(owner.public_key()),
                        "signature": base64.b64encode(sig).decode()})
        return out

    def _challenge(self, spec: wire.TaskSpec, signer: KeySigner) -> bytes:
        """A challenge for `signer` on this task, asked for as a client does (signed)."""
        at = int(time.time())
        sig = signer.sign(wire.challenge_message(spec.task_id, self.ex.tls_spki_hash, at))
        return self.ex.challenge(spec.digest(), signer.public_key(), at, sig)

    def _upload(self, spec: wire.TaskSpec, i: int, ds: str, table: pa.Table,
                batches: list[pa.RecordBatch]) -> None:
        challenge = self._challenge(spec, self.owners[i])
        sig = self.owners[i].sign(wire.upload_message(spec.task_id, ds, challenge,
                                                      self.ex.tls_spki_hash))

        def messages():
            for batch in batches:
                yield batch, None
            yield None, wire.end_marker(sum(b.num_rows for b in batches), len(batches))

        self.ex.receive(UploadRequest(spec.task_id, ds, challenge, sig), table.schema,
                        messages())

    def _fl(self, spec: wire.TaskSpec, kind: str, i: int, ds: str, round_: int,
            payload: bytes) -> FlRequest:
        challenge = self._challenge(spec, self.owners[i])
        sig = self.owners[i].sign(wire.fl_message(kind, spec.task_id, ds, round_, challenge,
                                                  self.ex.tls_spki_hash, payload))
        return FlRequest(kind, spec.task_id, ds, round_, challenge, sig)

    def _federated(self, spec: wire.TaskSpec, case: Case, params: dict[str, Any]) -> None:
        assert case.fed_parts is not None
        for round_ in range(params["rounds"]):
            for i, ((ds, _), (x, y)) in enumerate(zip(case.parties, case.fed_parts,
                                                      strict=True)):
                state = self.ex.fl_model(self._fl(spec, "fl-model", i, ds, round_, b""))
                weights = (np.zeros(x.shape[1] + 1) if state["weights"] is None
                           else np.asarray(state["weights"], dtype=np.float64))
                new, loss = federated.local_update(x, y, weights, params)
                update = {"weights": new.tolist(), "n_samples": int(x.shape[0]),
                          "loss": loss, "features": list(params["features"])}
                self.ex.fl_update(self._fl(spec, "fl-update", i, ds, round_,
                                           wire.canonical(update)), update)

    def whole(self, case: Case, batches: list[list[pa.RecordBatch]],
              params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """(seconds, result): create, upload, run, take the result; opening it is not timed."""
        spec = self._spec(case)
        approvals = self._approvals(spec)
        t0 = time.perf_counter()
        self.ex.create_task(spec, approvals)
        if case.compute_path:
            for i, ((ds, table), bs) in enumerate(zip(case.parties, batches, strict=True)):
                self._upload(spec, i, ds, table, bs)
            self.ex.run(spec.task_id, background=False)
        else:
            self._federated(spec, case, params)
        challenge = self._challenge(spec, self.initiator)
        sig = self.initiator.sign(wire.result_message(spec.task_id, challenge,
                                                      self.ex.tls_spki_hash))
        envelope = self.ex.take_result(spec.task_id, self.initiator.public_key(), challenge,
                                       sig)
        elapsed = time.perf_counter() - t0
        status = self.ex.status(spec.task_id)
        if status["status"] != "released" or status["inputs_held"]:
            raise RuntimeError(f"{case.name}: task ended {status['status']}: {status['error']}")
        body = json.loads(envelope)
        plain = seal.open_sealed(base64.b64decode(body["sealed"]),
                                 self.initiator.encryption_private_key(), spec.digest())
        return elapsed, json.loads(plain)["result"]


def as_received(table: pa.Table) -> list[pa.RecordBatch]:
    """The table's BATCH_ROWS-row batches as an upload delivers them: each read back from its
    own IPC message, so it owns its buffers. (Zero-copy slices of one table would share the
    table's whole column buffers, which the executor's input digest hashes once per batch.)"""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            writer.write_batch(batch)
    return list(pa.ipc.open_stream(sink.getvalue()))


def _paths(case: Case, harness: Harness) -> dict[str, Callable[[], tuple[float, Any]]]:
    comp = compute.get(case.compute)
    checked = comp.check_params(dict(case.params))
    batches = [as_received(t) for _, t in case.parties]
    tables = [(ds, pa.Table.from_batches(bs, t.schema))
              for (ds, t), bs in zip(case.parties, batches, strict=True)]

    def plain() -> tuple[float, Any]:
        t0 = time.perf_counter()
        value = case.plain()
        return time.perf_counter() - t0, value

    def executor_compute() -> tuple[float, Any]:
        t0 = time.perf_counter()
        comp.check_schemas({ds: t.schema for ds, t in tables}, checked)
        value = comp.run(tables, checked)
        return time.perf_counter() - t0, value

    paths = {"plain": plain}
    if case.compute_path:
        paths["compute"] = executor_compute
    paths["whole"] = lambda: harness.whole(case, batches, checked)
    return paths


def _sample(once: Callable[[], tuple[float, Any]]) -> tuple[float, Any]:
    """Seconds per run (runs back to back until MIN_SAMPLE, averaged), and the first value."""
    total, value = once()
    count = 1
    while total < MIN_SAMPLE:
        total += once()[0]
        count += 1
    return total / count, value


def _check(case: Case, values: dict[str, Any]) -> None:
    for path, value in values.items():
        if path != "plain":
            case.agree(value, values["plain"])


def _fmt(med: float, lo: float, hi: float) -> str:
    """`1.23 s (1.20-1.31)`, in ms below 0.1 s."""
    scale, unit = (1.0, "s") if med >= 0.1 else (1e3, "ms")
    return f"{med * scale:.3g} {unit} ({lo * scale:.3g}-{hi * scale:.3g})"


# -- the section ------------------------------------------------------------------------------
def run(opts: Options) -> list[Row]:
    rows = QUICK_ROWS if opts.quick else FULL_ROWS
    repeats = opts.repeats or (QUICK_REPEATS if opts.quick else FULL_REPEATS)
    harness = Harness()

    for case in make_cases(WARMUP_ROWS):  # warm-up and a cheap first agreement check
        paths = _paths(case, harness)
        _check(case, {name: once()[1] for name, once in paths.items()})

    out = [Row("data", f"{rows:,} rows",
               f"x {N_FEATURES} float64 features (+ label, id, group), 2 parties (by rows; "
               f"by columns for vertical/sql), seed {SEED}"),
           Row("ratio", "compute / whole",
               "executor time / plain time: compute-only (check_schemas + run on Arrow tables) "
               "/ whole path (create_task, receive x2, run, take_result)")]
    for case in make_cases(rows):
        paths = _paths(case, harness)
        names = list(paths)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            values = {}
            for name in names[r % len(names):] + names[: r % len(names)]:
                elapsed, values[name] = _sample(paths[name])
                seconds[name].append(elapsed)
            _check(case, values)
            del values
        med = {name: median_range(s) for name, s in seconds.items()}
        plain = med["plain"][0]
        ratios = " / ".join(f"{med[name][0] / plain:.2f}" if name in med else "-"
                            for name in ("compute", "whole"))
        times = "; ".join(
            f"{label} {_fmt(*med[name])}"
            for name, label in (("plain", "plain"), ("compute", "compute"),
                                ("whole", "whole path")) if name in med)
        out.append(Row(case.name, ratios, f"{times}; medians of {repeats}"))
        out.append(Row("", "", case.note))
    out.append(Row("timing", f"{repeats} repeats",
                   f"paths interleaved, rotating order; a path under {MIN_SAMPLE} s is run "
                   "back to back and averaged; one untimed warm-up of every path on "
                   f"{WARMUP_ROWS:,} rows; results checked to agree every repeat"))
    return out
