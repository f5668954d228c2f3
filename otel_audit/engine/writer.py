"""LedgerWriter: one thread that commits records in groups, and checkpoints.

Producers append canonical bodies to a queue without taking a lock (a
contended lock convoys the application's threads under the interpreter
lock); the writer thread takes everything queued, appends it in one
transaction (one fsync for all of them) and wakes the waiters: many threads
share each fsync (group commit).

* ``wait=True`` (sync durability): ``write`` returns only after the commit, or
  raises ``LedgerWriteError``; a record that failed is never written later.
* ``wait=False`` (async): ``submit`` returns at once. The queue is bounded and
  never drops: past ``max_queue_size`` the producer blocks. A batch that fails
  to commit is retried with backoff until it commits or the writer shuts down.
* While the last commit failed, ``healthy`` is False so audited actions can
  refuse to start (fail-closed).

An ``inline`` writer has no thread: its owner calls ``turn`` (the writer
process's worker, which builds and commits records on one thread).

Thread-safe. Fork-safe: the child starts with an empty queue, its own ledger
connection and its own thread (records queued before the fork are the
parent's to write).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from otel_audit.engine.checkpoints import (
    Checkpointer,
    Kept,
    SignerRefused,
    drop_covered,
    keep_committed,
)
from otel_audit.engine.ledger import Appended, Ledger, open_ledger
from otel_audit.errors import AuditError, LedgerUnavailable, LedgerWriteError
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer

_log = logging.getLogger("otel_audit")

_MAX_BACKOFF = 2.0
# Connections inherited across fork are kept referenced, never used or closed:
# closing a SQLite handle in the child could disturb the parent's locks.
_INHERITED: list[object] = []


# Orders add_callback against resolve; held for a few instructions only.
_CALLBACK_LOCK = threading.Lock()


class Waitable(Protocol):
    """What ``Ticket.wait`` needs of a writer: its name and the thread that answers tickets."""

    url: str
    _thread: threading.Thread | None

    def wake(self) -> None: ...

    def answers_here(self) -> bool: ...

    def lead(self, ticket: Ticket) -> bool: ...

    def withdraw(self, ticket: Ticket) -> bool: ...


class Ticket:
    """The fate of one queued record: resolved once by the writer thread.

    ``wait`` blocks a thread; ``add_callback`` lets an event loop be woken
    instead (the callback runs on the writer thread and must be quick).
    Thread-safe.
    """

    __slots__ = ("lock", "error", "appended", "_callbacks", "_done", "queued", "withdrawn")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.error: AuditError | None = None
        self.appended: Appended | None = None
        self._callbacks: list[Callable[[Ticket], None]] | None = None
        self._done = False
        #: Still in the writer's queue (not yet taken into a commit).
        self.queued = True
        #: Its waiter was refused (``LedgerWriter.withdraw``): never written from then on.
        self.withdrawn = False

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, appended: Appended | None, error: AuditError | None) -> None:
        self.appended, self.error = appended, error
        with _CALLBACK_LOCK:
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
        self.lock.release()
        for callback in callbacks or ():
            safe(callback, self)

    def add_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Call ``callback(ticket)`` once resolved (at once if it already is)."""
        with _CALLBACK_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def wait(self, writer: Waitable) -> Appended:
        """Block until resolved; raise its error (LedgerWriteError) if it was not committed."""
        if not self.lock.acquire(blocking=False):
            if writer.answers_here():
                # A finalizer (garbage collection) run on the very thread that
                # would answer (the writer thread, or one leading a commit):
                # waiting would hang it, and every action with it. Its record
                # is taken back and failed, so it is not written later (a
                # failed record never is); one a commit already holds may be.
                if writer.withdraw(self):
                    assert self.error is not None
                    raise self.error
                raise LedgerWriteError(
                    f"audit record waited for on the thread committing to {writer.url},"
                    " in the commit that holds it: it may still be stored"
                )
            # A record queued without waking the writer (``enqueue(lazy=True)``)
            # is committed no later than its first waiter asks for it: by the
            # waiter itself where it can (LedgerWriter.lead), else by the writer.
            if not writer.lead(self):
                writer.wake()
            while not self.lock.acquire(timeout=1.0):
                thread = writer._thread
                if thread is None or not thread.is_alive():
                    # The writer is gone; it may have answered just before it went.
                    if self.lock.acquire(blocking=False):
                        break
                    raise LedgerWriteError(f"audit writer for {writer.url} stopped before commit")
        self.lock.release()  # a resolved ticket stays resolved for any later waiter
        if self.error is not None:
            raise self.error
        assert self.appended is not None
        return self.appended


class _Item:
    """One queued record; compared by identity, so a producer can take back its own."""

    __slots__ = ("body", "ticket", "retry", "after")

    def __init__(
        self, body: bytes, ticket: Ticket | None, retry: bool, after: list[Ticket] | None = None
    ) -> None:
        self.body = body
        self.ticket = ticket
        #: Kept for a retry when a commit fails (async records), instead of failed at once.
        self.retry = retry
        #: Records queued before this one that it must not be written without.
        self.after = after


_WITHDRAWN = "audit record not written: waited for on the thread committing to {url}"
_ORPHAN = (
    "audit record not written: a record it must be written with"
    " (an effect of the same action) was not"
)

_MAX_BATCH = 8192
# The longest an idle writer sleeps without looking at its queue: a record
# queued lazily whose waiter never came (an action abandoned) still commits.
_LINGER = 1.0


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of the writer's counters (all since start or fork)."""

    submitted: int
    committed: int
    failed: int
    retries: int
    batches: int
    checkpoints: int
    checkpoint_errors: int
    queue_depth: int
    healthy: bool
    last_error: str | None
    commit_latency_p50_ms: float
    commit_latency_p99_ms: float


class LedgerWriter:
    """Group-commits canonical record bodies to one chain of a ledger."""

    def __init__(
        self,
        ledger_url: str,
        chain: str,
        *,
        max_queue_size: int = 8192,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        signer: Signer | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        if max_queue_size <= 0:
            raise ValueError("max_queue_size must be a positive integer.")
        self.url = ledger_url
        self.chain = chain
        self.max_queue_size = max_queue_size
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.signer = signer
        self.probe_interval = 1.0
        #: No thread of its own: whoever owns the writer calls ``turn`` (the
        #: writer process's worker, which builds and commits on one thread).
        self.inline = False
        self.checkpoint_listeners: list[Callable[[Checkpoint], None]] = []
        self.commit_listeners: list[Callable[[float, int], None]] = []
        #: Called on the writer thread once a batch's tickets are resolved
        #: (committed or failed): the writer process answers a batch at a time.
        self.resolved_listeners: list[Callable[[], None]] = []
        # Open now so a bad URL, a missing directory or a read-only file fails
        # configure(), not the first audited action.
        self._ledger: Ledger | None = ledger or open_ledger(ledger_url)
        # Held around every ledger transaction, and by fork(): a child must
        # never inherit a connection in the middle of a transaction (SQLite's
        # in-process lock state would then refuse the child's own writes).
        self._io_lock = threading.Lock()
        self._reset_state()
        weak_child = weakref.WeakMethod(self._after_fork)
        weak_self = weakref.ref(self)

        def _before() -> None:
            writer = weak_self()
            if writer is not None:
                writer._io_lock.acquire()

        def _parent() -> None:
            writer = weak_self()
            if writer is not None and writer._io_lock.locked():
                writer._io_lock.release()

        def _child() -> None:
            method = weak_child()
            if method is not None:
                method()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_before, after_in_parent=_parent, after_in_child=_child)

    def _reset_state(self) -> None:
        # _cond: for producers waiting on a full queue and for flush(); the
        # writer notifies it once per commit. The hot path takes no lock.
        self._cond = threading.Condition(threading.Lock())
        self._start_lock = threading.Lock()
        self._queue: deque[_Item] = deque()
        # Held by whoever commits (the writer thread or a leading waiter) and
        # around checkpoints: one commit at a time, in queue order.
        self._commit_lock = threading.Lock()
        # Set on a thread for as long as it may hold _commit_lock in ``lead``
        # or _start_lock while it starts the writer (``_answering``).
        self._leading = threading.local()
        self._wake = threading.Event()
        self._retry: list[_Item] | None = None
        self._inflight = 0
        # One entry per record ``withdraw`` failed (stats counts them as
        # failed; appending needs no lock); and whether any record was ever
        # withdrawn, so that every commit from then on looks for the marks.
        self._withdrawn: deque[None] = deque()
        self._withdrawals = False
        self._retry_at = 0.0  # inline: when the next attempt after a failure is due
        self._backoff = 0.05
        self._closed = False
        # Shutdown has begun: new actions are refused (``check``) so that the
        # flush ends; records of actions already running are still taken.
        self._draining = False
        self._thread: threading.Thread | None = None
        self._healthy = True
        self._refuse_until = 0.0
        self._last_error: str | None = None
        self._latencies: deque[float] = deque(maxlen=10_000)
        self._counts = dict.fromkeys(
            (
                "submitted",
                "committed",
                "failed",
                "retries",
                "batches",
                "checkpoints",
                "checkpoint_errors",
            ),
            0,
        )
        self._since_checkpoint = 0
        self._checkpoint_due = False
        self._checkpoint_failed = False
        self._last_checkpoint = time.monotonic()
        self._last_checkpoint_error: str | None = None
        self._last_appended: Appended | None = None
        self._recent: list[Kept] = []
        self._checkpointer: Checkpointer | None = None

    def _after_fork(self) -> None:
        self._io_lock = threading.Lock()  # the inherited one is held by fork
        if self._ledger is not None:
            _INHERITED.append(self._ledger)
        self._ledger = None
        self._reset_state()

    # -- producer side -------------------------------------------------

    def _thread_dead(self) -> bool:
        thread = self._thread
        return thread is not None and not thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False while the ledger cannot be written (or after shutdown)."""
        return self._healthy and not self._closed and not self._thread_dead()

    @property
    def last_error(self) -> str | None:
        """Why the last failed commit (or writer loop) failed; None if none has failed."""
        return self._last_error

    def check(self) -> None:
        """Raise LedgerUnavailable when new audited actions should be refused.

        After a failed commit, actions are refused for ``probe_interval``
        seconds; then one is let through, and its own write is the probe
        (a circuit breaker: no action proceeds unrecorded, and the writer
        recovers by itself once the ledger can be written again).
        """
        if self._closed or self._draining:
            raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        if self._thread_dead():
            raise LedgerUnavailable(f"audit writer for {self.url} has stopped: {self._last_error}")
        if not self._healthy and time.monotonic() < self._refuse_until:
            raise LedgerUnavailable(f"audit ledger {self.url} is unavailable: {self._last_error}")

    def _enqueue(
        self,
        body: bytes,
        wait: bool,
        retry: bool = False,
        wake: bool = True,
        after: list[Ticket] | None = None,
    ) -> Ticket | None:
        if self._closed:
            raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        if self._thread is None and not self.inline and not self.answers_here():
            # Started before the record is queued: if the ledger cannot be
            # opened, the caller is told and nothing is left behind. A
            # finalizer run on this thread while it starts the writer queues
            # its record for that writer (waiting for it raises).
            with self._answering(), self._start_lock:
                if self._closed:
                    raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
                if self._thread is None:
                    self._start()
        if (
            len(self._queue) >= self.max_queue_size
            and not self.inline
            and not self.answers_here()  # a finalizer there: it would wait for itself
        ):
            # Full: block (never drop) until the writer has made room. The
            # bound is approximate: producers woken together may pass it by
            # at most their number.
            self.wake()  # lazy records wake nobody: a full queue must
            with self._cond:
                while len(self._queue) >= self.max_queue_size and not self._closed:
                    if self._thread_dead():
                        raise LedgerUnavailable(
                            f"audit writer for {self.url} has stopped: {self._last_error}"
                        )
                    self._cond.wait(0.5)
            if self._closed:
                raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        ticket = Ticket() if wait else None
        item = _Item(body, ticket, retry or not wait, after)
        self._queue.append(item)  # atomic: no lock on the hot path
        if wake:
            self.wake()
        if self._closed:
            # Shutdown raced this append: take the record back if the writer
            # has not; if it has, the writer (or the final drain) answers it.
            try:
                self._queue.remove(item)
            except ValueError:
                pass
            else:
                raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        return ticket

    def submit(self, body: bytes) -> None:
        """Queue ``body`` for commit (async); blocks while the queue is full, never drops."""
        self._enqueue(body, False)

    def enqueue(
        self,
        body: bytes,
        *,
        retry: bool = False,
        lazy: bool = False,
        after: list[Ticket] | None = None,
    ) -> Ticket:
        """Queue ``body`` and return its ticket without waiting (sync at the action boundary).

        ``retry``: a failed commit is retried like an async record's (the
        ticket resolves once it commits, or fails at shutdown) instead of
        failing the ticket at once; the writer process acknowledges async
        records this way.

        ``lazy``: do not wake the writer for this record: it joins the next
        commit, which the ticket's first waiter (``Ticket.wait``), any other
        record, a flush or the writer's linger starts. An action's effects
        are queued so, and committed together in one transaction at its exit
        instead of one each as they end.

        ``after``: tickets of records queued earlier on this writer that this
        one must not be written without. Records queued earlier are committed
        in the same transaction or an earlier one; if one of those failed,
        this record is not written either and its ticket fails. An action's
        own record is queued so after its effects: a record that says the
        action succeeded never stands in the ledger without them.
        """
        ticket = self._enqueue(body, True, retry, not lazy, after)
        assert ticket is not None
        return ticket

    def write(self, body: bytes) -> Appended:
        """Commit ``body`` durably (sync); raises LedgerWriteError when it was not."""
        return self.enqueue(body).wait(self)

    def wake(self) -> None:
        """Start a commit of what is queued, if the writer is idle."""
        # Not from the writer thread: it is running, and a finalizer run there
        # may hold the event's own lock.
        if not self._wake.is_set() and threading.current_thread() is not self._thread:
            self._wake.set()

    def lead(self, ticket: Ticket) -> bool:
        """Commit what is queued, ``ticket``'s record with it, on the calling thread
        when no commit is under way (no hand-over to the writer thread and
        back). True once ``ticket`` is answered or taken into a commit (its
        committer answers it); False when the caller should wake the writer
        thread and wait: a commit is under way (the writer thread's next one
        takes all that queued meanwhile, in one transaction), a retry is
        pending, or this is the main thread, where a signal's exception
        (KeyboardInterrupt) could stop a commit between the ledger and the
        tickets it answers.
        """
        if self.inline or threading.current_thread() is threading.main_thread():
            return False
        with self._answering():
            if not self._commit_lock.acquire(blocking=False):
                return False
            try:
                # In turns until the ticket is taken: a batch holds at most
                # _MAX_BATCH records, and the ticket's may lie beyond.
                while ticket.queued and not ticket._done:
                    if self._closed or self._retry is not None or self._thread_dead():
                        return False
                    items = self._drain()
                    if not items:
                        return False
                    try:
                        self._commit(items, checkpoint=False)
                    except Exception as exc:  # as the writer thread: outlive any bug
                        self._loop_failed(exc)
            finally:
                self._commit_lock.release()
        # Records queued meanwhile are their waiters' to lead (or the writer's,
        # woken by them); a retry and a checkpoint are the writer thread's.
        if self._retry is not None or self._checkpoint_due:
            self.wake()
        return True

    def withdraw(self, ticket: Ticket) -> bool:
        """Take ``ticket``'s record out of the queue and fail its ticket: True,
        unless a commit has taken it. Records queued ``after`` it are refused
        when drained, as is the record itself if a commit drains it first.

        Called on the thread that answers tickets (a finalizer there), which
        may hold ``_cond`` below it: no lock is taken here. The ticket is
        marked before it leaves the queue, so a commit that drains it or a
        record queued after it sees the mark (``_refuse_orphans``).
        """
        ticket.withdrawn = True
        self._withdrawals = True
        item = next((i for i in list(self._queue) if i.ticket is ticket), None)
        if item is None:
            return False
        try:
            self._queue.remove(item)
        except ValueError:  # drained meanwhile: its commit refuses it, or has written it
            return False
        self._withdrawn.append(None)  # counted as failed (stats); atomic, no lock
        ticket.resolve(None, LedgerWriteError(_WITHDRAWN.format(url=self.url)))
        return True

    @contextmanager
    def _answering(self) -> Iterator[None]:
        """Mark this thread as the one that answers (``answers_here``) for the
        block: raised before a lock is tried and lowered after it is released,
        so a finalizer run here in between never waits for what this thread
        holds up (Ticket.wait raises instead)."""
        self._leading.on = True
        try:
            yield
        finally:
            self._leading.on = False

    def answers_here(self) -> bool:
        """The calling thread is the one that would answer a ticket: the writer
        thread, or one leading a commit (or starting the writer). A wait here
        could never end."""
        return self._thread is threading.current_thread() or getattr(self._leading, "on", False)

    def write_many(self, bodies: list[bytes]) -> list[Appended]:
        """Commit ``bodies`` durably, in order, waiting once; raises on the first not committed."""
        tickets = [self.enqueue(body) for body in bodies]
        return [ticket.wait(self) for ticket in tickets]

    # -- writer thread -------------------------------------------------

    def _start(self) -> None:
        if self._ledger is None:
            with self._io_lock:  # opening writes the schema: never across a fork
                self._ledger = open_ledger(self.url)
        thread = threading.Thread(target=self._run, name="otel-audit-writer", daemon=True)
        thread.start()
        self._thread = thread

    def _drain(self) -> list[_Item]:
        items: list[_Item] = []
        queue = self._queue
        while queue and len(items) < _MAX_BATCH:
            # Counted in flight before it leaves the queue, so flush() never
            # sees a moment where a record is in neither.
            self._inflight += 1
            try:
                item = queue.popleft()
            except IndexError:  # a producer took its item back meanwhile
                self._inflight -= 1
                break
            if item.ticket is not None:
                item.ticket.queued = False
            items.append(item)
        return items

    def _idle_wait(self) -> None:
        """Sleep until a record is queued, shutdown, or a timed checkpoint is due."""
        timeout: float | None = None
        if self._since_checkpoint:
            timeout = self._last_checkpoint + self.checkpoint_interval - time.monotonic()
            if timeout <= 0:
                with self._commit_lock:
                    self._checkpoint()
                return
        # Clear, then look again: a producer that appended after the look sees
        # the flag down and raises it, so no wake-up is ever lost.
        self._wake.clear()
        if self._queue or self._closed:
            return
        self._wake.wait(_LINGER if timeout is None else min(timeout, _LINGER))

    def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                result = self._step()
                if result is None:
                    return
                if result:
                    backoff = 0.05
                    continue
            except Exception as exc:  # the writer thread must outlive any bug
                self._loop_failed(exc)
            if self._closed and not self._queue and self._retry is None:
                return
            if self._closed and self._retry is not None:
                retry, self._retry = self._retry, None
                self._abandon(retry)
                continue
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _loop_failed(self, exc: Exception) -> None:
        self._healthy = False
        self._refuse_until = time.monotonic() + self.probe_interval
        self._last_error = f"audit writer error: {exc!r}"
        _log.exception("otel-audit: writer loop failed; retrying")

    def turn(self) -> float | None:
        """One round of the writer loop on the calling thread (``inline`` writers).

        Commits what is queued (one attempt; after a failed one, the next
        waits out the same backoff as the writer thread's) and makes a timed
        checkpoint when one is due. Returns the seconds until the next round
        is due: 0 when more is queued, None when nothing is until something
        is queued.
        """
        if self._queue or self._retry is not None:
            if time.monotonic() >= self._retry_at:
                try:
                    committed = bool(self._step())
                except Exception as exc:  # as the writer thread: outlive any bug
                    self._loop_failed(exc)
                    committed = False
                if committed:
                    self._backoff = 0.05
                    self._retry_at = 0.0
                else:
                    self._retry_at = time.monotonic() + self._backoff
                    self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
            if self._queue or self._retry is not None:
                return max(0.0, self._retry_at - time.monotonic())
        if not self._since_checkpoint:
            return None
        due = self._last_checkpoint + self.checkpoint_interval - time.monotonic()
        if due > 0:
            return due
        with self._commit_lock:
            self._checkpoint()
        return self.checkpoint_interval if self._since_checkpoint else None

    def _step(self) -> bool | None:
        """One round: commit what is queued, or idle. False when a commit failed,
        None when the writer is closed and has nothing left to do."""
        with self._commit_lock:
            if self._retry is not None:
                # Retried async records first, in order; records queued since go
                # with them, so a sync record fails at once instead of waiting out
                # the outage behind the retry.
                items, self._retry = self._retry, None
                items += self._drain()
            else:
                items = self._drain()
            if items:
                return self._commit(items)
            if self._closed and not self._queue:
                self._checkpoint()
                self._notify()
                return None
            if self._checkpoint_due:  # by count, after commits led by waiters (``lead``)
                self._checkpoint()
                return True
        self._idle_wait()
        return True

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _refuse_orphans(self, items: list[_Item]) -> list[_Item]:
        """``items`` without those queued ``after`` a record that failed or was
        withdrawn, and without withdrawn ones; those fail now.

        What they depend on was queued before them: it is in this batch (one
        transaction with them) or an earlier one, whose tickets are answered,
        or it was withdrawn (marked before it left the queue).
        """
        kept: list[_Item] = []
        refused: list[tuple[_Item, str]] = []
        for item in items:
            own = item.ticket
            after = item.after
            if own is not None and own.withdrawn:
                refused.append((item, _WITHDRAWN.format(url=self.url)))
            elif after and any(t.error is not None or t.withdrawn for t in after):
                refused.append((item, _ORPHAN))
            else:
                kept.append(item)
        if refused:
            with self._cond:
                self._counts["failed"] += len(refused)
                self._inflight -= len(refused)
                self._cond.notify_all()
            for item, message in refused:
                if item.ticket is not None:
                    item.ticket.resolve(None, LedgerWriteError(message))
        return kept

    def _commit(self, items: list[_Item], checkpoint: bool = True) -> bool:
        assert self._ledger is not None
        if self._withdrawals or (self._counts["failed"] and any(item.after for item in items)):
            items = self._refuse_orphans(items)
            if not items:
                return True
        started = time.perf_counter()
        try:
            bodies = [item.body for item in items]
            with self._io_lock:
                appended = self._ledger.append(self.chain, bodies)
        except AuditError as exc:
            error: AuditError = exc
        except Exception as exc:  # a backend bug must not kill the writer thread
            error = LedgerWriteError(f"audit ledger write failed: {exc!r}")
        else:
            elapsed = time.perf_counter() - started
            self._latencies.append(elapsed)
            for listener in self.commit_listeners:
                safe(listener, elapsed, len(appended))
            self._since_checkpoint += len(appended)
            if appended:
                self._last_appended = appended[-1]
                # What the next checkpoint's Merkle leaves are hashed from
                # (engine/checkpoints.py), instead of reading them back.
                if (
                    self._ledger.pads_positions
                    or len(appended) != len(items)
                    or not keep_committed(self._recent, appended, bodies)
                ):
                    self._recent.clear()  # the checkpointer reads the ledger instead
            # Counters and the in-flight count change together, under the
            # lock stats() and flush() read them with, before anyone is woken.
            with self._cond:
                self._counts["committed"] += len(appended)
                self._counts["batches"] += 1
                self._healthy = True
                self._inflight = 0
                self._cond.notify_all()
            for item, where in zip(items, appended):
                if item.ticket is not None:
                    item.ticket.resolve(where, None)
            for resolved in self.resolved_listeners:
                safe(resolved)
            if self._since_checkpoint >= self.checkpoint_every and not self._checkpoint_backoff():
                if checkpoint:
                    self._checkpoint()
                else:  # the writer thread's (``lead`` wakes it): once per such commit
                    self._checkpoint_due = True
            return True
        return self._fail(items, error)

    def _fail(self, items: list[_Item], error: AuditError) -> bool:
        """Fail the sync records of ``items`` now; keep the async ones for a retry."""
        _log.error("otel-audit: %s", error)
        failure = error if isinstance(error, LedgerWriteError) else LedgerWriteError(str(error))
        keep = [item for item in items if item.retry]
        with self._cond:
            self._healthy = False
            self._refuse_until = time.monotonic() + self.probe_interval
            self._last_error = str(error)
            self._counts["failed"] += len(items) - len(keep)
            if keep:
                self._counts["retries"] += 1
            self._retry = keep or None
            self._inflight = len(keep)
            self._cond.notify_all()
        for item in items:
            if item.ticket is not None and not item.retry:
                item.ticket.resolve(None, failure)
        for resolved in self.resolved_listeners:
            safe(resolved)
        return not keep

    def _abandon(self, items: list[_Item]) -> None:
        # Shutdown while the ledger is down: these records are lost, and
        # that is said loudly and counted, never silently.
        error = LedgerWriteError(f"not committed before shutdown: {self._last_error}")
        with self._cond:
            self._counts["failed"] += len(items)
            self._inflight = 0
            self._cond.notify_all()
        for item in items:
            if item.ticket is not None:
                item.ticket.resolve(None, error)
        for resolved in self.resolved_listeners:
            safe(resolved)
        _log.error(
            "otel-audit: %d audit records were not committed to %s before shutdown: %s",
            len(items),
            self.url,
            self._last_error,
        )

    def _checkpoint_backoff(self) -> bool:
        """A checkpoint failed less than an interval ago: the next try is the timed
        one, not one after every commit (a refusing signer would alert on each)."""
        return (
            self._checkpoint_failed
            and time.monotonic() - self._last_checkpoint < self.checkpoint_interval
        )

    def _checkpoint(self) -> None:
        self._checkpoint_due = False
        head = self._last_appended
        if head is None or self._since_checkpoint == 0 or self._ledger is None:
            self._last_checkpoint = time.monotonic()
            return
        # Made in one place (engine/checkpoints.py): Merkle root, link, the
        # signer's rollback check, signature, storage. The checkpointer keeps
        # its frontier between checkpoints, so each costs only the records since.
        checkpointer = self._checkpointer
        if checkpointer is None or checkpointer.signer is not self.signer:
            checkpointer = self._checkpointer = Checkpointer(self.chain, self.signer)
        try:
            checkpoint = checkpointer.make(self._ledger, head, self._io_lock, self._recent)
        except Exception as exc:  # any failure: count, back off, never kill the writer
            self._checkpoint_failed = True
            with self._cond:
                self._counts["checkpoint_errors"] += 1
            # Try again after the interval, not at once: a timed checkpoint that
            # keeps failing must not spin the writer thread or flood the log.
            self._last_checkpoint = time.monotonic()
            if isinstance(exc, SignerRefused):
                # An alert, every time: the ledger was rolled back or rewritten.
                _log.error("otel-audit: ALERT: %s", exc)
            elif str(exc) != self._last_checkpoint_error:
                self._last_checkpoint_error = str(exc)
                _log.error("otel-audit: checkpoint failed (retrying every %ss): %s",
                           self.checkpoint_interval, exc)  # fmt: skip
            return
        self._last_checkpoint_error = None
        self._checkpoint_failed = False
        self._since_checkpoint = 0
        drop_covered(self._recent, head.seq)
        self._last_checkpoint = time.monotonic()
        if checkpoint is None:  # another process already signed this head or a later one
            return
        with self._cond:
            self._counts["checkpoints"] += 1
        for listener in self.checkpoint_listeners:
            safe(listener, checkpoint)

    # -- lifecycle -----------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._queue or self._inflight or self._retry)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (or failed)."""
        self.wake()
        return wait_idle(
            self._cond,
            self._busy,
            lambda: self._thread is not None and self._thread.is_alive(),
            timeout,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Commit what is queued, write a final checkpoint, stop the thread, close.

        ``timeout`` bounds the whole shutdown (flush and join together).
        """
        deadline = time.monotonic() + timeout
        self._draining = True  # a process under load must still stop: no new actions
        if self.inline:  # commit (and retry) what is queued, on this thread
            while self._busy() and time.monotonic() < deadline:
                wait = self.turn()
                if wait and self._busy():  # a retry's backoff (not the next checkpoint)
                    time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        self.flush(timeout)
        # Under the start lock: a producer cannot start (or restart) the
        # writer thread once shutdown has begun.
        with self._start_lock:
            with self._cond:
                if self._closed:
                    return
                self._closed = True
                self._cond.notify_all()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        elif self._since_checkpoint:
            with self._commit_lock:
                self._checkpoint()
        if thread is not None and thread.is_alive():
            pending = len(self._queue) + self._inflight
            _log.error(
                "otel-audit: writer for %s did not stop within %ss; %d records still pending",
                self.url,
                timeout,
                pending,
            )
            return
        # Producers that raced the shutdown, or a writer that gave up: what is
        # still queued is answered, never left hanging. Taken one by one, so
        # each record belongs either to its producer's take-back or to here.
        leftovers = list(self._retry or [])
        self._retry = None
        while True:
            try:
                leftovers.append(self._queue.popleft())
            except IndexError:
                break
        if leftovers:
            self._abandon(leftovers)
        with self._io_lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None

    def stats(self, latencies: bool = True) -> WriterStats:
        """A snapshot of the counters (``queue_depth`` may include records being queued).

        ``latencies=False`` leaves the commit latency percentiles at 0 (they
        sort the last 10,000 latencies: the writer process answers every
        commit with its counters and adds the percentiles once a second).
        """
        with self._cond:
            counts = dict(self._counts)
            depth = len(self._queue) + self._inflight
        counts["failed"] += len(self._withdrawn)
        ordered = sorted(list(self._latencies)) if latencies else []
        counts["submitted"] = counts["committed"] + counts["failed"] + depth
        return WriterStats(
            **counts,
            queue_depth=depth,
            healthy=self.healthy,
            last_error=self._last_error,
            commit_latency_p50_ms=_percentile(ordered, 0.50) * 1000,
            commit_latency_p99_ms=_percentile(ordered, 0.99) * 1000,
        )


def wait_idle(
    cond: threading.Condition,
    busy: Callable[[], bool],
    alive: Callable[[], bool],
    timeout: float | None,
) -> bool:
    """Wait on ``cond`` until not ``busy()``: False at the timeout or once not ``alive()``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        while busy():
            if not alive():
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            cond.wait(0.5 if remaining is None else min(remaining, 0.5))
    return True


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def safe(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except Exception:  # a listener must never stop the writer
        _log.exception("otel-audit: listener failed")
