"""Copy a ledger to another backend with its chains intact (``otel-audit migrate``).

The source is verified first, so only an intact ledger is copied. Each
chain's records are appended in order through the target's ordinary
``append``, which recomputes every hash from the bytes: the copy is checked
record by record against the source (same seq, same hash), so the target
holds the same bytes, seqs and hashes and verifies the same. Checkpoints
follow their records. A target chain that already holds anything is refused
before a single record is written. Not thread-safe; stop the writers of the
source first (records they append during the copy may be left behind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.errors import LedgerError, VerificationError
from otel_audit.proof.verify import verify_ledger

_BATCH = 1000


@dataclass
class MigrateReport:
    """What was copied."""

    source: str
    target: str
    chains: int = 0
    records: int = 0
    checkpoints: int = 0


def migrate(
    source_url: str,
    target_url: str,
    *,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
) -> MigrateReport:
    """Copy every chain and checkpoint from ``source_url`` to ``target_url``; then verify it.

    ``jobs``: worker processes for both verifies (``verify_ledger``).
    """
    with open_ledger(source_url, create=False, readonly=True) as source:
        verify_ledger(source, jobs=jobs)  # raises VerificationError naming the damage
        with open_ledger(target_url, create=True) as target:
            if source.url == target.url:
                raise LedgerError(f"source and target are the same ledger ({source.url})")
            report = copy_ledger(source, target, progress=progress)
            verify_ledger(target, jobs=jobs)
    return report


def copy_ledger(
    source: Ledger, target: Ledger, *, progress: Callable[[int], None] | None = None
) -> MigrateReport:
    """Copy ``source`` into ``target`` (both open); refuses non-empty target chains."""
    report = MigrateReport(source.url, target.url)
    chains = source.chains()
    for chain in chains:
        if target.head(chain) is not None or target.checkpoints(chain):
            raise LedgerError(
                f"target chain {chain!r} in {target.url} is not empty: nothing was copied"
            )
    for chain in chains:
        batch = []
        for row in source.scan(chain):
            batch.append(row)
            if len(batch) >= _BATCH:
                report.records += _copy(target, chain, batch)
                batch = []
                if progress is not None:
                    progress(report.records)
        if batch:
            report.records += _copy(target, chain, batch)
        for checkpoint in source.checkpoints(chain):
            target.add_checkpoint(checkpoint)
            report.checkpoints += 1
        report.chains += 1
    return report


def _copy(target: Ledger, chain: str, rows: list) -> int:  # type: ignore[type-arg]
    appended = target.append(chain, [r.body for r in rows])
    for row, got in zip(rows, appended):
        if (got.seq, got.hash) != (row.seq, row.hash):
            # Someone else appended to the target chain while we copied, or the
            # source changed under us: say where, never leave it unnoticed.
            raise VerificationError(
                f"chain {chain!r} seq {row.seq}: copy differs from the source"
                f" (target seq {got.seq}); the target chain is incomplete",
                chain=chain,
                seq=row.seq,
                kind="modified",
            )
    return len(appended)
