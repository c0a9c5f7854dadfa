"""Capped reads of local files: an oversize file is refused, naming it, without being read
whole."""

from __future__ import annotations

import pytest

from teeflow.core.errors import ConfigError, InputError
from teeflow.files import read_capped


def test_read_capped(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_capped(path, 10, "file") == b"x" * 10
    with pytest.raises(ConfigError, match=r"file .*f: larger than 9 bytes"):
        read_capped(path, 9, "file")
    with pytest.raises(InputError, match="quote .*missing"):
        read_capped(tmp_path / "missing", 10, "quote", InputError)
