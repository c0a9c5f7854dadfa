"""The computation catalog, shared by every role: each computation's name, description,
parameters, data layout and checks.

Importing it is light (pyarrow and numpy only): the engines (DuckDB, scikit-learn, SciPy,
XGBoost) are imported by the code that runs inside the executor, when it runs. The scheduler,
the providers and the SDK use the catalog to check a task before any data moves; they never
compute a code digest themselves: the digest a spec carries comes from the executor's own
catalog, read over its attested channel (``teeflow.net.executor_client``).

Each computation is a module of this package defining

- ``NAME`` and ``DESCRIPTION``;
- ``PARAMS``: its parameters, a tuple of ``params.Param`` (name, type, default, bounds, help);
- ``LAYOUT``: how its datasets combine: ``"rows"`` (every party holds rows with one schema),
  ``"columns"`` (parties hold different columns of the same entities, joined on an ID),
  ``"federated"`` (rows stay with their owners) or ``"any"``;
- ``MIN_DATASETS``: the fewest datasets it accepts;
- ``USES``: the dotted names of the other modules its code runs (part of its digest);
- ``REVEALING``: the names of its parameters that can make a result reveal rows (a query,
  code, a group-size floor, epsilon, a minimum number of parties...); an owner's approval
  rule must say something about each of them to match (``provider/consent.py``). Required,
  even when empty: a module without it is refused at registration;
- optionally ``ALL_PARAMS``: every parameter it accepts when ``PARAMS`` is not all of them
  (vertical also takes its model's);
- pure functions over Arrow data (no I/O):

  - ``check_params(raw)``: validates and converts the task's string parameters; raises
    ParameterError naming the parameter (an unknown one too).
  - ``check_schemas(schemas, params)``: given ``{dataset: pa.Schema}`` and the *checked*
    params, raises SchemaMismatch naming the dataset and what is wrong.
  - optionally ``precheck_params`` / ``precheck_schemas``: the part of those checks that needs
    no engine, for the roles outside the executor (default: the full checks, which are light
    for every computation but ``sql``, whose output policy needs DuckDB's parser).
  - ``run(inputs, params)``: ``inputs`` is ``[(dataset, table), ...]`` in task dataset order;
    returns a JSON-serializable dict, raising ComputeError when the data cannot be used;
    optionally ``run_stream(sources, params)`` for inputs larger than memory.

``Computation.code_digest`` is the SHA-256 over the source files of the module and of
everything its ``USES`` reaches (computed once), so a result says exactly which code produced
it, and a change to shared code changes the digest of every computation that uses it.
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

from teeflow.compute import (
    dp_aggregate,
    dp_linreg,
    fedavg,
    federated,
    linreg,
    logreg,
    vertical,
    xgb,
)
from teeflow.compute.params import Param
from teeflow.compute.rows import Source
from teeflow.core.errors import ParameterError, SchemaMismatch

log = logging.getLogger(__name__)

Layout = Literal["rows", "columns", "any", "federated"]
LAYOUTS = ("rows", "columns", "any", "federated")
CheckParams = Callable[[dict[str, str]], dict[str, Any]]
CheckSchemas = Callable[[dict[str, pa.Schema], dict[str, Any]], None]


@dataclass(frozen=True)
class Computation:
    name: str
    description: str
    check_params: CheckParams
    check_schemas: CheckSchemas
    run: Callable[[list[tuple[str, pa.Table]], dict[str, Any]], dict[str, Any]]
    params: tuple[Param, ...] = ()
    layout: Layout = "any"
    min_datasets: int = 1
    modules: tuple[str, ...] = ()
    extra: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    # For inputs larger than memory: the same computation over streamed Sources.
    run_stream: Callable[[list[Source], dict[str, Any]], dict[str, Any]] | None = field(
        default=None, repr=False)
    # The checks outside the executor (no engine); default: check_params / check_schemas.
    precheck_params: CheckParams | None = field(default=None, repr=False)
    precheck_schemas: CheckSchemas | None = field(default=None, repr=False)
    # A DP computation's (epsilon, delta) for checked params; None: not DP.
    privacy_cost: Callable[[dict[str, Any]], tuple[float, float]] | None = field(
        default=None, repr=False)
    # the parameters an approval rule must bind (module REVEALING)
    revealing: tuple[str, ...] = ()
    # every parameter it accepts (PARAMS, or the module's ALL_PARAMS)
    all_params: tuple[Param, ...] = ()
    # checked params -> raises ParameterError if the task has too few parties (owners)
    check_parties: Callable[[int, dict[str, Any]], None] | None = field(
        default=None, repr=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.all_params or self.params if p.name == name), None)

    def parties_ok(self, spec_owner_count: int, checked: dict[str, Any]) -> None:
        """ParameterError if a task with this many distinct owners is too few for it."""
        if self.check_parties is not None:
            self.check_parties(spec_owner_count, checked)

    @property
    def differentially_private(self) -> bool:
        return self.privacy_cost is not None

    def precheck(self, raw: dict[str, str],
                 schemas: dict[str, pa.Schema] | None = None) -> dict[str, Any]:
        """What the scheduler, a provider or the SDK can check of a task before any data
        moves; the executor then runs the full checks. Returns the checked parameters."""
        checked = (self.precheck_params or self.check_params)(raw)
        if schemas is not None:
            (self.precheck_schemas or self.check_schemas)(schemas, checked)
        return checked

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """The source files of ``modules``, found without importing them."""
        return tuple(_source_file(m) for m in self.modules)

    @cached_property
    def code_digest(self) -> str:
        """SHA-256 hex over the computation's source files, each framed by its module name
        and length, in ``modules`` order. Only the executor's own value counts: a spec
        carries the digest the executor published."""
        h = hashlib.sha256()
        for module, path in zip(self.modules, self.sources, strict=True):
            data = Path(path).read_bytes()
            name = module.encode()
            h.update(b"%d:%s%d:" % (len(name), name, len(data)))
            h.update(data)
        return h.hexdigest()

    def describe(self, digest: bool = True) -> dict[str, Any]:
        """A JSON-ready summary: name, description, layout, parameters (and code digest)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "layout": self.layout,
            "min_datasets": self.min_datasets,
            "params": [p.describe() for p in self.params],
            "revealing": list(self.revealing),
        }
        if digest:
            out["code_digest"] = self.code_digest
        if self.extra is not None:
            out.update(self.extra())
        return out


def _source_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.has_location:
        raise RuntimeError(f"module {module}: source file not found")
    return spec.origin


def _reach(module: ModuleType) -> tuple[str, ...]:
    """The module and everything its USES reach, depth first, each once (the USES of a
    computation it runs, such as vertical's models, included)."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        out.append(name)
        declaring = module if name == module.__name__ else _LOADED.get(name)
        for used in getattr(declaring, "USES", ()):
            visit(used)

    visit(module.__name__)
    return tuple(out)


def _from_module(module: ModuleType) -> Computation:
    name: str = module.NAME
    layout: Layout = getattr(module, "LAYOUT", "any")
    if layout not in LAYOUTS:
        raise ValueError(f"computation {name!r}: unknown layout {layout!r}")
    min_datasets = int(getattr(module, "MIN_DATASETS", 1))
    check, execute = module.check_schemas, module.run
    revealing = getattr(module, "REVEALING", None)
    if not isinstance(revealing, tuple) or not all(isinstance(r, str) for r in revealing):
        raise ValueError(f"computation {name!r}: REVEALING (a tuple of parameter names) is "
                         "required: which of its parameters can reveal rows")
    params = tuple(getattr(module, "PARAMS", ()))
    all_params = tuple(getattr(module, "ALL_PARAMS", params))
    unknown = [r for r in revealing if r not in {p.name for p in all_params}]
    if unknown:
        raise ValueError(f"computation {name!r}: REVEALING names unknown parameter(s) {unknown}")

    def enough(count: int) -> None:
        if count < min_datasets:
            raise SchemaMismatch(
                f"{name} needs at least {min_datasets} dataset(s), got {count}"
            )

    def guarded(inner: CheckSchemas) -> CheckSchemas:
        def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
            enough(len(schemas))
            inner(schemas, params)
        return check_schemas

    def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
        enough(len(inputs))
        return execute(inputs, params)

    streamed = getattr(module, "run_stream", None)

    def run_stream(inputs: list[Source], params: dict[str, Any]) -> dict[str, Any]:
        enough(len(inputs))
        assert streamed is not None
        result: dict[str, Any] = streamed(inputs, params)
        return result

    pre_schemas = getattr(module, "precheck_schemas", None)
    return Computation(
        name=name,
        description=module.DESCRIPTION,
        check_params=module.check_params,
        check_schemas=guarded(check),
        run=run,
        params=params,
        layout=layout,
        min_datasets=min_datasets,
        modules=_reach(module),
        extra=getattr(module, "describe_extra", None),
        run_stream=run_stream if streamed is not None else None,
        precheck_params=getattr(module, "precheck_params", None),
        precheck_schemas=guarded(pre_schemas) if pre_schemas is not None else None,
        privacy_cost=getattr(module, "privacy_cost", None),
        revealing=revealing,
        all_params=all_params,
        check_parties=getattr(module, "check_parties", None),
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
    fedavg, logreg, linreg, xgb, vertical, federated, dp_aggregate, dp_linreg,
    *_optional("sql"), *_optional("usercode")
]
_LOADED: dict[str, ModuleType] = {m.__name__: m for m in _MODULES}
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


def describe_all(digest: bool = True) -> list[dict[str, Any]]:
    """``describe()`` of every computation, sorted by name: what an executor publishes (with
    the digests of the code it runs) and what ``teeflow computations`` lists."""
    return [_REGISTRY[n].describe(digest) for n in names()]


__all__ = ["Computation", "Param", "Source", "describe_all", "get", "names"]
