"""AuditSpanProcessor: selects audit spans, encodes them and hands them to the writer.

Selected: a span with ``audit.event`` (a user action), or a span inside a
trail whose effect the policy keeps (by default data writes, outbound calls,
message publishes, notifications); the rule is semantics.selection's.
``on_start`` stamps the trail id and the context's actor on every span
started inside a trail, whatever made it, and files the span under the
action scope of its context (capture/scope.py). ``on_end`` never raises: in
``sync`` durability a record inside an action is queued and its ticket handed
to the action, which waits once at its exit; a record outside any action is
committed before ``on_end`` returns; a failure is handed to the action (or
logged and counted when there is none). Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_audit import vocabulary as v
from otel_audit.capture.context import ACTOR_KEY, TRAIL_KEY, Actor
from otel_audit.capture.decision import Decision, Policy
from otel_audit.capture.scope import SCOPE_KEY, ActionScope
from otel_audit.engine.record import encode, record_from_span, span_attributes
from otel_audit.engine.remote import ProcessWriter
from otel_audit.engine.writer import LedgerWriter, Ticket
from otel_audit.errors import AuditError, LedgerWriteError
from otel_audit.semantics.selection import select

_log = logging.getLogger("otel_audit")

__all__ = ["AuditSpanProcessor", "Decision", "Policy"]


class AuditSpanProcessor(SpanProcessor):
    """Sends audit spans to a ledger writer; see the module docstring."""

    def __init__(
        self,
        writer: LedgerWriter | ProcessWriter,
        service_name: str | None = None,
        *,
        durability: str = "sync",
        effects: Iterable[str] = v.DEFAULT_KEPT_EFFECTS,
        policy: Policy | None = None,
    ) -> None:
        if durability not in ("sync", "async"):
            raise ValueError("durability must be 'sync' or 'async'.")
        self.writer = writer
        self.service_name = service_name
        self.durability = durability
        self.effects = frozenset(effects)
        self.policy = policy
        self.dropped_by_policy = 0
        #: Records that could not be written (each also failed its action, if any).
        self.failures = 0
        self._lock = threading.Lock()
        # span id -> the action scope of the context the span started in.
        self._scopes: dict[int, ActionScope] = {}
        # A writer process (engine/remote.py) builds records itself from the
        # span; this process keeps the selection and the policy's decision.
        self._remote = writer if isinstance(writer, ProcessWriter) else None
        if self._remote is not None:
            self._remote.fallback = self._body_of

    def _encode(
        self, span: ReadableSpan, extra: dict[str, Any], decision: Decision | None
    ) -> bytes:
        """The record's canonical bytes: built, redacted by the policy, encoded."""
        service = self.service_of(span)
        if decision is None or self.policy is None:
            return encode(record_from_span(span, service, extra))
        fused = getattr(self.policy, "encode_span", None)
        if fused is not None:  # AuditPolicy: one pass, the same bytes (tests/test_hotpath.py)
            body: bytes = fused(span, service, extra, decision)
            return body
        return encode(self.policy.apply(record_from_span(span, service, extra), decision))

    def _body_of(
        self, span: ReadableSpan, extra: dict[str, Any], level: str, durability: str
    ) -> bytes:
        """The in-process record path, for a span the writer process cannot be sent."""
        decision = Decision(level, durability or None, {}) if level else None
        return self._encode(span, extra, decision)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            # One context lookup for the scope, the trail and the actor (the
            # same reads as current_scope/current_trail/current_actor).
            ctx = parent_context if parent_context is not None else otel_context.get_current()
            scope = ctx.get(SCOPE_KEY)
            if isinstance(scope, ActionScope):
                # Ended spans are looked up by id: a span may end on another
                # thread, or after its context was detached.
                self._scopes[span.context.span_id] = scope
            trail = ctx.get(TRAIL_KEY)
            if trail is None:
                return
            attrs = span.attributes or {}
            if v.TRAIL_ID not in attrs:
                span.set_attribute(v.TRAIL_ID, str(trail))
            actor = ctx.get(ACTOR_KEY)
            if isinstance(actor, Actor) and v.ACTOR_ID not in attrs:
                span.set_attributes(actor.attributes())
        except Exception:  # on_start must never break the host application
            _log.exception("otel-audit: on_start failed")

    def select(self, span: ReadableSpan) -> dict[str, Any] | None:
        """Attributes to add to the record of ``span``, or None when it is not audited."""
        return select(span_attributes(span), span.kind, span.name, self.effects)

    def service_of(self, span: ReadableSpan) -> str:
        if self.service_name:
            return self.service_name
        resource = span.resource
        name = resource.attributes.get("service.name") if resource is not None else None
        return str(name) if name else "unknown_service"

    def _chosen(self, span: ReadableSpan) -> tuple[dict[str, Any], Decision | None] | None:
        """The record's extra attributes and the policy's decision, or None when
        the span is not audited (not selected, or dropped by the policy)."""
        extra = self.select(span)
        if extra is None:
            return None
        if self.policy is None:
            return extra, None
        decision = self.policy.decide(span, extra)
        if decision is None:
            self.dropped_by_policy += 1
            return None
        extra.update(decision.attributes)
        return extra, decision

    def on_end(self, span: ReadableSpan) -> None:
        scope = self._scopes.pop(span.context.span_id, None) if self._scopes else None
        try:
            chosen = self._chosen(span)
            if chosen is None:
                return
            extra, decision = chosen
            durability = self.durability
            if decision is not None:
                durability = decision.durability or durability
            # One path for both writers: the writer process is sent the span
            # (it builds the record there), the thread writer the record's bytes.
            remote = self._remote
            if durability == "async":
                if remote is not None:
                    remote.send_span(span, extra, _level(decision), durability, False)
                else:
                    self.writer.submit(self._encode(span, extra, decision))
                return
            # An effect's record waits for its action's exit (or its first
            # waiter) to be committed, with the action's other effects. With
            # the thread writer every sync record is queued so: its first
            # waiter (the action's exit, or the wait below) commits it
            # (LedgerWriter.lead), and an action's own record goes with its
            # effects, never without them (``after``).
            own = scope is not None and span.context.span_id == scope.span_id
            if remote is not None:
                lazy = scope is not None and not own
                ticket = remote.send_span(span, extra, _level(decision), durability, True, lazy)
                assert ticket is not None
            else:
                writer = self.writer
                assert isinstance(writer, LedgerWriter)
                after = (
                    scope.pending(writer) if own and scope is not None and scope.together else None
                )
                ticket = writer.enqueue(self._encode(span, extra, decision), lazy=True, after=after)
            if scope is not None:
                if scope.add_ticket(self.writer, ticket, own=own):
                    return  # the action waits for it at its exit
            ticket.wait(self.writer)  # no action, or it is gone: commit before returning
        except AuditError as exc:
            self._failed(span, scope, exc)
        except Exception as exc:  # never raise into span.end()
            _log.exception("otel-audit: could not record span %r", span.name)
            error = LedgerWriteError(f"audit record of span {span.name!r} not written: {exc!r}")
            self._failed(span, scope, error)

    def _failed(self, span: ReadableSpan, scope: ActionScope | None, error: AuditError) -> None:
        with self._lock:
            self.failures += 1
        if scope is not None:
            scope.fail(error)  # the action is recorded as failed and raises
        else:
            _log.error("otel-audit: audit record of span %r not written: %s", span.name, error)

    @property
    def commits_together(self) -> bool:
        """An action's own record can be committed with its effects, and refused
        without them (``LedgerWriter.enqueue(after=)``): the thread writer."""
        return isinstance(self.writer, LedgerWriter)

    def adopt(self, span: Any, scope: ActionScope) -> None:
        """File the record of ``span``, started before ``scope`` existed, under it
        as the action's own record (the Flask request's server span)."""
        self._scopes[span.get_span_context().span_id] = scope

    def forget(self, span: Any) -> None:
        """Undo ``adopt`` for a span that has not ended here (or ended elsewhere)."""
        self._scopes.pop(span.get_span_context().span_id, None)

    def write_lost(self, span: ReadableSpan, error: AuditError) -> None:
        """Write the record of an action whose own record was not written with its
        effects (``enqueue(after=)``): the same record, with outcome ``failure`` and
        the error's type as reason, committed now. Raises LedgerWriteError."""
        chosen = self._chosen(span)
        if chosen is None:
            return
        extra, decision = chosen
        extra[v.OUTCOME] = v.FAILURE
        extra[v.REASON] = type(error).__name__
        writer = self.writer
        assert isinstance(writer, LedgerWriter)
        writer.write(self._encode(span, extra, decision))

    def queue_intent(self, span: Any, default: str | None = None) -> Ticket | None:
        """Queue the intent record of an action whose durability is ``blocking``.

        Called before the action's body runs; the caller waits on the ticket
        (None: no intent is needed), so the body never runs unaudited.
        ``default``: the durability when the policy names none for the span
        (the Flask integration makes state-changing requests ``blocking``).
        Raises LedgerUnavailable when the ledger cannot be written.
        """
        if self.policy is None:
            return None
        decision = self.policy.decide(span, {})
        if decision is None or (decision.durability or default) != "blocking":
            return None
        self.writer.check()
        extra = dict(decision.attributes)
        extra[v.INTENT] = True
        return self.writer.enqueue(self._encode(span, extra, decision), lazy=True)

    def shutdown(self) -> None:
        self.writer.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000)


def _level(decision: Decision | None) -> str:
    """The decision's level as the writer process is sent it ("": no policy, no redaction)."""
    return decision.level if decision is not None else ""
