"""The executor's environment is pinned: every runtime dependency, exactly, with hashes.

`make` installs the runtime dependencies from `requirements/executor.lock` with
`--require-hashes`, so the same commit gives the same packages, and so (with the same paths)
the same enclave measurement. `make lock` re-pins after a change to pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "executor.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _pins() -> dict[str, tuple[str, str | None, list[str]]]:
    """name -> (version, marker, hashes), read from the lock's requirement blocks."""
    pins: dict[str, tuple[str, str | None, list[str]]] = {}
    current: str | None = None
    for line in LOCK.read_text().splitlines():
        if line.startswith((" ", "\t")):
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
            if hashes and current is not None:
                pins[current][2].extend(hashes)
            continue
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        current = canonicalize_name(match.group(1))
        pins[current] = (match.group(2), match.group(3), [])
    return pins


def _dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_every_pin_is_exact_and_hashed():
    pins = _pins()
    assert len(pins) > 10
    assert all(hashes for _, _, hashes in pins.values()), "a pin without a hash"
    text = LOCK.read_text()
    assert "--index-url" not in text and "--find-links" not in text  # no host of ours


def test_every_dependency_is_pinned_within_its_stated_range():
    pins = _pins()
    env = default_environment()
    for req in _dependencies():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock: run make lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{req.name}: the lock's {pins[name][0]} is outside {req.specifier}")


def test_the_installed_runtime_is_the_lock():
    """What this test runs on was installed from the lock (a drifted venv is caught)."""
    env = default_environment()
    drift = {}
    for name, (version, marker, _) in _pins().items():
        if marker and not Requirement(f"x; {marker}").marker.evaluate(env):  # type: ignore[union-attr]
            continue
        installed = metadata.version(name)
        if installed != version:
            drift[name] = (installed, version)
    assert drift == {}, f"installed != locked (rebuild the venv: make clean venv): {drift}"
