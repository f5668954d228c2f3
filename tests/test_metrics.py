"""Writer counters are exported as OpenTelemetry metrics through a real MeterProvider."""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_audit


def test_queue_commit_and_error_metrics(make_pipeline):
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    # A chain of its own: pipelines of earlier tests in this process report too.
    pipeline, _, _ = make_pipeline(service_name="metered")
    for _ in range(5):
        with otel_audit.audit_action("a.b"):
            pass
    data = reader.get_metrics_data()
    points = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    if p.attributes.get("chain") == pipeline.chain:
                        points[metric.name] = p
    assert points["otel_audit.records.committed"].value == 5
    assert points["otel_audit.records.failed"].value == 0
    assert points["otel_audit.queue.depth"].value == 0
    assert points["otel_audit.commit.duration"].count >= 1
