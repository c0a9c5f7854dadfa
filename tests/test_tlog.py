"""RFC 9162 Merkle tree: the transparency-dev/merkle (RFC 6962) vectors for roots,
inclusion and consistency proofs, their corruptions, and every size up to 40 both ways."""

from __future__ import annotations

import pytest

from teeflow.core import tlog
from teeflow.core.tlog import ProofError, Tree

LEAVES = [bytes.fromhex(h) for h in
          ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
           "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]


def h(x: str) -> bytes:
    return bytes.fromhex(x)


# (1-based leaf, size, proof), as in transparency-dev/merkle proof/verify_test.go
INCLUSION = [
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (3, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (2, 5, [h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
]
CONSISTENCY = [
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]


@pytest.fixture
def tree() -> Tree:
    return Tree([tlog.leaf_hash(x) for x in LEAVES])


def test_roots(tree: Tree) -> None:
    assert tree.root(0) == tlog.EMPTY_ROOT == h(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    for size, root in enumerate(ROOTS, 1):
        assert tree.root(size) == root


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_vectors(tree: Tree, leaf: int, size: int, proof: list[bytes]) -> None:
    assert tree.inclusion(leaf - 1, size) == proof
    tlog.verify_inclusion(leaf - 1, size, tlog.leaf_hash(LEAVES[leaf - 1]), proof,
                          ROOTS[size - 1])


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_corruptions(leaf: int, size: int, proof: list[bytes]) -> None:
    i, lh, root = leaf - 1, tlog.leaf_hash(LEAVES[leaf - 1]), ROOTS[size - 1]
    bad = [(i + 1, size, lh, proof, root), (i ^ 2, size, lh, proof, root),
           (i, size * 2, lh, proof, root), (i, size, tlog.leaf_hash(b"x"), proof, root),
           (i, size, lh, proof, tlog.EMPTY_ROOT), (i, size, lh, [*proof, root], root),
           (i, size, lh, [root, *proof], root), (i, size, lh, proof[:-1], root)]
    if i > 0:
        bad.append((i - 1, size, lh, proof, root))
    if size > 1:
        bad.append((i, size // 2, lh, proof, root))
    for n in range(len(proof)):
        flipped = list(proof)
        flipped[n] = bytes([flipped[n][0] ^ 8]) + flipped[n][1:]
        bad.append((i, size, lh, flipped, root))
    for args in bad:
        with pytest.raises(ProofError):
            tlog.verify_inclusion(*args)


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_vectors(tree: Tree, old: int, new: int, proof: list[bytes]) -> None:
    assert tree.consistency(old, new) == proof
    tlog.verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_corruptions(old: int, new: int, proof: list[bytes]) -> None:
    r1, r2 = ROOTS[old - 1], ROOTS[new - 1]
    bad = [(old - 1, new, r1, r2, proof), (old + 1, new, r1, r2, proof),
           (old ^ 2, new, r1, r2, proof), (old, new * 2, r1, r2, proof),
           (old, new // 2, r1, r2, proof), (old, new, tlog.leaf_hash(b"x"), r2, proof),
           (old, new, r1, tlog.leaf_hash(b"x"), proof), (old, new, r2, r1, proof),
           (old, new, r1, r2, []), (old, new, r1, r2, [*proof, r1]),
           (old, new, r1, r2, [r2, *proof]), (old, new, r1, r2, [proof[0], *proof]),
           (old, new, r1, r2, proof[:-1])]
    for n in range(len(proof)):
        flipped = list(proof)
        flipped[n] = bytes([flipped[n][0] ^ 16]) + flipped[n][1:]
        bad.append((old, new, r1, r2, flipped))
    for args in bad:
        with pytest.raises(ProofError):
            tlog.verify_consistency(*args)


def test_trivial_consistency() -> None:
    tlog.verify_consistency(0, 5, tlog.EMPTY_ROOT, ROOTS[4], [])
    tlog.verify_consistency(3, 3, ROOTS[2], ROOTS[2], [])
    with pytest.raises(ProofError, match="fork"):
        tlog.verify_consistency(3, 3, ROOTS[2], ROOTS[3], [])
    with pytest.raises(ProofError, match="rolled back"):
        tlog.verify_consistency(4, 3, ROOTS[3], ROOTS[2], [])


def test_every_size_both_ways() -> None:
    """Generated proofs verify for every pair of sizes up to 40, and the cached tree
    agrees with a fresh one after appends."""
    leaves = [tlog.leaf_hash(bytes([i])) for i in range(40)]
    grown = Tree()
    for n, leaf in enumerate(leaves, 1):
        grown.append(leaf)
        assert grown.root() == Tree(leaves[:n]).root()
    for new in range(1, 41):
        for old in range(0, new + 1):
            proof = grown.consistency(old, new)
            tlog.verify_consistency(old, new, grown.root(old), grown.root(new), proof)
        for i in range(new):
            tlog.verify_inclusion(i, new, leaves[i], grown.inclusion(i, new), grown.root(new))


def test_oversized_proof_refused() -> None:
    with pytest.raises(ProofError, match="more than"):
        tlog.verify_inclusion(0, 2, ROOTS[0], [ROOTS[0]] * 65, ROOTS[1])
    with pytest.raises(ProofError, match="not 32 bytes"):
        tlog.verify_consistency(1, 2, ROOTS[0], ROOTS[1], [b"short"])
