"""Merkle trees over a chain (RFC 9162 section 2.1): roots, inclusion and consistency proofs.

One leaf per record, in seq order (leaf index = seq - 1); an inner node is
SHA-256(0x01 || left || right). What a leaf hashes depends on the checkpoint
that states the root (``Checkpoint.hash_leaves``):

* version 3 (``record_leaf``): the record's chain hash, SHA-256(0x00 ||
  SHA-256(prev_hash || body)). Whoever walks the chain has computed that
  hash already, so a leaf costs one short hash instead of a second pass over
  the body: verify's largest saving (issue 13). A reviewer proving one record
  needs its bytes and its prev_hash (as stored beside it; the leaf binds
  both, so no other record is needed to trust them) and the proof;
* versions 1 and 2 (``leaf_hash``): the record's body, SHA-256(0x00 || body).

``Frontier`` keeps the roots of the perfect subtrees of a growing tree (one per
set bit of its size): appending is amortised O(1) and the root O(log n), so a
checkpoint's root costs only the records since the last one. ``Tree`` holds
every level of a fixed tree for generating many proofs. Pure computation;
instances are not thread-safe, the functions are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from otel_audit.engine.ledger import Ledger
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import link_hash

EMPTY_ROOT = hashlib.sha256(b"").digest()


def _short_input_sha256() -> Callable[[bytes], Any]:
    """The SHA-256 constructor to use for inputs of a block or two (inner nodes).

    Python's own SHA-256 (built into CPython unless configured without it)
    when present: for a 65-byte node its call costs about 60% of OpenSSL 3's,
    whose per-call context setup and copy dominate short inputs (issue 13,
    measured by benchmarks/bench_verify.py). Same function, same digests:
    checked here, and OpenSSL's is used when the two ever disagree.
    """
    get = getattr(hashlib, "__get_builtin_constructor", None)
    try:
        ctor: Callable[[bytes], Any] = get("sha256") if get is not None else hashlib.sha256
        probe = bytes(range(65))
        if ctor(probe).digest() == hashlib.sha256(probe).digest():
            return ctor
    except (ValueError, TypeError, AttributeError):  # built without it
        pass
    return hashlib.sha256


#: SHA-256 constructor for short inputs (see ``_short_input_sha256``).
short_sha256 = _short_input_sha256()

_LEAF_STATE = hashlib.sha256(b"\x00")


def leaf_hash(body: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + body).digest()


def record_leaf(record_hash: bytes) -> bytes:
    """The leaf of a record under a version 3 root: its chain hash, prefixed 0x00."""
    return short_sha256(b"\x00" + record_hash).digest()  # type: ignore[no-any-return]


def record_leaves(record_hashes: Iterable[bytes]) -> list[bytes]:
    """``record_leaf`` of each chain hash."""
    sha = short_sha256
    return [sha(b"\x00" + digest).digest() for digest in record_hashes]


def node_hash(left: bytes, right: bytes) -> bytes:
    return short_sha256(b"\x01" + left + right).digest()  # type: ignore[no-any-return]


def leaf_hashes(bodies: Iterable[bytes]) -> list[bytes]:
    """``leaf_hash`` of each body: a copy of a state that has absorbed 0x00 is
    cheaper than concatenating the prefix onto every body."""
    out: list[bytes] = []
    append, fresh = out.append, _LEAF_STATE.copy
    for body in bodies:
        h = fresh()
        h.update(body)
        append(h.digest())
    return out


def parent_level(level: Sequence[bytes]) -> list[bytes]:
    """``node_hash`` of each pair of ``level`` (0-1, 2-3, ...); an odd last node is left out."""
    sha = short_sha256
    pairs = iter(level)
    return [sha(b"\x01" + left + right).digest() for left, right in zip(pairs, pairs)]


class Frontier:
    """The right edge of a growing Merkle tree: enough to extend it and compute its root."""

    __slots__ = ("_nodes", "size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if size.bit_count() != len(nodes):
            raise ValueError("a frontier of size n has one node per set bit of n")
        self.size = size
        # Largest subtree first; each covers 2**k leaves for a set bit k of size.
        self._nodes = list(nodes)

    @property
    def nodes(self) -> tuple[bytes, ...]:
        return tuple(self._nodes)

    def append_leaf_hash(self, digest: bytes) -> None:
        nodes = self._nodes
        size = self.size
        # Each trailing 1 bit of size is a subtree of the same height to merge with.
        while size & 1:
            digest = node_hash(nodes.pop(), digest)
            size >>= 1
        nodes.append(digest)
        self.size += 1

    def append(self, body: bytes) -> None:
        self.append_leaf_hash(leaf_hash(body))

    def root(self) -> bytes:
        """MTH of the leaves so far (RFC 9162); SHA-256 of nothing when empty."""
        if not self._nodes:
            return EMPTY_ROOT
        digest = self._nodes[-1]
        for left in reversed(self._nodes[:-1]):
            digest = node_hash(left, digest)
        return digest

    def copy(self) -> Frontier:
        return Frontier(self.size, self._nodes)


def root_of(bodies: Iterable[bytes]) -> bytes:
    f = Frontier()
    for body in bodies:
        f.append(body)
    return f.root()


def advance(
    frontier: Frontier,
    ledger: Ledger,
    chain: str,
    upto: int,
    leaves: list[bytes] | None = None,
    *,
    hashes: bool = False,
) -> bool:
    """Extend ``frontier`` with ``chain``'s records up to seq ``upto`` read from the ledger.

    ``hashes``: the leaves are the records' chain hashes (version 3), computed
    here from each row's prev_hash and body, never taken from its stored hash.

    Reading the ledger (not remembering what this process appended) keeps the
    tree right when several processes append to one chain. Returns False (and
    leaves ``frontier`` unchanged) when the chain has a gap before ``upto``.
    The leaf hashes appended are added to ``leaves`` when given (for
    ``extension_proof``).
    """
    work = frontier.copy()
    added: list[bytes] = []
    if upto > work.size:
        for row in ledger.scan(chain, after_seq=work.size):
            if row.seq > upto:
                break
            if row.seq != work.size + 1:
                return False
            if hashes:
                digest = record_leaf(link_hash(row.prev_hash, row.body))
            else:
                digest = leaf_hash(row.body)
            work.append_leaf_hash(digest)
            added.append(digest)
    if work.size != upto:
        return False
    frontier.size, frontier._nodes = work.size, work._nodes
    if leaves is not None:
        leaves.extend(added)
    return True


class Tree:
    """Every level of a Merkle tree of fixed size, for generating proofs.

    Level 0 holds the leaf hashes; a level's last node without a sibling is
    carried up unchanged, which gives exactly RFC 9162's tree (its left
    subtree is always the largest power of two). Memory: about 64 bytes a leaf.
    """

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        self.size = len(leaf_hashes)
        self.levels: list[list[bytes]] = [list(leaf_hashes)]
        level = self.levels[0]
        while len(level) > 1:
            nxt = parent_level(level)
            if len(level) % 2:
                nxt.append(level[-1])
            self.levels.append(nxt)
            level = nxt

    @classmethod
    def from_bodies(cls, bodies: Iterable[bytes]) -> Tree:
        return cls(leaf_hashes(bodies))

    def root(self) -> bytes:
        return self.levels[-1][0] if self.size else EMPTY_ROOT

    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for any range of this tree's leaves (RFC 9162 2.1.1)."""
        n = hi - lo
        if n <= 0:
            return EMPTY_ROOT
        height = (n - 1).bit_length()
        # A stored node covers [i * 2**h, min((i + 1) * 2**h, size)).
        if lo % (1 << height) == 0 and (n == 1 << height or hi == self.size):
            return self.levels[height][lo >> height]
        k = 1 << ((n - 1).bit_length() - 1)
        return node_hash(self.mth(lo, lo + k), self.mth(lo + k, hi))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` (0-based) in the tree of the first ``size``
        leaves (default all), leaf to root: RFC 9162 2.1.3.1."""
        size = self.size if size is None else size
        if not 0 < size <= self.size or not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size}")
        proof: list[bytes] = []

        def path(m: int, lo: int, hi: int) -> None:
            n = hi - lo
            if n == 1:
                return
            k = 1 << ((n - 1).bit_length() - 1)
            if m < k:
                path(m, lo, lo + k)
                proof.append(self.mth(lo + k, hi))
            else:
                path(m - k, lo + k, hi)
                proof.append(self.mth(lo, lo + k))

        path(index, 0, size)
        return proof

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """Proof that the first ``old_size`` leaves are a prefix of the first ``size``
        (default all): RFC 9162 2.1.4.1."""
        size = self.size if size is None else size
        if not 0 < old_size <= size <= self.size:
            raise ValueError(f"no consistency proof from size {old_size} to {size}")
        return _consistency_path(old_size, size, self.mth)


def _consistency_path(old_size: int, size: int, mth: Callable[[int, int], bytes]) -> list[bytes]:
    """SUBPROOF(old_size, D[0:size], true) of RFC 9162 2.1.4.1, with ``mth`` for subtree hashes.

    Every node it asks for lies wholly inside the old tree (and is then one
    of the old tree's perfect subtrees) or wholly after it.
    """
    proof: list[bytes] = []

    def sub(m: int, lo: int, hi: int, whole: bool) -> None:
        n = hi - lo
        if m == n:
            if not whole:
                proof.append(mth(lo, hi))
            return
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            sub(m, lo, lo + k, whole)
            proof.append(mth(lo + k, hi))
        else:
            sub(m - k, lo + k, hi, False)
            proof.append(mth(lo, lo + k))

    sub(old_size, 0, size, True)
    return proof


def extension_proof(old: Frontier, appended: Sequence[bytes]) -> list[bytes]:
    """The RFC 9162 consistency proof from the tree ``old`` to ``old`` plus the leaf
    hashes ``appended``, without the old leaves: the old tree's side of the
    proof is made of its perfect subtrees, which are exactly its frontier.
    Memory: about 64 bytes per appended leaf.
    """
    m = old.size
    n = m + len(appended)
    if not 0 < m <= n:
        raise ValueError(f"no consistency proof from size {m} to {n}")
    known: dict[tuple[int, int], bytes] = {}
    start = 0
    for node in old.nodes:  # largest subtree first
        width = 1 << (((m - start).bit_length()) - 1)
        known[(start, start + width)] = node
        start += width
    new = Tree(list(appended))

    def mth(lo: int, hi: int) -> bytes:
        if hi <= m:
            return known[(lo, hi)]
        if lo < m:  # never asked for by _consistency_path
            raise AssertionError(f"subtree {lo}..{hi} straddles the old tree")
        return new.mth(lo - m, hi - m)

    return _consistency_path(m, n, mth)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise VerificationError unless ``proof`` shows leaf hash ``leaf`` at ``index`` under ``root``.

    RFC 9162 section 2.1.3.2.
    """
    if not 0 <= index < size:
        raise VerificationError(f"inclusion proof: leaf {index} is outside a tree of {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise VerificationError("inclusion proof does not lead to the checkpoint's merkle root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise VerificationError unless the tree of ``old_size`` is a prefix of ``new_size``.

    RFC 9162 section 2.1.4.2.
    """
    if not 0 < old_size <= new_size:
        raise VerificationError(f"consistency proof: sizes {old_size} -> {new_size} are invalid")
    if old_size == new_size:
        if proof:
            raise VerificationError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise VerificationError("checkpoints of the same size have different merkle roots")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is shorter than needed")
    if fr != old_root:
        raise VerificationError("consistency proof does not match the older checkpoint's root")
    if sr != new_root:
        raise VerificationError("consistency proof does not match the newer checkpoint's root")
