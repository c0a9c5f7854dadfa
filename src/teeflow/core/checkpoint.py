"""Signed checkpoints of the transparency log, in the C2SP formats. Pure.

A checkpoint (C2SP tlog-checkpoint) is the note text

    <origin>\\n<tree size>\\n<base64 root hash>\\n[extension lines]

signed as a C2SP signed note: the text, a blank line, then one line per signature,
`— <key name> base64(key ID || signature)`, where for Ed25519 the key ID is the first 4
bytes of SHA-256(key name || 0x0A || 0x01 || public key) and the signature is over the
text. The scheduler signs under the key name = the origin. A cosignature
(C2SP tlog-cosignature/v1) is a party's statement that it checked that checkpoint
consistent with what it had seen: key ID with type 0x04, and the signature line carries
key ID || 8-byte big-endian Unix time || Ed25519 signature over
"cosignature/v1\\ntime <t>\\n" + the checkpoint text.

Every parser caps its input and names the line that is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from teeflow.core.crypto import Signer
from teeflow.core.errors import NoteError

MAX_NOTE = 64 * 1024
MAX_SIGNATURES = 64
MAX_EXTENSIONS = 16
ED25519 = 0x01
COSIGNATURE_V1 = 0x04
DASH = "\u2014 "


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(),
                 *self.extensions]
        return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes  # what follows the key ID (for a cosignature: timestamp || sig)

    def line(self) -> str:
        return f"{DASH}{self.name} " + \
            base64.b64encode(self.key_id + self.signature).decode() + "\n"


def _raw_key(public_key_b64: str) -> bytes:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise NoteError("public key is not base64") from exc
    if len(raw) != 32:
        raise NoteError("public key is not a 32-byte Ed25519 key")
    return raw


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError("key name must be non-empty, without spaces or '+'")


def key_id(name: str, public_key_b64: str, kind: int = ED25519) -> bytes:
    _check_name(name)
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind]) +
                          _raw_key(public_key_b64)).digest()[:4]


def verifier_key(name: str, public_key_b64: str) -> str:
    """The note verifier key string, `name+hex key ID+base64(0x01 || key)`, to publish."""
    raw = bytes([ED25519]) + _raw_key(public_key_b64)
    return f"{name}+{key_id(name, public_key_b64).hex()}+{base64.b64encode(raw).decode()}"


def sign_checkpoint(cp: Checkpoint, name: str, signer: Signer) -> str:
    """The signed note: checkpoint text, blank line, the signer's line."""
    sig = NoteSignature(name, key_id(name, signer.public_key()),
                        signer.sign(cp.text().encode()))
    return cp.text() + "\n" + sig.line()


def parse_note(note: str | bytes) -> tuple[str, list[NoteSignature]]:
    """(text, signatures) of a signed note; NoteError naming what is wrong."""
    if isinstance(note, str):
        note = note.encode()
    if len(note) > MAX_NOTE:
        raise NoteError(f"note larger than {MAX_NOTE} bytes")
    try:
        s = note.decode()
    except UnicodeDecodeError:
        raise NoteError("note is not UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in s):
        raise NoteError("note has a control character")
    text, sep, sigs = s.rpartition("\n\n")
    if not sep or not text:
        raise NoteError("note has no blank line before its signatures")
    text += "\n"
    if not sigs:
        raise NoteError("note has no signature lines")
    if not sigs.endswith("\n"):
        raise NoteError("note does not end with a newline")
    out: list[NoteSignature] = []
    for n, line in enumerate(sigs[:-1].split("\n"), 1):
        if len(out) >= MAX_SIGNATURES:
            raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
        out.append(parse_signature_line(line, n))
    return text, out


def parse_signature_line(line: str, n: int = 1) -> NoteSignature:
    """One `— name base64(key ID || signature)` line (no newline)."""
    line = line.removesuffix("\n")
    if len(line) > 1024 or "\n" in line:
        raise NoteError(f"signature line {n} is not one line of at most 1024 characters")
    if not line.startswith(DASH):
        raise NoteError(f"signature line {n} does not start with '— '")
    name, _, b64 = line[len(DASH):].partition(" ")
    _check_name(name)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError(f"signature line {n} is not base64") from None
    if len(raw) < 5:
        raise NoteError(f"signature line {n} is too short")
    return NoteSignature(name, raw[:4], raw[4:])


def parse_checkpoint(text: str) -> Checkpoint:
    """The checkpoint in a note's text (no signature checked here)."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("checkpoint needs origin, size and root hash lines")
    origin, size, root, *ext = lines[:-1]
    if not origin:
        raise NoteError("checkpoint line 1: empty origin")
    if not size.isdigit() or (size != "0" and size.startswith("0")) or len(size) > 20:
        raise NoteError("checkpoint line 2: tree size is not a decimal number")
    try:
        root_hash = base64.b64decode(root, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError("checkpoint line 3: root hash is not base64") from None
    if len(root_hash) != 32:
        raise NoteError("checkpoint line 3: root hash is not 32 bytes")
    if len(ext) > MAX_EXTENSIONS or any(not e for e in ext):
        raise NoteError("checkpoint: extension lines must be non-empty, at most "
                        f"{MAX_EXTENSIONS}")
    return Checkpoint(origin, int(size), root_hash, tuple(ext))


def _verify(public_key_b64: str, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(_raw_key(public_key_b64)).verify(
            signature, message)
    except InvalidSignature:
        return False
    return True


def open_checkpoint(note: str | bytes, name: str, public_key_b64: str) -> Checkpoint:
    """The checkpoint of a note signed by `name`'s key (whose origin is `name`)."""
    text, sigs = parse_note(note)
    want = key_id(name, public_key_b64)
    mine = [s for s in sigs if s.name == name and s.key_id == want]
    if not mine:
        raise NoteError(f"checkpoint carries no signature by {name}")
    if not any(_verify(public_key_b64, s.signature, text.encode()) for s in mine):
        raise NoteError(f"checkpoint signature by {name} does not verify")
    cp = parse_checkpoint(text)
    if cp.origin != name:
        raise NoteError(f"checkpoint origin {cp.origin!r} is not the log {name!r}")
    return cp


def _cosigned_message(cp: Checkpoint, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + cp.text().encode()


def cosign(cp: Checkpoint, name: str, signer: Signer, timestamp: int) -> NoteSignature:
    """A tlog-cosignature/v1 line by `name` over `cp` at Unix time `timestamp`."""
    if not 0 <= timestamp < 2**63:
        raise NoteError("cosignature time out of range")
    sig = signer.sign(_cosigned_message(cp, timestamp))
    return NoteSignature(name, key_id(name, signer.public_key(), COSIGNATURE_V1),
                         struct.pack(">Q", timestamp) + sig)


def verify_cosignature(cp: Checkpoint, sig: NoteSignature, public_key_b64: str) -> int:
    """The cosignature's timestamp, if `sig` is `public_key_b64`'s cosignature of `cp`."""
    if sig.key_id != key_id(sig.name, public_key_b64, COSIGNATURE_V1):
        raise NoteError(f"cosignature by {sig.name}: key ID is not this key's")
    if len(sig.signature) != 8 + 64:
        raise NoteError(f"cosignature by {sig.name}: not timestamp || Ed25519 signature")
    (timestamp,) = struct.unpack(">Q", sig.signature[:8])
    if not _verify(public_key_b64, sig.signature[8:], _cosigned_message(cp, timestamp)):
        raise NoteError(f"cosignature by {sig.name} does not verify")
    return int(timestamp)


def add_signatures(note: str, lines: list[NoteSignature]) -> str:
    """The note with further signature lines (cosignatures) appended."""
    return note + "".join(s.line() for s in lines)


# -- how the scheduler hands checkpoints out (scheduler/log.py, net/logview.py) --------
CHECKPOINT_HEADER = "teeflow-checkpoint"
KEY_HEADER = "teeflow-log-key"
SIZE_HEADER = "teeflow-log-size"
PROOF_HEADER = "teeflow-log-proof"


def origin_of(log_key: str) -> str:
    """The log's origin line (and note key name): fixed by its key, so a checkpoint
    names the one log it is of."""
    return "teeflow-scheduler/" + hashlib.sha256(base64.b64decode(log_key)).hexdigest()[:16]


def encode_proof(proof: list[bytes]) -> str:
    return base64.b64encode(b"".join(proof)).decode()


def decode_proof(value: str, cap: int = 64) -> list[bytes]:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise NoteError("log proof is not base64") from None
    if len(raw) % 32 or len(raw) > 32 * cap:
        raise NoteError(f"log proof is not a list of at most {cap} 32-byte hashes")
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]
