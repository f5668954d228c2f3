"""Audit actions, actors, trails and sampling through the real SDK and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger


def records(pipeline, **filters):
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        return [r.record for r in ledger.query(Query(**filters))]


def by_action(pipeline):
    return {r.attr(v.ACTION): r for r in records(pipeline) if r.attr(v.EVENT)}


def test_action_records_every_audit_attribute(make_pipeline):
    pipeline, provider, _ = make_pipeline()
    with otel_audit.actor("alice", roles=["clerk", "admin"], auth="password", ip="10.0.0.7"):
        with otel_audit.audit_action(
            "order.update", resource=("order", 42), attributes={v.DATA_CLASSIFICATION: "pii"}
        ):
            pass
    rec = by_action(pipeline)["order.update"]
    assert rec.attributes == {
        v.EVENT: True,
        v.ACTION: "order.update",
        v.ACTOR_ID: "alice",
        v.ACTOR_TYPE: "user",
        v.ACTOR_ROLES: ["clerk", "admin"],
        v.ACTOR_AUTH: "password",
        v.ACTOR_IP: "10.0.0.7",
        v.RESOURCE_TYPE: "order",
        v.RESOURCE_ID: "42",
        v.OUTCOME: "success",
        v.TRAIL_ID: rec.span_id,
        v.DATA_CLASSIFICATION: "pii",
    }
    assert rec.service == "shop" and rec.name == "order.update" and rec.version == 1


def test_outcomes_success_failure_denied_and_reason(make_pipeline):
    pipeline, _, _ = make_pipeline()
    with otel_audit.audit_action("a.ok"):
        pass
    with pytest.raises(KeyError):
        with otel_audit.audit_action("a.raises"):
            raise KeyError("secret-value-not-stored")
    with otel_audit.audit_action("a.denied") as action:
        action.deny("missing role admin")
    with otel_audit.audit_action("a.failed") as action:
        action.fail("stock exhausted")
    got = by_action(pipeline)
    assert got["a.ok"].attr(v.OUTCOME) == "success"
    assert got["a.ok"].attr(v.REASON) is None
    assert got["a.raises"].attr(v.OUTCOME) == "failure"
    assert got["a.raises"].attr(v.REASON) == "KeyError"
    assert got["a.raises"].status == "ERROR"
    assert "secret-value-not-stored" not in str(got["a.raises"].attributes)
    assert got["a.denied"].attr(v.OUTCOME) == "denied"
    assert got["a.denied"].attr(v.REASON) == "missing role admin"
    assert got["a.failed"].attr(v.OUTCOME) == "failure"
    assert got["a.failed"].attr(v.REASON) == "stock exhausted"


def test_denied_then_raising_stays_denied(make_pipeline):
    pipeline, _, _ = make_pipeline()
    with pytest.raises(PermissionError):
        with otel_audit.audit_action("a.b") as action:
            action.deny("not owner")
            raise PermissionError
    rec = by_action(pipeline)["a.b"]
    assert (rec.attr(v.OUTCOME), rec.attr(v.REASON)) == ("denied", "not owner")


def test_anonymous_when_no_actor_and_explicit_actor_wins(make_pipeline):
    pipeline, _, _ = make_pipeline()
    with otel_audit.audit_action("a.anon"):
        pass
    with otel_audit.actor("alice"):
        with otel_audit.audit_action("a.svc", actor="billing", actor_type="service"):
            pass
    got = by_action(pipeline)
    assert got["a.anon"].attr(v.ACTOR_TYPE) == "anonymous"
    assert got["a.anon"].attr(v.ACTOR_ID) is None
    assert (got["a.svc"].attr(v.ACTOR_ID), got["a.svc"].attr(v.ACTOR_TYPE)) == (
        "billing",
        "service",
    )


def test_nested_actions_share_the_trail_and_link_by_parent(make_pipeline):
    pipeline, _, _ = make_pipeline()
    token = otel_audit.set_actor("bob")
    try:
        with otel_audit.audit_action("order.create") as outer:
            trail = outer.trail_id
            with otel_audit.audit_action("payment.charge"):
                pass
    finally:
        otel_audit.reset_actor(token)
    got = by_action(pipeline)
    outer_rec, inner = got["order.create"], got["payment.charge"]
    assert trail == outer_rec.span_id
    assert inner.attr(v.TRAIL_ID) == outer_rec.attr(v.TRAIL_ID) == trail
    assert inner.parent_span_id == outer_rec.span_id
    assert inner.trace_id == outer_rec.trace_id
    assert inner.attr(v.ACTOR_ID) == "bob"
    # A new context after the trail ended starts a new trail.
    with otel_audit.audit_action("order.view"):
        pass
    assert by_action(pipeline)["order.view"].attr(v.TRAIL_ID) != trail


def test_decorator_sync_and_async_each_call_is_its_own_action(make_pipeline):
    pipeline, _, _ = make_pipeline()

    @otel_audit.audit_action("report.run", resource_type="report")
    def run(n):
        return n * 2

    @otel_audit.audit_action("report.async")
    async def run_async():
        return "ok"

    assert run(2) == 4 and run(3) == 6
    assert asyncio.run(run_async()) == "ok"
    recs = [r for r in records(pipeline) if r.attr(v.EVENT)]
    assert sorted(r.attr(v.ACTION) for r in recs) == ["report.async", "report.run", "report.run"]
    assert len({r.span_id for r in recs}) == 3


def test_trail_id_rides_in_baggage(make_pipeline):
    pipeline, provider, _ = make_pipeline()
    with otel_audit.audit_action("x.y") as action:
        assert baggage.get_baggage(v.TRAIL_ID) == action.trail_id
    assert baggage.get_baggage(v.TRAIL_ID) is None


def test_spans_of_other_instrumentations_are_stamped_and_classified(make_pipeline, tmp_path):
    pipeline, provider, exporter = make_pipeline()
    SQLite3Instrumentor().instrument(tracer_provider=provider)
    try:
        con = sqlite3.connect(str(tmp_path / "shop.db"))
        cur = con.cursor()  # the instrumentation traces cursor statements
        cur.execute("CREATE TABLE orders (id INTEGER, item TEXT)")  # outside any trail
        with otel_audit.actor("alice"):
            with otel_audit.audit_action("order.create", resource=("order", "1")) as action:
                cur.execute("INSERT INTO orders VALUES (1, 'book')")
                cur.execute("SELECT * FROM orders").fetchall()
                trail = action.trail_id
        con.close()
    finally:
        SQLite3Instrumentor().uninstrument()
    recs = records(pipeline)
    effects = {r.attr(v.EFFECT): r for r in recs if not r.attr(v.EVENT)}
    # The write is kept by the default policy; the read and the CREATE outside the trail are not.
    assert list(effects) == ["data.write"]
    write = effects["data.write"]
    assert write.attr(v.TRAIL_ID) == trail and write.attr(v.ACTOR_ID) == "alice"
    assert "INSERT" in write.attr("db.statement")
    # The normal pipeline saw every span, including the read, stamped with the trail.
    names = [s.name for s in exporter.get_finished_spans()]
    assert any(s.attributes.get(v.TRAIL_ID) == trail for s in exporter.get_finished_spans())
    assert len(names) == 4


@pytest.mark.parametrize(
    "sampler", [TraceIdRatioBased(0.0), ParentBased(TraceIdRatioBased(0.0))], ids=str
)
def test_sampler_never_loses_audit_spans(make_pipeline, sampler):
    pipeline, provider, exporter = make_pipeline(sampler=sampler)
    tracer = provider.get_tracer("app")
    for i in range(20):
        with otel_audit.audit_action("order.create", resource=("order", i)):
            with tracer.start_as_current_span(
                "POST inventory",
                kind=trace.SpanKind.CLIENT,
                attributes={"http.request.method": "POST"},
            ):
                pass
    with tracer.start_as_current_span("ordinary"):
        pass
    recs = records(pipeline)
    assert len([r for r in recs if r.attr(v.EVENT)]) == 20
    assert len([r for r in recs if r.attr(v.EFFECT) == "http.call"]) == 20
    # Unsampled: the normal pipeline sees none of them.
    assert exporter.get_finished_spans() == ()


def test_sampled_traces_still_reach_the_normal_pipeline(make_pipeline):
    pipeline, provider, exporter = make_pipeline(sampler=ALWAYS_ON)
    with otel_audit.audit_action("a.b"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["a.b"]
    assert len(records(pipeline)) == 1


def test_existing_tracers_get_the_audit_sampler(tmp_path):
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(sampler=TraceIdRatioBased(0.0), shutdown_on_exit=False)
    early = provider.get_tracer("made-before-configure")
    pipeline = otel_audit.configure(
        ledger=str(tmp_path / "a.db"),
        service_name="s",
        tracer_provider=provider,
        handle_sigterm=False,
    )
    try:
        with otel_audit.audit_action("a.b", tracer=early):
            pass
        assert len(records(pipeline)) == 1
    finally:
        pipeline.shutdown()


def test_actor_is_never_read_from_inbound_baggage(make_pipeline):
    pipeline, _, _ = make_pipeline()
    forged = baggage.set_baggage(v.ACTOR_ID, "root", otel_context.get_current())
    forged = baggage.set_baggage(v.ACTOR_TYPE, "user", forged)
    token = otel_context.attach(forged)
    try:
        with otel_audit.audit_action("a.b"):
            pass
    finally:
        otel_context.detach(token)
    rec = by_action(pipeline)["a.b"]
    assert rec.attr(v.ACTOR_ID) is None and rec.attr(v.ACTOR_TYPE) == "anonymous"


def test_hostile_trail_id_in_baggage_is_ignored(make_pipeline):
    pipeline, _, _ = make_pipeline()
    ctx = baggage.set_baggage(v.TRAIL_ID, "x" * 500 + "\n<script>", otel_context.get_current())
    token = otel_context.attach(ctx)
    try:
        with otel_audit.audit_action("a.b") as action:
            trail = action.trail_id
    finally:
        otel_context.detach(token)
    assert trail == by_action(pipeline)["a.b"].span_id


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="action must be a non-empty string"):
        otel_audit.audit_action("")
    with pytest.raises(ValueError, match="actor type must be one of"):
        otel_audit.set_actor("alice", "robot")
    with pytest.raises(ValueError, match="outcome must be one of"):
        otel_audit.audit_action("a.b").set_outcome("maybe")
