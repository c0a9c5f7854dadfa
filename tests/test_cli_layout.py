"""The `teeflow` command's modules import in one direction: main -> commands -> helpers.

Checked on the source with `ast`, so an import inside a function counts too and
no interpreter order can hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import teeflow.cli
from teeflow.cli.daemons import parse_size
from teeflow.cli.legacy import SeedForm, apply_seed_form
from teeflow.core.errors import InputError

CLI_DIR = Path(teeflow.cli.__file__).parent
# Shared by the commands; they import no command module and never main.
HELPERS = {"common", "legacy", "cluster"}
COMMANDS = {"daemons", "initiator", "audit", "attest", "budget", "demo", "catalog", "doctor",
            "dashboard", "register"}
# Which helpers a helper may use; `common` stands on nothing of the CLI.
HELPER_DEPS: dict[str, set[str]] = {"common": set(), "legacy": set(), "cluster": set()}


def _cli_imports(path: Path) -> set[str]:
    """The teeflow.cli modules `path` imports (by short name), wherever the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against teeflow.cli
                base = "teeflow.cli" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["teeflow", "cli"] and len(parts) > 2:
                found.add(parts[2])
    return found


def _modules() -> dict[str, set[str]]:
    return {p.stem: _cli_imports(p) for p in sorted(CLI_DIR.glob("*.py"))
            if p.stem != "__init__"}


def test_every_module_has_a_place():
    assert set(_modules()) == HELPERS | COMMANDS | {"main"}


def test_nothing_imports_main():
    offenders = {m for m, deps in _modules().items() if "main" in deps and m != "main"}
    assert not offenders


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_modules_import_only_helpers(name):
    deps = _modules()[name] - {name}
    assert deps <= HELPERS, f"cli/{name}.py imports {sorted(deps - HELPERS)}"


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helpers_import_no_command_module(name):
    deps = _modules()[name] - {name}
    assert deps <= HELPER_DEPS[name], f"cli/{name}.py imports {sorted(deps)}"


def test_main_registers_every_command_module():
    assert _modules()["main"] >= COMMANDS | {"common"}


def test_the_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import teeflow.cli.main\nfrom teeflow.cli import demo\n"
                   "from . import audit\nfrom .common import kv\n"
                   "def f():\n    from teeflow.cli.attest import attest\n")
    assert _cli_imports(src) >= {"main", "demo", "audit", "common", "attest"}


def test_registered_commands():
    from teeflow.cli.main import cli

    assert set(cli.commands) == {
        "scheduler", "provider", "executor", "init", "submit", "tasks", "status", "result",
        "approve", "reject", "executors", "cancel", "datasets", "audit", "attest", "budget", "demo",
        "computations", "doctor", "wait", "dashboard", "register-executor"}


# -- the seed (PrimiHub-style) submit form -----------------------------------------------------
NONE = SeedForm(None, None, None, {})


def test_seed_form_fills_what_flags_leave_out():
    got = apply_seed_form("proto", "6", "datasets:STRING:0:a;b,server:STRING:0:h:1,"
                          "rounds:INT32:0:3", NONE)
    assert got == SeedForm("a,b", "h:1", "model_aggregation", {"rounds": "3"})


def test_seed_form_explicit_flags_win():
    given = SeedForm("x", "e:2", "sum", {"rounds": "5"})
    got = apply_seed_form(None, None, "compute:STRING:0:mean,rounds:INT32:0:3", given)
    assert got == SeedForm("x", "e:2", "sum", {"compute": "mean", "rounds": "5"})


@pytest.mark.parametrize("lang,kind,params,match", [
    ("java", "6", "", "only --task_lang=proto"),
    ("proto", "1", "", "only --task_lang=proto"),
    (None, None, "a:b:c", "is not name:TYPE:flag:value"),
])
def test_seed_form_refused(lang, kind, params, match):
    with pytest.raises(InputError, match=match):
        apply_seed_form(lang, kind, params, NONE)


@pytest.mark.parametrize("text,size", [("1000000", 10**6), ("512MB", 512 * 10**6),
                                       ("2GiB", 2 * 2**30), ("1kib", 1024)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2XB", "", "0", "MB"])
def test_parse_size_refused(text):
    with pytest.raises(InputError, match="--memory-budget"):
        parse_size(text)
