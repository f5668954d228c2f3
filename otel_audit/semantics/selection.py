"""Which spans are audit records: the one rule, used by the processor and policy.

A span is an audit record when it is an audit action (``audit.event=true``),
or when it is inside a trail (``audit.trail.id``) and its effect, as
classified from its semantic-convention attributes (semantics.effects), is
one the pipeline keeps. The decision is the sender's: a receiver (``serve``)
keeps every span that says what it is (``audit.event``, or ``audit.effect``
stamped by the sender's pipeline) and classifies only trail spans that arrive
undecided (a Collector routes every span of a trail to it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v
from otel_audit.semantics.effects import classify


def select(
    attributes: Mapping[str, Any], kind: SpanKind | None, name: str, kept: Collection[str]
) -> dict[str, Any] | None:
    """Attributes to add to the record of a span, or None when it is not an audit record.

    ``kept``: the effects this pipeline keeps (``OTEL_AUDIT_EFFECTS``).
    """
    if attributes.get(v.EVENT) is True:
        return {}
    if v.TRAIL_ID not in attributes:
        return None
    effect = classify(attributes, kind, name)
    if effect not in kept:
        return None
    return {} if v.EFFECT in attributes else {v.EFFECT: effect}
