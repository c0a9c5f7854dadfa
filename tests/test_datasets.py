"""Dataset files as streams of record batches, schema fingerprints and schema encoding."""

from __future__ import annotations

import base64

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from teeflow.core.errors import ConfigError, InputError
from teeflow.core.schemas import MAX_SCHEMA, schema_fingerprint, schema_from_b64, schema_to_b64
from teeflow.files.datasets import BATCH_ROWS, count_rows, iter_batches, read_schema

ROWS = 150_000


def _table(rows: int = ROWS) -> pa.Table:
    ids = pa.array(range(rows), pa.int64())
    return pa.table({
        "id": ids,
        "score": pc.multiply(ids.cast(pa.float64()), 0.5),
        "tag": pa.array([f"t{i % 97}" for i in range(rows)], pa.string()),
    })


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return _table()


@pytest.fixture(scope="module")
def files(tmp_path_factory, table):
    root = tmp_path_factory.mktemp("datasets")
    csv, parquet = root / "d.csv", root / "d.parquet"
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet, row_group_size=50_000)
    return {"csv": csv, "parquet": parquet}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_stream_in_bounded_batches(files, table, kind):
    batches = list(iter_batches(files[kind]))
    assert all(0 < b.num_rows <= BATCH_ROWS for b in batches)
    assert len(batches) >= -(-ROWS // BATCH_ROWS)
    got = pa.Table.from_batches(batches)
    assert got.schema == read_schema(files[kind])
    assert got.num_rows == ROWS
    assert got.equals(table)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_small_batch_size(files, kind):
    batches = list(iter_batches(files[kind], batch_rows=7_000))
    assert all(b.num_rows <= 7_000 for b in batches)
    assert sum(b.num_rows for b in batches) == ROWS
    # no batch short except where the file (or a Parquet row group) ends
    assert sum(b.num_rows < 7_000 for b in batches) <= 3


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_count_rows(files, kind):
    assert count_rows(files[kind]) == ROWS


def test_small_and_empty_csv(tmp_path):
    small = tmp_path / "small.csv"
    small.write_text("a,b\n1,x\n2,y\n")
    assert [b.num_rows for b in iter_batches(small)] == [2]
    assert count_rows(small) == 2
    empty = tmp_path / "empty.csv"
    empty.write_text("a,b\n")
    assert sum(b.num_rows for b in iter_batches(empty)) == 0
    assert count_rows(empty) == 0


@pytest.mark.parametrize("name", ["d.json", "d.xlsx", "d", "d.csv.gz"])
def test_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("a\n1\n")
    for call in (iter_batches, count_rows, read_schema):
        with pytest.raises(ConfigError, match="unsupported file type"):
            list(call(path)) if call is iter_batches else call(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="cannot read"):
        read_schema(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_schema(tmp_path / "missing.csv")


# -- schemas ---------------------------------------------------------------------------------

SCHEMA = pa.schema([("id", pa.int64()), ("score", pa.float64()), ("tag", pa.string())])


def test_fingerprint_ignores_metadata():
    fp = schema_fingerprint(SCHEMA)
    assert len(fp) == 64
    assert schema_fingerprint(SCHEMA.with_metadata({"pandas": "{}", "x": "y"})) == fp
    with_field_meta = pa.schema(
        [SCHEMA.field(0).with_metadata({"unit": "m"}), SCHEMA.field(1), SCHEMA.field(2)])
    assert with_field_meta.field(0).metadata == {b"unit": b"m"}
    assert schema_fingerprint(with_field_meta) == fp


@pytest.mark.parametrize("other", [
    pa.schema([("id", pa.int32()), ("score", pa.float64()), ("tag", pa.string())]),
    pa.schema([("id", pa.int64()), ("score", pa.float32()), ("tag", pa.string())]),
    pa.schema([("id", pa.int64()), ("score", pa.float64()), ("tag", pa.large_string())]),
    pa.schema([("ID", pa.int64()), ("score", pa.float64()), ("tag", pa.string())]),
    pa.schema([("score", pa.float64()), ("id", pa.int64()), ("tag", pa.string())]),
    pa.schema([("id", pa.int64()), ("score", pa.float64())]),
    pa.schema([pa.field("id", pa.int64(), nullable=False), ("score", pa.float64()),
               ("tag", pa.string())]),
])
def test_fingerprint_changes_with_the_schema(other):
    assert schema_fingerprint(other) != schema_fingerprint(SCHEMA)


def test_fingerprint_of_files_matches(files):
    assert schema_fingerprint(read_schema(files["csv"])) == schema_fingerprint(SCHEMA)
    assert schema_fingerprint(read_schema(files["parquet"])) == schema_fingerprint(SCHEMA)


@pytest.mark.parametrize("schema", [
    SCHEMA,
    SCHEMA.with_metadata({"k": "v"}),
    pa.schema([]),
    pa.schema([("t", pa.timestamp("us", tz="UTC")), ("l", pa.list_(pa.int8())),
               ("d", pa.dictionary(pa.int32(), pa.string()))]),
])
def test_schema_b64_round_trip(schema):
    text = schema_to_b64(schema)
    assert isinstance(text, str)
    back = schema_from_b64(text)
    assert back.equals(schema, check_metadata=True)
    assert schema_fingerprint(back) == schema_fingerprint(schema)


@pytest.mark.parametrize("text", [
    "", "AAAA", "not base64 !", "é", base64.b64encode(b"\x00" * 8).decode(),
    "A" * (MAX_SCHEMA + 1),
])
def test_schema_from_b64_garbage(text):
    with pytest.raises(InputError):
        schema_from_b64(text)


@pytest.mark.parametrize("raw", [
    b"\xff" * 20,
    b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x00" * 16,
])
def test_schema_from_b64_malformed_ipc(raw):
    with pytest.raises(InputError):
        schema_from_b64(base64.b64encode(raw).decode())


def test_a_malformed_csv_names_no_value(tmp_path):
    """Arrow's parse error quotes the offending row; the schema reader's error must not."""
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n3,SECRET-ROW-VALUE,9\n")
    with pytest.raises(ConfigError, match="cannot read: not a well-formed csv file") as info:
        read_schema(path)
    assert "SECRET-ROW-VALUE" not in str(info.value)
