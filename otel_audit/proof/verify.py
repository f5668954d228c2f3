"""Verification of a ledger: every chain, every checkpoint, every signature.

Walks each chain in seq order recomputing SHA-256(prev || body), and raises
``VerificationError`` naming the chain, the first damaged seq and the kind of
damage: ``modified``, ``deleted``, ``inserted``, ``reordered``, ``truncated``
(records a checkpoint covers are gone) or ``bad signature``. With a public
key, every checkpoint must carry a valid Ed25519 signature; that is what
catches an insider who rewrote a record and recomputed every later hash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit.engine.ledger import Ledger, RawRow
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint, check_checkpoints, link_hash
from otel_audit.proof.keys import key_id, verify_signature
from otel_audit.proof.merkle import Frontier


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


@dataclass
class VerifyReport:
    chains: list[ChainReport] = field(default_factory=list)
    public_key_id: str | None = None

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)


def _damage(chain: str, seq: int, kind: str, detail: str) -> VerificationError:
    return VerificationError(
        f"chain {chain!r} seq {seq}: {kind}: {detail}", chain=chain, seq=seq, kind=kind
    )


def verify_ledger(
    ledger: Ledger,
    public_key: Ed25519PublicKey | None = None,
    *,
    anchors: Iterable[Checkpoint] = (),
    progress: Callable[[int], None] | None = None,
    chains: Iterable[str] | None = None,
) -> VerifyReport:
    """Verify every chain of ``ledger`` (or only ``chains``); returns a report or raises
    VerificationError. The whole-ledger checks of a backend run only for a full verify.
    """
    report = VerifyReport(public_key_id=key_id(public_key) if public_key is not None else None)
    external: dict[str, list[Checkpoint]] = {}
    for anchor in anchors:
        external.setdefault(anchor.chain, []).append(anchor)
    selected = list(chains) if chains is not None else None
    names = selected if selected is not None else sorted(set(ledger.chains()) | set(external))
    damaged: list[tuple[bool, VerificationError]] = []
    for chain in names:
        try:
            report.chains.append(
                _verify_chain(ledger, chain, public_key, external.get(chain, []), progress)
            )
        except VerificationError as exc:
            # Every chain is checked; a chain with checkpoints is reported
            # before one without (a stray chain is usually a record moved out
            # of an established one, and the established chain names it).
            damaged.append((not ledger.checkpoints(chain), exc))
    if damaged:
        raise min(damaged, key=lambda item: item[0])[1]
    # A backend whose query columns are stored (not computed on read) checks
    # that none of them disagrees with the hashed bytes.
    check_columns = getattr(ledger, "check_generated", None)
    if check_columns is not None and selected is None:
        check_columns()
    return report


def _check_signature(cp: Checkpoint, public_key: Ed25519PublicKey | None, what: str) -> None:
    if public_key is None:
        return
    if not cp.signature:
        raise _damage(cp.chain, cp.seq, "bad signature", f"{what} is not signed")
    if not verify_signature(public_key, cp.signature, cp.message()):
        raise _damage(
            cp.chain,
            cp.seq,
            "bad signature",
            f"{what} signature does not verify with the public key",
        )


def _verify_chain(
    ledger: Ledger,
    chain: str,
    public_key: Ed25519PublicKey | None,
    anchors: list[Checkpoint],
    progress: Callable[[int], None] | None,
) -> ChainReport:
    rep = ChainReport(chain)
    # Signatures and links of the stored checkpoints (proof/chain.py); each
    # comes back as the version it was signed as, so message() below is right.
    stored, problems = check_checkpoints(ledger.checkpoints(chain), public_key)
    if problems:
        raise _damage(problems[0].chain, problems[0].seq, problems[0].kind, problems[0].detail)
    rep.checkpoints = len(stored)
    # seq -> [(checkpoint, what)]; anchors are checkpoints held by another system.
    due: dict[int, list[tuple[Checkpoint, str]]] = {}
    for cp in stored:
        due.setdefault(cp.seq, []).append((cp, f"checkpoint at seq {cp.seq}"))
    for cp in anchors:
        due.setdefault(cp.seq, []).append((cp, f"anchor at seq {cp.seq}"))

    # Merkle roots (RFC 9162) of checkpoints are checked against the records
    # walked so far; the frontier is only kept when some checkpoint has a root.
    frontier = Frontier() if any(cp.merkle_root for cps in due.values() for cp, _ in cps) else None
    expected = GENESIS
    before: bytes | None = None  # hash of the record before the previous one
    last_seq = 0
    last_good_cp = 0
    rows = iter(ledger.scan(chain))
    row: RawRow | None = next(rows, None)
    count = 0
    while row is not None:
        nxt = next(rows, None)
        seq, prev, digest, body = row
        if seq != last_seq + 1:
            raise _damage(
                chain, last_seq + 1, "deleted", f"record missing (next present is seq {seq})"
            )
        if link_hash(prev, body) != digest:
            if nxt is not None and nxt.prev_hash == expected:
                raise _damage(chain, seq, "inserted", "record is not part of the chain around it")
            raise _damage(chain, seq, "modified", "hash does not match the record's bytes")
        if prev != expected:
            if before is not None and prev == before:
                raise _damage(
                    chain, last_seq, "inserted", "record is not part of the chain around it"
                )
            if _hash_elsewhere(ledger, chain, prev, seq):
                raise _damage(chain, seq, "reordered", "record is out of its place in the chain")
            raise _damage(chain, seq, "modified", "previous-hash link does not match")
        if frontier is not None:
            frontier.append(body)
        checks = due.pop(seq, None)
        if checks:
            for cp, what in checks:
                _check_signature(cp, public_key, what)
                if cp.head != digest:
                    raise _damage(
                        chain,
                        last_good_cp + 1,
                        "modified",
                        f"history rewritten between seq {last_good_cp + 1} and {seq}:"
                        f" record {seq} does not match the {what}",
                    )
                if cp.merkle_root is not None and frontier is not None:
                    if frontier.root() != cp.merkle_root:
                        raise _damage(
                            chain,
                            seq,
                            "modified",
                            f"merkle root of the {what} does not match records 1..{seq}",
                        )
                if public_key is not None:
                    if what.startswith("anchor"):
                        rep.anchors_checked += 1
                    else:
                        rep.signatures_checked += 1
                elif what.startswith("anchor"):
                    rep.anchors_checked += 1
            last_good_cp = seq
        before, expected, last_seq = expected, digest, seq
        count += 1
        if progress is not None and count % 65536 == 0:
            progress(65536)
        row = nxt
    if progress is not None:
        progress(count % 65536)
    for seq in sorted(due):
        for cp, what in due[seq]:
            _check_signature(cp, public_key, what)
            raise _damage(
                chain,
                last_seq + 1,
                "truncated",
                f"records {last_seq + 1}..{seq} are gone but the {what} covers them",
            )
    if public_key is not None and count and not (rep.signatures_checked or rep.anchors_checked):
        # Deleting every checkpoint must not turn "rewritten" into "unchecked":
        # with a key, a chain is only intact when a signature vouches for it.
        raise _damage(
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


def _hash_elsewhere(ledger: Ledger, chain: str, digest: bytes, seq: int) -> bool:
    return any(r.hash == digest and r.seq != seq for r in ledger.scan(chain))
