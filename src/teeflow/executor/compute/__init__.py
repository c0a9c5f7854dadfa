"""The computations a TEE executor can run, by name.

Each computation is three pure functions over Arrow data (no I/O):

- ``check_params(raw)``: validates and converts the task's string parameters before any data
  moves; raises ParameterError naming the parameter.
- ``check_schemas(schemas, params)``: given ``{dataset: pa.Schema}`` and the *checked* params,
  raises SchemaMismatch naming the dataset and what is wrong (ParameterError when a parameter
  names a column no dataset has). Called before upload with the catalogued schemas and again
  on the received data.
- ``run(inputs, params)``: ``inputs`` is ``[(dataset, table), ...]`` in task dataset order;
  returns a JSON-serializable dict, raising ComputeError when the data cannot be used.

``code_digest`` is the SHA-256 of the source file defining ``run``, so a result can say
exactly which code produced it.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pyarrow as pa

from teeflow.core.errors import ParameterError
from teeflow.executor.compute import fedavg, logreg


@dataclass(frozen=True)
class Computation:
    name: str
    description: str
    check_params: Callable[[dict[str, str]], dict[str, Any]]
    check_schemas: Callable[[dict[str, pa.Schema], dict[str, Any]], None]
    run: Callable[[list[tuple[str, pa.Table]], dict[str, Any]], dict[str, Any]]

    @property
    def code_digest(self) -> str:
        """SHA-256 hex of the source file that defines ``run``."""
        path = inspect.getsourcefile(self.run)
        if path is None:  # pragma: no cover - only for code without a source file
            raise RuntimeError(f"computation {self.name!r}: source file of run() not found")
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def _from_module(module: ModuleType) -> Computation:
    return Computation(
        name=module.NAME,
        description=module.DESCRIPTION,
        check_params=module.check_params,
        check_schemas=module.check_schemas,
        run=module.run,
    )


_REGISTRY: dict[str, Computation] = {c.name: c for c in map(_from_module, (logreg, fedavg))}


def names() -> list[str]:
    """The known computation names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Computation:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(names())
        raise ParameterError(
            f"computation: unknown computation {name!r} (known: {known})"
        ) from None


__all__ = ["Computation", "get", "names"]
