"""The newest log checkpoint a node has seen, kept in a small file next to its key.

JSON {"log_key": base64 Ed25519 key, "note": signed checkpoint}, owner-only, replaced
atomically (a crash leaves the old or the new one, never half). The first checkpoint a
node sees fixes the log key it trusts from then on (over the scheduler's pinned TLS
channel); a checkpoint under another key is refused, not adopted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from teeflow.core.errors import ConfigError
from teeflow.files import read_capped

MAX_CHECKPOINT_FILE = 128 * 1024


def checkpoint_path(key_file: Path) -> Path:
    """Where the node whose key is `key_file` keeps its checkpoint."""
    return key_file.with_name(key_file.name + ".checkpoint.json")


class CheckpointFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[str, str] | None:
        """(log key, note), or None if this node has seen no checkpoint yet."""
        if not self.path.exists():
            return None
        raw = read_capped(self.path, MAX_CHECKPOINT_FILE, "checkpoint file")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"checkpoint file {self.path}: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("log_key"), str) or \
                not isinstance(doc.get("note"), str):
            raise ConfigError(f"checkpoint file {self.path}: needs log_key and note strings")
        return doc["log_key"], doc["note"]

    def save(self, log_key: str, note: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"log_key": log_key, "note": note}, f)
        os.replace(tmp, self.path)
