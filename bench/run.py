"""Run teeflow's benchmarks and print their figures (`make bench`).

    python bench/run.py            # every section, full size
    python bench/run.py --quick    # small inputs, for a smoke test
    python bench/run.py --only upload --repeats 7

Add a section: a module in bench/ with `run(opts: Options) -> list[Row]`,
listed in SECTIONS below.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script: make the `bench` package importable (spawned children inherit sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import Options, Row, attestation, compute, dp, load, memory, pool, upload  # noqa: E402

SECTIONS: dict[str, tuple[str, Callable[[Options], list[Row]]]] = {
    "upload": ("Upload: one provider -> executor, Arrow Flight do_put", upload.run),
    "attestation": ("Attestation: quote verification and attested connect", attestation.run),
    "memory": ("Bounded memory: input 4x the executor's memory budget", memory.run),
    "compute": ("Computations: executor vs. plain Python on the same data", compute.run),
    "dp": ("Differential privacy: accuracy cost of the DP model, time of a DP aggregate",
           dp.run),
    "load": ("Load: concurrent tasks over four owners and one executor", load.run),
    "pool": ("Executor pool: three members vs. one executor with a memory budget", pool.run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs (smoke test)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per figure (default: each section's own)")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS),
                        help="run only this section (repeatable)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    opts = Options(quick=args.quick, repeats=args.repeats)

    console = Console()
    if not console.is_terminal:  # piped or logged: do not wrap at 80 columns
        console.width = 150
    console.print(f"teeflow bench: python {platform.python_version()}, pyarrow {pa.__version__}, "
                  f"{os.cpu_count()} CPUs, {platform.machine()} {platform.system()}"
                  f"{' [quick]' if args.quick else ''}")
    started = time.perf_counter()
    for name in args.only or list(SECTIONS):
        title, func = SECTIONS[name]
        t0 = time.perf_counter()
        rows = func(opts)
        table = Table(title=f"{title}  ({time.perf_counter() - t0:.1f} s)", title_justify="left")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_column("detail", style="dim")
        for row in rows:
            table.add_row(row.measure, row.value, row.detail)
        console.print(table)
    console.print(f"total bench runtime {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
