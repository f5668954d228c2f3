"""Verification of a ledger: every chain, every checkpoint, every signature.

Walks each chain in seq order recomputing SHA-256(prev || body), and raises
``VerificationError`` naming the chain, the first damaged seq and the kind of
damage: ``modified``, ``deleted``, ``inserted``, ``reordered``, ``truncated``
(records a checkpoint covers are gone) or ``bad signature``. With a public
key, every checkpoint must carry a valid Ed25519 signature; that is what
catches an insider who rewrote a record and recomputed every later hash.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit.engine.ledger import Ledger, RawRow
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint, check_checkpoints, link_hash
from otel_audit.proof.keys import key_id
from otel_audit.proof.merkle import leaf_hashes, record_leaves
from otel_audit.proof.walk import (
    BODIES,
    ChainReport,
    NeedBodyLeaves,
    check_due,
    check_signature,
    damage,
    due_checks,
    frontiers,
    last_root,
    linked,
)

__all__ = ["ChainReport", "VerifyReport", "verify_ledger"]


@dataclass
class VerifyReport:
    chains: list[ChainReport] = field(default_factory=list)
    public_key_id: str | None = None

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)


#: How SQL names the Python type a stored value came back as.
_TYPE_NAMES = {str: "text", float: "real", bytes: "blob", type(None): "null"}


def verify_ledger(
    ledger: Ledger,
    public_key: Ed25519PublicKey | None = None,
    *,
    anchors: Iterable[Checkpoint] = (),
    progress: Callable[[int], None] | None = None,
    chains: Iterable[str] | None = None,
    jobs: int = 1,
) -> VerifyReport:
    """Verify every chain of ``ledger`` (or only ``chains``); returns a report or raises
    VerificationError. The whole-ledger checks (every row accounted for by a chain
    walk, stored query columns) run only for a full verify; the schema check always.

    ``jobs`` > 1 walks long chains in that many worker processes, each
    opening the ledger by its URL (proof/parallel.py); the result, and the
    damage named, are the same as with one.
    """
    report = VerifyReport(public_key_id=key_id(public_key) if public_key is not None else None)
    # The schema derives the query columns search, trail and export select by:
    # a rebuilt one shows reviewers what the hashes never covered.
    problems = ledger.schema_problems()
    if problems:
        raise VerificationError(f"ledger schema was altered: {'; '.join(problems)}", kind="schema")
    external: dict[str, list[Checkpoint]] = {}
    for anchor in anchors:
        external.setdefault(anchor.chain, []).append(anchor)
    selected = list(chains) if chains is not None else None
    if selected is not None:
        names = selected
    else:
        # A chain id that is not text (a row whose chain was stored as bytes)
        # names no chain: stray_rows reports its rows below.
        names = sorted({c for c in ledger.chains() if isinstance(c, str)} | set(external))
    walked: dict[str, ChainReport] = {}
    tried: set[str] = set()
    if jobs > 1:
        from otel_audit.proof.parallel import walk_chains

        walked, tried = walk_chains(ledger, names, public_key, external, jobs, progress)
    damaged: list[tuple[bool, VerificationError]] = []
    for chain in names:
        try:
            found = walked.get(chain)
            if found is None:
                # A chain the workers tried had its progress told already; one
                # they could not prove without a key may hold roots over chain
                # hashes and then over bodies: both trees from the start.
                tried_here = chain in tried
                found = _walk_chain(
                    ledger, chain, public_key, external.get(chain, []),
                    None if tried_here else progress, tried_here and public_key is None,
                )  # fmt: skip
            report.chains.append(found)
        except VerificationError as exc:
            # Every chain is checked; a chain with checkpoints is reported
            # before one without (a stray chain is usually a record moved out
            # of an established one, and the established chain names it).
            damaged.append((not ledger.checkpoints(chain), exc))
    if damaged:
        raise min(damaged, key=lambda item: item[0])[1]
    if selected is None:
        _account_for_every_row(ledger, report)
        # A backend whose query columns are stored (not computed on read) checks
        # that none of them disagrees with the hashed bytes.
        check_columns = getattr(ledger, "check_generated", None)
        if check_columns is not None:
            check_columns()
    return report


def _walk_chain(
    ledger: Ledger,
    chain: str,
    public_key: Ed25519PublicKey | None,
    anchors: list[Checkpoint],
    progress: Callable[[int], None] | None,
    both_trees: bool,
) -> ChainReport:
    """``_verify_chain``, walked again with both trees when a root over bodies came
    after the tree over them was dropped; progress is told once per record."""
    told = 0

    def counted(n: int) -> None:
        nonlocal told
        told += n
        if progress is not None:
            progress(n)

    try:
        return _verify_chain(ledger, chain, public_key, anchors, counted, both_trees)
    except NeedBodyLeaves:
        pass

    def rest(n: int) -> None:
        nonlocal told
        skip = min(n, told)
        told -= skip
        if n > skip and progress is not None:
            progress(n - skip)

    return _verify_chain(ledger, chain, public_key, anchors, rest, True)


def _account_for_every_row(ledger: Ledger, report: VerifyReport) -> None:
    """Every stored record row must be one a chain walk verified.

    A row outside every sequence (seq 0 or below, a chain or seq of another
    type) is read by no walk, yet a query can return it to a reviewer.
    """
    # The walks read every row of a text chain with an integer seq above 0 and
    # name any value of the wrong type in it; a row they did not read shows
    # in the count, and only then is the (slower) stray search run to name it.
    walked = {c.chain for c in report.chains}
    for cp in ledger.checkpoints():
        if cp.chain not in walked:  # its chain id was stored as another type than text
            raise VerificationError(
                f"chain {cp.chain!r} seq {cp.seq}: inserted: checkpoint row is in no chain",
                chain=cp.chain,
                seq=cp.seq,
                kind="inserted",
            )
    stored = ledger.count()
    if stored == report.records:
        return
    for chain, seq, why in ledger.stray_rows(limit=1):
        name = chain if isinstance(chain, str) else repr(chain)
        where = seq if type(seq) is int else 0
        raise VerificationError(
            f"chain {name!r} seq {seq!r}: inserted: row is outside the chain's sequence ({why})",
            chain=str(name),
            seq=where,
            kind="inserted",
        )
    # No stray: the difference is records appended while the walks ran.


def _verify_chain(
    ledger: Ledger,
    chain: str,
    public_key: Ed25519PublicKey | None,
    anchors: list[Checkpoint],
    progress: Callable[[int], None] | None,
    both_trees: bool = False,
) -> ChainReport:
    rep = ChainReport(chain)
    # Signatures and links of the stored checkpoints (proof/chain.py); each
    # comes back as the version it was signed as, so message() below is right.
    stored, problems = check_checkpoints(ledger.checkpoints(chain), public_key)
    if problems:
        raise damage(problems[0].chain, problems[0].seq, problems[0].kind, problems[0].detail)
    rep.checkpoints = len(stored)
    # Leaf hashes after the last checkpoint or anchor with a root of their kind
    # (hashes_until, bodies_until) are compared with nothing: each tree stops
    # at the batch that reaches it.
    due, hashes_until, bodies_until = due_checks(stored, anchors, resolved=public_key is not None)
    # Roots of either kind (no key) need the tree over bodies only until one of
    # them matches the tree over chain hashes; roots known to be over bodies
    # need it to the last of them. ``both_trees``: to the end, as parallel.py.
    matched: set[str] | None = None if both_trees else set()

    # The hot path of verify (issue 13) works a batch of rows at a time with
    # list comprehensions, so the per-record work is the SHA-256 calls and
    # little else: the links and hashes of a whole batch are compared in one
    # go, and only a batch that fails goes through _find_damage, row by row,
    # to name the first damage. Merkle roots (RFC 9162), only when some
    # checkpoint carries one, are built a perfect subtree at a time. What is
    # left is the formats' own cost: reading each row, its link hash, its
    # Merkle leaf (a short hash of the link hash; a second SHA-256 over the
    # body for roots before version 3) and inner nodes (bench_verify.py
    # prints each, and the ratio they allow).
    pending = deque(sorted(due))  # seqs with checkpoints or anchors to check, in order
    if pending and pending[0] < 1:
        _cp, what, _kind = due[pending[0]][0]
        raise damage(chain, pending[0], "inserted", f"the {what} is outside the chain's sequence")
    # Merkle frontiers (roots of perfect subtrees, largest first) of the trees
    # over chain hashes and over bodies.
    hash_nodes: list[bytes] = []
    body_nodes: list[bytes] = []
    expected = GENESIS
    before: bytes | None = None  # hash of the record before the previous one
    last_seq = 0
    last_good_cp = 0
    for batch in ledger.scan_batches(chain):
        n = len(batch)
        if not n:
            continue
        digests = linked(batch, last_seq, expected)
        if digests is None:
            _find_damage(ledger, chain, batch, last_seq, expected, before)
            raise damage(chain, last_seq + 1, "modified", "records do not chain")  # unreachable
        first, last = last_seq + 1, last_seq + n
        inside: list[int] = []
        while pending and pending[0] <= last:
            inside.append(pending.popleft())
        by_hash = by_body = {}
        if first <= hashes_until:
            by_hash = frontiers(hash_nodes, last_seq, record_leaves(digests), inside)
        if first <= bodies_until:
            by_body = frontiers(body_nodes, last_seq, leaf_hashes([r[3] for r in batch]), inside)
        for seq in inside:
            last_good_cp = check_due(
                chain, due.pop(seq), seq, digests[seq - first], by_hash.get(seq),
                by_body.get(seq), public_key, last_good_cp, rep, matched,
            )  # fmt: skip
        if matched:
            bodies_until = min(bodies_until, last_root(due, (BODIES,)))
            matched = None
        before = digests[-2] if n > 1 else expected
        expected, last_seq = digests[-1], last
        if progress is not None:
            progress(n)
    count = last_seq
    for seq in sorted(due):
        for cp, what, _kind in due[seq]:
            check_signature(cp, public_key, what)
            raise damage(
                chain,
                last_seq + 1,
                "truncated",
                f"records {last_seq + 1}..{seq} are gone but the {what} covers them",
            )
    if public_key is not None and count and not (rep.signatures_checked or rep.anchors_checked):
        # Deleting every checkpoint must not turn "rewritten" into "unchecked":
        # with a key, a chain is only intact when a signature vouches for it.
        raise damage(
            chain,
            1,
            "bad signature",
            f"{count} records but no signed checkpoint; nothing proves the chain was not rewritten",
        )
    rep.records = count
    rep.last_seq = last_seq
    rep.head = expected
    rep.last_checkpoint_seq = last_good_cp
    return rep


def _find_damage(
    ledger: Ledger,
    chain: str,
    batch: Sequence[RawRow],
    last_seq: int,
    expected: bytes,
    before: bytes | None,
) -> None:
    """Walk ``batch`` row by row and raise the first damage in it."""
    for seq, prev, digest, body in batch:
        if seq != last_seq + 1:
            if type(seq) is not int:
                kind = _TYPE_NAMES.get(type(seq), type(seq).__name__)
                raise VerificationError(
                    f"chain {chain!r} seq {seq!r}: inserted: row is outside the chain's"
                    f" sequence (seq is {kind}, not integer)",
                    chain=chain,
                    seq=last_seq + 1,
                    kind="inserted",
                )
            raise damage(
                chain, last_seq + 1, "deleted", f"record missing (next present is seq {seq})"
            )
        try:
            ok = link_hash(prev, body) == digest
        except TypeError:
            ok = False
        if not ok or prev != expected:
            _classify(ledger, chain, seq, prev, digest, body, expected, before, last_seq)
        before, expected, last_seq = expected, digest, seq


def _classify(
    ledger: Ledger,
    chain: str,
    seq: int,
    prev: bytes,
    digest: bytes,
    body: bytes,
    expected: bytes,
    before: bytes | None,
    last_seq: int,
) -> None:
    """Name the damage at ``seq`` (a hash or link that does not match); always raises."""
    for name, value in (("prev_hash", prev), ("hash", digest), ("body", body)):
        if type(value) is not bytes:
            kind = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise damage(chain, seq, "modified", f"{name} is {kind}, not blob")
    if link_hash(prev, body) != digest:
        nxt = next(iter(ledger.scan(chain, after_seq=seq)), None)
        if nxt is not None and nxt.prev_hash == expected:
            raise damage(chain, seq, "inserted", "record is not part of the chain around it")
        raise damage(chain, seq, "modified", "hash does not match the record's bytes")
    if before is not None and prev == before:
        raise damage(chain, last_seq, "inserted", "record is not part of the chain around it")
    if _hash_elsewhere(ledger, chain, prev, seq):
        raise damage(chain, seq, "reordered", "record is out of its place in the chain")
    raise damage(chain, seq, "modified", "previous-hash link does not match")


def _hash_elsewhere(ledger: Ledger, chain: str, digest: bytes, seq: int) -> bool:
    return any(r.hash == digest and r.seq != seq for r in ledger.scan(chain))
