"""``otel-audit export --format jaeger`` against a real Jaeger v2.

Jaeger v2 has no API that loads a trace from a JSON document: the UI's
"JSON File" tab reads the file in the browser and never sends it to the
server. So these tests load the same records into a fresh Jaeger the way
Jaeger ingests anything, over OTLP (``otel-audit export --format otlp-json``
posted to its OTLP/HTTP receiver), read the trace back through the query API
(the document the UI renders), and require the Jaeger export to be that
document: the same spans, tree, services, times, tags and logs.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import requests
from opentelemetry import trace

from otel_audit import audit_action
from otel_audit import vocabulary as v
from otel_audit._commands.dev_stack import Ports
from tests.plugins.flask_service import base_env
from tests.plugins.otel_stack import ledger_records, make_jaeger, wait_until

_BIN = pathlib.Path(sys.executable).parent
# Tags Jaeger adds from OTLP that the ledger does not keep (the record has no scope version).
JAEGER_ONLY_TAGS = {"otel.scope.version"}


@pytest.fixture
def jaeger(otel_binaries, tmp_path):
    """A fresh, empty Jaeger v2 on free loopback ports."""
    ports = Ports(agent_grpc=0, agent_http=0, jaeger_query=0).resolve()
    component = make_jaeger(otel_binaries[1], ports, tmp_path).start()
    yield ports
    component.stop()


def export(ledger: str, fmt: str, *args: str) -> str:
    out = subprocess.run(
        [str(_BIN / "otel-audit"), "export", "--ledger", ledger, "--format", fmt, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def load_into_jaeger(ports: Ports, ledger: str, trace_id: str) -> dict[str, Any]:
    """Send the trace's records to Jaeger over OTLP/JSON; Jaeger's API document of it."""
    body = export(ledger, "otlp-json", "--trace-id", trace_id).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.jaeger_otlp_http}/v1/traces", data=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    n = len(ledger_records(ledger, "--trace-id", trace_id))

    def stored() -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{ports.jaeger_query}/api/traces/{trace_id}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                (doc,) = json.load(reply)["data"]
        except OSError:  # 404 until stored
            return None
        return doc if len(doc["spans"]) == n else None

    return wait_until(stored, 30, f"{n} spans of {trace_id} in Jaeger")


def comparable(doc: dict[str, Any], drop: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """A Jaeger trace document's spans, services by name, tags as maps, in a stable order.

    A span id can occur twice: an action's intent record (written before it
    ran, end time 0) and its final record are two records of one span.
    """

    def tags(items: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
        return {t["key"]: (t["type"], t["value"]) for t in items if t["key"] not in drop}

    out = [
        {
            "span": s["spanID"],
            "trace": s["traceID"],
            "operation": s["operationName"],
            "service": doc["processes"][s["processID"]]["serviceName"],
            "references": sorted(
                (r["refType"], r["traceID"], r["spanID"]) for r in s["references"]
            ),
            "start": s["startTime"],
            "duration": s["duration"],
            "tags": tags(s["tags"]),
            "logs": [(lg["timestamp"], tags(lg["fields"])) for lg in s["logs"]],
        }
        for s in doc["spans"]
    ]
    return sorted(
        out, key=lambda s: (s["span"], s["duration"], json.dumps(s["tags"], sort_keys=True))
    )


def assert_same_trace(exported: dict[str, Any], in_jaeger: dict[str, Any]) -> None:
    assert exported["traceID"] == in_jaeger["traceID"]
    ours, theirs = comparable(exported), comparable(in_jaeger, drop=JAEGER_ONLY_TAGS)
    for span in theirs:
        # An intent record has no end yet (0): over OTLP Jaeger clamps its
        # duration to 0, as the export does, and says so in a warning tag.
        if span["tags"].get(v.INTENT) == ("bool", True):
            warning = span["tags"].pop("@jaeger@warnings", ("string", ""))[1]
            assert "Negative duration" in warning and span["duration"] == 0
    assert [s["span"] for s in ours] == [s["span"] for s in theirs]
    for mine, jaegers in zip(ours, theirs):
        for key, value in mine.items():
            if key == "tags":
                only_ours = {k: x for k, x in value.items() if jaegers["tags"].get(k) != x}
                only_theirs = {k: x for k, x in jaegers["tags"].items() if value.get(k) != x}
                assert not only_ours and not only_theirs, (
                    mine["operation"],
                    only_ours,
                    only_theirs,
                )
            else:
                assert value == jaegers[key], (mine["operation"], key, value, jaegers[key])


def test_a_trail_across_two_services_exports_as_jaeger_shows_it(run_service, tmp_path, jaeger):
    ledger = f"sqlite:///{tmp_path / 'shop.db'}"
    extra = {"OTEL_AUDIT_TRUSTED_PEERS": "127.0.0.1/32"}
    inventory = run_service(
        "otel_audit._demo.inventory:app", env=base_env(ledger, tmp_path, **extra)
    )
    orders = run_service(
        "otel_audit._demo.orders:app",
        env=base_env(ledger, tmp_path, SHOP_INVENTORY_URL=inventory.url, **extra),
    )
    reply = requests.post(orders.url + "/orders", json={"sku": "apple", "qty": 2},
                          auth=("alice", "alice-pw"), timeout=30)  # fmt: skip
    assert reply.status_code == 201, reply.text
    records = wait_until(
        lambda: (rs := ledger_records(ledger)) and any("restock" in str(r["attributes"]) for r in rs) and rs,
        30, "the order's trail with its background job",
    )  # fmt: skip
    trace_id = records[0]["trace_id"]
    (exported,) = json.loads(export(ledger, "jaeger", "--trace-id", trace_id))["data"]
    assert {p["serviceName"] for p in exported["processes"].values()} == {"orders", "inventory"}
    assert_same_trace(exported, load_into_jaeger(jaeger, ledger, trace_id))


def test_every_kind_of_value_exports_as_jaeger_writes_it(make_pipeline, jaeger):
    """Integers beyond 2^53, floats, booleans, arrays, events, links, error status, scope."""
    pipeline, provider, _ = make_pipeline(service_name="values")
    tracer = provider.get_tracer("values.scope", "1.2.3")
    with tracer.start_as_current_span("linked") as other:
        linked = other.get_span_context()
    attributes = {
        "big": 2**60, "negative.big": -(2**60), "small": 42, "ratio": 0.25, "flag": True,
        "names": ["a", "b"], "counts": [1, 2, 3],
    }  # fmt: skip
    with pytest.raises(RuntimeError):
        with audit_action("thing.break", resource=("thing", "t1"), actor="alice",
                          attributes=attributes, tracer=tracer):  # fmt: skip
            span = trace.get_current_span()
            span.add_event("checked", {"step": 2**60, "ok": False})
            span.add_link(linked, {"why": "caused"})
            raise RuntimeError("boom")
    assert pipeline.flush()
    ledger = pipeline.ledger_url
    (record,) = [r for r in ledger_records(ledger) if r["name"] == "thing.break"]
    (exported,) = json.loads(export(ledger, "jaeger", "--trace-id", record["trace_id"]))["data"]
    (span_doc,) = exported["spans"]
    tags = {t["key"]: (t["type"], t["value"]) for t in span_doc["tags"]}
    assert tags["big"] == ("int64", str(2**60)) and tags["small"] == ("int64", 42)
    assert tags["otel.scope.name"] == ("string", "values.scope")
    assert_same_trace(exported, load_into_jaeger(jaeger, ledger, record["trace_id"]))
