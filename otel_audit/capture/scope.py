"""The action scope: what one audited action owns, carried in the OpenTelemetry context.

``audit_action`` (and the Flask integration's request action) opens a scope
and attaches it to the context with the action's span. Because it lives in
the context (contextvars), it travels wherever the context travels: into
``asyncio`` tasks, ``asyncio.to_thread``, executors and threads that carry a
copied context. The processor finds the scope of each span it ends and puts
there the ticket of the span's record (sync durability) or its failure.

At the action's exit the scope is *settled*: the action waits once for every
record of its effects and its own (one commit per action, not per record,
with group commit shared between actions; its own record is queued after
the effects still pending and never written without them, ``pending``), and
an action returns normally only if every one of them is durable; otherwise
it raises, and an outcome record written for it says it failed
(docs/design.md, rule 2). A record that ends after its action has exited (a
fire-and-forget thread) is written synchronously by the thread that ends it.

Thread-safe.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from otel_audit.errors import AuditError, CommitUncertain, LedgerWriteError

if TYPE_CHECKING:
    from otel_audit.engine.writer import Ticket
    from otel_audit.engine.writer import Waitable as LedgerWriter
    from otel_audit.setup import AuditPipeline

_SCOPE_KEY = otel_context.create_key("otel_audit.scope")
SCOPE_KEY = _SCOPE_KEY  # for the processor's one-lookup on_start


class ActionScope:
    """Pending records and failures of one audited action; see the module docstring."""

    __slots__ = (
        "pipeline", "trail_id", "span_id", "parent", "_lock", "_tickets", "_failures", "_open",
        "_pid", "together", "_settled", "own_ticket", "_effects",
    )  # fmt: skip

    def __init__(
        self,
        pipeline: AuditPipeline | None,
        trail_id: str,
        span_id: int,
        parent: ActionScope | None = None,
    ) -> None:
        self.pipeline = pipeline
        #: The enclosing action: a lost record here fails it too, even if the
        #: code between them catches the error.
        self.parent = parent
        self.trail_id = trail_id
        #: The action's own span: its record is settled apart (after the effects).
        self.span_id = span_id
        self._lock = threading.Lock()
        self._tickets: list[tuple[LedgerWriter, Ticket]] = []
        self._failures: list[AuditError] = []
        self._open = True
        #: The action's own record is committed with its effects, in one
        #: transaction, and is never written when one of them was not (the
        #: Flask request's scope with the thread writer; ``pending``).
        self.together = False
        # The action has waited for its own record: a later one is the ending
        # thread's to wait for (a streamed response ends after its request).
        self._settled = False
        #: The ticket of the action's own record, once handed in.
        self.own_ticket: Ticket | None = None
        # Every effect's ticket (kept after settling: own_record_lost asks later).
        self._effects: list[Ticket] = []
        # A forked child inherits the context, and this scope with it, but not
        # the action: nobody in the child would ever wait for its records.
        self._pid = os.getpid()

    def add_ticket(self, writer: LedgerWriter, ticket: Ticket, own: bool = False) -> bool:
        """Hand a queued record to the action; False when the action has already exited.

        ``own``: the action's own record, accepted until the action has settled it.
        False too in a forked child: the thread that ends the span waits for it.
        """
        with self._lock:
            if (not self._open and not own) or (own and self._settled) or self._pid != os.getpid():
                return False
            self._tickets.append((writer, ticket))
            if own:
                self.own_ticket = ticket
            elif self.together:
                self._effects.append(ticket)
            return True

    def fail(self, error: AuditError) -> None:
        """Note that a record of this action (or one of its effects) was not written."""
        with self._lock:
            self._failures.append(error)

    def pending(self, writer: LedgerWriter) -> list[Ticket]:
        """What the action's own record is written after (``LedgerWriter.enqueue(after=)``):
        the tickets handed in so far for ``writer`` not yet answered, or failed."""
        with self._lock:
            return [t for w, t in self._tickets if w is writer and (not t.done or t.error)]

    def own_record_lost(self) -> bool:
        """The action's own record was not written (refused after its effects, or
        failed with them), and a record of one of its effects was not written
        either: the action's record must then say so. Not for a commit that went
        through unconfirmed (``CommitUncertain``), nor for an own record that
        failed alone (its action raises; there is nothing more to say)."""
        own = self.own_ticket
        if own is None or not own.done or own.error is None:
            return False
        if isinstance(own.error, CommitUncertain):
            return False
        with self._lock:
            return any(t.done and t.error is not None for t in self._effects)

    def finish(self) -> None:
        """The action has waited for its own record; one ending later is not handed in."""
        with self._lock:
            self._open = False
            self._settled = True

    def _take(self) -> list[tuple[LedgerWriter, Ticket]]:
        with self._lock:
            tickets, self._tickets = self._tickets, []
            return tickets

    def close(self) -> None:
        """No more records join the action; later ones are written by the thread ending them."""
        with self._lock:
            self._open = False

    def _collect(self, tickets: list[tuple[LedgerWriter, Ticket]]) -> None:
        for _writer, ticket in tickets:
            if ticket.error is not None:
                self.fail(ticket.error)

    def settle(self) -> AuditError | None:
        """Wait for every record handed in so far; the first failure, if any."""
        for writer, ticket in self._take():
            try:
                ticket.wait(writer)
            except AuditError as exc:
                self.fail(exc)
            except Exception as exc:  # never let a bug pass as success
                self.fail(LedgerWriteError(f"audit record not confirmed: {exc!r}"))
        return self.failure()

    async def settle_async(self) -> AuditError | None:
        """``settle`` without blocking the event loop: the writer thread wakes the loop."""
        tickets = self._take()
        pending = [t for _w, t in tickets if not t.done]
        if pending:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            remaining = [len(pending)]
            counter = threading.Lock()

            def one_done(_ticket: Ticket) -> None:
                with counter:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    loop.call_soon_threadsafe(_finish, done)

            for ticket in pending:
                ticket.add_callback(one_done)
            for writer, ticket in tickets:
                if not ticket.done:
                    writer.wake()  # records queued lazily (Ticket.wait does this for threads)
            await _wait_or_writer_gone(done, tickets)
        for writer, ticket in tickets:
            if not ticket.done:
                self.fail(LedgerWriteError(f"audit writer for {writer.url} stopped before commit"))
        self._collect(tickets)
        return self.failure()

    def propagate(self, error: AuditError) -> None:
        if self.parent is not None:
            self.parent.fail(error)

    def known_failure(self) -> AuditError | None:
        """The first failure known without waiting: a record that could not be
        built, or one whose commit has already failed."""
        with self._lock:
            if self._failures:
                return self._failures[0]
            for _writer, ticket in self._tickets:
                if ticket.done and ticket.error is not None:
                    return ticket.error
        return None

    def failure(self) -> AuditError | None:
        with self._lock:
            return self._failures[0] if self._failures else None


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait_or_writer_gone(
    done: asyncio.Future[None], tickets: list[tuple[LedgerWriter, Ticket]]
) -> None:
    # The writer resolves every ticket, even on failure or shutdown; a dead
    # writer thread (a bug) is the one case where nobody would: look each second.
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(done), 1.0)
            return
        except asyncio.TimeoutError:
            for writer, ticket in tickets:
                thread = writer._thread
                if not ticket.done and (thread is None or not thread.is_alive()):
                    return


def current_scope(ctx: Context | None = None) -> ActionScope | None:
    """The scope of the innermost audited action of ``ctx`` (default: current), or None."""
    scope = otel_context.get_value(_SCOPE_KEY, ctx)
    return scope if isinstance(scope, ActionScope) else None


def with_scope(scope: ActionScope, ctx: Context | None = None) -> Context:
    return otel_context.set_value(_SCOPE_KEY, scope, ctx)


def random_trail_id() -> str:
    return secrets.token_hex(8)
