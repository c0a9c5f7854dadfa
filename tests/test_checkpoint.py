"""C2SP checkpoints and cosignatures: round trips, the key ID rule, and every malformed
or forged note refused with the line named."""

from __future__ import annotations

import base64
import hashlib

import pytest

from teeflow.core import checkpoint as ck
from teeflow.core.checkpoint import Checkpoint, NoteError
from teeflow.core.crypto import KeySigner

NAME = "teeflow.test/log"


@pytest.fixture
def key() -> KeySigner:
    return KeySigner.generate()


def cp(size: int = 7) -> Checkpoint:
    return Checkpoint(NAME, size, hashlib.sha256(b"root").digest())


def test_round_trip(key: KeySigner) -> None:
    note = ck.sign_checkpoint(cp(), NAME, key)
    lines = note.split("\n")
    assert lines[:3] == [NAME, "7", base64.b64encode(hashlib.sha256(b"root").digest()).decode()]
    assert lines[3] == "" and lines[4].startswith("\u2014 " + NAME + " ")
    assert ck.open_checkpoint(note, NAME, key.public_key()) == cp()


def test_key_id_is_c2sp(key: KeySigner) -> None:
    raw = base64.b64decode(key.public_key())
    want = hashlib.sha256(NAME.encode() + b"\n\x01" + raw).digest()[:4]
    assert ck.key_id(NAME, key.public_key()) == want
    vkey = base64.b64encode(b"\x01" + raw).decode()
    assert ck.verifier_key(NAME, key.public_key()) == f"{NAME}+{want.hex()}+{vkey}"
    _, sigs = ck.parse_note(ck.sign_checkpoint(cp(), NAME, key))
    assert sigs[0].key_id == want and len(sigs[0].signature) == 64


def test_forgeries_refused(key: KeySigner) -> None:
    note = ck.sign_checkpoint(cp(), NAME, key)
    other = KeySigner.generate()
    with pytest.raises(NoteError, match="no signature by"):
        ck.open_checkpoint(note, NAME, other.public_key())
    with pytest.raises(NoteError, match="does not verify"):
        ck.open_checkpoint(note.replace("\n7\n", "\n8\n"), NAME, key.public_key())
    with pytest.raises(NoteError, match="no signature by"):
        ck.open_checkpoint(ck.sign_checkpoint(cp(), NAME, other), NAME, key.public_key())
    wrong_origin = ck.sign_checkpoint(Checkpoint("elsewhere", 1, bytes(32)), NAME, key)
    with pytest.raises(NoteError, match="origin"):
        ck.open_checkpoint(wrong_origin, NAME, key.public_key())


@pytest.mark.parametrize(("note", "what"), [
    ("x" * (ck.MAX_NOTE + 1), "larger than"),
    ("a\n1\n\n", "no signature"),
    ("a\n1\nAAAA\n\n\u2014 n AAAAAAAA", "newline"),
    ("a\n1\nAAAA\n\n- n AAAAAAAA\n", "line 1"),
    ("a\n1\nAAAA\n\n\u2014 n !!!\n", "not base64"),
    ("a\n1\nAAAA\n\n\u2014 n AAAA\n", "too short"),
    ("a\x01\n1\nAAAA\n\n\u2014 n AAAAAAAA\n", "control"),
])
def test_malformed_notes(note: str, what: str) -> None:
    with pytest.raises(NoteError, match=what):
        ck.parse_note(note)


@pytest.mark.parametrize(("text", "what"), [
    ("a\n1\n", "needs origin"),
    ("\n1\n" + base64.b64encode(bytes(32)).decode() + "\n", "line 1"),
    ("a\n01\n" + base64.b64encode(bytes(32)).decode() + "\n", "line 2"),
    ("a\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n", "line 2"),
    ("a\n1\n" + base64.b64encode(bytes(31)).decode() + "\n", "line 3"),
    ("a\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n", "extension"),
])
def test_malformed_checkpoints(text: str, what: str) -> None:
    with pytest.raises(NoteError, match=what):
        ck.parse_checkpoint(text)


def test_cosignature(key: KeySigner) -> None:
    witness = KeySigner.generate()
    sig = ck.cosign(cp(), "alice", witness, 1_700_000_000)
    assert sig.key_id == hashlib.sha256(b"alice\n\x04" + base64.b64decode(
        witness.public_key())).digest()[:4]
    note = ck.add_signatures(ck.sign_checkpoint(cp(), NAME, key), [sig])
    text, sigs = ck.parse_note(note)
    assert ck.open_checkpoint(note, NAME, key.public_key()) == cp()
    assert ck.verify_cosignature(cp(), sigs[1], witness.public_key()) == 1_700_000_000
    with pytest.raises(NoteError, match="does not verify"):
        ck.verify_cosignature(cp(8), sigs[1], witness.public_key())
    with pytest.raises(NoteError, match="key ID"):
        ck.verify_cosignature(cp(), sigs[1], key.public_key())
