"""Dataset files (CSV or Parquet) as streams of Arrow record batches.

Never reads a whole file into memory: Parquet by row groups, CSV by blocks,
both re-cut to about BATCH_ROWS rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from teeflow.core.errors import ConfigError

BATCH_ROWS = 64 * 1024


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".txt"):
        return "csv"
    raise ConfigError(f"dataset {path}: unsupported file type {suffix!r} (use .csv or .parquet)")


def _csv_reader(path: Path) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=8 << 20))


def read_schema(path: Path) -> pa.Schema:
    try:
        if _kind(path) == "parquet":
            return pq.read_schema(path)
        with _csv_reader(path) as reader:
            return reader.schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"dataset {path}: cannot read: {exc}") from exc


def iter_batches(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `batch_rows` rows, in file order."""
    if _kind(path) == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        return
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with _csv_reader(path) as reader:
        for batch in reader:
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= batch_rows:
                table = pa.Table.from_batches(pending)
                yield from table.slice(0, batch_rows).combine_chunks().to_batches()
                rest = table.slice(batch_rows)
                pending = rest.combine_chunks().to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
    if pending_rows:
        yield from pa.Table.from_batches(pending).combine_chunks().to_batches()


def count_rows(path: Path) -> int:
    if _kind(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return sum(b.num_rows for b in iter_batches(path))
