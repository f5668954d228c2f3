"""The example shop through the real Collector (collector-config/ as shipped) to serve and Jaeger.

Every process is real and on loopback: the two services under
``opentelemetry-instrument``, the agent and the gateway (the Collector built
from collector-config/builder.yaml), ``otel-audit serve`` and Jaeger v2,
which is read through its query API (what the UI reads).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
from typing import Any

import pytest
import requests

from otel_audit import vocabulary as v
from tests.plugins.flask_service import base_env
from tests.plugins.otel_stack import OtelStack, ledger_records, wait_until

ALICE = ("alice", "alice-pw")
BOB = ("bob", "bob-pw")
_BIN = pathlib.Path(sys.executable).parent


@pytest.fixture
def otel_stack(stack_running: OtelStack) -> OtelStack:
    """The module's stack (started once), everything running at the start of each test."""
    return stack_running


@pytest.fixture
def shop(otel_stack: OtelStack, run_service, tmp_path: pathlib.Path):
    """The two services, their own local ledger, exporting OTLP to the stack's agent."""
    ledger = f"sqlite:///{tmp_path / 'shop.db'}"
    extra = dict(
        otel_stack.service_env(),
        OTEL_AUDIT_TRUSTED_PEERS="127.0.0.1/32",
        OTEL_AUDIT_CHECKPOINT_INTERVAL="1",
    )
    inventory = run_service(
        "otel_audit._demo.inventory:app", env=base_env(ledger, tmp_path, **extra)
    )
    orders = run_service(
        "otel_audit._demo.orders:app",
        env=base_env(ledger, tmp_path, SHOP_INVENTORY_URL=inventory.url, **extra),
    )
    return orders, inventory, ledger


def ids(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["trace_id"], r["span_id"]) for r in records]


def order(orders, user=ALICE, sku="apple", qty=1) -> requests.Response:
    return requests.post(
        orders.url + "/orders", json={"sku": sku, "qty": qty}, auth=user, timeout=30
    )


def wait_for_background_job(ledger: str, n_orders: int) -> list[dict[str, Any]]:
    """The shop's local ledger once the restock job of each of ``n_orders`` orders wrote."""

    def done() -> list[dict[str, Any]] | None:
        got = ledger_records(ledger)
        restocks = [
            r for r in got if r["service"] == "inventory" and "restock" in str(r["attributes"])
        ]
        return got if len(restocks) >= n_orders else None

    return wait_until(done, 30, "the restock jobs of the orders")


def assert_serve_has_exactly(stack: OtelStack, local: list[dict[str, Any]], timeout: float = 60) -> list[dict[str, Any]]:  # fmt: skip
    """serve's ledger ends up holding every audit span of this test's traces, each once, and no other.

    serve's ledger outlives a test (one stack per module), so it is compared on
    the traces of this test's services; across all of it, no span is there twice.
    """
    expected = set(ids(local))
    traces = {trace_id for trace_id, _ in expected}

    def arrived() -> list[dict[str, Any]] | None:
        rs = [r for r in ledger_records(stack.ledger) if r["trace_id"] in traces]
        return rs if set(ids(rs)) >= expected else None

    got = wait_until(arrived, timeout, f"{len(expected)} audit spans in serve's ledger")
    assert sorted(ids(got)) == sorted(expected), "serve's ledger differs from the services' records"
    every = ids(ledger_records(stack.ledger))
    assert len(every) == len(set(every)), "a span stored twice in serve's ledger"
    return got


def verify(ledger: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_BIN / "otel-audit"), "verify", "--ledger", ledger, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def jaeger_tree(trace: dict[str, Any]) -> dict[str, tuple[str | None, str, str]]:
    """span id -> (parent span id, service, operation) of a Jaeger API trace."""
    out = {}
    for s in trace["spans"]:
        parents = [r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"]
        service = trace["processes"][s["processID"]]["serviceName"]
        out[s["spanID"]] = (parents[0] if parents else None, service, s["operationName"])
    return out


def test_audit_spans_reach_serve_once_and_the_trail_shows_in_jaeger(otel_stack, shop):
    orders, inventory, shop_ledger = shop
    created = order(orders)
    assert created.status_code == 201, created.text
    order_id = created.json()["order_id"]
    assert order(orders, user=BOB).status_code == 403
    assert (
        requests.get(f"{orders.url}/orders/{order_id}", auth=ALICE, timeout=10).status_code == 200
    )
    assert (
        requests.delete(f"{orders.url}/orders/{order_id}", auth=ALICE, timeout=30).status_code
        == 200
    )
    local = wait_for_background_job(shop_ledger, 1)

    # Every audit span in serve's ledger exactly once, and the ledger verifies.
    served = assert_serve_has_exactly(otel_stack, local)
    assert verify(otel_stack.ledger).returncode == 0

    # The trail, found in Jaeger by its tag, with the ledger's tree across both services.
    (create,) = [
        r for r in served
        if r["attributes"].get(v.ACTION) == "order.create" and r["attributes"].get(v.OUTCOME) == v.SUCCESS
    ]  # fmt: skip
    trail = create["attributes"][v.TRAIL_ID]
    trail_records = [r for r in served if r["attributes"].get(v.TRAIL_ID) == trail]
    assert {r["service"] for r in trail_records} == {"orders", "inventory"}

    def found() -> list[dict[str, Any]] | None:
        traces = otel_stack.jaeger_traces("orders", **{v.TRAIL_ID: trail})
        if not traces:
            return None
        spans = jaeger_tree(traces[0])
        return traces if all(r["span_id"] in spans for r in trail_records) else None

    (trace,) = wait_until(found, 30, "the trail in Jaeger")
    tree = jaeger_tree(trace)
    for r in trail_records:
        parent, service, _ = tree[r["span_id"]]
        assert (parent, service) == (r["parent_span_id"], r["service"]), r["name"]
    reserve = next(r for r in trail_records if r["attributes"].get(v.ACTION) == "stock.reserve")
    call = tree[reserve["parent_span_id"]]
    assert call[1] == "orders"  # inventory's action is a child of orders' outbound call
    assert tree[create["span_id"]][0] is None or tree[create["span_id"]][1] == "orders"

    # Ordinary spans reach Jaeger and never the ledger: the GET of the order.
    def get_span() -> str | None:
        for t in otel_stack.jaeger_traces("orders"):
            for s in t["spans"]:
                if s["operationName"].startswith("GET /orders/"):
                    return str(s["spanID"])
        return None

    get_id = wait_until(get_span, 30, "the GET span in Jaeger")
    assert get_id not in {r["span_id"] for r in served}
    assert get_id not in {r["span_id"] for r in local}

    # Checkpoint log records reach the log pipeline: the log backend and the anchors file.
    wait_until(
        lambda: any(body.startswith("otel-audit checkpoint") for body in otel_stack.log_bodies()),
        30, "a checkpoint log record at the log backend",
    )  # fmt: skip
    wait_until(
        lambda: otel_stack.anchors.exists() and "otel_audit.checkpoint" in otel_stack.anchors.read_text(),
        30, "a checkpoint in the anchors file",
    )  # fmt: skip
    anchored = verify(shop_ledger, "--anchors", str(otel_stack.anchors))
    assert anchored.returncode == 0, anchored.stdout + anchored.stderr


def test_serve_down_then_back_loses_and_doubles_nothing(otel_stack, shop):
    orders, _, shop_ledger = shop
    assert order(orders).status_code == 201
    wait_for_background_job(shop_ledger, 1)
    otel_stack.serve.stop()
    for _ in range(3):
        assert order(orders).status_code == 201
    local = wait_for_background_job(shop_ledger, 4)
    # The gateway holds them in its persistent audit queue while serve is away.
    wait_until(
        lambda: otel_stack.metric("gateway", "otelcol_exporter_queue_size", exporter="otlp_http/audit") > 0,
        30, "audit requests waiting in the gateway's queue",
    )  # fmt: skip
    otel_stack.serve.start()
    assert_serve_has_exactly(otel_stack, local)
    assert verify(otel_stack.ledger).returncode == 0


def jaeger_failures(stack: OtelStack) -> int:
    """How many times the gateway logged a failed export to Jaeger."""
    text = stack.gateway.log.read_text(errors="replace") if stack.gateway.log.exists() else ""
    return sum(
        "otlp_grpc/jaeger" in line and "Exporting failed" in line for line in text.splitlines()
    )


def test_jaeger_down_never_holds_up_the_audit_route(otel_stack, shop):
    orders, _, shop_ledger = shop
    failures_before = jaeger_failures(otel_stack)
    otel_stack.jaeger.stop()
    for _ in range(3):
        assert order(orders).status_code == 201
    local = wait_for_background_job(shop_ledger, 3)
    wait_until(
        lambda: jaeger_failures(otel_stack) > failures_before,
        30,
        "the gateway failing to reach Jaeger",
    )
    # The audit route flows while Jaeger is away, and the gateway refused nothing.
    assert_serve_has_exactly(otel_stack, local, timeout=30)
    assert otel_stack.metric("gateway", "otelcol_receiver_refused_spans") == 0
    assert otel_stack.metric("agent", "otelcol_exporter_send_failed_spans") == 0
    # Jaeger back (empty: in-memory), new spans reach it again.
    otel_stack.jaeger.start()
    assert order(orders).status_code == 201
    wait_until(lambda: otel_stack.jaeger_traces("orders"), 30, "new traces in Jaeger")


def test_collector_crash_and_restart_mid_stream_loses_nothing(otel_stack, shop):
    orders, _, shop_ledger = shop
    replies: list[int] = []

    def stream() -> None:
        for _ in range(8):
            replies.append(order(orders).status_code)

    sender = threading.Thread(target=stream)
    sender.start()
    wait_until(lambda: len(replies) >= 2, 60, "the first orders")
    otel_stack.gateway.kill()  # a crash, mid-stream
    sender.join(120)
    assert replies == [201] * 8
    local = wait_for_background_job(shop_ledger, 8)
    # The agent holds what it acknowledged in its persistent queue; crash it too.
    wait_until(
        lambda: otel_stack.metric("agent", "otelcol_exporter_queue_size", exporter="otlp_grpc/gateway") > 0,
        30, "traces waiting in the agent's queue",
    )  # fmt: skip
    otel_stack.agent.kill()
    otel_stack.agent.start()
    otel_stack.gateway.start()
    assert_serve_has_exactly(otel_stack, local)
    assert verify(otel_stack.ledger).returncode == 0
