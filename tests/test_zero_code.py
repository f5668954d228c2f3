"""Zero-code: the unchanged shop under opentelemetry-instrument (with and without
opentelemetry-distro) and under gunicorn with several workers; the normal OTLP
traces and logs still reach a real OTLP receiver, and no audit record is lost."""

from __future__ import annotations

import pathlib
import secrets
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from tests.plugins.flask_service import base_env

ALICE = ("alice", "alice-pw")


def records(ledger_url: str):
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        # Outcome records: each audited request also committed an intent before its view.
        return [r.record for r in ledger.query(Query()) if not r.record.attr(v.INTENT)]


def otlp_env(sink, **extra: str) -> dict[str, str]:
    return dict(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
        OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_BLRP_SCHEDULE_DELAY="100",
        OTEL_AUDIT_TRUSTED_PEERS="127.0.0.1/32",
        **extra,
    )


# Without the distro: the loader falls back to its default distro and no
# configurator, exactly as when opentelemetry-distro is not installed.
WITHOUT_DISTRO = {
    "OTEL_PYTHON_DISTRO": "not-installed",
    "OTEL_PYTHON_CONFIGURATOR": "not-installed",
}


@pytest.mark.parametrize("distro", ["with-distro", "without-distro"])
def test_unchanged_service_is_audited_and_still_exports_otlp(
    distro, run_service, otlp_sink, tmp_path: pathlib.Path
):
    ledger = f"sqlite:///{tmp_path / 'audit.db'}"
    extra = WITHOUT_DISTRO if distro == "without-distro" else {}
    env = base_env(ledger, tmp_path, **otlp_env(otlp_sink, **extra))
    # `opentelemetry-instrument flask run` for one service, `python -m` for the other.
    inventory = run_service("otel_audit._demo.inventory:app", env=env, flask_cli=True)
    orders = run_service(
        "otel_audit._demo.orders:app", env=dict(env, SHOP_INVENTORY_URL=inventory.url)
    )
    reply = requests.post(orders.url + "/orders", json={"sku": "apple", "qty": 1}, auth=ALICE)
    assert reply.status_code == 201
    got = records(ledger)
    assert any(r.service == "inventory" and r.attr(v.EVENT) for r in got)
    (action,) = [r for r in got if r.service == "orders" and r.attr(v.EVENT)]
    assert (action.attr(v.ACTION), action.attr(v.ACTOR_ID)) == ("order.create", "alice")
    # The normal pipeline is untouched: the same trace reaches the OTLP receiver...
    assert otlp_sink.wait_for(
        lambda s: (
            {"orders", "inventory"}
            <= {sp["service"] for sp in s.spans() if sp["trace_id"] == action.trace_id}
            and any(sp["span_id"] == action.span_id for sp in s.spans())
        )
    ), otlp_sink.spans()
    server = next(sp for sp in otlp_sink.spans() if sp["span_id"] == action.span_id)
    assert server["attributes"][v.ACTION] == "order.create"
    # ...and so do the logs (werkzeug's request log lines).
    assert otlp_sink.wait_for(lambda s: any("POST /orders" in str(r["body"]) for r in s.logs()))


def test_not_active_without_a_ledger_setting(run_service, tmp_path: pathlib.Path):
    env = base_env("unused", tmp_path)
    del env["OTEL_AUDIT_LEDGER"]
    inventory = run_service("otel_audit._demo.inventory:app", env=env)
    assert requests.post(inventory.url + "/stock/apple/release", json={"qty": 1},
                         headers={"X-Shop-Internal": "1"}).ok  # fmt: skip
    inventory.stop()
    assert not list(tmp_path.glob("audit.db")) and not list(tmp_path.glob("*.db-wal"))


@pytest.mark.parametrize(
    "bad",
    [
        {"OTEL_AUDIT_DURABILITY": "maybe"},
        {"OTEL_AUDIT_LEDGER": "sqlite:////nonexistent-dir/x/audit.db"},
        {"OTEL_AUDIT_LEDGER": "mysql://nope"},
        {"OTEL_AUDIT_SIGNING_KEY": "/nonexistent/audit-signing.key"},
        {"OTEL_AUDIT_TRUSTED_PEERS": "10.0.0.0/99"},
    ],
)
def test_a_broken_setup_refuses_audited_requests_until_fixed(run_service, tmp_path, bad):
    """The operator asked for auditing: a change that cannot be recorded is not made (503)."""
    env = base_env(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path, **bad)
    inventory = run_service("otel_audit._demo.inventory:app", env=env)
    internal = {"X-Shop-Internal": "1"}
    assert requests.get(inventory.url + "/stock/apple", headers=internal).ok  # not audited
    reply = requests.post(inventory.url + "/stock/apple/release", json={"qty": 1}, headers=internal)
    assert reply.status_code == 503 and reply.text == "audit not configured\n"
    inventory.stop()
    out = inventory.output()
    name = next(iter(bad))
    assert "otel-audit: audit setup failed: " in out and name.split("_")[-1].lower() in out.lower()
    assert "OTEL_AUDIT_FAIL_OPEN=true" in out and "Traceback" not in out


def test_fail_open_is_an_explicit_choice(run_service, tmp_path):
    env = base_env(
        f"sqlite:///{tmp_path / 'audit.db'}", tmp_path,
        OTEL_AUDIT_DURABILITY="maybe", OTEL_AUDIT_FAIL_OPEN="true",
    )  # fmt: skip
    inventory = run_service("otel_audit._demo.inventory:app", env=env)
    reply = requests.post(inventory.url + "/stock/apple/release", json={"qty": 1},
                          headers={"X-Shop-Internal": "1"})  # fmt: skip
    assert reply.ok
    inventory.stop()
    out = inventory.output()
    assert "otel-audit: not auditing this process (OTEL_AUDIT_FAIL_OPEN=true): " in out
    assert "OTEL_AUDIT_DURABILITY" in out and "Traceback" not in out


def test_gunicorn_workers_lose_nothing(run_service, otlp_sink, tmp_path: pathlib.Path):
    ledger = f"sqlite:///{tmp_path / 'audit.db'}"
    env = base_env(ledger, tmp_path, OTEL_AUDIT_TRUSTED_PEERS="127.0.0.1/32")
    inventory = run_service("otel_audit._demo.inventory:app", env=env, gunicorn_workers=2)
    orders = run_service(
        "otel_audit._demo.orders:app",
        env=dict(env, SHOP_INVENTORY_URL=inventory.url),
        gunicorn_workers=3,
    )
    trace_ids = [secrets.token_hex(16) for _ in range(40)]

    def order(trace_id: str) -> int:
        parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        return requests.post(
            orders.url + "/orders", json={"sku": "apple", "qty": 0 + 1}, auth=("alice", "alice-pw"),
            headers={"traceparent": parent}, timeout=30,
        ).status_code  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(order, trace_ids))
    # 10 apples in stock: 10 orders succeed, the rest are refused by inventory.
    assert Counter(statuses) == {201: 10, 409: 30}
    assert orders.stop() == 0 and inventory.stop() == 0
    got = records(ledger)
    per_trace = Counter((r.trace_id, r.service, r.attr(v.ACTION) or r.name) for r in got)
    for trace_id in trace_ids:
        assert per_trace[(trace_id, "orders", "order.create")] == 1
        assert per_trace[(trace_id, "orders", "INSERT")] == 1
        assert per_trace[(trace_id, "orders", "POST")] == 1  # the call to inventory
        assert per_trace[(trace_id, "inventory", "stock.reserve")] == 1
        assert per_trace[(trace_id, "inventory", "UPDATE")] == 1
    assert len({r.trace_id for r in got}) == len(trace_ids)
    result = subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", ledger],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "chain 'orders'" in result.stdout and "chain 'inventory'" in result.stdout
