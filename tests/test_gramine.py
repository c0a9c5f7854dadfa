"""The Gramine manifest template (gramine/) renders to a production SGX manifest
that fixes the executor's command line and trusts every file the executor loads.

Needs no Gramine: a small renderer stands in for `gramine-manifest` (the template
uses plain substitutions only); when jinja2 is importable it must agree with it.
The trust check runs the interpreter exactly as the manifest does (its argv
flags, its environment and nothing else) and asks which files got imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAMINE_DIR = ROOT / "gramine"
TEMPLATE = GRAMINE_DIR / "teeflow-executor.manifest.template"
SPILL = "/tmp/teeflow-spill"

# Stand-ins for what gramine-manifest provides; values unlike any default, so
# the checks below can tell they came from the variables.
GRAMINE_LIBDIR = Path("/opt/gramine-stand-in/lib/x86_64-linux-gnu/gramine")
ENCLAVE_SIZE = "3G"
MAX_THREADS = "37"
LISTEN = "127.0.0.1:9999"

# What the executor process may load: its command, every module of the packages
# it draws on (so a backend imported lazily is covered too), and the natives.
IMPORT_ROOTS = ["teeflow.cli.main", "teeflow.executor.server", "teeflow.attestation.registry"]
WALK_PACKAGES = ["teeflow.executor", "teeflow.attestation", "teeflow.core"]
IMPORT_EXTRA = ["pyarrow.flight", "cryptography"]

_PROBE = """
import importlib, json, pkgutil, sys
for name in {roots!r} + {extra!r}:
    importlib.import_module(name)
for pkg in {walk!r}:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
files = sorted({{getattr(m, "__file__", None) for m in list(sys.modules.values())}} - {{None}})
print(json.dumps({{"files": files, "path": sys.path}}))
"""


class _Runtimedir:
    """Like graminelibos' `gramine.runtimedir`: callable, and printable as a path."""

    def __call__(self, libc: str = "glibc") -> Path:
        return GRAMINE_LIBDIR / "runtime" / libc

    def __str__(self) -> str:
        return str(self())


def _variables() -> dict[str, Any]:
    """What the Makefile passes with -D, worked out the same way for this interpreter."""
    return {
        "entrypoint": os.path.realpath(sys.executable),
        "python_home": sys.base_prefix,
        "python_stdlib": sysconfig.get_path("stdlib"),
        "python_libdir": sysconfig.get_config_var("LIBDIR"),
        "venv_site": os.path.realpath(sysconfig.get_path("purelib")),
        "teeflow_src": os.path.realpath(ROOT / "src"),  # the Makefile's TEEFLOW_SRC
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "enclave_size": ENCLAVE_SIZE,
        "max_threads": MAX_THREADS,
        "edmm_enable": "false",
        "listen": LISTEN,
    }


def _globals() -> dict[str, Any]:
    paths = sysconfig.get_paths()
    return {
        "gramine": {"libos": GRAMINE_LIBDIR / "libsysdb.so", "runtimedir": _Runtimedir()},
        "python": {
            "stdlib": Path(paths["stdlib"]),
            "platstdlib": Path(paths["platstdlib"]),
            "purelib": Path(paths["purelib"]),
            "distlib": Path(paths["stdlib"]).parent / "python3" / "dist-packages",
        },
    }


_SUBST = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*(\(\s*\))?\s*\}\}")


def render_fallback(text: str, context: dict[str, Any]) -> str:
    """Render the subset of Jinja the template may use: {{ name }}, {{ a.b }}, {{ a.b() }}."""
    assert "{%" not in text, "template uses Jinja statements; keep it to plain substitutions"
    text = re.sub(r"\{#.*?#\}", "", text, flags=re.S)

    def substitute(match: re.Match[str]) -> str:
        value: Any = context
        for part in match.group(1).split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        return str(value() if match.group(2) else value)

    out = _SUBST.sub(substitute, text)
    assert "{{" not in out and "}}" not in out, "an expression the fallback cannot render"
    return out


def _context() -> dict[str, Any]:
    return {**_globals(), **_variables()}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return tomllib.loads(render_fallback(TEMPLATE.read_text(), _context()))


@pytest.fixture(scope="module")
def probe(manifest: dict[str, Any]) -> dict[str, Any]:
    """Import what the executor imports, run the way the manifest runs the interpreter."""
    argv = manifest["loader"]["argv"]
    flags = argv[1 : argv.index("-m")]
    script = _PROBE.format(roots=IMPORT_ROOTS, extra=IMPORT_EXTRA, walk=WALK_PACKAGES)
    done = subprocess.run(
        [argv[0], *flags, "-c", script],
        env=manifest["loader"]["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{where}.{key}".lstrip("."), key
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]")
    else:
        yield where, node


def _uri_path(uri: str) -> str:
    assert uri.startswith("file:"), f"unexpected URI {uri!r}"
    return uri[len("file:") :]


def _covered(path: str, entries: list[str]) -> bool:
    """True if `path` is one of the file entries or lies under one of the directory entries."""
    for entry in entries:
        if entry.endswith("/"):
            if path.startswith(entry):
                return True
        elif path == entry:
            return True
    return False


def _trusted(manifest: dict[str, Any]) -> list[str]:
    out = []
    for item in manifest["sgx"]["trusted_files"]:
        uri = item if isinstance(item, str) else item["uri"]
        out.append(_uri_path(uri))
    return out


def test_renders_to_valid_toml_with_every_variable_used(manifest: dict[str, Any]) -> None:
    text = TEMPLATE.read_text()
    for name in _variables():
        assert re.search(r"\{\{\s*" + name + r"\s*\}\}", text), f"variable {name} is never used"
    assert manifest["libos"]["entrypoint"] == _variables()["entrypoint"]
    assert manifest["loader"]["entrypoint"]["uri"] == f"file:{GRAMINE_LIBDIR / 'libsysdb.so'}"


def test_jinja_renders_the_same() -> None:
    jinja2 = pytest.importorskip(
        "jinja2", reason="jinja2 not installed: only the fallback renderer is checked"
    )
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals.update(_globals())
    text = TEMPLATE.read_text()
    assert env.from_string(text).render(**_variables()) == render_fallback(text, _context())


def test_production_sgx_settings(manifest: dict[str, Any]) -> None:
    sgx = manifest["sgx"]
    assert sgx["debug"] is False
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["enclave_size"] == ENCLAVE_SIZE
    assert sgx["max_threads"] == int(MAX_THREADS)
    assert sgx["edmm_enable"] is False
    assert sgx.get("file_check_policy", "strict") == "strict"
    assert "allowed_files" not in sgx, "allowed files are read without any check"
    assert manifest["loader"]["log_level"] in ("error", "none")


def test_nothing_insecure(manifest: dict[str, Any]) -> None:
    assert "insecure__" not in TEMPLATE.read_text()
    for where, item in _walk(manifest):
        assert "insecure__" not in str(item), f"{where}: {item!r}"


def test_argv_is_fixed_to_the_sgx_executor(manifest: dict[str, Any]) -> None:
    loader = manifest["loader"]
    assert "argv_src_file" not in loader
    argv = loader["argv"]
    assert argv[0] == manifest["libos"]["entrypoint"]
    at = argv.index("-m")
    assert "-S" in argv[1:at]  # no site module: no .pth file runs, sys.path is PYTHONPATH + stdlib
    assert argv[at + 1 : at + 3] == ["teeflow.cli.main", "executor"]
    rest = argv[at + 3 :]
    assert rest[rest.index("--tee") + 1] == "sgx"
    assert rest[rest.index("--listen") + 1] == LISTEN
    assert "--debug-enclave" not in argv


def test_environment_is_fixed(manifest: dict[str, Any]) -> None:
    env = manifest["loader"]["env"]
    assert "env_src_file" not in manifest["loader"]
    for name, value in env.items():
        assert isinstance(value, str), f"loader.env.{name} is not a fixed string: {value!r}"
    assert "PYTHONHASHSEED" not in env
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_spill_goes_to_an_enclave_sealed_mount(manifest: dict[str, Any]) -> None:
    mounts = manifest["fs"]["mounts"]
    encrypted = [m for m in mounts if m.get("type") == "encrypted"]
    assert [m["path"] for m in encrypted] == [SPILL]
    assert encrypted[0]["key_name"] == "_sgx_mrenclave"
    assert manifest["loader"]["env"]["TMPDIR"] == SPILL
    trusted = _trusted(manifest)
    assert not any(Path(_uri_path(encrypted[0]["uri"])) == Path(t) for t in trusted)


def test_trusted_files_are_mounted(manifest: dict[str, Any]) -> None:
    chroot = [m["path"].rstrip("/") + "/" for m in manifest["fs"]["mounts"]
              if m.get("type", "chroot") == "chroot" and m["uri"] == f"file:{m['path']}"]
    paths = [m["path"] for m in manifest["fs"]["mounts"]]
    assert len(paths) == len(set(paths)), "Gramine refuses a path mounted twice"
    for path in _trusted(manifest):
        if path.startswith(str(GRAMINE_LIBDIR)):
            continue  # Gramine's own runtime, mounted at /lib
        assert _covered(path, chroot), f"trusted {path} is not visible inside the enclave"


def test_the_executor_command_exists(manifest: dict[str, Any]) -> None:
    argv = manifest["loader"]["argv"]
    cmd = argv[: argv.index("executor") + 1] + ["--help"]
    done = subprocess.run(
        cmd, env=manifest["loader"]["env"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--tee" in done.stdout and "--listen" in done.stdout


def test_every_imported_file_is_trusted(manifest: dict[str, Any], probe: dict[str, Any]) -> None:
    trusted = _trusted(manifest)
    files = probe["files"]
    assert any(f.endswith(os.sep + "flight.py") for f in files)  # the probe did import things
    assert any(f.endswith(".so") for f in files)  # extension modules are module files too
    untrusted = [f for f in files if not _covered(f, trusted)]
    assert not untrusted, f"imported but not trusted: {untrusted[:20]}"
    teeflow_src = _variables()["teeflow_src"]
    assert any(f.startswith(teeflow_src + os.sep + "teeflow" + os.sep) for f in files)


def test_sys_path_is_only_trusted_dirs(probe: dict[str, Any], manifest: dict[str, Any]) -> None:
    trusted = _trusted(manifest)
    for entry in probe["path"]:
        if not os.path.exists(entry):
            continue  # e.g. pythonXY.zip: absent, never opened
        assert _covered(entry.rstrip("/") + "/", trusted), f"sys.path entry {entry} not trusted"
