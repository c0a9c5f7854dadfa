"""What a provider catalogued of each of its datasets, and the check that a file is still
that before this node signs for it or sends it.

A file that cannot be read or parsed takes only its own dataset offline: the node logs the
named reason, serves the others, and refuses tasks on that one with the same reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow as pa

from teeflow.core.errors import DatasetOffline, InputError
from teeflow.files.datasets import FileRecord, catalogue, open_unchanged, unchanged_batches
from teeflow.provider.config import DatasetConfig

log = logging.getLogger("teeflow.provider")


class Catalog:
    def __init__(self, datasets: tuple[DatasetConfig, ...]) -> None:
        self._datasets = {d.name: d for d in datasets}
        self._records: dict[str, FileRecord] = {}
        self._offline: dict[str, str] = {}
        self._lock = threading.Lock()

    def record(self, name: str) -> FileRecord:
        """The dataset's record, taken on first use (at start, by `Provider.register`);
        DatasetOffline, with the reason found then, for a file that was bad."""
        with self._lock:
            if name in self._records:
                return self._records[name]
            if name in self._offline:
                raise DatasetOffline(self._offline[name])
            dataset = self._datasets.get(name)
            if dataset is None:
                raise InputError(f"this node does not hold dataset {name!r}")
            try:
                self._records[name] = catalogue(name, dataset.path)
            except DatasetOffline as exc:
                self._offline[name] = f"{exc}; dataset offline"
                log.error("%s; dataset offline, the others are served", exc)
                raise DatasetOffline(self._offline[name]) from None
            return self._records[name]

    def online(self) -> list[DatasetConfig]:
        """The datasets whose files catalogued cleanly (cataloguing each not yet seen)."""
        good = []
        for name, dataset in self._datasets.items():
            try:
                self.record(name)
            except DatasetOffline:
                continue
            good.append(dataset)
        return good

    def check(self, name: str) -> None:
        """The file is still what was catalogued (size, SHA-256), or DatasetChanged."""
        self.open(name).close()

    def open(self, name: str) -> BinaryIO:
        record = self.record(name)
        return open_unchanged(name, self._datasets[name].path, record)

    def batches(self, name: str, f: BinaryIO) -> Iterator[pa.RecordBatch]:
        """The batches of a handle from `open`, checked again (rows, content) at the end."""
        return unchanged_batches(name, self._datasets[name].path, f, self.record(name))
