"""Node key files: an Ed25519 private key in PEM, readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from teeflow.core.crypto import KeySigner
from teeflow.core.errors import ConfigError
from teeflow.files import read_capped

MAX_KEY_FILE = 16 * 1024


def save_key(signer: KeySigner, path: Path) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_pem())


def load_key(path: Path) -> KeySigner:
    data = read_capped(path, MAX_KEY_FILE, "key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise ConfigError(f"key file {path}: not a PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"key file {path}: not an Ed25519 key")
    return KeySigner(key)


def load_existing_key(path: Path, made_by: str) -> KeySigner:
    """The key in `path`; a missing file is an error naming what makes one (`made_by`),
    never a new key: a mistyped path must not become a new identity."""
    if not path.exists():
        raise ConfigError(f"key file {path}: no such file (check the path; {made_by} "
                          "makes a new key)")
    return load_key(path)


def load_or_create_key(path: Path) -> KeySigner:
    if not path.exists():
        save_key(KeySigner.generate(), path)
    return load_key(path)
