"""Effect spans made by hand: notifications, message publishes, any custom step.

The standard instrumentations' spans are classified by semantics.effects;
these helpers mark a span as an effect explicitly, on the audit pipeline's
tracer so it reaches the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v
from otel_audit.capture.installed import global_pipeline
from otel_audit.capture.scope import current_scope


@contextmanager
def effect_span(
    name: str,
    effect: str,
    *,
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind | None = None,
    tracer: trace.Tracer | None = None,
) -> Iterator[trace.Span]:
    """``with effect_span("notify alice", "notification"):`` a child span marked as an effect.

    The kind defaults to PRODUCER for ``message.publish`` and ``notification``
    (something sent), else INTERNAL. The span carries the trail and actor of
    the context like any other span (the processor stamps them).
    """
    if effect not in v.EFFECTS:
        raise ValueError(f"effect must be one of {', '.join(v.EFFECTS)}")
    if kind is None:
        kind = (
            SpanKind.PRODUCER
            if effect in (v.MESSAGE_PUBLISH, v.NOTIFICATION)
            else SpanKind.INTERNAL
        )
    attrs = dict(attributes or {})
    attrs[v.EFFECT] = effect
    # The audit pipeline's tracer, like audit_action: the span must reach the ledger.
    used = tracer or _audit_tracer()
    with used.start_as_current_span(name, kind=kind, attributes=attrs) as span:
        yield span


def _audit_tracer() -> trace.Tracer:
    scope = current_scope()
    pipeline = scope.pipeline if scope is not None else None
    pipeline = pipeline or global_pipeline()
    return pipeline.tracer if pipeline is not None else trace.get_tracer("otel_audit")


def notification(
    name: str, *, recipient: str | None = None, channel: str | None = None, **attributes: Any
) -> Any:
    """``with notification("order confirmed", recipient="alice"):`` an effect span for a notice."""
    attrs: dict[str, Any] = dict(attributes)
    if recipient is not None:
        attrs["notification.recipient"] = recipient
    if channel is not None:
        attrs["notification.channel"] = channel
    return effect_span(name, v.NOTIFICATION, attributes=attrs)


def publish(name: str, *, destination: str, system: str = "inprocess", **attributes: Any) -> Any:
    """``with publish("send order.created", destination="orders"):`` an effect span for a message.

    Sets the stable messaging attributes so tools that know semconv read it too.
    """
    attrs: dict[str, Any] = dict(attributes)
    attrs["messaging.system"] = system
    attrs["messaging.destination.name"] = destination
    attrs["messaging.operation.type"] = "send"
    return effect_span(name, v.MESSAGE_PUBLISH, attributes=attrs)
