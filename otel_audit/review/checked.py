"""Records checked against their chains before a reviewer sees them.

search, export and trail find records through query columns, and a query can
return what no chain walk vouches for: a row outside every sequence (seq 0, a
chain stored as bytes), a row at or after the first damage of its chain, a
row whose query columns an altered schema derives (a review is then refused
whole: the same schema can hide records). ``Review`` verifies
each chain a result touches once, exactly as ``otel-audit verify`` does, and
gives every record a ``Verdict``: ``intact`` (its chain verifies and a
checkpoint covers it), ``unanchored`` (its chain verifies, no checkpoint yet)
or ``damaged`` (with the reason). It also says whether an intent record (the
request record written before a state-changing action) was concluded by the
record of its outcome; one that was not has the outcome ``unknown``.

A record is the one the walk verified when its chain is text, its seq an
integer inside the walked range and its hash links its bytes to the previous
hash: (chain, seq) is the primary key, so no other row can sit there.
Not thread-safe: one ``Review`` per command, over one ledger connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Ledger, Query, StoredRecord
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import link_hash
from otel_audit.proof.verify import verify_ledger

#: Verification states of a record shown to a reviewer.
INTACT = "intact"  # chain verified up to it and it is covered by a (signed) checkpoint
UNANCHORED = "unanchored"  # chain verified up to it, but no checkpoint covers it yet
DAMAGED = "damaged"  # not vouched for by its chain: never shown as good

#: Damage after which no record of the chain is proven: a checkpoint that is
#: unsigned or wrongly signed means the whole chain could have been recomputed.
_WHOLE_CHAIN = frozenset({"bad signature"})


@dataclass(frozen=True)
class Verdict:
    """What verification says about one record: ``status`` and why, in one line."""

    status: str
    detail: str

    @property
    def damaged(self) -> bool:
        return self.status == DAMAGED


@dataclass
class _Chain:
    damaged_from: int | None  # first untrusted seq, None when the chain verified
    why: str
    last_seq: int  # last seq walked
    head: bytes  # hash of record last_seq
    covered_to: int  # last seq a (signed) checkpoint covers


class Review:
    """Judges the records a review command is about to show; see the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        public_key: Ed25519PublicKey | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        jobs: int = 1,
    ) -> None:
        self.ledger = ledger
        self.public_key = public_key
        self.progress = progress
        self.jobs = jobs  # worker processes for a long chain's walk (proof/parallel.py)
        self._chains: dict[str, _Chain] = {}
        # An altered schema can hide records from a query as well as forge
        # them, so no answer drawn through it is shown: the review is refused.
        problems = ledger.schema_problems()
        if problems:
            raise VerificationError(
                f"ledger schema was altered: {'; '.join(problems)}; its query columns cannot"
                " be trusted (run otel-audit verify)",
                kind="schema",
            )

    # -- verdicts --------------------------------------------------------------

    def judge(self, stored: StoredRecord, query: Query | None = None) -> Verdict:
        """The verdict on ``stored``, as returned by ``query`` (when given)."""
        chain, seq = stored.chain, stored.seq
        if not isinstance(chain, str):
            return Verdict(DAMAGED, f"row is in no chain: its chain id {chain!r} is not text")
        where = f"chain {chain!r} seq {seq!r}"
        if type(seq) is not int or seq < 1:
            return Verdict(DAMAGED, f"{where}: inserted: row is outside the chain's sequence")
        if link_hash(stored.prev_hash, stored.body) != stored.hash:
            return Verdict(DAMAGED, f"{where}: modified: hash does not match the record's bytes")
        state = self._state(chain)
        if state.damaged_from is not None and seq >= state.damaged_from:
            return Verdict(DAMAGED, state.why)
        if seq > state.last_seq:
            self._extend(chain, state)
            if seq > state.last_seq:  # the chain breaks before this record
                return Verdict(DAMAGED, state.why or f"{where}: not reached by the chain walk")
        mismatch = _query_mismatch(stored, query) if query is not None else None
        if mismatch:
            return Verdict(
                DAMAGED,
                f"{where}: modified: the query columns say {mismatch}, the record's bytes do not",
            )
        if state.damaged_from is not None:
            return Verdict(INTACT, f"verified before the damage at seq {state.damaged_from}")
        if seq <= state.covered_to:
            return Verdict(
                INTACT,
                "chain and signed checkpoint verified" if self.public_key else "chain verified",
            )
        return Verdict(UNANCHORED, "chain verified; no checkpoint covers it yet")

    def _state(self, chain: str) -> _Chain:
        state = self._chains.get(chain)
        if state is None:
            try:
                report = verify_ledger(
                    self.ledger,
                    self.public_key,
                    progress=self.progress,
                    chains=[chain],
                    jobs=self.jobs,
                )
            except VerificationError as exc:
                start = 1 if exc.kind in _WHOLE_CHAIN else max(exc.seq, 1)
                state = _Chain(start, str(exc), start - 1, b"", 0)
            else:
                rep = report.chains[0]
                state = _Chain(None, "", rep.last_seq, rep.head, rep.last_checkpoint_seq)
            self._chains[chain] = state
        return state

    def _extend(self, chain: str, state: _Chain) -> None:
        """Walk the records appended since the chain was verified (no checkpoint covers them)."""
        if state.damaged_from is not None:
            return
        for row in self.ledger.scan(chain, after_seq=state.last_seq):
            if row.seq != state.last_seq + 1 or row.prev_hash != state.head:
                kind = "deleted" if row.seq != state.last_seq + 1 else "modified"
                state.damaged_from = state.last_seq + 1
                state.why = f"chain {chain!r} seq {state.last_seq + 1}: {kind}: chain breaks"
                return
            if link_hash(row.prev_hash, row.body) != row.hash:
                state.damaged_from = row.seq
                state.why = f"chain {chain!r} seq {row.seq}: modified: hash does not match"
                return
            state.last_seq, state.head = row.seq, row.hash

    # -- outcomes --------------------------------------------------------------

    def concluded(self, stored: StoredRecord) -> StoredRecord:
        """``stored``, marked concluded when it is an intent whose outcome record exists."""
        try:
            rec = stored.record
        except VerificationError:
            return stored
        if rec.attr(v.INTENT) is not True:
            return stored
        for other in self.ledger.query(Query(trace_id=rec.trace_id)):
            if other.body == stored.body:
                continue
            try:
                o = other.record
            except VerificationError:
                continue
            if o.span_id == rec.span_id and o.attr(v.INTENT) is not True:
                if self.judge(other).status != DAMAGED:
                    return replace(stored, concluded=True)
        return stored

    # -- whole queries ---------------------------------------------------------

    def records(self, query: Query) -> Iterator[tuple[StoredRecord, Verdict]]:
        """Records matching ``query`` with their verdicts, in ledger order.

        ``outcome=unknown`` also finds intents that no outcome record concluded
        (their query column holds no outcome), so it is filtered here, not in SQL.
        """
        wanted = query.outcome
        sql_query = replace(query, outcome=None) if wanted == v.UNKNOWN else query
        for stored in self.ledger.query(sql_query):
            verdict = self.judge(stored, sql_query)
            if not verdict.damaged:
                stored = self.concluded(stored)
            if wanted == v.UNKNOWN and not verdict.damaged and stored.outcome != v.UNKNOWN:
                continue
            yield stored, verdict


def _query_mismatch(stored: StoredRecord, query: Query) -> str | None:
    """Which filter of ``query`` the record's own bytes do not satisfy, if any."""
    try:
        rec = stored.record
    except VerificationError:
        return "a record"
    fields: dict[str, Any] = {
        "actor": rec.attr(v.ACTOR_ID),
        "action": rec.attr(v.ACTION),
        "resource_type": rec.attr(v.RESOURCE_TYPE),
        "resource_id": rec.attr(v.RESOURCE_ID),
        "outcome": rec.attr(v.OUTCOME),
        "service": rec.service,
        "trail_id": rec.attr(v.TRAIL_ID),
        "trace_id": rec.trace_id,
        "chain": stored.chain,
    }
    for name, value in fields.items():
        want = getattr(query, name)
        if want is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            continue  # SQL's text form of these is not Python's; nothing to compare safely
        if str(value) != str(want):
            return f"{name} is {want!r}"
    if query.since is not None and rec.start < query.since:
        return "it started after --since"
    if query.until is not None and rec.start >= query.until:
        return "it started before --until"
    return None


def checked(
    records: Iterator[tuple[StoredRecord, Verdict]], damaged: list[Verdict]
) -> Iterator[StoredRecord]:
    """The records that are not damaged; the verdicts of the damaged ones go to ``damaged``."""
    for stored, verdict in records:
        if verdict.damaged:
            damaged.append(verdict)
            continue
        yield stored
