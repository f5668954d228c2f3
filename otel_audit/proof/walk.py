"""The walk of a chain, shared by verify (one process) and its workers (proof/parallel.py).

A batch of rows at a time: the links and hashes of a whole batch are
compared in one go (``linked``), Merkle roots (RFC 9162) are built a perfect
subtree at a time (``merkle_batch``), and checkpoints and anchors are checked
against the walk (``check_due``). What fails is named by verify.py.

A checkpoint's root is over the records' chain hashes (version 3) or their
bodies (versions 1 and 2): ``leaf_kind`` says which, and the walk builds only
the trees its checkpoints need. The kind of a root is known when a key
resolved the checkpoint's version, or when the checkpoint states it (an
anchor); else (no key, or unsigned) either kind is accepted, and the walk
builds both trees. verify.py's single walk stops building the tree over
bodies for such roots once one of them matched the tree over chain hashes
(a chain's roots change kind only when its writer is upgraded); a later one
that then matches nothing makes it walk the chain again with both
(``NeedBodyLeaves``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit.engine.ledger import RawRow
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint
from otel_audit.proof.keys import verify_signature
from otel_audit.proof.merkle import Frontier, node_hash, parent_level

#: What a checkpoint's Merkle root is over: chain hashes, bodies, or not known.
HASHES, BODIES, EITHER = "hashes", "bodies", "either"
#: seq -> [(checkpoint or anchor, what it is, the kind of its root)] to check at seq.
Due = dict[int, list[tuple[Checkpoint, str, str]]]


@dataclass
class ChainReport:
    chain: str
    records: int = 0
    last_seq: int = 0
    head: bytes = GENESIS
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    signatures_checked: int = 0
    anchors_checked: int = 0

    @property
    def unanchored(self) -> int:
        """Records after the last checkpoint: protected by the chain, not yet by a signature."""
        return self.last_seq - self.last_checkpoint_seq


class NeedBodyLeaves(VerificationError):
    """A root of either kind matched no tree over chain hashes after the walk had
    stopped building the tree over bodies: the chain must be walked with both."""


def leaf_kind(cp: Checkpoint, resolved: bool) -> str:
    """The kind of ``cp``'s root; ``resolved``: its version was checked by a key."""
    if cp.hash_leaves:
        return HASHES
    if cp.version == 2 or resolved:
        return BODIES
    return EITHER


def damage(chain: str, seq: int, kind: str, detail: str) -> VerificationError:
    return VerificationError(
        f"chain {chain!r} seq {seq}: {kind}: {detail}", chain=chain, seq=seq, kind=kind
    )


def check_signature(cp: Checkpoint, public_key: Ed25519PublicKey | None, what: str) -> None:
    if public_key is None:
        return
    if not cp.signature:
        raise damage(cp.chain, cp.seq, "bad signature", f"{what} is not signed")
    if not verify_signature(public_key, cp.signature, cp.message()):
        raise damage(
            cp.chain,
            cp.seq,
            "bad signature",
            f"{what} signature does not verify with the public key",
        )


def linked(batch: Sequence[RawRow], last_seq: int, expected: bytes) -> list[bytes] | None:
    """The hashes of ``batch`` when its rows continue the chain intact, else None."""
    sha256 = hashlib.sha256
    try:
        if batch[0][0] != last_seq + 1 or batch[-1][0] != last_seq + len(batch):
            return None  # seqs are unique and ascending: first and last tell a gap
        digests = [row[2] for row in batch]
        if batch[0][1] != expected or [row[1] for row in batch[1:]] != digests[:-1]:
            return None
        if [sha256(row[1] + row[3]).digest() for row in batch] != digests:
            return None
    except TypeError:  # text where bytes belong: verify.py names it
        return None
    return digests


def merkle_batch(
    nodes: list[bytes], size: int, leaves: Sequence[bytes], inside: list[int]
) -> Iterator[tuple[int, list[bytes]]]:
    """Extend the frontier ``nodes`` (of ``size`` leaves) with the leaf hashes ``leaves``.

    Yields (seq, frontier nodes at seq) for each seq of ``inside`` (ascending,
    within the batch) before extending past it. The batch is cut into perfect
    subtrees (powers of two, aligned on the tree's size), each built level by
    level; a frontier inside one is the old frontier plus the subtree's nodes
    that cover the prefix (the set bits of the offset).
    """
    i, n, k = 0, len(leaves), 0
    while i < n:
        c = 1 << ((n - i).bit_length() - 1)
        if size:
            c = min(c, size & -size)
        level = leaves[i : i + c]
        levels = [level]
        while len(level) > 1:
            level = parent_level(level)
            levels.append(level)
        while k < len(inside) and inside[k] - size <= c:
            m = inside[k] - size
            if m == c:
                break  # the whole subtree: checked after it joins the frontier
            prefix, p = [], 0
            for h in range(len(levels) - 2, -1, -1):
                if m >> h & 1:
                    prefix.append(levels[h][p >> h])
                    p += 1 << h
            yield inside[k], nodes + prefix
            k += 1
        size = extend(nodes, size, level[0], len(levels) - 1)
        i += c
        if k < len(inside) and inside[k] == size:
            yield inside[k], nodes
            k += 1


def frontiers(
    nodes: list[bytes], size: int, leaves: Sequence[bytes], inside: list[int]
) -> dict[int, list[bytes]]:
    """``merkle_batch`` collected: seq -> a copy of the frontier at seq."""
    return {seq: list(front) for seq, front in merkle_batch(nodes, size, leaves, inside)}


def check_due(
    chain: str,
    checks: list[tuple[Checkpoint, str, str]],
    seq: int,
    digest: bytes,
    hash_nodes: list[bytes] | None,
    body_nodes: list[bytes] | None,
    public_key: Ed25519PublicKey | None,
    last_good_cp: int,
    rep: ChainReport,
    matched: set[str] | None = None,
) -> int:
    """Check the checkpoints and anchors at ``seq`` against the walk; returns ``seq``.

    ``hash_nodes`` and ``body_nodes``: the frontiers at ``seq`` of the trees
    over chain hashes and over bodies, None for a tree not built. ``matched``
    gets HASHES when a root of either kind matched the tree over chain hashes."""
    for cp, what, kind in checks:
        check_signature(cp, public_key, what)
        if cp.head != digest:
            raise damage(
                chain,
                last_good_cp + 1,
                "modified",
                f"history rewritten between seq {last_good_cp + 1} and {seq}:"
                f" record {seq} does not match the {what}",
            )
        root = cp.merkle_root
        if root is None:
            pass
        elif kind != BODIES and hash_nodes is not None and Frontier(seq, hash_nodes).root() == root:
            if matched is not None and kind == EITHER:
                matched.add(HASHES)
        elif not (
            kind != HASHES and body_nodes is not None and Frontier(seq, body_nodes).root() == root
        ):
            detail = f"merkle root of the {what} does not match records 1..{seq}"
            if kind == EITHER and body_nodes is None:
                raise NeedBodyLeaves(
                    f"chain {chain!r} seq {seq}: modified: {detail}", chain=chain, seq=seq,
                    kind="modified",
                )  # fmt: skip
            raise damage(chain, seq, "modified", detail)
        if what.startswith("anchor"):
            rep.anchors_checked += 1
        elif public_key is not None:
            rep.signatures_checked += 1
    return seq


def extend(nodes: list[bytes], size: int, node: bytes, height: int) -> int:
    """Add a perfect subtree of 2**height leaves to the frontier ``nodes`` of ``size``
    leaves (a multiple of 2**height); returns the new size."""
    s = size >> height
    while s & 1:
        node = node_hash(nodes.pop(), node)
        s >>= 1
    nodes.append(node)
    return size + (1 << height)


def due_checks(
    stored: list[Checkpoint],
    anchors: list[Checkpoint],
    *,
    resolved: bool,
) -> tuple[Due, int, int]:
    """What to check against a walk (anchors are checkpoints held by another
    system): seq -> [(checkpoint, what, kind of root)], and the last seq whose
    checks need the tree over chain hashes, and over bodies (a root of either
    kind needs both). ``resolved``: a key checked the versions."""
    due: Due = {}
    for cp in stored:
        due.setdefault(cp.seq, []).append(
            (cp, f"checkpoint at seq {cp.seq}", leaf_kind(cp, resolved))
        )
    for cp in anchors:
        due.setdefault(cp.seq, []).append((cp, f"anchor at seq {cp.seq}", leaf_kind(cp, resolved)))
    return due, last_root(due, (HASHES, EITHER)), last_root(due, (BODIES, EITHER))


def last_root(due: Due, kinds: tuple[str, ...]) -> int:
    """The last seq of ``due`` with a root of one of ``kinds`` (0 when none)."""
    return max(
        (
            seq
            for seq, cps in due.items()
            if any(cp.merkle_root is not None and k in kinds for cp, _, k in cps)
        ),
        default=0,
    )
