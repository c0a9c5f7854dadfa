"""The partitions a pool member holds: what its providers streamed to it, in its own memory.

One entry per (task, member): ``key`` is ``f"{spec_digest}/{member_name}"``, so several
in-process workers (tests) each keep their own. Only tasks pinned to this member's worker
read an entry; what leaves a task is an aggregate, never a row.
"""

from __future__ import annotations

import pyarrow as pa

from teeflow.core.errors import SchemaMismatch, StateError

_HELD: dict[str, dict[str, pa.Table]] = {}


def hold(key: str, tables: dict[str, pa.Table]) -> None:
    """Keep this member's part of every dataset of the task (dataset name -> table)."""
    _HELD[key] = dict(tables)


def tables(key: str) -> dict[str, pa.Table]:
    try:
        return _HELD[key]
    except KeyError:
        raise StateError(f"pool: no partition held under {key!r} on this member") from None


def drop(key: str) -> None:
    _HELD.pop(key, None)


def part(key: str, dataset: str, schema: pa.Schema) -> pa.Table:
    """This member's part of one dataset; an empty table when it holds none of its rows."""
    held = tables(key)
    if dataset not in held:
        return schema.empty_table()
    table = held[dataset]
    for field in schema:
        if field.name not in table.column_names or table.schema.field(field.name).type != \
                field.type:
            raise SchemaMismatch(f"dataset {dataset!r}: a pool member's part does not have the "
                                 f"task's schema (column {field.name!r})")
    return table


def pinned(address: str) -> dict[str, object]:
    """Dask submit options that run a task on `address`'s worker and nowhere else: the
    only way a task that reads rows is started."""
    return {"workers": [address], "allow_other_workers": False, "pure": False}
