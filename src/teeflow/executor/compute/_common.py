"""Shared pieces of the computations: declarative parameters, column checks, row gathering,
the held-out split and metrics.

Every computation that imports this module lists it in its ``USES``, so a change here changes
those computations' code digests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import log_loss, roc_auc_score

from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch

# --- parameters -------------------------------------------------------------------------------

PARAM_TYPES = ("str", "int", "float", "bool", "list[str]")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Param:
    """One parameter of a computation. Values arrive as strings and are converted by ``parse``.

    ``low``/``high`` bound numbers (``low_open``/``high_open`` make a bound strict);
    ``choices`` restricts strings; ``check`` is a last, custom test returning an error message
    (or None) for a converted value.
    """

    name: str
    type: str
    required: bool = False
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name!r}: unknown type {self.type!r}")

    def _fail(self, message: str) -> ParameterError:
        return ParameterError(f"parameter {self.name!r}: {message}")

    def _bounds_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self._num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self._num(self.high)}")
        return " and ".join(parts)

    def _num(self, v: float) -> str:
        return str(int(v)) if self.type == "int" else repr(float(v)).removesuffix(".0")

    def _in_bounds(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def parse(self, raw: Any) -> Any:
        """The converted value of a raw string; raises ParameterError naming the parameter."""
        if not isinstance(raw, str):
            raise self._fail(f"must be a string, got {type(raw).__name__}")
        text = raw.strip()
        value: Any
        if self.type == "str":
            if not text:
                raise self._fail("required" if self.required else "must not be empty")
            if self.choices is not None and text not in self.choices:
                raise self._fail(f"must be one of {', '.join(self.choices)}; got {text!r}")
            value = text
        elif self.type == "list[str]":
            items = [item.strip() for item in raw.split(",")]
            if any(not item for item in items):
                raise self._fail(
                    f"empty column name in {raw!r} (expected a comma-separated list of names)"
                )
            dupes = sorted({item for item in items if items.count(item) > 1})
            if dupes:
                raise self._fail(f"duplicate column(s) {dupes}")
            value = items
        elif self.type == "bool":
            if text.lower() in _TRUE:
                value = True
            elif text.lower() in _FALSE:
                value = False
            else:
                raise self._fail(f"not a boolean (true or false): {raw!r}")
        elif self.type == "int":
            try:
                value = int(text, 10)
            except ValueError:
                raise self._fail(f"not an integer: {raw!r}") from None
            if not self._in_bounds(value):
                if self.low is not None and self.high is not None and not (
                    self.low_open or self.high_open
                ):
                    limits = f"between {self._num(self.low)} and {self._num(self.high)}"
                else:
                    limits = f"an integer {self._bounds_text()}"
                raise self._fail(f"must be {limits}, got {value}")
        else:  # float
            try:
                value = float(text)
            except ValueError:
                raise self._fail(f"not a number: {raw!r}") from None
            if not math.isfinite(value) or not self._in_bounds(value):
                raise self._fail(f"must be a finite number {self._bounds_text()}, got {raw!r}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise self._fail(problem)
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": self.default,
            "help": self.help,
        }
        if self.low is not None:
            out["min"] = self.low
            out["min_exclusive"] = self.low_open
        if self.high is not None:
            out["max"] = self.high
            out["max_exclusive"] = self.high_open
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def parse_params(
    computation: str, params: Sequence[Param], raw: dict[str, Any]
) -> dict[str, Any]:
    """Every declared parameter, converted or defaulted; raises ParameterError naming the first
    unknown, missing or invalid one."""
    if not isinstance(raw, dict):
        raise ParameterError(f"{computation}: parameters must be a mapping of names to strings")
    by_name = {p.name: p for p in params}
    for key in raw:
        if key not in by_name:
            accepted = ", ".join(by_name) if by_name else "none"
            raise ParameterError(
                f"parameter {key!r}: unknown parameter for {computation} (accepted: {accepted})"
            )
    out: dict[str, Any] = {}
    for p in params:
        if p.name in raw:
            out[p.name] = p.parse(raw[p.name])
        elif p.required:
            raise ParameterError(f"parameter {p.name!r}: required ({p.help or 'no default'})")
        else:
            out[p.name] = p.default
    return out


def make_check_params(
    computation: str,
    params: Sequence[Param],
    post: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``check_params`` generated from the declared parameters, with an optional cross-check
    ``post`` on the converted values (raising ParameterError)."""

    def check_params(raw: dict[str, Any]) -> dict[str, Any]:
        checked = parse_params(computation, params, raw)
        if post is not None:
            post(checked)
        return checked

    check_params.__doc__ = f"Validate and convert the string parameters of {computation}."
    return check_params


# Parameters shared by the models.
LABEL = Param("label", "str", required=True, help="the name of the label column")
FEATURES = Param(
    "features",
    "list[str]",
    help="comma-separated feature columns; default every integer or floating column "
    "other than the label",
)
TEST_FRACTION = Param(
    "test_fraction",
    "float",
    default=0.0,
    low=0.0,
    high=1.0,
    high_open=True,
    help="share of the rows held out for testing (0 = none); test metrics are reported",
)
SEED = Param("seed", "int", default=0, low=0, high=2**32 - 1, help="seed of the held-out split")


def check_label_not_feature(checked: dict[str, Any]) -> None:
    features = checked.get("features")
    if features and checked["label"] in features:
        raise ParameterError(
            f"parameter 'features': includes the label column {checked['label']!r}"
        )


# --- schemas ----------------------------------------------------------------------------------


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_class_label(t: pa.DataType) -> bool:
    return is_numeric(t) or pa.types.is_boolean(t) or is_string(t)


def columns_of(dataset: str, schema: pa.Schema) -> dict[str, pa.DataType]:
    """name → type, in schema order; raises SchemaMismatch on a duplicate name."""
    cols: dict[str, pa.DataType] = {}
    for f in schema:
        if f.name in cols:
            raise SchemaMismatch(f"dataset {dataset!r}: duplicate column {f.name!r}")
        cols[f.name] = f.type
    return cols


def _shown(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def require_columns(
    named: Sequence[tuple[str, str]], available: Iterable[dict[str, pa.DataType]], where: str
) -> None:
    """ParameterError for the first (parameter, column) whose column no dataset has."""
    available = list(available)
    for param, column in named:
        if all(column not in cols for cols in available):
            raise ParameterError(
                f"parameter {param!r}: no column {column!r} in any dataset ({where})"
            )


def named_columns(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(parameter, column) for the label and the explicit features."""
    return [("label", params["label"])] + [("features", f) for f in params.get("features") or []]


def same_schema(
    computation: str, schemas: dict[str, pa.Schema], params: dict[str, Any]
) -> tuple[dict[str, pa.DataType], dict[str, str]]:
    """Rows layout: every dataset must have the same columns with the same types (order and
    nullability aside). Returns (columns, owner) where owner maps each column to the first
    dataset, for messages."""
    if not schemas:
        raise SchemaMismatch(f"{computation} needs at least one dataset, got none")
    cols = {ds: columns_of(ds, schema) for ds, schema in schemas.items()}
    first = next(iter(cols))
    base = cols[first]
    require_columns(
        named_columns(params), cols.values(), f"columns of {first!r}: {_shown(base)}"
    )
    for ds, c in cols.items():
        if c == base:
            continue
        problems = []
        missing = [n for n in base if n not in c]
        extra = [n for n in c if n not in base]
        if missing:
            problems.append(f"missing column(s) {missing}")
        if extra:
            problems.append(f"extra column(s) {extra}")
        for n, t in c.items():
            if n in base and base[n] != t:
                problems.append(f"column {n!r} is {t}, not {base[n]}")
        raise SchemaMismatch(
            f"dataset {ds!r}: schema differs from dataset {first!r}: {'; '.join(problems)}"
        )
    return base, dict.fromkeys(base, first)


def resolve_features(cols: dict[str, pa.DataType], params: dict[str, Any]) -> list[str]:
    if params.get("features"):
        return list(params["features"])
    return [n for n, t in cols.items() if n != params["label"] and is_numeric(t)]


def check_label_and_features(
    cols: dict[str, pa.DataType],
    owner: dict[str, str],
    params: dict[str, Any],
    label_ok: Callable[[pa.DataType], bool],
    label_need: str,
) -> list[str]:
    """Check the label's and features' types over the combined columns; returns the features.
    ``owner`` names the dataset holding each column, for messages."""
    require_columns(named_columns(params), [cols], f"columns: {_shown(cols)}")
    label = params["label"]
    if not label_ok(cols[label]):
        raise SchemaMismatch(
            f"dataset {owner[label]!r}: label column {label!r} has type {cols[label]}; "
            f"need {label_need}"
        )
    features = resolve_features(cols, params)
    if not features:
        raise SchemaMismatch(
            f"dataset {next(iter(owner.values()))!r}: no numeric feature columns besides the "
            f"label {label!r}"
        )
    for f in features:
        if not is_numeric(cols[f]):
            raise SchemaMismatch(
                f"dataset {owner[f]!r}: feature column {f!r} has type {cols[f]}; "
                "features must be integer or floating"
            )
    return features


# --- streamed inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input, streamed: each call of `batches()` is a fresh pass over its rows in order.
    What a computation gets when the input did not fit the executor's memory budget."""

    name: str
    schema: pa.Schema
    rows: int
    batches: Callable[[], Iterator[pa.RecordBatch]]

    @classmethod
    def of_table(cls, name: str, table: pa.Table) -> Source:
        return cls(name, table.schema, table.num_rows, lambda: iter(table.to_batches()))


def stream_xy(sources: list[Source], features: list[str], label: str
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, x, y) per batch over all sources in order, float64, refusing nulls,
    NaN and infinity (naming the dataset, never a value)."""
    offset = 0
    for src in sources:
        for batch in src.batches():
            if batch.num_rows == 0:
                continue
            cols = []
            for name in [*features, label]:
                col = batch.column(name)
                if col.null_count:
                    raise ComputeError(f"dataset {src.name!r}: column {name!r} has null values")
                values = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
                if not np.isfinite(values).all():
                    raise ComputeError(f"dataset {src.name!r}: column {name!r} has a "
                                       "non-finite value (NaN or infinity)")
                cols.append(values)
            yield offset, np.column_stack(cols[:-1]), cols[-1]
            offset += batch.num_rows


# --- rows -------------------------------------------------------------------------------------


@dataclass
class Rows:
    """The rows a model trains on, with enough bookkeeping to name the dataset in errors.

    Rows layout: ``spans`` gives each dataset's range of rows in ``table``. Columns layout
    (a join): ``owner`` names the dataset of each column, and rows have no meaningful position.
    """

    table: pa.Table
    spans: list[tuple[str, int, int]] | None = None
    owner: dict[str, str] = field(default_factory=dict)

    def where(self, column: str, row: int) -> tuple[str, str]:
        """("dataset '...'", position text) for a bad value of ``column`` at ``row``."""
        if self.spans is not None:
            ds, start = next((ds, s) for ds, s, e in self.spans if s <= row < e)
            return f"dataset {ds!r}", f"at row {row - start}"
        return f"dataset {self.owner.get(column, '?')!r}", "in the joined rows"


def gather_rows(inputs: list[tuple[str, pa.Table]], columns: list[str]) -> Rows:
    """The union of the datasets' rows over ``columns`` (zero-copy where the types agree),
    refusing nulls. Types follow the first dataset; nullability and metadata are dropped."""
    first = inputs[0][1].schema
    common = pa.schema([pa.field(n, first.field(n).type) for n in columns])
    parts = []
    spans: list[tuple[str, int, int]] = []
    start = 0
    for ds, table in inputs:
        part = table.select(columns)
        for name in columns:
            nulls = part[name].null_count
            if nulls:
                raise ComputeError(f"dataset {ds!r}: column {name!r} has {nulls} null value(s)")
        parts.append(part.cast(common))
        spans.append((ds, start, start + part.num_rows))
        start += part.num_rows
    return Rows(pa.concat_tables(parts), spans=spans)


def column_vector(
    rows: Rows, name: str, kind: str, offset: int = 0, data: Any = None
) -> np.ndarray:
    """float64 values of one column (of ``data``, a table or batch starting at row ``offset``
    of ``rows``; default the whole table), refusing NaN and infinity."""
    col = (rows.table if data is None else data).column(name)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = np.empty(len(col), dtype=np.float64)
    i = 0
    for chunk in chunks:
        out[i : i + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        i += len(chunk)
    finite = np.isfinite(out)
    if not finite.all():
        row = int(np.argmin(finite))
        ds, pos = rows.where(name, offset + row)
        raise ComputeError(
            f"{ds}: {kind} column {name!r} has a non-finite value (NaN or infinity) {pos}"
        )
    return out


def feature_matrix(
    rows: Rows, features: list[str], offset: int = 0, data: Any = None
) -> np.ndarray:
    """float64 (n, p) matrix of the features, column by column, refusing NaN and infinity."""
    n = (rows.table if data is None else data).num_rows
    x = np.empty((n, len(features)), dtype=np.float64, order="F")
    for j, name in enumerate(features):
        x[:, j] = column_vector(rows, name, "feature", offset, data)
    return x


def binary_label(rows: Rows, label: str) -> tuple[np.ndarray, list[Any]]:
    """(y in {0, 1} as int8, sorted classes); the label must have exactly two values."""
    col = rows.table[label]
    if pa.types.is_floating(col.type):
        column_vector(rows, label, "label")
    classes = sorted(pc.unique(col).to_pylist())
    if len(classes) != 2:
        shown = classes[:10] + (["..."] if len(classes) > 10 else [])
        raise ComputeError(
            f"label column {label!r} must have exactly two distinct values, found "
            f"{len(classes)}: {shown}"
        )
    y = pc.equal(col, pa.scalar(classes[1], type=col.type)).to_numpy(zero_copy_only=False)
    return y.astype(np.int8), classes


# --- held-out split and metrics ---------------------------------------------------------------


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, each ascending. The test rows are the first
    ceil(test_fraction * n) of numpy ``default_rng(seed).permutation(n)``; none when the
    fraction is 0."""
    if n == 0:
        raise ComputeError("the datasets have no rows")
    if test_fraction <= 0:
        return np.arange(n), np.arange(0)
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise ComputeError(
            f"test_fraction {test_fraction} of {n} rows leaves no rows to train on"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def classification_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """accuracy, log loss and (when both classes occur) ROC AUC of probabilities ``p``."""
    p = np.asarray(p, dtype=np.float64)
    out = {
        "accuracy": float(np.mean((p > 0.5) == (y == 1))),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }
    if 0 < int(np.sum(y)) < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    return out


def regression_metrics(sse: float, sst: float, n: int) -> dict[str, float]:
    """rmse, and r2 when the label varies, from sums of squares."""
    out = {"rmse": math.sqrt(sse / n)}
    if sst > 0:
        out["r2"] = 1.0 - sse / sst
    return out


def with_metrics(
    result: dict[str, Any],
    n: int,
    train: np.ndarray,
    test: np.ndarray,
    metric: Callable[[np.ndarray], dict[str, float]],
) -> dict[str, Any]:
    """Add n_samples, n_train, n_test, ``metrics`` (training rows) and, with a held-out set,
    ``test_metrics``."""
    result.update(n_samples=n, n_train=len(train), n_test=len(test), metrics=metric(train))
    if len(test):
        result["test_metrics"] = metric(test)
    return result
