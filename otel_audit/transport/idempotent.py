"""A ledger whose appends store each span once: what makes OTLP retries idempotent.

An OTLP sender retries a request whose answer it did not get (a lost
response, a timeout, a forwarder that crashed before moving its cursor); the
receiver must then store each (trace id, span id) once. The ledger does that
inside the append transaction (``append(..., dedupe=True)``); this wrapper
turns it on for every append of the one commit engine (``LedgerWriter``), so
``serve`` commits through the writer like any process, with no committer of
its own.

The writer expects one position per body. When the transaction skipped
duplicates, the positions are the appended ones padded with the
transaction's head (the chain's head before it when nothing was new): the
last position is always the real head, which is what the writer checkpoints,
and every body is covered by it. Spans are unique across the whole ledger,
so a chain may receive only spans already stored in other chains (a sender's
retry reaching another serve instance): its position is then the genesis
(seq 0), and the checkpoint the writer makes of it, which would cover
nothing, is not stored. Everything else is the wrapped ledger's.

The receiver already knows each record's (trace id, span id): it hands them
over with ``expect`` before queueing the bodies, and ``append`` passes them
to the ledger, which checks each against its body's bytes instead of
parsing every body again (a body without one is parsed, as before).

Checkpoints hash their Merkle leaves from memory, not from the ledger: the
writer cannot keep what it committed when positions are padded, so this
wrapper keeps it instead (``committed_records``): the (seq, body, hash) of each
append whose bodies were all new, in seq order. An append that skipped a
duplicate, or whose seqs are not one run after what is kept, or that
failed, empties it (the checkpointer then reads the ledger back, as before);
each stored checkpoint drops what it covers, and more than ``MAX_KEPT``
(engine/checkpoints.py) bodies are not kept at all.
Thread-safety: the wrapped ledger's (the writer serialises its appends, and
checkpoints on the same thread); the counters are read under a lock, the
keys kept in a dict whose single operations are atomic.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from otel_audit.engine.checkpoints import Kept, drop_covered, keep_committed
from otel_audit.engine.ledger import Appended, Ledger
from otel_audit.engine.ledger.base import SpanKey
from otel_audit.proof.chain import GENESIS, Checkpoint


class IdempotentAppends:
    """Delegates to ``ledger``; ``append`` skips spans already stored, and counts them."""

    #: Positions of skipped duplicates are padded with the head (see above).
    pads_positions = True

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._duplicates = 0
        # body -> its (trace id, span id), from ``expect`` until its append.
        self._keys: dict[bytes, SpanKey] = {}
        # chain -> (seq, body, hash) committed by this wrapper's appends since the
        # last checkpoint, strictly increasing seqs (see above).
        self._committed: dict[str, list[Kept]] = {}

    @property
    def duplicates(self) -> int:
        """Bodies skipped because their span was already stored."""
        with self._lock:
            return self._duplicates

    def expect(self, bodies: Sequence[bytes], keys: Sequence[SpanKey]) -> None:
        """Remember the (trace id, span id) of ``bodies`` about to be queued for ``append``."""
        self._keys.update(zip(bodies, keys))

    def forget(self, bodies: Sequence[bytes]) -> None:
        """Drop the keys of ``bodies`` that will not be appended (their queueing failed)."""
        for body in bodies:
            self._keys.pop(body, None)

    def append(self, chain: str, bodies: Sequence[bytes], *, dedupe: bool = True) -> list[Appended]:
        # Taken out whatever the outcome: a body appended again later (a
        # retried request) is expected again by its own request, else parsed.
        take = self._keys.pop
        keys = [take(body, None) for body in bodies]
        try:
            stored = self._ledger.append(chain, bodies, dedupe=True, keys=keys)
        except BaseException:
            self._committed.pop(chain, None)
            raise
        missing = len(bodies) - len(stored)
        self._keep(chain, bodies, stored, missing)
        if not missing:
            return stored
        with self._lock:
            self._duplicates += missing
        if stored:
            head = stored[-1]
        else:
            # Nothing new. An empty chain whose spans are all stored in other
            # chains has no head; seq 0 is the genesis position.
            head = self._ledger.head(chain) or Appended(chain, 0, GENESIS)
        return stored + [head] * missing

    def _keep(
        self, chain: str, bodies: Sequence[bytes], stored: Sequence[Appended], missing: int
    ) -> None:
        """Keep (seq, body, hash) of an append whose every body was stored, in order."""
        if not stored:
            return  # nothing appended: what is kept is still the chain's
        kept = self._committed.setdefault(chain, [])
        # With a duplicate skipped, which body each position holds is the ledger's secret.
        if missing or not keep_committed(kept, stored, bodies):
            self._committed.pop(chain, None)

    def committed_records(self, chain: str) -> list[Kept]:
        """(seq, body, hash) this wrapper appended to ``chain`` since its last checkpoint, by seq.

        Not necessarily every record of the range (another writer may have
        appended between them): the checkpointer uses them only when they
        are exactly the range it needs.
        """
        return self._committed.get(chain) or []

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        if checkpoint.seq == 0:
            return  # an empty chain: nothing to cover
        self._ledger.add_checkpoint(checkpoint)
        kept = self._committed.get(checkpoint.chain)
        if kept:  # covered now: the next checkpoint starts after it
            drop_covered(kept, checkpoint.seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)
