"""Rows a computation runs on, inside the executor: streamed inputs, the union of the parties'
rows with their provenance (for errors that name a dataset, never a value), and the held-out
split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute.errors import public


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
                    raise public("nulls", dataset=src.name, column=name)
                values = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
                if not np.isfinite(values).all():
                    raise public("non_finite", dataset=src.name, column=name,
                                 kind="label" if name == label else "feature")
                cols.append(values)
            yield offset, np.column_stack(cols[:-1]), cols[-1]
            offset += batch.num_rows



@dataclass
class Rows:
    """The rows a model trains on, with enough bookkeeping to name the dataset in errors.

    Rows layout: ``spans`` gives each dataset's range of rows in ``table``. Columns layout
    (a join): ``owner`` names the dataset of each column, and rows have no meaningful position.
    """

    table: pa.Table
    spans: list[tuple[str, int, int]] | None = None
    owner: dict[str, str] = field(default_factory=dict)

    def where(self, column: str, row: int) -> str:
        """The dataset holding ``column`` at ``row`` (never the row's position: it is data)."""
        if self.spans is not None:
            return next(ds for ds, s, e in self.spans if s <= row < e)
        return self.owner.get(column, "?")


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
                raise public("nulls", dataset=ds, column=name)
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
        raise public("non_finite", dataset=rows.where(name, offset + row), column=name,
                     kind=kind)
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
        raise public("label_not_binary", column=label)
    y = pc.equal(col, pa.scalar(classes[1], type=col.type)).to_numpy(zero_copy_only=False)
    return y.astype(np.int8), classes



def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, each ascending. The test rows are the first
    ceil(test_fraction * n) of numpy ``default_rng(seed).permutation(n)``; none when the
    fraction is 0."""
    if n == 0:
        raise public("empty")
    if test_fraction <= 0:
        return np.arange(n), np.arange(0)
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise public("no_train_rows", test_fraction=test_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
