"""The normal pipeline stays normal: logs and ordinary spans go out over OTLP, never into the ledger."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode


@pytest.fixture
def app(otlp_sink, tmp_path):
    """An app wired like production: OTLP traces and logs to a receiver, plus the audit ledger."""
    made = []

    def build(sampler):
        resource = Resource.create({"service.name": "shop"})
        traces = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
        traces.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_sink.endpoint}/v1/traces"))
        )
        logs = LoggerProvider(resource=resource, shutdown_on_exit=False)
        logs.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{otlp_sink.endpoint}/v1/logs"))
        )
        handler = LoggingHandler(logger_provider=logs)
        logger = logging.getLogger(f"shop.app.{len(made)}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        pipeline = otel_audit.configure(
            ledger=f"sqlite:///{tmp_path / f'audit{len(made)}.db'}",
            service_name="shop",
            tracer_provider=traces,
            handle_sigterm=False,
        )
        made.append((pipeline, traces, logs))
        return pipeline, traces.get_tracer("shop"), logger, traces, logs

    yield build
    for pipeline, traces, logs in made:
        pipeline.shutdown()
        traces.shutdown()
        logs.shutdown()


def _ledger(pipeline):
    with open_ledger(pipeline.ledger_url, create=False) as ledger:
        return [decode(r.body) for c in ledger.chains() for r in ledger.scan(c)]


def _work(tracer, logger):
    with tracer.start_as_current_span("GET /health"):
        logger.info("health ok")
    with tracer.start_as_current_span(
        "order.update", attributes={v.EVENT: True, v.ACTION: "order.update", v.ACTOR_ID: "alice"}
    ):
        logger.warning("updating order 42")


def test_sampled_audit_span_goes_to_both_ordinary_only_to_otlp(app, otlp_sink):
    pipeline, tracer, logger, traces, logs = app(ALWAYS_ON)
    _work(tracer, logger)
    traces.force_flush()
    logs.force_flush()
    assert otlp_sink.wait_for(lambda s: len(s.spans()) >= 2 and len(s.logs()) >= 2)
    # Normal pipeline: every span and every log record, untouched.
    assert sorted(s["name"] for s in otlp_sink.spans()) == ["GET /health", "order.update"]
    audit = next(s for s in otlp_sink.spans() if s["name"] == "order.update")
    assert audit["attributes"][v.ACTOR_ID] == "alice"
    assert sorted(r["body"] for r in otlp_sink.logs()) == ["health ok", "updating order 42"]
    # Ledger: the audit span only; no ordinary span, no log record.
    stored = _ledger(pipeline)
    assert [r.name for r in stored] == ["order.update"]
    assert stored[0].span_id == audit["span_id"] and stored[0].trace_id == audit["trace_id"]
    assert "health ok" not in repr(stored) and "updating order 42" not in repr(stored)


def test_unsampled_audit_span_still_reaches_the_ledger_but_not_the_normal_pipeline(app, otlp_sink):
    pipeline, tracer, logger, traces, logs = app(ALWAYS_OFF)
    _work(tracer, logger)
    # force_flush exports synchronously: whatever the span pipeline would send is sent by now.
    traces.force_flush()
    logs.force_flush()
    assert otlp_sink.wait_for(lambda s: len(s.logs()) >= 2)
    assert otlp_sink.spans() == []
    assert [r.name for r in _ledger(pipeline)] == ["order.update"]
    # Logs are not sampled: they still flow normally.
    assert sorted(r["body"] for r in otlp_sink.logs()) == ["health ok", "updating order 42"]
