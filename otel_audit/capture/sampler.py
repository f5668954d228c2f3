"""AuditSampler: the normal sampler decides, but never drops an audit span.

Where the wrapped sampler says DROP for an audit action (``audit.event`` at
start) or for a span inside a trail, the span is still recorded
(RECORD_ONLY): the trace flags stay unsampled, so the normal exporters still
see only sampled spans, while the AuditSpanProcessor sees it (docs/design.md, rule 1).
Thread-safe when the wrapped sampler is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from otel_audit import vocabulary as v
from otel_audit.capture.context import current_trail

#: A predicate (parent context, name, kind, attributes) -> True when a span may
#: become an audit record later (e.g. a Flask server span of a POST request).
Candidate = Callable[[Context | None, str, Any, Attributes], bool]


class AuditSampler(Sampler):
    """Wraps ``delegate``; upgrades DROP to RECORD_ONLY for audit spans and trails."""

    def __init__(self, delegate: Sampler, candidates: Sequence[Candidate] = ()) -> None:
        self.delegate = delegate
        self.candidates: tuple[Candidate, ...] = tuple(candidates)

    def add_candidate(self, predicate: Candidate) -> None:
        """Also keep spans for which ``predicate`` says they may become audit records."""
        self.candidates = self.candidates + (predicate,)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision is not Decision.DROP:
            return result
        if self._is_audit(parent_context, name, kind, attributes):
            # The SDK starts the span with the result's attributes, and a DROP
            # result carries none: hand the span its own attributes back.
            merged = dict(attributes or {})
            merged.update(result.attributes or {})
            return SamplingResult(Decision.RECORD_ONLY, merged, result.trace_state)
        return result

    def _is_audit(
        self, parent_context: Context | None, name: str, kind: Any, attributes: Attributes
    ) -> bool:
        if attributes and attributes.get(v.EVENT) is True:
            return True
        if current_trail(parent_context) is not None:
            return True
        return any(pred(parent_context, name, kind, attributes) for pred in self.candidates)

    def get_description(self) -> str:
        return f"AuditSampler{{{self.delegate.get_description()}}}"
