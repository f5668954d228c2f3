"""Audited span throughput vs the stock SDK, commit latency, and verify speed.

Run: .venv/bin/python benchmarks/bench_core.py [--spans N] [--verify-records N]

Every workload makes the same spans (name, kind, the audit.* attributes of a
user action) through the real SDK. The baseline is the stock TracerProvider
with a BatchSpanProcessor and an exporter that does nothing; the audited runs
add otel_audit's processor writing to a real SQLite ledger in a temp dir
(every span is an audit record: the worst case). Ratios are audited/baseline
in the same run; absolute numbers vary on shared machines.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.proof.verify import verify_ledger

ATTRS = {
    v.EVENT: True,
    v.ACTION: "order.update",
    v.ACTOR_ID: "alice",
    v.ACTOR_TYPE: "user",
    v.RESOURCE_TYPE: "order",
    v.RESOURCE_ID: "42",
    v.OUTCOME: "success",
    v.TRAIL_ID: "0123456789abcdef",
}


class NoopExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def provider_with_batch() -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20))
    return provider


def run(
    provider: TracerProvider, spans: int, threads: int, latencies: list[float] | None = None
) -> float:
    """Spans per second ending on `threads` threads."""
    tracer = provider.get_tracer("bench")
    per_thread = spans // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        local = []
        for _ in range(per_thread):
            span = tracer.start_span("order.update", attributes=ATTRS)
            t0 = time.perf_counter()
            span.end()
            local.append(time.perf_counter() - t0)
        if latencies is not None:
            latencies.extend(local)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return per_thread * threads / (time.perf_counter() - start)


def audited(
    tmp: Path, name: str, durability: str
) -> tuple[TracerProvider, otel_audit.AuditPipeline]:
    provider = provider_with_batch()
    pipeline = otel_audit.configure(
        ledger=str(tmp / f"{name}.db"), service_name="bench", tracer_provider=provider,
        durability=durability, handle_sigterm=False, max_queue_size=65536,
    )  # fmt: skip
    return provider, pipeline


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=40_000)
    ap.add_argument("--verify-records", type=int, default=300_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="otel-audit-bench-"))
    print(f"spans per run: {args.spans}; ledger in {tmp}")

    rows = []
    for threads in (1, 16):
        base = run(provider_with_batch(), args.spans, threads)
        for durability in ("async", "sync"):
            provider, pipeline = audited(tmp, f"{durability}{threads}", durability)
            lat: list[float] = []
            start = time.perf_counter()
            rate = run(provider, args.spans, threads, lat)
            pipeline.flush(None)
            # async: what the producers saw, and also until everything was durable
            durable = args.spans / (time.perf_counter() - start)
            stats = pipeline.stats()
            pipeline.shutdown()
            rows.append(
                (
                    durability,
                    threads,
                    base,
                    rate,
                    durable,
                    pct(lat, 0.5),
                    pct(lat, 0.99),
                    stats.committed,
                    stats.batches,
                )
            )

    print()
    print(
        f"{'mode':6} {'threads':>7} {'stock spans/s':>14} {'audited spans/s':>16} {'ratio':>6} {'durable/s':>10} {'on_end p50 ms':>13} {'p99 ms':>8} {'records/commit':>14}"
    )
    for mode, threads, base, rate, durable, p50, p99, committed, batches in rows:
        print(
            f"{mode:6} {threads:>7} {base:>14,.0f} {rate:>16,.0f} {rate / base:>6.2f} {durable:>10,.0f} {p50:>13.3f} {p99:>8.3f} {committed / max(batches, 1):>14.1f}"
        )

    # verify speed on a ledger built directly from canonical bodies
    db = tmp / "verify.db"
    ledger = open_ledger(str(db))
    body = (
        b'{"attributes":{"audit.action":"order.update","audit.actor.id":"alice","audit.event":true,'
        b'"audit.outcome":"success","audit.resource.id":"%d","audit.resource.type":"order"},'
        b'"end":2,"kind":"INTERNAL","name":"order.update","parent_span_id":null,"service":"bench",'
        b'"span_id":"%016x","start":1,"status":"UNSET","trace_id":"%032x","v":1}'
    )
    batch = 50_000
    for start_n in range(0, args.verify_records, batch):
        ledger.append("bench", [body % (i, i, i) for i in range(start_n, start_n + batch)])
    ledger.close()
    with open_ledger(str(db), readonly=True) as ro:
        t0 = time.perf_counter()
        report = verify_ledger(ro)
        elapsed = time.perf_counter() - t0
    print()
    print(
        f"verify: {report.records:,} records ({len(body)} bytes each) in {elapsed:.2f}s = {report.records / elapsed:,.0f} records/s"
    )


if __name__ == "__main__":
    main()
