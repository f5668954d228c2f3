"""AuditSpanProcessor: selects audit spans, encodes them and hands them to the writer.

Selected: a span with ``audit.event`` (a user action), or a span inside a
trail whose effect the policy keeps (by default data writes, outbound calls,
message publishes, notifications). ``on_start`` stamps the trail id and the
context's actor on every span started inside a trail, whatever made it.
``on_end`` never raises: a failure to commit is kept for the audited action
that ended the span (see ``take_failure``), counted, and logged.
Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_audit import vocabulary as v
from otel_audit.capture.context import current_actor, current_trail
from otel_audit.engine.record import Record, encode, record_from_span
from otel_audit.engine.writer import LedgerWriter
from otel_audit.errors import AuditError, LedgerWriteError
from otel_audit.semantics.effects import classify

_log = logging.getLogger("otel_audit")
_failures = threading.local()


@dataclass(frozen=True)
class Decision:
    """What a policy decided for one selected span."""

    #: ``metadata`` or ``full`` (``none`` is expressed by deciding None).
    level: str = "full"
    #: ``blocking``, ``sync`` or ``async``; None keeps the pipeline's durability.
    durability: str | None = None
    #: Attributes to add to the record (e.g. ``audit.data.classification``).
    attributes: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """The hook an audit policy plugs into the processor (see otel_audit.policy.rules)."""

    def decide(self, span: ReadableSpan, derived: dict[str, Any]) -> Decision | None:
        """None leaves the span out of the ledger."""

    def apply(self, record: Record, decision: Decision) -> Record:
        """Redact ``record`` for ``decision.level``; runs before encoding (DESIGN rule 4)."""


_MAX_TRAIL_FAILURES = 64


def _note_failure(span: ReadableSpan, exc: AuditError) -> None:
    """Keep ``exc`` for the audited action that ends ``span``, or ends its trail's action."""
    _failures.value = (span.context.span_id, exc)
    trail = (span.attributes or {}).get(v.TRAIL_ID)
    if isinstance(trail, str):
        trails: dict[str, AuditError] = getattr(_failures, "trails", None) or {}
        if len(trails) >= _MAX_TRAIL_FAILURES:
            trails.pop(next(iter(trails)))  # bounded: a thread never grows without end
        trails[trail] = exc
        _failures.trails = trails


def _trail_failed(trail: object) -> bool:
    """True when an effect of ``trail`` lost its record on this thread (not yet taken)."""
    trails: dict[str, AuditError] = getattr(_failures, "trails", None) or {}
    return isinstance(trail, str) and trail in trails


def take_failure(span_id: int, trail_id: str | None = None) -> AuditError | None:
    """The commit error of span ``span_id``, or of an effect in trail ``trail_id``,
    ended on this thread since it was last taken (each is returned once).

    An effect (a DB write inside the action) whose record was not committed
    makes the enclosing action fail too: the trail would otherwise miss it.
    """
    own = None
    failure = getattr(_failures, "value", None)
    if failure is not None and failure[0] == span_id:
        _failures.value = None
        own = failure[1]
    trails: dict[str, AuditError] | None = getattr(_failures, "trails", None)
    in_trail = trails.pop(trail_id, None) if trails and trail_id is not None else None
    return own or in_trail


class AuditSpanProcessor(SpanProcessor):
    """Sends audit spans to a ledger writer; see the module docstring."""

    def __init__(
        self,
        writer: LedgerWriter,
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

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            trail = current_trail(parent_context)
            if trail is None:
                return
            attrs = span.attributes or {}
            if v.TRAIL_ID not in attrs:
                span.set_attribute(v.TRAIL_ID, trail)
            actor = current_actor(parent_context)
            if actor is not None and v.ACTOR_ID not in attrs:
                span.set_attributes(actor.attributes())
        except Exception:  # on_start must never break the host application
            _log.exception("otel-audit: on_start failed")

    def select(self, span: ReadableSpan) -> dict[str, Any] | None:
        """Attributes to add to the record of ``span``, or None when it is not audited."""
        attrs = span.attributes or {}
        extra: dict[str, Any] = {}
        if attrs.get(v.EVENT) is True:
            selected = True
        elif v.TRAIL_ID in attrs:
            effect = classify(attrs, span.kind, span.name)
            if effect is not None and v.EFFECT not in attrs:
                extra[v.EFFECT] = effect
            selected = effect in self.effects
        else:
            selected = False
        return extra if selected else None

    def _service(self, span: ReadableSpan) -> str:
        if self.service_name:
            return self.service_name
        resource = span.resource
        name = resource.attributes.get("service.name") if resource is not None else None
        return str(name) if name else "unknown_service"

    def on_end(self, span: ReadableSpan) -> None:
        try:
            extra = self.select(span)
            if extra is None:
                return
            attrs = span.attributes or {}
            if attrs.get(v.EVENT) is True and _trail_failed(attrs.get(v.TRAIL_ID)):
                # An effect of this action lost its record: the action's own
                # record must not claim success (its caller gets the error too).
                extra[v.OUTCOME] = v.FAILURE
                extra[v.REASON] = "LedgerWriteError"
            durability = self.durability
            decision: Decision | None = None
            if self.policy is not None:
                decision = self.policy.decide(span, extra)
                if decision is None:
                    self.dropped_by_policy += 1
                    return
                extra.update(decision.attributes)
                durability = decision.durability or durability
            record = record_from_span(span, self._service(span), extra)
            if decision is not None and self.policy is not None:
                record = self.policy.apply(record, decision)
            body = encode(record)
            if durability in ("sync", "blocking"):
                self.writer.write(body)
            else:
                self.writer.submit(body)
        except AuditError as exc:
            _note_failure(span, exc)
        except Exception as exc:  # never raise into span.end()
            _log.exception("otel-audit: could not record span %r", span.name)
            _note_failure(
                span, LedgerWriteError(f"audit record of span {span.name!r} not written: {exc!r}")
            )

    def shutdown(self) -> None:
        self.writer.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000)
