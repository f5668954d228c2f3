"""A Flask request's effects and its own record: one commit, and no reply before it.

A real Flask app instrumented by FlaskInstrumentor and AuditFlask, served
over real HTTP on loopback by werkzeug in a thread, recorded by a real audit
pipeline into a real SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import flask
import pytest
import requests
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from otel_audit import vocabulary as v
from otel_audit.capture.effects import effect_span
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode
from otel_audit.engine.writer import LedgerWriter
from otel_audit.errors import LedgerWriteError
from otel_audit.integrations.flask import AuditFlask


def make_app(provider: Any, on_view: Any = None, middleware: Any = None) -> flask.Flask:
    """An ordinary app: a view that sends three notifications, one that streams."""
    app = flask.Flask("orders")
    FlaskInstrumentor.instrument_app(app, tracer_provider=provider)
    if middleware is not None:
        app.wsgi_app = middleware(app.wsgi_app)  # type: ignore[method-assign]

    @app.post("/orders/<order_id>/ship")
    def ship(order_id: str) -> Any:
        if on_view is not None:
            on_view()
        for who in ("warehouse", "customer", "billing"):
            with effect_span(f"notify {who}", v.NOTIFICATION):
                pass
        return {"shipped": order_id}

    @app.post("/orders/export")
    def export() -> Any:
        with effect_span("notify auditor", v.NOTIFICATION):
            pass

        def rows() -> Iterator[str]:
            yield "id\n"
            yield "1\n"

        return flask.Response(flask.stream_with_context(rows()), mimetype="text/csv")

    @app.post("/orders/<order_id>/cancel")
    def cancel(order_id: str) -> Any:
        with effect_span(f"refund {order_id}", v.DATA_WRITE):
            pass
        time.sleep(1.3)  # a slow view: the idle writer commits the refund meanwhile
        return {"cancelled": order_id}

    AuditFlask(app)
    return app


def refuse(path: str, marker: str) -> None:
    """An insider's trigger: the ledger refuses records whose body holds ``marker``."""
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records"
            f" WHEN instr(CAST(NEW.body AS TEXT), '{marker}') > 0"
            " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )


def ledger_rows(path: str) -> list[Any]:
    with open_ledger(path, readonly=True) as ledger:
        return [decode(row.body) for chain in ledger.chains() for row in ledger.scan(chain)]


def test_a_requests_effects_and_own_record_are_committed_together(make_pipeline, serve, tmp_path):
    pipeline, provider, _ = make_pipeline(writer="thread")
    url = serve(make_app(provider))
    assert requests.post(url + "/orders/1/ship").ok  # warm up: the writer starts
    before = pipeline.writer.stats().batches
    for i in range(10):
        assert requests.post(url + f"/orders/{i}/ship").json() == {"shipped": str(i)}
    # Two commits per request: the request record before the view, then the
    # three notifications and the request's own record (three before).
    assert pipeline.writer.stats().batches - before == 20
    records = ledger_rows(str(tmp_path / "audit.db"))
    last = records[-5:]  # the last request: intent, three effects, its own record
    assert [r.attr(v.INTENT) for r in last] == [True, None, None, None, None]
    assert [r.attr(v.EFFECT) for r in last[1:4]] == [v.NOTIFICATION] * 3
    own = last[4]
    assert (own.attr(v.ACTION), own.attr(v.OUTCOME), own.span_id) == (
        "order.ship", v.SUCCESS, last[0].span_id,
    )  # fmt: skip


def test_a_streamed_response_still_has_its_own_record(make_pipeline, serve, tmp_path):
    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider))
    reply = requests.post(url + "/orders/export")
    assert (reply.status_code, reply.text) == (200, "id\n1\n")
    pipeline.flush()
    names = [
        (r.name, r.attr(v.INTENT), r.attr(v.OUTCOME))
        for r in ledger_rows(str(tmp_path / "audit.db"))
    ]
    assert names[0] == ("POST /orders/export", True, None)
    assert ("notify auditor", None, None) in names
    assert names[-1] == ("POST /orders/export", None, v.SUCCESS)


def test_a_ledger_replaced_during_the_view_gets_a_503_and_no_record_of_success(
    make_pipeline, serve, tmp_path
):
    """An insider swaps the ledger file while a request runs: its records go to
    the orphaned file, so the client must not be told the change was made."""
    path = str(tmp_path / "audit.db")
    pipeline, provider, _ = make_pipeline()
    swapped = threading.Event()

    def swap() -> None:
        if not swapped.is_set():
            swapped.set()
            copy = str(tmp_path / "copy.db")
            with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
                src.backup(dst)
            os.replace(copy, path)

    url = serve(make_app(provider, on_view=swap))
    reply = requests.post(url + "/orders/7/ship")
    assert (reply.status_code, reply.text) == (503, "audit record of a change not written\n")
    records = ledger_rows(path)
    # The request record before the view is there (written before the swap);
    # nothing in the ledger says the request succeeded.
    assert [r.attr(v.INTENT) for r in records if r.name == "POST /orders/<order_id>/ship"] == [True]


def test_a_record_queued_after_one_that_failed_is_not_written(tmp_path):
    """The writer never commits a record without one it was queued after (an
    action's own record without its effects), even when the ledger recovers."""
    path = str(tmp_path / "audit.db")
    writer = LedgerWriter(f"sqlite:///{path}", "main")
    writer.write(b'{"v":1,"n":0}')
    # An insider's trigger refuses one record: its batch fails, the next commits.
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records"
            " WHEN instr(CAST(NEW.body AS TEXT), 'refused') > 0"
            " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )
    effect = writer.enqueue(b'{"v":1,"n":"refused"}')
    with pytest.raises(LedgerWriteError):
        effect.wait(writer)
    own = writer.enqueue(b'{"v":1,"n":2}', after=[effect])
    alone = writer.enqueue(b'{"v":1,"n":3}')
    with pytest.raises(LedgerWriteError, match="must be written with"):
        own.wait(writer)
    assert alone.wait(writer).seq == 2
    writer.shutdown()
    with open_ledger(path, readonly=True) as ledger:
        assert [row.body for row in ledger.scan("main")] == [b'{"v":1,"n":0}', b'{"v":1,"n":3}']


@pytest.mark.parametrize(
    "path, refused",
    [
        # committed with the request's own record, which is refused with it
        ("/orders/9/ship", "notify billing"),
        # committed alone while the view still runs (the idle writer's look)
        ("/orders/9/cancel", "refund 9"),
    ],
)
def test_an_effect_refused_by_the_ledger_leaves_a_failure_not_a_success(
    make_pipeline, serve, tmp_path, path, refused
):
    ledger = str(tmp_path / "audit.db")
    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider))
    assert requests.post(url + "/orders/1/ship").ok
    refuse(ledger, refused)
    reply = requests.post(url + path)
    assert (reply.status_code, reply.text) == (503, "audit record of a change not written\n")
    pipeline.flush()
    outcomes = [
        (r.attr(v.INTENT), r.attr(v.OUTCOME), r.attr(v.REASON))
        for r in ledger_rows(ledger)
        if r.span_id == ledger_rows(ledger)[-1].span_id
    ]
    assert outcomes == [(True, None, None), (None, v.FAILURE, "LedgerWriteError")]


def test_a_middleware_that_starts_the_response_at_its_first_chunk(make_pipeline, serve, tmp_path):
    """A generator middleware applied before AuditFlask calls start_response only
    when its body is iterated: the records are waited for there."""

    def lazily(app: Any) -> Any:
        def middleware(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            yield from app(environ, start_response)

        return middleware

    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider, middleware=lazily))
    reply = requests.post(url + "/orders/3/ship")
    assert reply.json() == {"shipped": "3"}
    # No flush: the reply came after the records were durable.
    own = [r for r in ledger_rows(str(tmp_path / "audit.db")) if r.attr(v.ACTION) == "order.ship"]
    assert [r.attr(v.OUTCOME) for r in own] == [None, v.SUCCESS]


def test_a_request_refused_before_its_view_keeps_its_answer(make_pipeline, serve, tmp_path):
    path = str(tmp_path / "audit.db")
    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider))
    assert requests.post(url + "/orders/1/ship").ok
    refuse(path, "orders/2/ship")  # its request record and its outcome record
    reply = requests.post(url + "/orders/2/ship")
    assert (reply.status_code, reply.text) == (503, "audit ledger unavailable\n")


_TWO_PIPELINES = """
import gc, sys
import flask
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
import otel_audit
from otel_audit.capture.scope import ActionScope
from otel_audit.integrations.flask import AuditFlask

first, second = TracerProvider(), TracerProvider()
trace.set_tracer_provider(first)
for name, provider in (("first", first), ("second", second)):
    otel_audit.configure(ledger=f"sqlite:///{sys.argv[1]}/{name}.db", service_name=name,
                         tracer_provider=provider, handle_sigterm=False)
app = flask.Flask("orders")
FlaskInstrumentor.instrument_app(app, tracer_provider=second)

@app.post("/orders/<order_id>/ship")
def ship(order_id):
    return {"shipped": order_id}

AuditFlask(app)
client = app.test_client()
assert all(client.post(f"/orders/{i}/ship").status_code == 200 for i in range(50))
gc.collect()
print(sum(isinstance(o, ActionScope) for o in gc.get_objects()))
"""


def test_requests_recorded_by_a_second_pipeline_leave_nothing_behind(tmp_path):
    """Two pipelines in one process, the app instrumented on the second one:
    nothing is kept per request (the first pipeline's processor adopted each)."""
    out = subprocess.run(
        [sys.executable, "-c", _TWO_PIPELINES, str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert int(out.stdout.strip().splitlines()[-1]) < 5


def test_a_ledger_renamed_away_and_back_never_gets_two_records_for_one_request(
    make_pipeline, serve, tmp_path
):
    """A backup tool renames the ledger away and back, again and again, while 8
    clients send requests. A commit confirmed in a gap is answered as failed
    (503) but is in the ledger: it must not be written a second time saying
    failure, and every request answered 200 has all its records."""
    path = str(tmp_path / "audit.db")
    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider))
    status: dict[str, int] = {}
    stop = threading.Event()

    def client(k: int) -> None:
        with requests.Session() as session:
            i = k
            while not stop.is_set():
                status[str(i)] = session.post(url + f"/orders/{i}/ship", timeout=60).status_code
                i += 8

    clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in clients:
        thread.start()
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        time.sleep(0.003)
        os.rename(path, path + ".away")
        time.sleep(0.0005)
        os.rename(path + ".away", path)
    stop.set()
    for thread in clients:
        thread.join()
    pipeline.flush()
    outcomes: dict[str, list[Any]] = {}
    for r in ledger_rows(path):
        if r.attr(v.ACTION) == "order.ship" and not r.attr(v.INTENT):
            request = str(r.attr("http.target") or r.attr("url.path")).split("/")[2]
            outcomes.setdefault(request, []).append(r.attr(v.OUTCOME))
    assert 503 in status.values()  # the dance did hit commits
    assert all(len(found) == 1 for found in outcomes.values()), {
        k: found for k, found in outcomes.items() if len(found) > 1
    }
    assert all(outcomes.get(i) == [v.SUCCESS] for i, code in status.items() if code == 200)


def test_the_apps_body_is_closed_once_when_the_reply_becomes_a_503(make_pipeline, serve, tmp_path):
    """WSGI: close() once. A middleware inside AuditFlask that starts its response
    at the first chunk counts the closes of the body it passes on."""
    closed: list[int] = []

    class Counted:
        def __init__(self, app: Any) -> None:
            self.app = app

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            outer = self

            class Body:
                def __iter__(self) -> Iterator[bytes]:
                    yield from outer.app(environ, start_response)

                def close(self) -> None:
                    closed.append(1)

            return Body()

    path = str(tmp_path / "audit.db")
    pipeline, provider, _ = make_pipeline()
    url = serve(make_app(provider, middleware=Counted))
    assert requests.post(url + "/orders/1/ship").ok
    refuse(path, "notify billing")
    closed.clear()
    reply = requests.post(url + "/orders/2/ship")
    assert reply.status_code == 503
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert closed == [1]
