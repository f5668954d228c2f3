"""One OTLP trace request in, committed records out: the receiver behind every listener.

``AuditReceiver.submit`` parses a request body (``otlp``), keeps the audit
spans (never re-deciding what the sender decided), redacts them with the
policy and encodes them, then queues them on the one commit engine
(``LedgerWriter``, one per chain) and returns at once with a ``Pending``
that completes when every record of the request is durable. Listeners wait
on it in their own way: a thread blocks (``Pending.wait``), an event loop
is called back (``Pending.add_done_callback``). Many requests queued at once
share one transaction and one fsync (group commit); the checkpoints, with
their Merkle root and signature, are the writer's.

Pushback instead of loss: when more records wait for commit than
``max_pending``, a request is refused (``Overloaded``: HTTP 429 / gRPC
UNAVAILABLE); when the ledger cannot be written, or the commit takes longer
than ``commit_timeout``, it is refused as ``Unavailable`` (503): the records
may still commit, and the sender's retry is stored once (``idempotent``).
Nothing accepted is dropped. Thread-safe.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.engine.writer import LedgerWriter, Ticket
from otel_audit.errors import AuditError, ConfigError
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer
from otel_audit.transport.idempotent import IdempotentAppends
from otel_audit.transport.otlp import Rejected, parse_request, records_from_request

#: Default chain of a receiver (``Ledger.default_chain`` of this name).
DEFAULT_CHAIN_NAME = "otel-audit-serve"
#: Largest request body, before and after decompression (the Collector's default).
DEFAULT_MAX_REQUEST_SIZE = 20 * 1024 * 1024
#: Records waiting for commit above which new requests are pushed back.
DEFAULT_MAX_PENDING = 50_000
#: Seconds a pushed-back client is asked to wait.
RETRY_AFTER_SECONDS = 1


class Overloaded(AuditError):
    """More records wait for commit than the receiver accepts: retry later."""


class Unavailable(AuditError):
    """The ledger cannot be written right now: retry later."""


@dataclass(frozen=True)
class ReceiverStats:
    """Counters since start (a snapshot)."""

    requests: int
    spans_received: int
    committed: int
    duplicates: int
    rejected: int
    ignored: int
    pushed_back: int
    failed_commits: int
    checkpoints: int
    #: Ledger transactions that committed records (requests share them).
    commits: int = 0


class Pending:
    """The commit of one request's records; completes once, from the writer thread.

    ``rejected`` are the request's invalid spans (reported as partial success).
    """

    def __init__(self, rejected: list[Rejected], tickets: list[Ticket]) -> None:
        self.rejected = rejected
        self._tickets = tickets
        self._event = threading.Event()
        self._callbacks: list[Callable[[Pending], None]] = []
        self._lock = threading.Lock()
        self._done = False
        if tickets:
            # Tickets resolve in queue order, so the last one resolves last.
            tickets[-1].add_callback(self._resolved)
        else:
            self._resolved(None)

    def _resolved(self, _ticket: Ticket | None) -> None:
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        self._event.set()
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Pending], None]) -> None:
        """Call ``callback(self)`` once complete (at once if it is); it must be quick."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def error(self) -> AuditError | None:
        """Why the request's records were not all committed (None: all durable)."""
        for ticket in self._tickets:
            if ticket.error is not None:
                return Unavailable(f"ledger write failed: {ticket.error}")
        return None

    def wait(self, timeout: float) -> list[Rejected]:
        """Block until durable; returns the rejected spans. Raises Unavailable."""
        if not self._event.wait(timeout):
            # Still queued or committing: the client retries and dedupe keeps one copy.
            raise Unavailable(f"commit did not finish within {timeout:g}s")
        error = self.error()
        if error is not None:
            raise error
        return self.rejected


class AuditReceiver:
    """Protocol-independent core: one OTLP trace request in, committed records out."""

    def __init__(
        self,
        ledger_url: str,
        *,
        chain: str | None = None,
        keep_all: bool = False,
        effects: frozenset[str] | None = None,
        token: str | None = None,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        commit_timeout: float = 30.0,
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        redact: Callable[[Record], Record] | None = None,
    ) -> None:
        if max_request_size <= 0:
            raise ConfigError("max_request_size must be a positive integer")
        if max_pending <= 0:
            raise ConfigError("max_pending must be a positive integer")
        if redact is None:
            # Secrets never reach the ledger (docs/design.md, rule 4), whoever sent them:
            # the same default redaction (or OTEL_AUDIT_POLICY's) as in-process.
            from otel_audit.policy.rules import load_policy

            redact = load_policy().redactor.record
        self._redact = redact
        ledger = open_ledger(ledger_url)
        try:
            self.chain = chain or ledger.default_chain(DEFAULT_CHAIN_NAME)
            self._appends = IdempotentAppends(ledger)
            # The one commit engine: group commit, Merkle-rooted signed
            # checkpoints, fail-closed tickets. Its queue never fills before
            # our own pushback does.
            self.writer = LedgerWriter(
                ledger_url,
                self.chain,
                max_queue_size=max_pending + _MAX_REQUEST_RECORDS,
                checkpoint_every=checkpoint_every,
                checkpoint_interval=checkpoint_interval,
                signer=signer,
                ledger=cast(Ledger, self._appends),
            )
        except BaseException:
            ledger.close()
            raise
        self.keep_all = keep_all
        self.effects = v.DEFAULT_KEPT_EFFECTS if effects is None else frozenset(effects)
        self._token = token.encode("utf-8") if token else None
        self.max_request_size = max_request_size
        self.max_pending = max_pending
        self.commit_timeout = commit_timeout
        self._lock = threading.Lock()
        self._pending = 0
        self._counts = dict.fromkeys(
            ("requests", "spans_received", "rejected", "ignored", "pushed_back"), 0
        )

    @property
    def checkpoint_listeners(self) -> list[Callable[[Checkpoint], None]]:
        """Called with every checkpoint written (e.g. ``anchors`` log emission)."""
        return self.writer.checkpoint_listeners

    @property
    def pending(self) -> int:
        """Records queued for commit and not yet answered."""
        with self._lock:
            return self._pending

    def authorized(self, authorization: str | None) -> bool:
        """True when no token is configured or ``authorization`` is ``Bearer <token>``."""
        if self._token is None:
            return True
        if not authorization:
            return False
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode("utf-8"), self._token)

    def submit(self, body: bytes, json_body: bool = False) -> Pending:
        """Parse, select, redact, encode and queue one request body; does not wait.

        Raises MalformedRequest (not retryable), Overloaded or Unavailable (retryable).
        """
        request = parse_request(body, json_body)
        records, rejected, ignored = records_from_request(
            request, keep_all=self.keep_all, effects=self.effects
        )
        redact = self._redact
        redacted = [redact(r) for r in records]
        bodies = [encode(r) for r in redacted]
        with self._lock:
            self._counts["requests"] += 1
            self._counts["spans_received"] += len(records) + len(rejected) + ignored
            self._counts["rejected"] += len(rejected)
            self._counts["ignored"] += ignored
            # One request larger than the limit is still accepted when nothing
            # waits, or it could never be delivered.
            if self._pending and self._pending + len(bodies) > self.max_pending:
                self._counts["pushed_back"] += 1
                raise Overloaded(f"{self._pending} records are waiting for commit")
            self._pending += len(bodies)
        # The ledger's dedupe checks these against the bodies instead of parsing them.
        self._appends.expect(bodies, [(r.trace_id, r.span_id) for r in redacted])
        tickets: list[Ticket] = []
        try:
            for encoded in bodies:
                tickets.append(self.writer.enqueue(encoded))
        except AuditError as exc:
            # Shut down (or the writer died): what was queued still commits
            # or fails on its own; the client retries and dedupe keeps one copy.
            self._appends.forget(bodies[len(tickets) :])
            self._release(len(bodies) - len(tickets))
            if tickets:
                tickets[-1].add_callback(lambda _t: self._release(len(tickets)))
            raise Unavailable(f"ledger unavailable: {exc}") from exc
        pending = Pending(rejected, tickets)
        count = len(bodies)
        pending.add_done_callback(lambda _p: self._release(count))
        return pending

    def _release(self, count: int) -> None:
        with self._lock:
            self._pending -= count

    def export(self, body: bytes, json_body: bool = False) -> list[Rejected]:
        """``submit`` and wait (at most ``commit_timeout``); returns the rejected spans."""
        return self.submit(body, json_body).wait(self.commit_timeout)

    def stats(self) -> ReceiverStats:
        with self._lock:
            counts = dict(self._counts)
        writer = self.writer.stats()
        duplicates = self._appends.duplicates
        return ReceiverStats(
            **counts,
            committed=writer.committed - duplicates,
            duplicates=duplicates,
            failed_commits=writer.failed,
            checkpoints=writer.checkpoints,
            commits=writer.batches,
        )

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, write the final checkpoint, close the ledger."""
        self.writer.shutdown(timeout)


# Records one request may add past ``max_pending`` (a request is always let
# through when nothing waits); the writer's queue is sized above both.
_MAX_REQUEST_RECORDS = 100_000
