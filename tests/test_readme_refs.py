"""The README names the tests that show each promise (e.g. what a malicious scheduler can no
longer do); every test it names must exist, so a renamed test cannot leave a claim behind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/test_x.py::test_name`, or `::test_name` for another test of the file named before it
REF = re.compile(r"`(tests/[\w/]+\.py)?::(test_\w+)`|`(tests/[\w/]+\.py)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    last: str | None = None
    named = 0
    for m in REF.finditer(text):
        file, name, bare = m.groups()
        if bare:
            assert (ROOT / bare).is_file(), f"README names {bare}, which does not exist"
            last = bare
            continue
        file = file or last
        assert file is not None, f"README names ::{name} before any test file"
        assert (ROOT / file).is_file(), f"README names {file}, which does not exist"
        assert name in _tests_in(ROOT / file), f"README names {file}::{name}, which is not a test"
        last = file
        named += 1
    assert named >= 10  # the trust section alone names more
