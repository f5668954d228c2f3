"""Example shop, inventory service: writes the stock table, notifies the user, queues a job.

The notification (an outbox row for the user) is marked with
``otel_audit.semantics.effects.notification``; a restock check runs on a background
thread, carrying the trace context in the job's headers like a message queue would.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from flask import request
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from otel_audit import actor as audit_actor
from otel_audit import continue_trail, current_actor
from otel_audit._demo._common import Route, create_app, main, run_sql
from otel_audit.capture.effects import notification

DB = "inventory.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, recipient TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS restock (id INTEGER PRIMARY KEY, sku TEXT, remaining INTEGER);
INSERT OR IGNORE INTO stock (sku, qty) VALUES ('apple', 10), ('pear', 3);
"""
RESTOCK_BELOW = int(os.environ.get("SHOP_RESTOCK_BELOW", "100"))

_jobs: queue.Queue[dict[str, Any]] = queue.Queue()
_worker_lock = threading.Lock()
_worker_pid = 0
_tracer = trace.get_tracer("shop.inventory")


def _notify(message: str) -> None:
    who = current_actor()
    recipient = who.id if who is not None else "unknown"
    with notification(f"notify {recipient}", recipient=recipient, channel="outbox"):
        run_sql(
            DB, [("INSERT INTO outbox (recipient, message) VALUES (?, ?)", (recipient, message))]
        )


def _enqueue(sku: str) -> None:
    """Queue a restock check; the headers carry the trace context (and the trail in baggage)."""
    global _worker_pid
    headers: dict[str, str] = {}
    propagate.inject(headers)
    who = current_actor()
    with _worker_lock:
        if _worker_pid != os.getpid():  # a fresh worker per process (gunicorn forks)
            threading.Thread(target=_work, name="restock-worker", daemon=True).start()
            _worker_pid = os.getpid()
    _jobs.put({"headers": headers, "sku": sku, "actor": who.id if who else None})


def _work() -> None:
    while True:
        job = _jobs.get()
        # Attach the extracted context (not only parent the span on it): the
        # trail rides in its baggage, and spans below must see it. The queue is
        # this process's own, so its baggage is trusted to continue the trail.
        token = otel_context.attach(continue_trail(propagate.extract(job["headers"])))
        try:
            with _tracer.start_as_current_span("restock check", kind=SpanKind.CONSUMER):
                # The actor travels inside the process, not in the headers.
                if job["actor"]:
                    with audit_actor(job["actor"]):
                        _restock(job["sku"])
                else:
                    _restock(job["sku"])
        except Exception:
            logging.getLogger("shop.inventory").exception("restock check failed")
        finally:
            otel_context.detach(token)


def _restock(sku: str) -> None:
    rows = run_sql(DB, [("SELECT qty FROM stock WHERE sku = ?", (sku,))])[2]
    remaining = rows[0][0] if rows else 0
    if remaining < RESTOCK_BELOW:
        run_sql(DB, [("INSERT INTO restock (sku, remaining) VALUES (?, ?)", (sku, remaining))])


def reserve(sku: str) -> Any:
    qty = int((request.get_json(silent=True) or {}).get("qty", 1))
    changed = run_sql(
        DB, [("UPDATE stock SET qty = qty - ? WHERE sku = ? AND qty >= ?", (qty, sku, qty))]
    )[1]
    if changed != 1:
        return {"error": "not enough stock"}, 409
    _notify(f"{qty} x {sku} reserved for you")
    _enqueue(sku)
    return {"sku": sku, "reserved": qty}


def release(sku: str) -> Any:
    qty = int((request.get_json(silent=True) or {}).get("qty", 1))
    run_sql(DB, [("UPDATE stock SET qty = qty + ? WHERE sku = ?", (qty, sku))])
    _notify(f"{qty} x {sku} released")
    return {"sku": sku, "released": qty}


def get_stock(sku: str) -> Any:
    rows = run_sql(DB, [("SELECT qty FROM stock WHERE sku = ?", (sku,))])[2]
    return {"sku": sku, "qty": rows[0][0] if rows else 0}


ROUTES: list[Route] = [
    ("/stock/<sku>", ["GET"], get_stock),
    ("/stock/<sku>/reserve", ["POST"], reserve),
    ("/stock/<sku>/release", ["POST"], release),
]

app = create_app("inventory", ROUTES, SCHEMA, DB)

if __name__ == "__main__":
    main(app)
