"""The computations a TEE executor can run, by name: the registry.

Each computation is a module of this package defining

- ``NAME`` and ``DESCRIPTION``;
- ``PARAMS``: its parameters, a tuple of ``_common.Param`` (name, type, default, bounds, help);
- ``LAYOUT``: how its datasets combine: ``"rows"`` (every party holds rows with one schema),
  ``"columns"`` (parties hold different columns of the same entities, joined on an ID) or
  ``"any"``;
- ``MIN_DATASETS``: the fewest datasets it accepts;
- ``USES``: the other modules of this package its code runs (they are part of its digest);
- three pure functions over Arrow data (no I/O):

  - ``check_params(raw)``: validates and converts the task's string parameters before any data
    moves; raises ParameterError naming the parameter (an unknown one too).
  - ``check_schemas(schemas, params)``: given ``{dataset: pa.Schema}`` and the *checked*
    params, raises SchemaMismatch naming the dataset and what is wrong (ParameterError when a
    parameter names a column no dataset has). Called before upload with the catalogued schemas
    and again on the received data.
  - ``run(inputs, params)``: ``inputs`` is ``[(dataset, table), ...]`` in task dataset order;
    returns a JSON-serializable dict, raising ComputeError when the data cannot be used.

``Computation.code_digest`` is the SHA-256 over the source files of the module and of its
``USES`` (computed once), so a result can say exactly which code produced it, and a change to
shared code changes the digest of every computation that uses it. ``describe()`` gives a
JSON-ready summary for listing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pyarrow as pa

from teeflow.core.errors import ParameterError, SchemaMismatch
from teeflow.executor.compute import fedavg, federated, linreg, logreg, vertical, xgb
from teeflow.executor.compute._common import Param, Source

log = logging.getLogger(__name__)

Layout = Literal["rows", "columns", "any", "federated"]
LAYOUTS = ("rows", "columns", "any", "federated")


@dataclass(frozen=True)
class Computation:
    name: str
    description: str
    check_params: Callable[[dict[str, str]], dict[str, Any]]
    check_schemas: Callable[[dict[str, pa.Schema], dict[str, Any]], None]
    run: Callable[[list[tuple[str, pa.Table]], dict[str, Any]], dict[str, Any]]
    params: tuple[Param, ...] = ()
    layout: Layout = "any"
    min_datasets: int = 1
    sources: tuple[str, ...] = ()
    extra: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    # For inputs larger than memory: the same computation over streamed Sources.
    run_stream: Callable[[list[Source], dict[str, Any]], dict[str, Any]] | None = field(
        default=None, repr=False)

    @cached_property
    def code_digest(self) -> str:
        """SHA-256 hex over the computation's source files, each framed by its file name and
        length, in ``sources`` order."""
        h = hashlib.sha256()
        for path in self.sources:
            data = Path(path).read_bytes()
            name = Path(path).name.encode()
            h.update(b"%d:%s%d:" % (len(name), name, len(data)))
            h.update(data)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: name, description, layout, parameters, code digest."""
        out = {
            "name": self.name,
            "description": self.description,
            "layout": self.layout,
            "min_datasets": self.min_datasets,
            "params": [p.describe() for p in self.params],
            "code_digest": self.code_digest,
        }
        if self.extra is not None:
            out.update(self.extra())
        return out


def _source(module: ModuleType) -> str:
    path = getattr(module, "__file__", None)
    if not path:  # pragma: no cover - only for code without a source file
        raise RuntimeError(f"module {module.__name__}: source file not found")
    return path


def _from_module(module: ModuleType) -> Computation:
    name: str = module.NAME
    layout = getattr(module, "LAYOUT", "any")
    if layout not in LAYOUTS:
        raise ValueError(f"computation {name!r}: unknown layout {layout!r}")
    min_datasets = int(getattr(module, "MIN_DATASETS", 1))
    sources: list[str] = []
    for m in (module, *getattr(module, "USES", ())):
        if _source(m) not in sources:
            sources.append(_source(m))
    check, execute = module.check_schemas, module.run

    def enough(count: int) -> None:
        if count < min_datasets:
            raise SchemaMismatch(
                f"{name} needs at least {min_datasets} dataset(s), got {count}"
            )

    def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
        enough(len(schemas))
        check(schemas, params)

    def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
        enough(len(inputs))
        return execute(inputs, params)

    streamed = getattr(module, "run_stream", None)

    def run_stream(inputs: list[Source], params: dict[str, Any]) -> dict[str, Any]:
        enough(len(inputs))
        return streamed(inputs, params)

    return Computation(
        name=name,
        description=module.DESCRIPTION,
        check_params=module.check_params,
        check_schemas=check_schemas,
        run=run,
        params=tuple(getattr(module, "PARAMS", ())),
        layout=layout,
        min_datasets=min_datasets,
        sources=tuple(sources),
        extra=getattr(module, "describe_extra", None),
        run_stream=run_stream if streamed is not None else None,
    )


def _optional(name: str) -> list[ModuleType]:
    """A computation module that may be absent, or need a package that is not installed:
    then it is not offered (and a warning is logged), and the others still are."""
    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        return []
    try:
        return [importlib.import_module(f"{__name__}.{name}")]
    except ImportError as exc:
        log.warning("computation module %s not available: %s", name, exc)
        return []


_MODULES: list[ModuleType] = [
    fedavg, logreg, linreg, xgb, vertical, federated, *_optional("sql"),
    *_optional("usercode")
]
_REGISTRY: dict[str, Computation] = {c.name: c for c in map(_from_module, _MODULES)}


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


def describe_all() -> list[dict[str, Any]]:
    """``describe()`` of every computation, sorted by name."""
    return [_REGISTRY[n].describe() for n in names()]


__all__ = ["Computation", "Param", "Source", "describe_all", "get", "names"]
