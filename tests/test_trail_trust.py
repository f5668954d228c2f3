"""Inbound baggage never grafts a process's actions onto someone else's trail, unless the
application says the context came from a peer it trusts (issue 11, identity)."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.capture.context import continue_trail
from otel_audit.engine.ledger import Query, open_ledger

VICTIM = "aaaabbbbccccdddd"


def _inbound(headers: dict[str, str]) -> otel_context.Context:
    return W3CBaggagePropagator().extract(headers)


def _trail_of(pipeline, action: str) -> str:
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        (rec,) = [r.record for r in ledger.query(Query(action=action))]
    return rec.attr(v.TRAIL_ID)


def test_a_trail_id_in_inbound_baggage_is_not_continued(make_pipeline):
    pipeline, _, _ = make_pipeline()
    forged = _inbound({"baggage": f"audit.trail.id={VICTIM},audit.actor.id=admin"})
    token = otel_context.attach(forged)
    try:
        assert otel_audit.current_trail() is None
        with otel_audit.audit_action("job.run"):
            pass
    finally:
        otel_context.detach(token)
    assert _trail_of(pipeline, "job.run") != VICTIM


def test_a_context_the_application_trusts_continues_its_trail(make_pipeline):
    pipeline, _, _ = make_pipeline()
    trusted = continue_trail(_inbound({"baggage": f"audit.trail.id={VICTIM}"}))
    token = otel_context.attach(trusted)
    try:
        with otel_audit.audit_action("job.run"):
            pass
    finally:
        otel_context.detach(token)
    assert _trail_of(pipeline, "job.run") == VICTIM


def test_a_malformed_trail_id_is_not_continued_even_from_a_trusted_peer(make_pipeline):
    pipeline, _, _ = make_pipeline()
    trusted = continue_trail(_inbound({"baggage": "audit.trail.id=not%20a%20trail%3B%20x"}))
    token = otel_context.attach(trusted)
    try:
        with otel_audit.audit_action("job.run"):
            pass
    finally:
        otel_context.detach(token)
    assert _trail_of(pipeline, "job.run") != "not a trail; x"
