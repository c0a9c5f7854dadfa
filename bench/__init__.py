"""teeflow benchmarks. `python bench/run.py` (or `make bench`) runs every section.

A section is a module with a function `run(opts: Options) -> list[Row]`, registered in
`bench/run.py`. Each measures its figures side by side in the same run and reports
medians over repeats, saying how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Row(NamedTuple):
    measure: str
    value: str
    detail: str = ""


@dataclass(frozen=True)
class Options:
    quick: bool = False
    repeats: int | None = None  # None: the section's own default


def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a non-empty list."""
    ordered = sorted(values)
    n = len(ordered)
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return mid, ordered[0], ordered[-1]
