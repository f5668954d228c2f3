"""Cost of the audit policy (selection + redaction) on the processor path.

Run: .venv/bin/python benchmarks/bench_policy.py [--spans N]

0. Default redaction per span, for typical spans (a Flask server span, a
   database span, an audit action), in microseconds and as a ratio of what
   the stock SDK spends creating and ending the same span (BatchSpanProcessor,
   exporter that does nothing) measured in the same run; then a profile of
   where the redaction time goes.
1. Per record: the work ``on_end`` does for one realistic span (15 attributes
   including a URL, a SQL statement, captured headers, and an event), from the
   finished span to its canonical bytes: without a policy (the core path),
   with the default policy (default redaction only), and with a configured
   policy (rules, HMAC and commitments, value patterns, boundary
   classification); each policy both composed (``record_from_span``, then
   ``policy.apply``, then ``encode``) and in one pass (``policy.encode_span``,
   the same bytes), for this span and for a plain audit action (8 audit.*
   attributes, no secrets: the common case).
2. End to end: spans per second through the real SDK: the stock SDK
   (BatchSpanProcessor, exporter that does nothing) as the baseline, then the
   audit processor without a policy and with the default policy (async
   durability, real SQLite ledger). Every span is an audit record, the worst
   case. Ratios are against numbers measured in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.capture.processor import AuditSpanProcessor
from otel_audit.engine.record import encode, record_from_span
from otel_audit.engine.writer import LedgerWriter
from otel_audit.policy.rules import AuditPolicy, load_policy

ATTRS: dict[str, Any] = {
    v.EVENT: True,
    v.ACTION: "order.update",
    v.ACTOR_ID: "alice",
    v.ACTOR_TYPE: "user",
    v.RESOURCE_TYPE: "order",
    v.RESOURCE_ID: "42",
    v.OUTCOME: "success",
    v.TRAIL_ID: "0123456789abcdef",
    "http.request.method": "POST",
    "http.route": "/orders/<id>",
    "url.full": "https://shop.example/orders/42?token=abc123def456&page=2",
    "db.statement": "UPDATE orders SET total = 99 WHERE id = 42",
    "http.request.header.authorization": ["Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"],
    "user.email": "alice@example.com",
    "note": "paid with card 4111 1111 1111 1111",
}

CONFIGURED = """\
[[rules]]
action = "payment.*"
durability = "blocking"

[[rules]]
route = "/health*"
level = "none"

[[rules]]
action = "order.*"
level = "full"

[redact]
hmac_key_file = "{key}"

[[redact.attributes]]
name = "user.email"
method = "hmac"

[[redact.attributes]]
name = "customer.*"
method = "commit"

[[redact.values]]
pattern = '\\b\\d{{3}}-\\d{{2}}-\\d{{4}}\\b'

[[boundary.classify]]
classification = "production"
tables = ["orders"]

[boundary.allow.production]
hosts = ["billing.internal:443"]
"""


# Typical spans, with the attributes their instrumentations set.
TYPICAL: dict[str, tuple[str, SpanKind, dict[str, Any]]] = {
    "Flask server span": (
        "POST /orders/<order_id>",
        SpanKind.SERVER,
        {
            "http.request.method": "POST",
            "url.scheme": "http",
            "server.address": "shop.internal",
            "server.port": 8080,
            "network.peer.address": "10.0.3.7",
            "client.address": "203.0.113.9",
            "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/120.0 Safari/537.36",
            "url.path": "/orders/42",
            "url.query": "expand=items&page=2",
            "http.route": "/orders/<order_id>",
            "network.protocol.version": "1.1",
            "http.response.status_code": 200,
            v.EVENT: True,
            v.ACTION: "order.update",
            v.ACTOR_ID: "alice",
            v.ACTOR_TYPE: "user",
            v.ACTOR_AUTH: "session",
            v.ACTOR_IP: "203.0.113.9",
            v.RESOURCE_TYPE: "order",
            v.RESOURCE_ID: "42",
            v.OUTCOME: "success",
            v.TRAIL_ID: "4bf92f3577b34da6",
        },
    ),
    "database span": (
        "INSERT shop.orders",
        SpanKind.CLIENT,
        {
            "db.system": "sqlite",
            "db.name": "shop.db",
            "db.statement": "INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)",
            "db.operation.name": "INSERT",
            "server.address": "localhost",
            v.EFFECT: "data.write",
            v.TRAIL_ID: "4bf92f3577b34da6",
        },
    ),
    "audit action": (
        "invoice.approve",
        SpanKind.INTERNAL,
        {
            v.EVENT: True,
            v.ACTION: "invoice.approve",
            v.ACTOR_ID: "bob",
            v.ACTOR_TYPE: "user",
            v.RESOURCE_TYPE: "invoice",
            v.RESOURCE_ID: "INV-2024-0042",
            v.OUTCOME: "success",
            v.TRAIL_ID: "00f067aa0ba902b7",
            "invoice.amount": 1250.0,
            "invoice.currency": "EUR",
        },
    ),
}


def varied(name: str, i: int) -> dict[str, Any]:
    """The attributes of the ``i``-th span of a kind: ids and trails differ span to span."""
    attributes = dict(TYPICAL[name][2])
    attributes[v.TRAIL_ID] = f"{i * 7919:016x}"
    if name == "Flask server span":
        attributes["url.path"] = f"/orders/{i}"
        attributes[v.RESOURCE_ID] = str(i)
    elif name == "audit action":
        attributes[v.RESOURCE_ID] = f"INV-2024-{i:05d}"
        attributes["invoice.amount"] = float(i)
    return attributes


def typical_spans(name: str, n: int) -> list[ReadableSpan]:
    span_name, kind, _ = TYPICAL[name]
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for i in range(n):
        with tracer.start_as_current_span(span_name, kind=kind, attributes=varied(name, i)):
            pass
    return list(exporter.get_finished_spans())


def stock_span_cost(name: str, n: int) -> float:
    """Microseconds the stock SDK spends creating and ending one such span."""
    span_name, kind, _ = TYPICAL[name]
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20))
    tracer = provider.get_tracer("bench")
    attributes = [varied(name, i) for i in range(n)]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for attrs in attributes:
            with tracer.start_as_current_span(span_name, kind=kind, attributes=attrs):
                pass
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    provider.shutdown()
    return best


def redaction_cost(records: list[Any]) -> float:
    """Microseconds of default redaction (``policy.redactor.record``) per record, best of 3.

    Each round starts with a fresh policy: its caches are filled by the
    measured spans themselves, as in a service that just started.
    """
    best = float("inf")
    for _ in range(3):
        redact = load_policy(env={}).redactor.record
        started = time.perf_counter()
        for record in records:
            redact(record)
        best = min(best, (time.perf_counter() - started) / len(records) * 1e6)
    return best


def typical(n: int) -> None:
    print(f"default redaction per span ({n} spans of each kind, best of 3)")
    print(f"  {'span':<20}{'stock SDK span':>16}{'redaction':>12}{'ratio':>8}")
    everything = []
    for name in TYPICAL:
        records = [record_from_span(s, "shop") for s in typical_spans(name, n)]
        everything.extend(records)
        stock = stock_span_cost(name, n)
        redaction = redaction_cost(records)
        print(f"  {name:<20}{stock:13.1f} us{redaction:9.1f} us{redaction / stock:8.2f}")
    policy = load_policy(env={})
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [policy.redactor.record(r) for r in everything])
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print("\nwhere the redaction time goes (cProfile, all three kinds, top 8 by own time)")
    for line in lines[start : start + 9]:
        print("  " + line.replace(str(Path.cwd()) + "/", ""))
    print()


class NoopExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _recorded(n: int, make: Any) -> list[ReadableSpan]:
    """The ``n`` spans ``make(tracer, i)`` ends, finished by the real SDK."""
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for i in range(n):
        make(tracer, i)
    return list(exporter.get_finished_spans())


def finished_spans(n: int) -> list[ReadableSpan]:
    def make(tracer: Any, i: int) -> None:
        with tracer.start_as_current_span(
            "order.update", kind=SpanKind.SERVER, attributes=ATTRS
        ) as s:
            s.add_event("exception", {"exception.message": "retry with Bearer abcdefghijkl"})

    return _recorded(n, make)


def per_record(spans: list[ReadableSpan], policy: AuditPolicy | None, fused: bool = False) -> float:
    """Thread CPU microseconds per span from finished span to canonical bytes.

    ``fused``: through ``policy.encode_span`` (one pass) instead of
    ``record_from_span`` + ``policy.apply`` + ``encode``.
    """
    started = time.thread_time()
    for span in spans:
        extra: dict[str, Any] = {}
        if policy is not None:
            decision = policy.decide(span, extra)
            assert decision is not None
            extra.update(decision.attributes)
            if fused:
                policy.encode_span(span, "shop", extra, decision)
                continue
            record = policy.apply(record_from_span(span, "shop", extra), decision)
        else:
            record = record_from_span(span, "shop", extra)
        encode(record)
    return (time.thread_time() - started) / len(spans) * 1e6


def plain_spans(n: int) -> list[ReadableSpan]:
    """Audit actions with the 8 audit.* attributes only (bench_core's span)."""

    def make(tracer: Any, i: int) -> None:
        attributes = {k: val for k, val in ATTRS.items() if k.startswith("audit.")}
        attributes[v.RESOURCE_ID] = str(i)
        with tracer.start_as_current_span("order.update", attributes=attributes):
            pass

    return _recorded(n, make)


def throughput(provider: TracerProvider, n: int) -> float:
    tracer = provider.get_tracer("bench")
    started = time.perf_counter()
    for _ in range(n):
        with tracer.start_as_current_span("order.update", attributes=ATTRS):
            pass
    return n / (time.perf_counter() - started)


def audited(directory: Path, name: str, policy: AuditPolicy | None) -> tuple[TracerProvider, Any]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20))
    url = f"sqlite:///{directory / name}"
    writer = LedgerWriter(url, "shop", max_queue_size=1 << 16, checkpoint_every=1 << 30)
    processor = AuditSpanProcessor(writer, "shop", durability="async", policy=policy)
    provider.add_span_processor(processor)
    return provider, writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        key = directory / "hmac.key"
        key.write_bytes(b"0123456789abcdef0123456789abcdef")
        policy_file = directory / "policy.toml"
        policy_file.write_text(CONFIGURED.format(key=key))
        default, configured = load_policy(env={}), AuditPolicy.load(str(policy_file))
        typical(min(args.spans, 5000))

        n = min(args.spans, 5000)
        for label, spans in (("15 attributes, secrets", finished_spans(n)),
                             ("audit action, 8 attributes", plain_spans(n))):  # fmt: skip
            per_record(spans[:200], default)  # warm up
            per_record(spans[:200], default, fused=True)
            rows = [
                ("no policy (core path)", None, False),
                ("default policy", default, False),
                ("default policy, one pass", default, True),
                ("configured policy", configured, False),
                ("configured policy, one pass", configured, True),
            ]
            best = {name: float("inf") for name, _, _ in rows}
            for _ in range(5):  # interleaved: a busy machine slows every row alike
                for name, policy, fused in rows:
                    best[name] = min(best[name], per_record(spans, policy, fused))
            base = best["no policy (core path)"]
            print(f"per record, finished span -> canonical bytes, {label} "
                  f"({len(spans)} spans, thread CPU, best of 5)")  # fmt: skip
            for name, _, _ in rows:
                print(f"  {name:<28}{best[name]:8.1f} us   x{best[name] / base:.2f}")

        stock = TracerProvider(shutdown_on_exit=False)
        stock.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20))
        throughput(stock, 1000)
        sdk = throughput(stock, args.spans)
        results = {}
        for name, policy in (("no policy", None), ("default policy", default)):
            provider, writer = audited(directory, name.replace(" ", "_") + ".db", policy)
            rate = throughput(provider, args.spans)
            writer.flush(120)
            results[name] = rate
            provider.shutdown()
        print(f"\nend to end, spans/s ({args.spans} spans, async, SQLite ledger)")
        print(f"  stock SDK              {sdk:10.0f}")
        for name, rate in results.items():
            print(f"  audited, {name:<15}{rate:10.0f}   {rate / sdk:.2f} of stock")
        print(f"  default policy vs none: {results['default policy'] / results['no policy']:.2f}")
    _ = otel_audit


if __name__ == "__main__":
    main()
