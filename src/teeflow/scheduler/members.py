"""The operator's key list (`teeflow scheduler --members FILE`): keys admitted without
an invitation, with their roles. TOML, capped:

    [[member]]
    public_key = "base64 Ed25519 key"
    roles = ["owner", "initiator"]
    name = "alice"          # optional: the only name this key may join under
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from teeflow.core.crypto import check_public_key
from teeflow.core.errors import AuthError, ConfigError, InputError
from teeflow.files import read_capped
from teeflow.scheduler.store import check_roles

MAX_MEMBERS_FILE = 1024 * 1024


def load_members(path: Path) -> list[tuple[str, list[str], str | None]]:
    raw = read_capped(path, MAX_MEMBERS_FILE, "members file")
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"members file {path}: not valid TOML: {exc}") from exc
    return parse_members(doc, str(path))


def parse_members(doc: dict, where: str) -> list[tuple[str, list[str], str | None]]:
    unknown = set(doc) - {"member"}
    if unknown:
        raise ConfigError(f"{where}: unknown table {sorted(unknown)[0]!r} (only [[member]])")
    entries = doc.get("member", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: member must be an array of tables ([[member]])")
    out: list[tuple[str, list[str], str | None]] = []
    for i, m in enumerate(entries):
        at = f"{where}: member[{i}]"
        if not isinstance(m, dict) or set(m) - {"public_key", "roles", "name"}:
            raise ConfigError(f"{at}: a table of public_key, roles and optional name")
        key, roles, name = m.get("public_key"), m.get("roles"), m.get("name")
        if not isinstance(key, str):
            raise ConfigError(f"{at}.public_key: required, a base64 Ed25519 key")
        try:
            check_public_key(key)
        except AuthError as exc:
            raise ConfigError(f"{at}.public_key: {exc}") from None
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{at}.roles: required, a list of role names")
        try:
            check_roles(roles)
        except InputError as exc:
            raise ConfigError(f"{at}.{exc}") from None
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"{at}.name: a non-empty string")
        out.append((key, sorted(set(roles)), name))
    return out
