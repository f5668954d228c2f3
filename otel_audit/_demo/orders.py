"""Example shop, orders service: writes the orders table and calls inventory.

Run: ``OTEL_AUDIT_LEDGER=sqlite:///audit.db OTEL_SERVICE_NAME=orders
opentelemetry-instrument python -m otel_audit._demo.orders --port 5001``.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from flask import g, request

from otel_audit._demo._common import Route, create_app, main, run_sql

DB = "orders.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY, owner TEXT NOT NULL, sku TEXT NOT NULL,
    qty INTEGER NOT NULL, status TEXT NOT NULL
);
"""


def _inventory() -> str:
    return os.environ.get("SHOP_INVENTORY_URL", "http://127.0.0.1:5002")


def _may_change() -> bool:
    return "customer" in g.user["roles"]


def create_order() -> Any:
    if not _may_change():
        return {"error": "customers only"}, 403
    body = request.get_json(silent=True) or {}
    sku, qty = str(body.get("sku", "")), int(body.get("qty", 1))
    if not sku or qty <= 0:
        return {"error": "sku and a positive qty are required"}, 400
    order_id = run_sql(
        DB,
        [("INSERT INTO orders (owner, sku, qty, status) VALUES (?, ?, ?, 'placed')",
          (g.user["id"], sku, qty))],
    )[0]  # fmt: skip
    reply = requests.post(
        f"{_inventory()}/stock/{sku}/reserve",
        json={"qty": qty, "order_id": order_id},
        headers={"X-Shop-Internal": "1"},
        timeout=10,
    )
    if reply.status_code != 200:
        run_sql(DB, [("UPDATE orders SET status = 'rejected' WHERE id = ?", (order_id,))])
        return {"error": "out of stock", "order_id": order_id}, 409
    return {"order_id": order_id, "status": "placed"}, 201


def get_order(order_id: int) -> Any:
    rows = run_sql(
        DB, [("SELECT id, owner, sku, qty, status FROM orders WHERE id = ?", (order_id,))]
    )[2]
    if not rows:
        return {"error": "no such order"}, 404
    oid, owner, sku, qty, status = rows[0]
    return {"order_id": oid, "owner": owner, "sku": sku, "qty": qty, "status": status}


def cancel_order(order_id: int) -> Any:
    if not _may_change():
        return {"error": "customers only"}, 403
    rows = run_sql(DB, [("SELECT sku, qty, status FROM orders WHERE id = ?", (order_id,))])[2]
    if not rows or rows[0][2] != "placed":
        return {"error": "no such open order"}, 404
    sku, qty, _ = rows[0]
    run_sql(DB, [("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))])
    requests.post(
        f"{_inventory()}/stock/{sku}/release",
        json={"qty": qty, "order_id": order_id},
        headers={"X-Shop-Internal": "1"},
        timeout=10,
    ).raise_for_status()
    return {"order_id": order_id, "status": "cancelled"}


def export_orders() -> Any:
    """Send every order to a partner (``SHOP_EXPORT_URL``).

    The demo's deliberate data-boundary violation: the orders table is
    classified ``production`` and the partner's host is not on its allow-list,
    so the audit pipeline records a ``boundary.violation`` (the call still
    goes out: the demo policy detects, it does not enforce).
    """
    target = os.environ.get("SHOP_EXPORT_URL")
    if not target:
        return {"error": "no export target configured (SHOP_EXPORT_URL)"}, 404
    rows = run_sql(DB, [("SELECT id, owner, sku, qty, status FROM orders", ())])[2]
    requests.post(target, json=rows, timeout=10).raise_for_status()
    return {"exported": len(rows)}


def fail_order() -> Any:
    raise RuntimeError("simulated failure")


ROUTES: list[Route] = [
    ("/orders", ["POST"], create_order),
    ("/orders/<int:order_id>", ["GET"], get_order),
    ("/orders/<int:order_id>", ["DELETE"], cancel_order),
    ("/orders/fail", ["POST"], fail_order),
    ("/orders/export", ["POST"], export_orders),
]

app = create_app("orders", ROUTES, SCHEMA, DB)

if __name__ == "__main__":
    main(app)
