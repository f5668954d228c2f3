"""Writer counters are exported as OpenTelemetry metrics through a real MeterProvider."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_audit


def test_queue_commit_and_error_metrics(make_pipeline, tmp_path):
    import sqlite3

    import pytest

    reader = InMemoryMetricReader()
    db = tmp_path / "metered.db"
    pipeline, _, _ = make_pipeline(
        ledger=f"sqlite:///{db}?busy_timeout=20",
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    for _ in range(5):
        with otel_audit.audit_action("a.b"):
            pass
    # One record that cannot be committed: another connection holds the write lock.
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(otel_audit.LedgerWriteError):
        with otel_audit.audit_action("a.locked"):
            pass
    locker.execute("ROLLBACK")
    locker.close()
    data = reader.get_metrics_data()
    points = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    if p.attributes.get("chain") == pipeline.chain:
                        points[metric.name] = p
    assert points["otel_audit.records.committed"].value == 5
    assert points["otel_audit.records.failed"].value == 1
    assert points["otel_audit.queue.depth"].value == 0
    assert points["otel_audit.commit.duration"].count >= 1
