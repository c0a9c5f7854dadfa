"""Which computations an executor pool runs, and running them.

Each member holds its part of every dataset (held.py); ``run_on_pool`` returns the value
dict ``teeflow.compute.get(name).run`` returns over the union of the parts, computed by
tasks pinned to the members' workers that send on aggregates only (see each module).
``check_pool_params`` says, before any data moves, what a pool cannot do: a computation it
does not run, or a parameter value whose result it cannot reproduce exactly.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from distributed import Client

from teeflow.core.errors import ParameterError

SUPPORTED = ("linear_regression", "logistic_regression", "sql")


def check_pool_params(compute_name: str, params: dict[str, Any]) -> None:
    """ParameterError naming what a pool cannot do with these (checked) params."""
    if compute_name not in SUPPORTED:
        raise ParameterError(
            f"computation {compute_name!r}: not available on an executor pool (a pool runs "
            f"{', '.join(SUPPORTED)})")
    if compute_name in ("linear_regression", "logistic_regression"):
        if params.get("test_fraction", 0.0) > 0:
            raise ParameterError(
                "parameter 'test_fraction': a held-out split picks rows by their position "
                "in the union of the datasets, which an executor pool does not have; use 0 "
                "on a pool")
        return
    from teeflow.executor.pool import sql

    sql.check(params)


async def run_on_pool(client: Client, workers: dict[str, str], keys: dict[str, str],
                      compute_name: str, params: dict[str, Any],
                      schemas: dict[str, pa.Schema]) -> dict[str, Any]:
    """`compute_name` over every member's parts. `workers`: member -> its Dask worker
    address; `keys`: member -> its held.py key; `schemas`: the task's datasets, in task
    order. `params` are the checked params."""
    check_pool_params(compute_name, params)
    if sorted(workers) != sorted(keys) or not workers:
        raise ParameterError("pool: every member needs a worker address and a held key")
    if compute_name == "linear_regression":
        from teeflow.executor.pool import linreg

        return await linreg.run(client, workers, keys, params, schemas)
    if compute_name == "logistic_regression":
        from teeflow.executor.pool import logreg

        return await logreg.run(client, workers, keys, params, schemas)
    from teeflow.executor.pool import sql

    return await sql.run(client, workers, keys, params, schemas)
