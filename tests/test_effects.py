"""Downstream effects: classification (old and stable semconv), real instrumentations, marks."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
from opentelemetry.trace import SpanKind

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.capture.effects import effect_span, notification, publish
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.semantics.effects import classify, http_peer, mark_effect, sql_operation

CLIENT, PRODUCER, INTERNAL = SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.INTERNAL


@pytest.mark.parametrize(
    ("attributes", "kind", "expected"),
    [
        # databases, old semconv (db.system, db.statement / db.operation)
        ({"db.system": "sqlite", "db.statement": "INSERT INTO t VALUES (1)"}, CLIENT, v.DATA_WRITE),
        ({"db.system": "postgresql", "db.operation": "UPDATE"}, CLIENT, v.DATA_WRITE),
        ({"db.system": "sqlite", "db.statement": "  /* c */ DELETE FROM t"}, CLIENT, v.DATA_WRITE),
        ({"db.system": "mysql", "db.statement": "MERGE INTO t USING s ON 1"}, CLIENT, v.DATA_WRITE),
        ({"db.system": "sqlite", "db.statement": "CREATE TABLE x (a)"}, CLIENT, v.DATA_WRITE),
        ({"db.system": "sqlite", "db.statement": "select * from t"}, CLIENT, v.DATA_READ),
        # databases, stable semconv (db.system.name, db.query.text / db.operation.name)
        ({"db.system.name": "postgresql", "db.query.text": "INSERT INTO t"}, CLIENT, v.DATA_WRITE),
        ({"db.system.name": "postgresql", "db.operation.name": "SELECT"}, CLIENT, v.DATA_READ),
        ({"db.system.name": "sqlite", "db.query.summary": "DELETE orders"}, CLIENT, v.DATA_WRITE),
        ({"db.system.name": "sqlite", "db.query.text": "BEGIN"}, CLIENT, None),
        # outbound HTTP, old and stable
        ({"http.method": "POST", "http.url": "http://inv:1/x"}, CLIENT, v.HTTP_CALL),
        ({"http.request.method": "GET", "url.full": "http://inv/x"}, CLIENT, v.HTTP_CALL),
        ({"http.request.method": "GET"}, SpanKind.SERVER, None),
        # messaging, old and stable
        ({"messaging.system": "kafka", "messaging.destination": "o"}, PRODUCER, v.MESSAGE_PUBLISH),
        ({"messaging.system": "rabbitmq", "messaging.operation.type": "send"}, CLIENT,
         v.MESSAGE_PUBLISH),
        ({"messaging.system": "kafka", "messaging.operation.type": "receive"}, CLIENT, None),
        # an explicit mark wins
        ({v.EFFECT: v.NOTIFICATION, "db.system": "sqlite", "db.statement": "SELECT 1"}, CLIENT,
         v.NOTIFICATION),
        ({"foo": "bar"}, INTERNAL, None),
    ],
)  # fmt: skip
def test_classify_old_and_stable_semconv(attributes: dict[str, Any], kind: SpanKind, expected):
    assert classify(attributes, kind) == expected


def test_sql_operation_and_http_peer_from_either_generation():
    assert sql_operation({"db.operation": "insert"}) == "INSERT"
    assert sql_operation({}, "UPDATE orders") == "UPDATE"
    assert http_peer({"server.address": "inventory"}) == "inventory"
    assert http_peer({"net.peer.name": "old-host"}) == "old-host"
    assert http_peer({"url.full": "http://h.example:8080/p"}) == "h.example"
    assert http_peer({"http.url": "https://[::1]:1/"}) == "::1"
    assert http_peer({}) is None


def test_mark_effect_rejects_unknown_effects():
    with pytest.raises(ValueError, match="effect must be one of"):
        mark_effect("data.delete")
    with pytest.raises(ValueError, match="effect must be one of"):
        with effect_span("x", "email"):
            pass


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _records(pipeline) -> list[Any]:
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        return [r.record for r in ledger.query(Query())]


def test_real_instrumentations_inside_a_trail_become_effects(make_pipeline, tmp_path, http_server):
    pipeline, provider, _ = make_pipeline()
    SQLite3Instrumentor().instrument(tracer_provider=provider)
    RequestsInstrumentor().instrument(tracer_provider=provider)
    try:
        con = sqlite3.connect(str(tmp_path / "app.db"))
        cur = con.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS t (a)")  # outside a trail: not audited
        with otel_audit.actor("alice"):
            with otel_audit.audit_action("thing.create", resource=("thing", 1)) as action:
                cur.execute("INSERT INTO t VALUES (1)")
                cur.execute("SELECT a FROM t")  # a read: traced, not kept by default
                requests.post(http_server + "/hook", json={}, timeout=5)
                with notification("notify alice", recipient="alice", channel="email"):
                    pass
                with publish("send thing.created", destination="things"):
                    pass
                with effect_span("custom step", v.DATA_WRITE) as span:
                    mark_effect(v.DATA_WRITE, span, attributes={"store": "blob"})
        con.close()
    finally:
        SQLite3Instrumentor().uninstrument()
        RequestsInstrumentor().uninstrument()
    trail = action.span.get_span_context().span_id
    got = _records(pipeline)
    assert all(r.attr(v.TRAIL_ID) == format(trail, "016x") for r in got)
    assert all(r.attr(v.ACTOR_ID) == "alice" for r in got)
    effects = sorted((r.attr(v.EFFECT), r.name) for r in got if not r.attr(v.EVENT))
    assert effects == [
        (v.DATA_WRITE, "INSERT"),
        (v.DATA_WRITE, "custom step"),
        (v.HTTP_CALL, "POST"),
        (v.MESSAGE_PUBLISH, "send thing.created"),
        (v.NOTIFICATION, "notify alice"),
    ]
    call = next(r for r in got if r.attr(v.EFFECT) == v.HTTP_CALL)
    assert http_peer(call.attributes) == "127.0.0.1"
    notice = next(r for r in got if r.attr(v.EFFECT) == v.NOTIFICATION)
    assert notice.kind == "PRODUCER" and notice.attr("notification.recipient") == "alice"
    # Every effect links back to the action by trace and parent span.
    action_rec = next(r for r in got if r.attr(v.EVENT))
    assert {r.trace_id for r in got} == {action_rec.trace_id}
    assert all(r.parent_span_id == action_rec.span_id for r in got if r is not action_rec)


def test_reads_are_kept_when_the_policy_keeps_them(make_pipeline, tmp_path):
    pipeline, provider, _ = make_pipeline(effects=[v.DATA_READ, v.DATA_WRITE])
    SQLite3Instrumentor().instrument(tracer_provider=provider)
    try:
        con = sqlite3.connect(str(tmp_path / "app.db"))
        with otel_audit.audit_action("thing.read"):
            con.cursor().execute("SELECT 1")
        con.close()
    finally:
        SQLite3Instrumentor().uninstrument()
    assert [r.attr(v.EFFECT) for r in _records(pipeline) if not r.attr(v.EVENT)] == [v.DATA_READ]


def test_trail_and_actor_continue_into_a_thread_pool(make_pipeline, tmp_path):
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    pipeline, provider, _ = make_pipeline()
    SQLite3Instrumentor().instrument(tracer_provider=provider)

    def job() -> None:
        con = sqlite3.connect(str(tmp_path / "jobs.db"))
        con.cursor().execute("CREATE TABLE IF NOT EXISTS j (a)")
        con.close()

    try:
        with ThreadPoolExecutor(2) as pool, otel_audit.actor("alice"):
            with otel_audit.audit_action("job.start") as action:
                pool.submit(contextvars.copy_context().run, job).result()
    finally:
        SQLite3Instrumentor().uninstrument()
    trail = format(action.span.get_span_context().span_id, "016x")
    (write,) = [r for r in _records(pipeline) if r.attr(v.EFFECT) == v.DATA_WRITE]
    assert (write.attr(v.TRAIL_ID), write.attr(v.ACTOR_ID)) == (trail, "alice")
