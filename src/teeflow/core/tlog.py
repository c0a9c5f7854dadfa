"""RFC 9162 (Certificate Transparency 2.0) Merkle tree: hashing, the tree head, and
inclusion and consistency proofs, generated and verified as the RFC's sections 2.1.1-2.1.4
describe. Pure.

Leaf hash = SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right), the
empty tree's root = SHA-256(""). Indices are 0-based. `Tree` caches the hash of every
complete, aligned power-of-two subtree, which never changes in an append-only tree, so a
root or a proof costs O(log n) hashes once the cache is warm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from teeflow.core.errors import ProofError

HASH_SIZE = 32
MAX_PROOF = 64  # hashes: enough for 2**63 leaves


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Tree:
    """An append-only list of leaf hashes and the RFC's functions over any prefix."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self.leaves: list[bytes] = list(leaves)
        self._perfect: dict[tuple[int, int], bytes] = {}

    def __len__(self) -> int:
        return len(self.leaves)

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; return its index."""
        self.leaves.append(leaf)
        return len(self.leaves) - 1

    def _mth(self, start: int, n: int) -> bytes:
        """MTH(D[start:start+n])."""
        if n == 1:
            return self.leaves[start]
        perfect = n & (n - 1) == 0
        if perfect and (start, n) in self._perfect:
            return self._perfect[(start, n)]
        k = _split(n)
        h = node_hash(self._mth(start, k), self._mth(start + k, n - k))
        if perfect:
            self._perfect[(start, n)] = h
        return h

    def root(self, size: int | None = None) -> bytes:
        size = len(self.leaves) if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._mth(0, size)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self.leaves):
            raise ProofError(f"tree size {size} is not between 0 and {len(self.leaves)}")

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size]) (RFC 9162 2.1.3.1)."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ProofError(f"leaf index {index} is not in a tree of size {size}")
        return self._path(index, 0, size)

    def _path(self, m: int, start: int, n: int) -> list[bytes]:
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return self._path(m, start, k) + [self._mth(start + k, n - k)]
        return self._path(m - k, start + k, n - k) + [self._mth(start, k)]

    def consistency(self, old: int, new: int) -> list[bytes]:
        """PROOF(old, D[0:new]) (RFC 9162 2.1.4.1); empty when old is 0 or old == new."""
        self._check_size(new)
        if not 0 <= old <= new:
            raise ProofError(f"cannot prove size {old} consistent with smaller size {new}")
        if old == 0 or old == new:
            return []
        return self._subproof(old, 0, new, True)

    def _subproof(self, m: int, start: int, n: int, complete: bool) -> list[bytes]:
        if m == n:
            return [] if complete else [self._mth(start, n)]
        k = _split(n)
        if m <= k:
            return self._subproof(m, start, k, complete) + [self._mth(start + k, n - k)]
        return self._subproof(m - k, start + k, n - k, False) + [self._mth(start, k)]


def _check_hashes(proof: Sequence[bytes], what: str) -> None:
    if len(proof) > MAX_PROOF:
        raise ProofError(f"{what} proof has more than {MAX_PROOF} hashes")
    if any(len(h) != HASH_SIZE for h in proof):
        raise ProofError(f"{what} proof has a hash that is not {HASH_SIZE} bytes")


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 2.1.3.2: `leaf` (a leaf hash) is at `index` of the tree `root` of `size`."""
    _check_hashes(proof, "inclusion")
    if not 0 <= index < size:
        raise ProofError(f"inclusion: leaf index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError(f"inclusion: leaf {index} is not in the tree of size {size} "
                         "with that root")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2: the tree (`new`, `new_root`) extends (`old`, `old_root`)."""
    _check_hashes(proof, "consistency")
    if not 0 <= old <= new:
        raise ProofError(f"consistency: size {old} is larger than size {new} (rolled back)")
    if old == new:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for tree size {old} (a fork)")
        return
    if old == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root is the first node
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"the tree of size {new} does not contain the tree of size {old} "
                         "held (rewritten or forked)")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of size {new}")
