"""Audited span throughput vs the stock SDK, commit latency, and verify speed.

Run: .venv/bin/python benchmarks/bench_core.py [--spans N] [--verify-records N] [--profile]

Every workload makes the same spans (name, kind, the audit.* attributes of a
user action) through the real SDK. The baseline is the stock TracerProvider
with a BatchSpanProcessor and an exporter that does nothing; the audited runs
add otel_audit's processor writing to a real SQLite ledger in a temp dir
(every span is an audit record: the worst case). Ratios are audited/baseline
in the same run; absolute numbers vary on shared machines.

Then, per record, where the time goes: each step of the processor's path
(select, policy decision, build, redaction, encode, hash) timed on the same
spans with the pipeline's own policy, beside the stock SDK's cost per span
and the commit wait the sync runs measured. ``--profile`` adds a cProfile of
a 1-thread async and sync run over every thread (the application's and the
writer's), summed by part of the package.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.capture.scope import SCOPE_KEY
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import encode, encode_reference, fast_encoder, record_from_span
from otel_audit.engine.remote import ProcessWriter, _Queued, snapshot
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.proof.parallel import default_jobs
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


def provider_with_batch(*more: Any) -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20))
    for processor in more:
        provider.add_span_processor(processor)
    return provider


class LookupOnly(SpanProcessor):
    """What any audit processor must at least do: one context lookup when a span
    starts (its action, trail and actor) and one attribute check when it ends."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        ctx = parent_context if parent_context is not None else otel_context.get_current()
        ctx.get(SCOPE_KEY)

    def on_end(self, span: Any) -> None:
        span.attributes.get(v.EVENT)


def bare_body(span: Any) -> bytes:
    """The span's fields as JSON bytes, at C speed and nothing else: no selection,
    policy, redaction, canonical form or hash. Less than any audit record can cost."""
    ctx = span.context
    return orjson.dumps(
        {
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "name": span.name,
            "start": span.start_time,
            "end": span.end_time,
            "attributes": dict(span.attributes),
        }
    )


class BareQueue(SpanProcessor):
    """The least an async audit record costs on the span's thread: its bytes, queued."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def on_end(self, span: Any) -> None:
        if span.attributes.get(v.EVENT):
            self.queue.append(bare_body(span))


class BareGroupCommit(SpanProcessor):
    """Sync at its barest: each audit span's bytes are queued, and its thread waits
    until they are committed to a plain SQLite table (WAL, synchronous=FULL: one
    fsync per commit). The first waiter while no commit is under way commits
    everything queued, in one transaction, on its own thread; the others wait
    for it. No hash chain, no query index, no checks, no failure handling: what
    a sync record costs in CPython before any of the ledger's guarantees."""

    def __init__(self, path: Path) -> None:
        self._con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.execute("CREATE TABLE IF NOT EXISTS records (body BLOB NOT NULL)")
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._queued = self._committed = 0
        self._committing = False

    def on_end(self, span: Any) -> None:
        if not span.attributes.get(v.EVENT):
            return
        body = bare_body(span)
        with self._cond:
            self._queue.append(body)
            self._queued += 1
            mine = self._queued
            while self._committed < mine:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    for start in range(0, len(batch), 500):
                        chunk = batch[start : start + 500]
                        self._con.execute(
                            "INSERT INTO records (body) VALUES " + ",".join(["(?)"] * len(chunk)),
                            chunk,
                        )
                finally:
                    self._cond.acquire()
                self._committed += len(batch)
                self._committing = False
                self._cond.notify_all()

    def shutdown(self) -> None:
        self._con.close()


def headroom(spans: int, rounds: int = 5) -> list[tuple[str, float]]:
    """The stock SDK with one more processor that does (almost) nothing, as ratios
    to the stock SDK, 1 thread: the ceiling a goal of 0.9x leaves for the audit
    processor's own work. Each round runs the stock SDK just before each
    variant; the median of the rounds' ratios is shown (one ratio moves by
    about 0.1 from round to round here)."""
    variants = [
        ("stock SDK + a processor doing nothing", lambda: [SpanProcessor()]),
        ("stock SDK + one context lookup and one attribute check", lambda: [LookupOnly()]),
        ("stock SDK + a second BatchSpanProcessor (no-op exporter)",
         lambda: [BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 20)]),
        ("stock SDK + the span's fields as JSON (orjson), queued", lambda: [BareQueue()]),
    ]  # fmt: skip
    ratios: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, more in variants:
            stock = run(provider_with_batch(), spans, 1)
            ratios[name].append(run(provider_with_batch(*more()), spans, 1) / stock)
    return [(name, sorted(found)[len(found) // 2]) for name, found in ratios.items()]


def bare_sync(tmp: Path, spans: int, threads: int) -> tuple[float, float]:
    """Stock spans/s and spans/s with ``BareGroupCommit``, ``threads`` threads, best of 2:
    the ceiling any sync design reaches in CPython on this machine."""
    best_stock = best_bare = 0.0
    for attempt in range(2):
        best_stock = max(best_stock, run(provider_with_batch(), spans, threads))
        bare = BareGroupCommit(tmp / f"bare-{threads}-{attempt}.db")
        try:
            best_bare = max(best_bare, run(provider_with_batch(bare), spans, threads))
        finally:
            bare.shutdown()
    return best_stock, best_bare


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
    tmp: Path, name: str, durability: str, writer: str = "thread"
) -> tuple[TracerProvider, otel_audit.AuditPipeline]:
    provider = provider_with_batch()
    pipeline = otel_audit.configure(
        ledger=str(tmp / f"{name}.db"), service_name="bench", tracer_provider=provider,
        durability=durability, handle_sigterm=False, max_queue_size=65536, writer=writer,
    )  # fmt: skip
    return provider, pipeline


def sample_spans(n: int) -> list[Any]:
    """``n`` finished spans like the workload's, from a provider that exports nothing."""
    provider = TracerProvider(shutdown_on_exit=False)
    tracer = provider.get_tracer("bench")
    out = []
    for _ in range(n):
        span = tracer.start_span("order.update", attributes=ATTRS)
        span.end()
        out.append(span)
    return out


def per_call_us(fn: Any, items: list[Any], repeat: int = 5) -> float:
    """Best-of-``repeat`` thread CPU microseconds of ``fn`` per item (CPU time: the
    machine is shared, so wall time would count other processes' turns)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        for item in items:
            fn(item)
        best = min(best, time.thread_time() - t0)
    return best / len(items) * 1e6


def breakdown(pipeline: otel_audit.AuditPipeline, n: int = 2000) -> list[tuple[str, float]]:
    """Microseconds per record of each step of the processor's path, on the same spans."""
    processor: Any = pipeline.processor
    policy = processor.policy
    spans = sample_spans(n)
    service = processor.service_of(spans[0])
    extras = [processor.select(s) or {} for s in spans]
    decisions = [policy.decide(s, dict(e)) for s, e in zip(spans, extras)]
    pairs = list(zip(spans, extras, decisions))
    records = [record_from_span(s, service, e) for s, e, _ in pairs]
    redacted = [policy.apply(r, d) for r, (_, _, d) in zip(records, pairs)]
    bodies = [encode(r) for r in redacted]
    items = [_Queued(i, s, None, {}, "full", "async", None) for i, s in enumerate(spans)]
    return [
        ("select", per_call_us(processor.select, spans)),
        ("policy decision", per_call_us(lambda p: policy.decide(p[0], dict(p[1])), pairs)),
        ("build (record_from_span)", per_call_us(lambda p: record_from_span(p[0], service, p[1]), pairs)),
        ("redaction (policy.apply)", per_call_us(lambda rd: policy.apply(rd[0], rd[1]), list(zip(records, decisions)))),
        (f"encode ({fast_encoder() or 'stdlib'})", per_call_us(encode, redacted)),
        ("encode (stdlib reference)", per_call_us(encode_reference, redacted)),
        ("build+redact+encode in one pass (policy.encode_span, used)", per_call_us(lambda p: policy.encode_span(p[0], service, p[1], p[2]), pairs)),
        ("hash (SHA-256 link)", per_call_us(lambda b: link_hash(GENESIS, b), bodies)),
        ("writer process, in the application: span snapshot", per_call_us(snapshot, spans)),
        ("writer process, in the application: frame (snapshot + orjson)", per_call_us(lambda it: frame_of([it]), items)),
    ]  # fmt: skip


def frame_of(items: list[Any]) -> bytes:
    """One batch frame as the writer process's sender writes it."""
    return orjson.dumps(["b", [ProcessWriter._entry(item) for item in items]])


# Parts of the package and what they are, for the profile summary.
_PARTS = [
    ("otel_audit/capture/processor.py", "capture/processor.py"),
    ("otel_audit/capture/", "capture/ (actions, scope, context)"),
    ("otel_audit/engine/writer.py", "engine/writer.py"),
    ("otel_audit/engine/record.py", "engine/record.py"),
    ("otel_audit/engine/ledger/", "engine/ledger/ (SQLite calls)"),
    ("otel_audit/policy/", "policy/ (decision, redaction)"),
    ("otel_audit/semantics/", "semantics/ (select)"),
    ("otel_audit/", "otel_audit (other)"),
    ("opentelemetry/", "OpenTelemetry SDK"),
    ("threading.py", "threading (waits, locks)"),
]


def _part(filename: str, name: str) -> str:
    if filename == "~":  # a C function: sqlite3, locks, hashlib, orjson
        if "sqlite3" in name or "execute" in name or "commit" in name:
            return "sqlite3 (C: execute, commit, fsync)"
        if "lock" in name or "wait" in name:
            return "locks and waits (C)"
        return "other C calls"
    for prefix, part in _PARTS:
        if prefix in filename.replace(os.sep, "/"):
            return part
    return "other Python"


def profiled(tmp: Path, durability: str, spans: int) -> None:
    """Profile every thread of one audited 1-thread run and print time by part."""
    profiles: list[cProfile.Profile] = []

    def start(frame: Any, event: str, arg: Any) -> None:  # the first event of a new thread
        sys.setprofile(None)
        prof = cProfile.Profile(time.thread_time)  # CPU: a blocked thread costs nothing
        profiles.append(prof)
        prof.enable()

    threading.setprofile(start)
    provider, pipeline = audited(tmp, f"profile-{durability}", durability)
    run(provider, spans, 1)
    pipeline.flush(None)
    pipeline.shutdown()
    threading.setprofile(None)  # type: ignore[arg-type]
    by_part: dict[str, float] = {}
    by_func: dict[str, float] = {}
    for prof in profiles:
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
            part = _part(filename, name)
            by_part[part] = by_part.get(part, 0.0) + tottime
            key = f"{Path(filename).name}:{name}" if filename != "~" else name
            by_func[key] = by_func.get(key, 0.0) + tottime
    total = sum(by_part.values())
    print(f"\nprofile, {durability}, 1 thread, {spans} spans: {total / spans * 1e6:.1f} us of"
          " profiled thread CPU per record (every thread; cProfile inflates Python calls)")  # fmt: skip
    for part, t in sorted(by_part.items(), key=lambda kv: -kv[1]):
        if t / total >= 0.01:
            print(f"  {part:40} {t / spans * 1e6:8.2f} us/record {100 * t / total:5.1f} %")
    print("  top functions (own time):")
    for name, t in sorted(by_func.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {name:60} {t / spans * 1e6:8.2f} us/record")


def worker_cpu(pipeline: otel_audit.AuditPipeline) -> float:
    """CPU seconds the writer process has used (0 with the in-process writer)."""
    proc = getattr(pipeline.writer, "_proc", None)
    if proc is None:
        return 0.0
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=40_000)
    ap.add_argument("--verify-records", type=int, default=300_000)
    ap.add_argument("--profile", action="store_true", help="profile a 1-thread async and sync run")
    ap.add_argument("--writer", choices=("thread", "process", "both"), default="both",
                    help="where records are built and committed (configure(writer=...))")  # fmt: skip
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="otel-audit-bench-"))
    print(f"spans per run: {args.spans}; ledger in {tmp}")

    rows = []
    steps: list[tuple[str, float]] = []
    commit_p50: dict[str, float] = {}
    writers = ("thread", "process") if args.writer == "both" else (args.writer,)
    for threads in (1, 16):
        for writer in writers:
            for durability in ("async", "sync"):
                # The stock run just before each audited one: the ratio pairs
                # neighbours, so a machine that slows down mid-run skews less.
                base = run(provider_with_batch(), args.spans, threads)
                provider, pipeline = audited(
                    tmp, f"{writer}-{durability}{threads}", durability, writer
                )
                lat: list[float] = []
                cpu0 = worker_cpu(pipeline)
                start = time.perf_counter()
                rate = run(provider, args.spans, threads, lat)
                pipeline.flush(None)
                # async: what the producers saw, and also until everything was durable
                durable = args.spans / (time.perf_counter() - start)
                worker_us = (worker_cpu(pipeline) - cpu0) / args.spans * 1e6
                stats = pipeline.stats()
                if not steps:
                    steps = breakdown(pipeline)
                commit_p50[f"{writer} {durability} {threads}"] = stats.commit_latency_p50_ms
                pipeline.shutdown()
                rows.append((writer, durability, threads, base, rate, durable, pct(lat, 0.5),
                             pct(lat, 0.99), stats.committed, stats.batches, worker_us))  # fmt: skip

    print()
    print(
        f"{'writer':7} {'mode':6} {'threads':>7} {'stock spans/s':>14} {'audited spans/s':>16} {'ratio':>6}"
        f" {'durable/s':>10} {'on_end p50 ms':>13} {'p99 ms':>8} {'records/commit':>14} {'worker CPU us/rec':>17}"
    )
    for writer, mode, threads, base, rate, durable, p50, p99, committed, batches, wus in rows:
        print(
            f"{writer:7} {mode:6} {threads:>7} {base:>14,.0f} {rate:>16,.0f} {rate / base:>6.2f}"
            f" {durable:>10,.0f} {p50:>13.3f} {p99:>8.3f} {committed / max(batches, 1):>14.1f}"
            f" {wus if writer == 'process' else float('nan'):>17.1f}"
        )

    base1 = next(r[3] for r in rows if r[2] == 1)
    print()
    print("per record, where the time goes (thread CPU us, best of 5, same spans):")
    print(f"  {'stock SDK span + BatchSpanProcessor (wall, 1 thread)':52} {1e6 / base1:8.2f}")
    for name, us in steps:
        print(f"  {name:52} {us:8.2f}")
    for row in rows:
        writer, mode, threads = row[0], row[1], row[2]
        if mode != "sync":
            continue
        print(f"  {f'commit wait, {writer} writer, sync {threads} thread(s) (on_end p50, wall)':52}"
              f" {row[6] * 1000:8.2f}  ({row[8] / max(row[9], 1):.1f} records per commit;"
              f" commit p50 {commit_p50.get(f'{writer} sync {threads}', 0.0):.2f} ms)")  # fmt: skip

    print()
    print("headroom: what 0.9x leaves (ratios to the stock SDK, 1 thread, median of 5 pairs):")
    for name, ratio in headroom(min(args.spans, 20_000)):
        print(f"  {name:60} {ratio:5.2f}x")
    print("the barest sync design: spans' JSON committed in groups to a plain SQLite table")
    print("(WAL, synchronous=FULL; no chain, index, check or failure handling), same run:")
    for threads in (1, 16):
        stock, bare = bare_sync(tmp, min(args.spans, 20_000), threads)
        # otel-audit's ratio from the table above (thread writer; the process
        # writer's when only it ran).
        row = next(r for r in rows if r[1] == "sync" and r[2] == threads)
        ours, ours_base = row[4], row[3]
        print(f"  sync {threads:2} thread(s): {bare:9,.0f} spans/s vs stock {stock:9,.0f} ="
              f" {bare / stock:5.2f}x   (otel-audit, {row[0]} writer, above: {ours / ours_base:5.2f}x)")  # fmt: skip

    if args.profile:
        for durability in ("async", "sync"):
            profiled(tmp, durability, min(args.spans, 10_000))

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
    print()
    jobs = default_jobs()
    with open_ledger(str(db), readonly=True) as ro:
        for n in (1, jobs) if jobs > 1 else (1,):
            t0 = time.perf_counter()
            report = verify_ledger(ro, jobs=n)
            elapsed = time.perf_counter() - t0
            print(
                f"verify, jobs={n}: {report.records:,} records ({len(body)} bytes each)"
                f" in {elapsed:.2f}s = {report.records / elapsed:,.0f} records/s (wall)"
            )


if __name__ == "__main__":
    main()
