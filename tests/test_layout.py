"""The shape of the package, checked: what each role loads, what core may import, no cycles.

The SDK, the scheduler and the providers must start without the executor's engines (DuckDB,
scikit-learn, SciPy, XGBoost): they use the light computation catalog, and take code digests
from the executor. `core/` holds pure pieces only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import teeflow

SRC = Path(teeflow.__file__).parent
HEAVY = ("duckdb", "sklearn", "scipy", "xgboost")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("code", [
    "import teeflow.sdk",
    "import teeflow.provider.node",
    "import teeflow.cli.main",
    "from teeflow import compute\n"
    "compute.get('sql').precheck({'query': 'SELECT count(*) FROM t'})",
    # the scheduler as `teeflow scheduler` starts it: app over a real SQLite store
    "import tempfile, pathlib\n"
    "from teeflow.scheduler.app import create_app\n"
    "from teeflow.scheduler.store import Store\n"
    "create_app(Store(str(pathlib.Path(tempfile.mkdtemp()) / 's.sqlite')))",
])
def test_roles_outside_the_executor_load_no_engine(code):
    assert _loaded_after(code) == []


def test_the_executor_loads_its_engines_only_when_it_runs():
    assert _loaded_after("import teeflow.executor.server") == []
    assert "duckdb" in _loaded_after(
        "from teeflow import compute\n"
        "compute.get('sql').check_params({'query': 'SELECT count(*) FROM t'})")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path) -> set[str]:
    """teeflow modules imported when `path` is imported: module-level statements only (not
    inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("teeflow"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level
                                                        + 1] + ([base] if base else []))
                if not base.startswith("teeflow"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if _is_module(sub) else base)

    visit(tree.body)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _top_level_imports(p) for p in SRC.rglob("*.py")}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def test_core_is_pure():
    """core imports nothing from attestation, the network clients, files or a role."""
    allowed = ("teeflow.core",)
    for name, imports in _graph().items():
        if name.startswith("teeflow.core"):
            assert all(i.startswith(allowed) for i in imports), (name, imports)


def test_shared_packages_import_no_role():
    """The catalog, core, attestation and the clients import no role's package (the
    computations may name the executor's sandbox only lazily, inside the run)."""
    roles = ("teeflow.scheduler", "teeflow.provider", "teeflow.executor", "teeflow.sdk",
             "teeflow.cli")
    for name, imports in _graph().items():
        if name.startswith(("teeflow.compute", "teeflow.core", "teeflow.attestation",
                            "teeflow.net", "teeflow.files")):
            assert not [i for i in imports if i.startswith(roles)], name


def _all_imports(path: Path) -> set[str]:
    """teeflow modules a file imports anywhere (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("teeflow"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("teeflow"):
            base = node.module or ""
            out.update(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                       for a in node.names)
    return out


def test_code_digests_cover_all_the_code_they_run():
    """Every teeflow module a computation's code imports (eagerly or lazily) is part of its
    digest, except the pure shared core (errors, wire): owners sign what actually runs."""
    from teeflow import compute

    for name in compute.names():
        comp = compute.get(name)
        for module, path in zip(comp.modules, comp.sources, strict=True):
            missing = {m for m in _all_imports(Path(path))
                       if not m.startswith(("teeflow.core", "teeflow.errors")) and m != "teeflow"
                       and m not in comp.modules}
            assert not missing, f"{name}: {module} runs {sorted(missing)}, not in its digest"
