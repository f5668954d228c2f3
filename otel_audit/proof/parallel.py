"""Verify on several processes at once (``otel-audit verify --jobs N``).

Chains are independent, and within a chain each record can be checked on its
own: SHA-256(prev_hash || body) must be its stored hash, and its prev_hash the
stored hash of the record before it. So a long chain is cut into ranges of
seqs, each walked by a worker process that starts from the stored hash of the
row just before its range. The range before computes that very row's hash
from its bytes, and this process checks that every range starts where the one
before it ended: together the ranges check exactly the links one walk does.

Ranges are aligned on a power of two, so a chain's Merkle tree (RFC 9162)
splits along them: a whole range is one perfect subtree, and the frontier at
a checkpoint inside a range is the frontier of the ranges before it plus the
range's own prefix nodes. Signatures, checkpoint heads and Merkle roots are
then checked here, in seq order, with the code the single walk uses. Workers
build the trees the chain's checkpoints need: over chain hashes, over bodies,
or both (proof/walk.py, ``leaf_kind``). Roots of either kind (no key) need
both, unless the chain's first root is over chain hashes: then, as in the
single walk, the later ones are taken to be too, and a chain where one is
not is walked again by the single walk.

Only an intact chain is assembled from ranges. When a range is not intact (a
link breaks, a row is missing, a value has the wrong type) or a checkpoint
does not match, that chain is walked again by the single walk of verify.py,
which names the first damage exactly as it always does: damage is rare, and
its report must not depend on how the work was cut.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint, check_checkpoints
from otel_audit.proof.merkle import Frontier, advance, leaf_hashes, record_leaves
from otel_audit.proof.walk import (
    BODIES,
    EITHER,
    HASHES,
    ChainReport,
    Due,
    check_due,
    due_checks,
    extend,
    last_root,
    linked,
    merkle_batch,
)

_log = logging.getLogger(__name__)

#: The smallest range worth a process (a power of two): below about this many
#: records, starting and feeding a worker costs more than the walk it saves.
MIN_RANGE = 1 << 15
#: Chains shorter than this are walked by the parent: planning them would cost
#: more queries than walking them.
SHORT = 1024
#: Without a key, the parent reads a chain up to its first root, when it is at
#: most this far, to tell which tree the workers need (``_first_root_kind``):
#: a few writers' checkpoints (1,000 records each by default), read in one process.
PROBE = 4096


def default_jobs() -> int:
    """Worker processes ``otel-audit verify`` uses unless told: the CPUs it may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Range:
    """What an intact walk of seqs (after, until] found (the worker's answer)."""

    after: int
    start: bytes  # the stored hash of row ``after`` (GENESIS for 0): where the walk began
    last_seq: int
    last_hash: bytes  # computed from the bytes of row ``last_seq``
    digests: dict[int, bytes] = field(default_factory=dict)  # at the seqs asked for
    # Per tree (True: over chain hashes, False: over bodies): seq -> its Merkle
    # nodes after ``after``, and the range's own Merkle frontier.
    prefixes: dict[bool, dict[int, list[bytes]]] = field(default_factory=dict)
    nodes: dict[bool, list[bytes]] = field(default_factory=dict)


#: A piece of work: (chain, after, until, due seqs, last seq needing the tree over
#: chain hashes, and over bodies).
_Piece = tuple[str, int, "int | None", list[int], int, int]


def _reopen(target: str) -> Ledger:
    if target.startswith("sqlite:"):
        return open_ledger(target, create=False, readonly=True)
    from otel_audit.engine.ledger.postgres import PostgresLedger

    return PostgresLedger(target, readonly=True)


def walk_pieces(
    target: str, identity: tuple[object, ...], pieces: list[_Piece]
) -> list[_Range | None]:
    """Walk each piece (rows ``after`` < seq <= ``until`` of a chain); runs in a worker.

    The ledger is opened again through ``target`` and used only if it is the
    store the parent reads (``identity``): a path swapped for another file,
    or a connection that reaches another database, walks nothing. A piece
    comes back None when its rows are not an intact piece of chain, or could
    not be read: the single walk then names it.
    """
    try:
        ledger = _reopen(target)
    except Exception:  # noqa: BLE001 - whatever it is, the single walk names it
        return [None] * len(pieces)
    try:
        ledger.head(pieces[0][0])  # a read: the -wal and -shm a file ledger reads are open
        if ledger.store_identity() != identity:
            return [None] * len(pieces)
        return [_walk(ledger, *piece) for piece in pieces]
    except Exception:  # noqa: BLE001
        return [None] * len(pieces)
    finally:
        ledger.close()


def _walk(
    ledger: Ledger,
    chain: str,
    after: int,
    until: int | None,
    due: list[int],
    hashes_until: int,
    bodies_until: int,
) -> _Range | None:
    if after:
        row = next(iter(ledger.scan(chain, after - 1, after)), None)
        if row is None or row[0] != after:
            return None
        expected = row[2]
    else:
        expected = GENESIS
    found = _Range(after, expected, after, expected)
    pending = deque(due)
    last_seq = after
    trees = [(True, hashes_until), (False, bodies_until)]
    for hashes, until_seq in trees:
        if until_seq:
            found.nodes[hashes], found.prefixes[hashes] = [], {}
    for batch in ledger.scan_batches(chain, after, until):
        if not batch:
            continue
        digests = linked(batch, last_seq, expected)
        if digests is None:
            return None
        first, last = last_seq + 1, last_seq + len(batch)
        inside: list[int] = []
        while pending and pending[0] <= last:
            inside.append(pending.popleft())
        local = [seq - after for seq in inside]
        for hashes, until_seq in trees:
            if first <= until_seq:
                leaves = record_leaves(digests) if hashes else leaf_hashes([r[3] for r in batch])
                got = merkle_batch(found.nodes[hashes], last_seq - after, leaves, local)
                found.prefixes[hashes].update((off + after, list(front)) for off, front in got)
        for seq in inside:
            found.digests[seq] = digests[seq - first]
        expected, last_seq = digests[-1], last
    if until is not None and last_seq != until:
        return None  # rows missing at the end of the range
    found.last_seq, found.last_hash = last_seq, expected
    return found


def _joined(nodes: list[bytes], size: int, prefix: list[bytes], offset: int) -> list[bytes]:
    """The frontier at ``size + offset``: ``nodes`` (at ``size``) then a range's prefix nodes."""
    out = list(nodes)
    heights = [h for h in range(offset.bit_length() - 1, -1, -1) if offset >> h & 1]
    for node, height in zip(prefix, heights):
        size = extend(out, size, node, height)
    return out


def _frontier_at(
    nodes: dict[bool, list[bytes]], tree: int, found: _Range, hashes: bool, seq: int, until: int
) -> list[bytes] | None:
    """The frontier at ``seq`` (inside ``found``) of one tree, None when no check needs it:
    past ``until``, the ranges before were not added to ``nodes``."""
    prefix = found.prefixes.get(hashes, {}).get(seq)
    if prefix is None or seq > until:
        return None
    return _joined(nodes[hashes], tree, prefix, seq - found.after)


@dataclass
class _Plan:
    chain: str
    ranges: list[tuple[int, int | None]]  # (after, until) in seq order
    due: Due
    hashes_until: int  # the last seq whose checks need the tree over chain hashes
    bodies_until: int  # ... over bodies
    checkpoints: int
    head: int  # the chain's last seq when planned


def _plan(
    ledger: Ledger,
    chain: str,
    public_key: Ed25519PublicKey | None,
    anchors: list[Checkpoint],
    size: int,
    head: int,
) -> _Plan | None:
    """The ranges of ``chain`` (whose last seq is ``head``) and what to check where;
    None: walk it whole."""
    stored, problems = check_checkpoints(ledger.checkpoints(chain), public_key)
    if problems:
        return None
    due, hashes_until, bodies_until = due_checks(stored, anchors, resolved=public_key is not None)
    if any(type(seq) is not int or seq < 1 for seq in due):
        return None
    if bodies_until and _first_root_kind(ledger, chain, due) == HASHES:
        bodies_until = last_root(due, (BODIES,))
    count = max(1, -(-head // size))  # a chain shorter than a range is one range
    ranges: list[tuple[int, int | None]] = [(k * size, (k + 1) * size) for k in range(count - 1)]
    ranges.append(((count - 1) * size, None))
    return _Plan(chain, ranges, due, hashes_until, bodies_until, len(stored), head)


def _first_root_kind(ledger: Ledger, chain: str, due: Due) -> str | None:
    """HASHES when the chain's first root is of either kind and over chain hashes
    (read here: records 1 to it, at most PROBE of them), else None (also when
    they cannot be read: the single walk names why)."""
    try:
        return _probe(ledger, chain, due)
    except Exception:  # noqa: BLE001 - whatever it is, the walks name it
        return None


def _probe(ledger: Ledger, chain: str, due: Due) -> str | None:
    seq = min((s for s, cps in due.items() if any(cp.merkle_root for cp, _, _ in cps)), default=0)
    roots = [cp.merkle_root for cp, _, kind in due.get(seq, []) if cp.merkle_root]
    if not 0 < seq <= PROBE or any(kind != EITHER for _, _, kind in due[seq]):
        return None
    # The tree the writer builds (damage in the rows is left to the walks).
    tree = Frontier()
    if not advance(tree, ledger, chain, seq, hashes=True):
        return None
    return HASHES if all(root == tree.root() for root in roots) else None


def _assemble(
    plan: _Plan, walked: list[_Range | None], public_key: Ed25519PublicKey | None, size: int
) -> ChainReport | None:
    """The chain's report from its intact ranges, or None when the single walk must name damage."""
    rep = ChainReport(plan.chain)
    rep.checkpoints = plan.checkpoints
    height = size.bit_length() - 1
    # Per tree (True: over chain hashes): the frontier of the ranges so far.
    nodes: dict[bool, list[bytes]] = {True: [], False: []}
    tree = 0  # leaves in each frontier
    until = {True: plan.hashes_until, False: plan.bodies_until}
    expected, last_seq, last_good_cp = GENESIS, 0, 0
    try:
        for (after, _until), found in zip(plan.ranges, walked):
            if found is None or found.after != last_seq or found.start != expected:
                return None
            for seq in sorted(found.digests):
                last_good_cp = check_due(
                    plan.chain, plan.due.pop(seq), seq, found.digests[seq],
                    _frontier_at(nodes, tree, found, True, seq, plan.hashes_until),
                    _frontier_at(nodes, tree, found, False, seq, plan.bodies_until),
                    public_key, last_good_cp, rep,
                )  # fmt: skip
            grown = tree
            for hashes in (True, False):
                if after + size < until[hashes]:  # later checkpoints need this range's root
                    own = found.nodes.get(hashes, [])
                    if found.last_seq != after + size or len(own) != 1:
                        return None
                    grown = extend(nodes[hashes], tree, own[0], height)
            tree = grown
            expected, last_seq = found.last_hash, found.last_seq
    except VerificationError:
        return None
    if plan.due:  # checkpoints past the last record: truncated
        return None
    if public_key is not None and last_seq and not (rep.signatures_checked or rep.anchors_checked):
        return None
    rep.records = last_seq
    rep.last_seq = last_seq
    rep.head = expected
    rep.last_checkpoint_seq = last_good_cp
    return rep


def _context() -> multiprocessing.context.BaseContext:
    # fork is fast (nothing to import again) but unsafe once threads run:
    # a library caller's threads may hold locks the child would inherit.
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def walk_chains(
    ledger: Ledger,
    chains: Iterable[str],
    public_key: Ed25519PublicKey | None,
    anchors: dict[str, list[Checkpoint]],
    jobs: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, ChainReport], set[str]]:
    """Walk long chains on ``jobs`` worker processes.

    Returns the reports of the chains found intact, by chain, and the chains
    that were tried (their progress was reported). A chain missing from the
    reports (short, tried and not intact, or not tried) is for the single walk.
    """
    names = list(chains)
    if jobs < 2 or not names:
        return {}, set()
    # A short chain is walked here, with no planning (one indexed read each).
    heads: dict[str, int] = {}
    for chain in names:
        last = ledger.head(chain)
        if last is not None and type(last.seq) is int and last.seq >= SHORT:
            heads[chain] = last.seq
    if sum(heads.values()) < 2 * MIN_RANGE:
        return {}, set()
    # A head above the rows stored (a row planted at a huge seq) is damage,
    # and would make ranges without end: such a chain is walked here too.
    total = ledger.count()
    heads = {chain: head for chain, head in heads.items() if head <= total}
    if sum(heads.values()) < 2 * MIN_RANGE:
        return {}, set()
    target = ledger.reopen_target()
    identity = ledger.store_identity() if target is not None else None
    if target is None or identity is None:
        return {}, set()
    size = MIN_RANGE
    while size * 2 * jobs * 4 <= sum(heads.values()):  # at least 4 ranges a worker
        size *= 2
    plans: list[_Plan] = []
    for chain, head in heads.items():
        plan = _plan(ledger, chain, public_key, anchors.get(chain, []), size, head)
        if plan is not None:
            plans.append(plan)
    if not plans:
        return {}, set()
    tasks = _tasks(plans, size)
    results: list[list[_Range | None]] = [[None] * len(p.ranges) for p in plans]
    left = [len(p.ranges) for p in plans]
    reports: dict[str, ChainReport] = {}
    try:
        # The workers make no reference cycles; without the collector, a
        # forked worker never walks (and so never copies) its parent's heap.
        pool = ProcessPoolExecutor(
            min(jobs, len(tasks)), mp_context=_context(), initializer=gc.disable
        )
        with pool:
            running: dict[Future[list[_Range | None]], list[tuple[int, int]]] = {}
            for task in tasks:
                pieces: list[_Piece] = []
                for i, k in task:
                    p = plans[i]
                    after, until = p.ranges[k]
                    due = sorted(s for s in p.due if s > after and (until is None or s <= until))
                    pieces.append((p.chain, after, until, due, p.hashes_until, p.bodies_until))
                running[pool.submit(walk_pieces, target, identity, pieces)] = task
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    for (i, k), found in zip(task, future.result()):
                        results[i][k] = found
                        if progress is not None and found is not None:
                            progress(found.last_seq - found.after)
                        left[i] -= 1
                        if not left[i]:
                            rep = _assemble(plans[i], results[i], public_key, size)
                            if rep is not None:
                                reports[plans[i].chain] = rep
    except (BrokenExecutor, OSError) as exc:
        # A worker died (killed, out of memory) or none could start: the
        # chains not assembled yet are walked here instead.
        _log.warning("otel-audit: verify workers failed (%s); walking the rest in one process", exc)
    return reports, {p.chain for p in plans}


def _tasks(plans: list[_Plan], size: int) -> list[list[tuple[int, int]]]:
    """The ranges, as tasks of about ``size`` records or more: a long range alone,
    short ones (short chains, the ends of long ones) packed together, so that
    each worker opens the ledger once per task, not once per chain. Longest first,
    so no worker is left with a long one at the end."""

    def length(ik: tuple[int, int]) -> int:
        after, until = plans[ik[0]].ranges[ik[1]]
        return (until if until is not None else plans[ik[0]].head) - after

    ranges = sorted(
        ((i, k) for i, p in enumerate(plans) for k in range(len(p.ranges))),
        key=length,
        reverse=True,
    )
    tasks: list[list[tuple[int, int]]] = []
    group: list[tuple[int, int]] = []
    filled = 0
    for ik in ranges:
        if length(ik) >= size:
            tasks.append([ik])
            continue
        group.append(ik)
        filled += length(ik)
        if filled >= size:
            tasks.append(group)
            group, filled = [], 0
    if group:
        tasks.append(group)
    return tasks
