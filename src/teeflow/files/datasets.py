"""Dataset files (CSV or Parquet) as streams of Arrow record batches.

Never reads a whole file into memory: Parquet by row groups, CSV by blocks,
both re-cut to about BATCH_ROWS rows.

`catalogue` records what a file is when a provider announces it (rows, size, mtime,
SHA-256), reading the whole file through the parser so a bad row anywhere is found then;
`open_unchanged` and `unchanged_batches` refuse a file that is no longer that.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from teeflow.core.errors import ConfigError, DatasetChanged, DatasetOffline

BATCH_ROWS = 64 * 1024
HASH_CHUNK = 1 << 20


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".txt"):
        return "csv"
    raise ConfigError(f"dataset {path}: unsupported file type {suffix!r} (use .csv or .parquet)")


def _csv_reader(source: Path | BinaryIO) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=8 << 20))


def read_schema(path: Path) -> pa.Schema:
    try:
        if _kind(path) == "parquet":
            return pq.read_schema(path)
        with _csv_reader(path) as reader:
            return reader.schema
    except OSError as exc:
        raise ConfigError(f"dataset {path}: cannot read: {exc.strerror or type(exc).__name__}"
                          ) from None
    except pa.ArrowInvalid:  # the parser's message can quote a row: name the kind only
        raise ConfigError(f"dataset {path}: cannot read: not a well-formed "
                          f"{_kind(path)} file") from None


def iter_batches(path: Path, batch_rows: int = BATCH_ROWS,
                 source: BinaryIO | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `batch_rows` rows, in file order (read from `source`, an
    open file of `path`, if given)."""
    src: Path | BinaryIO = path if source is None else source
    if _kind(path) == "parquet":
        yield from pq.ParquetFile(src).iter_batches(batch_size=batch_rows)
        return
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with _csv_reader(src) as reader:
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


@dataclass(frozen=True)
class FileRecord:
    """What a dataset file was when catalogued."""

    rows: int
    size: int
    mtime_ns: int
    sha256: str


def _digest(f: BinaryIO) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def catalogue(name: str, path: Path) -> FileRecord:
    """Read the whole file once for its digest and once through the parser (every row, so
    a bad one past the first block is found now, not mid-upload). DatasetOffline names
    what is wrong without quoting the file (a parser's message may hold a row)."""
    try:
        kind = _kind(path)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = _digest(f)
            rows = sum(b.num_rows for b in iter_batches(path, source=f))
            if os.fstat(f.fileno()).st_size != st.st_size or _digest(f) != digest:
                raise DatasetOffline(f"dataset {name!r}: its file changed while it was "
                                     "being catalogued")
    except ConfigError as exc:
        raise DatasetOffline(f"dataset {name!r}: {exc}") from None
    except OSError as exc:
        raise DatasetOffline(f"dataset {name!r}: cannot read {path} "
                             f"({exc.strerror or type(exc).__name__})") from None
    except (pa.ArrowException, ValueError) as exc:
        raise DatasetOffline(f"dataset {name!r}: {path} is not valid {kind.upper()} "
                             f"({type(exc).__name__}; a row or block does not parse)") from None
    return FileRecord(rows, st.st_size, st.st_mtime_ns, digest)


def _check(name: str, f: BinaryIO, record: FileRecord) -> None:
    if os.fstat(f.fileno()).st_size != record.size:
        raise DatasetChanged(f"dataset {name!r}: its file's size changed since it was "
                             "catalogued; refusing (restart the provider to catalogue it)")
    if _digest(f) != record.sha256:
        raise DatasetChanged(f"dataset {name!r}: its file's content changed since it was "
                             "catalogued; refusing (restart the provider to catalogue it)")


def open_unchanged(name: str, path: Path, record: FileRecord) -> BinaryIO:
    """The file opened and checked against its record (size, then the SHA-256 of every
    byte), or DatasetChanged naming which. Read the upload from this handle: a file
    replaced under the same name after this check is not the one sent."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DatasetOffline(f"dataset {name!r}: cannot open {path} "
                             f"({exc.strerror or type(exc).__name__})") from None
    try:
        _check(name, f, record)
    except BaseException:
        f.close()
        raise
    return f


def unchanged_batches(name: str, path: Path, f: BinaryIO, record: FileRecord,
                      batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The batches of an `open_unchanged` handle; after the last, the rows counted must be
    the catalogued ones and the file re-hashes the same, else DatasetChanged is raised
    before the sender's end marker (so the executor drops what it got)."""
    rows = 0
    with f:
        for batch in iter_batches(path, batch_rows, source=f):
            rows += batch.num_rows
            if rows > record.rows:
                raise DatasetChanged(f"dataset {name!r}: its file's rows changed since it "
                                     "was catalogued; refusing")
            yield batch
        if rows != record.rows:
            raise DatasetChanged(f"dataset {name!r}: its file's rows changed since it was "
                                 "catalogued; refusing")
        _check(name, f, record)
