"""Data boundary across two real services, a background job, and enforce mode.

Three HTTP servers on loopback: ``shop`` and ``billing`` are audited services,
each with its own TracerProvider, audit pipeline and the real OpenTelemetry
instrumentations (WSGI middleware in, requests / urllib3 out, sqlite3 for the
shop's orders); ``sink`` is the outside world, on no allow-list. The shop
reads the ``orders`` table (classified ``production``) and sends the data on.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import pathlib
import sqlite3
import textwrap
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import urllib3
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, StoredRecord, open_ledger
from otel_audit.policy.boundary import BoundaryViolation
from otel_audit.policy.rules import AuditPolicy

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # SDK < 1.36
    from opentelemetry.sdk._logs.export import InMemoryLogExporter as InMemoryLogRecordExporter


@dataclass
class World:
    ledger: str
    shop: Any
    billing: Any
    sink: Any
    pipelines: list[Any]
    logs: Any
    metrics: InMemoryMetricReader
    shop_spans: Any
    sink_hits: list[str] = field(default_factory=list)

    def call(self, path: str, method: str = "POST") -> tuple[int, str]:
        """A user's request to the shop (not traced: it comes from outside)."""
        req = urllib.request.Request(
            self.shop.url + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def records(self) -> list[StoredRecord]:
        for p in self.pipelines:
            assert p.flush(30)
        with open_ledger(self.ledger, create=False, readonly=True) as ledger:
            return list(ledger.query(Query()))

    def violations(self) -> list[StoredRecord]:
        return [s for s in self.records() if s.record.attr(v.ACTION) == "boundary.violation"]

    def counter(self) -> int:
        data = self.metrics.get_metrics_data()
        total = 0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "otel_audit.policy.boundary.violations":
                        total += sum(p.value for p in metric.data.data_points)
        return total


def _policy(mode: str, billing: str, services: list[str]) -> str:
    return textwrap.dedent(
        f"""\
        [boundary]
        mode = "{mode}"

        [[boundary.classify]]
        classification = "production"
        tables = ["orders"]

        [boundary.allow.production]
        hosts = ["{billing}"]
        services = {json.dumps(services)}
        """
    )


def _sink_app(hits: list[str]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        hits.append(environ.get("PATH_INFO", ""))
        start("200 OK", [("Content-Type", "text/plain")])
        return [b"thanks"]

    return app


@pytest.fixture
def world(request, tmp_path: pathlib.Path, make_pipeline, serve_wsgi):
    options = getattr(request, "param", {})
    mode = options.get("mode", "detect")
    shop_srv, billing_srv, sink_srv = serve_wsgi(), serve_wsgi(), serve_wsgi()
    billing_host = f"127.0.0.1:{billing_srv.server_port}"
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        _policy(mode, billing_host, options.get("services", ["shop", "billing"]))
    )

    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    ledger = f"sqlite:///{tmp_path / 'audit.db'}"

    def pipeline(service: str):
        if service == "billing" and options.get("billing_default_policy"):
            # A service with no policy file of its own still follows the trail.
            policy = AuditPolicy(logger_provider=logger_provider, meter_provider=meter_provider)
            return make_pipeline(ledger=ledger, service_name=service, policy=policy)
        policy = AuditPolicy.load(
            str(policy_file), logger_provider=logger_provider, meter_provider=meter_provider
        )
        return make_pipeline(ledger=ledger, service_name=service, policy=policy)

    shop_pipe, shop_provider, shop_spans = pipeline("shop")
    billing_pipe, billing_provider, _ = pipeline("billing")

    orders = sqlite3.connect(tmp_path / "shop.db", check_same_thread=False)
    orders.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)")
    orders.executemany("INSERT INTO orders VALUES (?, ?)", [(1, 10), (2, 20)])
    orders.commit()
    orders = SQLite3Instrumentor.instrument_connection(orders, tracer_provider=shop_provider)
    RequestsInstrumentor().instrument(tracer_provider=shop_provider)
    URLLib3Instrumentor().instrument(tracer_provider=billing_provider)
    shop_tracer = shop_provider.get_tracer("shop")
    billing_tracer = billing_provider.get_tracer("billing")
    hits: list[str] = []
    lock = threading.Lock()

    def shop_app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        query = {k: vs[0] for k, vs in parse_qs(environ.get("QUERY_STRING", "")).items()}
        path = environ.get("PATH_INFO", "")
        status, body = "200 OK", "ok"
        try:
            with (
                otel_audit.actor("alice"),
                otel_audit.audit_action(
                    "order.export" if path == "/export" else "catalog.view",
                    resource=("order", "all"),
                    tracer=shop_tracer,  # two pipelines in one process: say which
                ) as act,
            ):
                if path == "/export":
                    with lock:
                        cursor = orders.cursor()
                        cursor.execute("SELECT id, total FROM orders")
                        rows = cursor.fetchall()
                else:
                    rows = [("catalog",)]
                data = json.dumps(rows)
                to = query.get("to", "")
                if "billing" in to:
                    forward = "?forward=1" if query.get("forward") else ""
                    requests.post(f"{billing_srv.url}/ingest{forward}", data=data, timeout=30)
                if "sink" in to:
                    requests.post(f"{sink_srv.url}/upload", data=data, timeout=30)
                if query.get("job"):

                    def job() -> None:
                        with shop_tracer.start_as_current_span("export.job"):
                            requests.post(f"{sink_srv.url}/nightly", data=data, timeout=30)

                    # The job carries the request's context, as a task queue would.
                    with concurrent.futures.ThreadPoolExecutor(1) as pool:
                        pool.submit(contextvars.copy_context().run, job).result()
                body = act.trail_id or ""
        except BoundaryViolation as exc:
            status, body = "403 Forbidden", str(exc)
        start(status, [("Content-Type", "text/plain")])
        return [body.encode()]

    http = urllib3.PoolManager()

    def billing_app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        # The shop is a peer billing trusts: its baggage continues the trail.
        token = otel_context.attach(otel_audit.continue_trail())
        try:
            with otel_audit.audit_action("invoice.create", tracer=billing_tracer):
                if "forward=1" in environ.get("QUERY_STRING", ""):
                    http.request("POST", f"{sink_srv.url}/from-billing", body=data)
        finally:
            otel_context.detach(token)
        start("200 OK", [("Content-Type", "text/plain")])
        return [b"billed"]

    shop_srv.set_app(OpenTelemetryMiddleware(shop_app, tracer_provider=shop_provider))
    billing_srv.set_app(OpenTelemetryMiddleware(billing_app, tracer_provider=billing_provider))
    sink_srv.set_app(_sink_app(hits))  # the outside world: not instrumented
    yield World(
        ledger,
        shop_srv,
        billing_srv,
        sink_srv,
        [shop_pipe, billing_pipe],
        logs,
        reader,
        shop_spans,
        hits,
    )
    RequestsInstrumentor().uninstrument()
    URLLib3Instrumentor().uninstrument()
    orders.close()


def _by_chain(records: list[StoredRecord], chain: str) -> list[StoredRecord]:
    return [s for s in records if s.chain == chain]


@pytest.mark.parametrize("world", [{}, {"billing_default_policy": True}], indirect=True)
def test_allowed_flow_is_classified_in_both_services_and_not_a_violation(world: World) -> None:
    status, trail = world.call("/export?to=billing")
    assert status == 200
    records = world.records()
    shop = [s.record for s in _by_chain(records, "shop")]
    billing = [s.record for s in _by_chain(records, "billing")]
    assert world.violations() == [] and world.counter() == 0
    # The shop's records of the trail all carry the classification...
    assert {r.name for r in shop} == {"order.export", "POST"}
    assert {(r.attr(v.TRAIL_ID), r.attr(v.DATA_CLASSIFICATION)) for r in shop} == {
        (trail, "production")
    }
    # ...and billing learned it over HTTP (its own registry never saw the orders table).
    assert [r.attr(v.ACTION) for r in billing] == ["invoice.create"]
    assert {(r.attr(v.TRAIL_ID), r.attr(v.DATA_CLASSIFICATION)) for r in billing} == {
        (trail, "production")
    }


def test_violations_in_the_shop_in_its_background_job_and_downstream_in_billing(
    world: World, capsys
) -> None:
    status, trail = world.call("/export?to=billing,sink&forward=1&job=1")
    assert status == 200
    assert sorted(world.sink_hits) == ["/from-billing", "/nightly", "/upload"]  # detect mode: sent
    records = world.records()
    violations = [s for s in records if s.record.attr(v.ACTION) == "boundary.violation"]
    sink = f"127.0.0.1:{world.sink.server_port}"
    assert sorted((s.chain, s.record.attr("audit.boundary.destination")) for s in violations) == [
        ("billing", sink),
        ("shop", sink),
        ("shop", sink),
    ]
    for s in violations:
        r = s.record
        assert r.attr(v.TRAIL_ID) == trail
        assert r.attr(v.DATA_CLASSIFICATION) == "production"
        assert (r.attr(v.OUTCOME), r.attr("audit.boundary.blocked")) == (v.FAILURE, False)
        assert r.attr(v.ACTOR_ID) == "alice" or s.chain == "billing"
    # One of the shop's violations happened inside the background job.
    (job,) = [s for s in world.shop_spans.get_finished_spans() if s.name == "export.job"]
    parents = {s.record.parent_span_id for s in violations if s.chain == "shop"}
    assert format(job.context.span_id, "016x") in parents
    calls = [s.record for s in records if s.record.name == "POST" and s.chain == "shop"]
    assert len(calls) == 3  # billing, sink, nightly: all in the trail
    # The offending calls' own records say so too.
    flagged = [s for s in records if s.record.attr("audit.boundary.violation") is True]
    assert sorted(s.chain for s in flagged) == ["billing", "shop", "shop"]
    # A log record and a metric per violation.
    logs = [json.loads(r.to_json()) for r in world.logs.get_finished_logs()]
    assert len(logs) == 3 and all(
        sink in entry["body"] and trail in entry["body"] for entry in logs
    )
    assert {entry["attributes"]["service.name"] for entry in logs} == {"shop", "billing"}
    assert world.counter() == 3

    code = main(["boundary", "--ledger", world.ledger])
    out = capsys.readouterr().out
    assert code == 1
    assert f"trail {trail} (production)" in out
    assert "actors:      alice" in out
    assert "services:    billing, shop" in out
    assert f"hosts:       {sink}, 127.0.0.1:{world.billing.server_port}" in out or (
        f"hosts:       127.0.0.1:{world.billing.server_port}, {sink}" in out
    )
    assert out.count("VIOLATION") == 3
    assert out.rstrip().endswith("3 boundary violations in 1 of 1 trails touching classified data")


def test_background_job_inherits_the_trail_classification(world: World) -> None:
    status, trail = world.call("/export?job=1")
    assert status == 200
    records = world.records()
    (violation,) = [s.record for s in records if s.record.attr(v.ACTION) == "boundary.violation"]
    call = next(
        s.record
        for s in records
        if s.record.attr("url.full", s.record.attr("http.url", "")).endswith("/nightly")
    )
    assert call.attr(v.TRAIL_ID) == trail and call.attr(v.DATA_CLASSIFICATION) == "production"
    assert violation.attr("audit.boundary.span_id") == call.span_id
    # The call ran on the job's thread, under the job's span.
    (job,) = [s for s in world.shop_spans.get_finished_spans() if s.name == "export.job"]
    assert call.parent_span_id == format(job.context.span_id, "016x")
    assert violation.parent_span_id == call.parent_span_id


def test_unclassified_trail_goes_anywhere(world: World, capsys) -> None:
    status, _ = world.call("/catalog?to=sink")
    assert status == 200 and world.sink_hits == ["/upload"]
    assert world.violations() == []
    for p in world.pipelines:
        p.shutdown()
    assert main(["boundary", "--ledger", world.ledger]) == 0
    assert capsys.readouterr().out.startswith(
        "no trail touched classified data (2 records examined)"
    )
    assert len(world.records()) == 2  # the action and its call, unclassified


def test_clean_report_names_the_covering_checkpoint(world: World, capsys) -> None:
    world.call("/export?to=billing")
    world.call("/export?to=billing")
    for p in world.pipelines:
        p.shutdown()  # writes the final checkpoint
    assert main(["boundary", "--ledger", world.ledger, "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "no violation in 2 trails touching classified data" in out
    assert "covered by checkpoint shop:4 at " in out
    assert "covered by checkpoint billing:2 at " in out
    assert "VIOLATION" not in out


@pytest.mark.parametrize("world", [{"services": ["shop"]}], indirect=True)
def test_a_service_outside_the_allow_list_receiving_the_trail_is_a_violation(world: World) -> None:
    status, trail = world.call("/export?to=billing")
    assert status == 200
    (violation,) = world.violations()
    assert violation.record.attr(v.TRAIL_ID) == trail
    assert violation.chain == "billing"
    assert violation.record.attr("audit.boundary.destination") == "billing"
    assert violation.record.attr("audit.boundary.kind") == "services"


@pytest.mark.parametrize("world", [{"mode": "enforce"}], indirect=True)
def test_enforce_blocks_the_call_and_records_the_attempt(world: World, capsys) -> None:
    status, body = world.call("/export?to=billing,sink")
    assert status == 403
    assert (
        "production data may not reach 127.0.0.1:" in body and "blocked by the audit policy" in body
    )
    assert world.sink_hits == []  # nothing left
    records = world.records()
    (violation,) = [s.record for s in records if s.record.attr(v.ACTION) == "boundary.violation"]
    assert violation.attr("audit.boundary.blocked") is True
    assert violation.attr(v.OUTCOME) == v.DENIED and violation.attr(v.ACTOR_ID) == "alice"
    export = next(s.record for s in records if s.record.attr(v.ACTION) == "order.export")
    assert (export.attr(v.OUTCOME), export.attr(v.REASON)) == (v.FAILURE, "BoundaryViolation")
    # The allowed call to billing went through before.
    assert any(s.chain == "shop" and s.record.name == "POST" for s in records)
    assert world.counter() == 1
    assert main(["boundary", "--ledger", world.ledger]) == 1
    assert "(blocked)" in capsys.readouterr().out


def test_copy_into_an_unapproved_data_store_is_blocked(tmp_path, make_pipeline) -> None:
    """Data stores are destinations too: production rows written into analytics."""
    policy = AuditPolicy.from_dict(
        {
            "boundary": {
                "mode": "enforce",
                "classify": [{"classification": "production", "db_system": "postgresql",
                              "db_name": "shop_prod"}],
                "allow": {"production": {"data_stores": ["postgresql:shop_prod"]}},
            }
        }
    )  # fmt: skip
    pipeline, provider, _ = make_pipeline(policy=policy)
    tracer = provider.get_tracer("db")
    prod = {"db.system": "postgresql", "db.name": "shop_prod"}
    analytics = {"db.system": "postgresql", "db.name": "analytics"}
    with otel_audit.audit_action("report.build", tracer=tracer):
        with tracer.start_as_current_span(
            "SELECT",
            kind=SpanKind.CLIENT,
            attributes={**prod, "db.statement": "SELECT * FROM orders"},
        ):
            pass
        with pytest.raises(
            BoundaryViolation, match="production data may not reach postgresql:analytics"
        ):
            with tracer.start_as_current_span(
                "INSERT",
                kind=SpanKind.CLIENT,
                attributes={**analytics, "db.statement": "INSERT INTO t VALUES (1)"},
            ):
                raise AssertionError("the write must not start")  # pragma: no cover
    with open_ledger(pipeline.ledger_url, create=False, readonly=True) as ledger:
        got = [s.record for s in ledger.query(Query())]
    (violation,) = [r for r in got if r.attr(v.ACTION) == "boundary.violation"]
    assert violation.attr("audit.boundary.kind") == "data_stores"
    assert violation.attr("audit.boundary.blocked") is True
    assert [r.name for r in got if r.attr(v.EFFECT) == v.DATA_WRITE] == []


def test_inbound_classification_header_is_validated() -> None:
    from opentelemetry import baggage

    from otel_audit.policy.boundary import ClassificationPropagator

    prop = ClassificationPropagator()
    labels = ",".join(
        ["production", "<script>", "pii", " spaced out "] + [f"l{i}" for i in range(20)]
    )
    ctx = prop.extract({"otel-audit-classification": labels})
    got = baggage.get_baggage(v.DATA_CLASSIFICATION, ctx)
    assert isinstance(got, str)
    parts = got.split(",")
    assert "production" in parts and "pii" in parts and "<script>" not in parts
    assert len(parts) <= 8
    assert (
        prop.extract({}) is not None
        and baggage.get_baggage(v.DATA_CLASSIFICATION, prop.extract({})) is None
    )
    carrier: dict[str, str] = {}
    prop.inject(carrier, ctx)
    assert carrier == {"otel-audit-classification": got}
