"""Benchmark: audit spans/s that ``otel-audit serve`` commits durably, against a no-op receiver.

N client processes, each a real ``OTLPSpanExporter`` (OTLP/HTTP protobuf) on
loopback, send pre-built batches of audit spans (every span new, so nothing is
deduplicated away). In the same run, alternating round by round:

* a no-op OTLP/HTTP receiver on the same HTTP server (uvicorn) serve runs on:
  it reads the body and answers success, so the ratio shows serve's own work
  (decode, select, redact, encode, commit), not a difference of HTTP servers;
* the floor: the same receiver committing each request's spans durably and
  nothing else (one row per span, its protobuf bytes, to a plain SQLite table,
  WAL, synchronous=FULL), so the part of the gap durability itself costs shows;
* ``otel-audit serve`` on a fresh SQLite ledger (synchronous=FULL, WAL):
  success only after the spans are committed.

Prints spans/s for each, the ratio (best round of each), the receiver's CPU
per span, checks that every ledger holds every span sent exactly once, and
prints where serve's time goes per span (parse, records, redaction, encoding,
ledger append with deduplication, checkpoints with leaves from the bodies
serve's ``IdempotentAppends`` kept, and the same read back from the ledger),
measured in-process on the same spans.
Goal (issue 13): >= 0.8x the no-op receiver, nothing lost or doubled.

    .venv/bin/python benchmarks/bench_serve.py [--clients 4] [--batches 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


def _noop_server(port_out: mp.Queue[int], durable: str | None = None) -> None:
    """The no-op receiver; with ``durable`` (a file path) the bare durable one: each
    request's spans are decoded and committed, one row per span (its protobuf
    bytes and ids), to a plain SQLite table (WAL, synchronous=FULL) before the
    reply. No records, policy, JSON, hash chain, index or dedupe: the least a
    receiver that keeps every span durably can do."""
    import asyncio
    import socket
    import sqlite3

    import uvicorn
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    reply = ExportTraceServiceResponse().SerializeToString()
    con = None
    if durable is not None:
        con = sqlite3.connect(durable, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE spans (trace_id BLOB, span_id BLOB, body BLOB)")
    lock = threading.Lock()

    def commit(body: bytes) -> None:
        assert con is not None
        rows = [
            (span.trace_id, span.span_id, span.SerializeToString())
            for resource in ExportTraceServiceRequest.FromString(body).resource_spans
            for scoped in resource.scope_spans
            for span in scoped.spans
        ]
        with lock:
            con.execute("BEGIN")
            con.executemany("INSERT INTO spans VALUES (?, ?, ?)", rows)
            con.execute("COMMIT")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        parts = []
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        if con is not None:
            await asyncio.to_thread(commit, b"".join(parts))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": reply})

    sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    port_out.put(sock.getsockname()[1])
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning",
                            access_log=False)  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])


def _make_batches(seed: int, batches: int, size: int) -> list[Any]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"bench-{seed}"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    for i in range(batches * size):
        with tracer.start_as_current_span(
            "order.update",
            attributes={
                "audit.event": True,
                "audit.action": "order.update",
                "audit.actor.id": f"user-{i % 97}",
                "audit.resource.type": "order",
                "audit.resource.id": str(i),
                "audit.outcome": "success",
                "http.route": "/orders/<id>",
            },
        ):
            pass
    spans = list(memory.get_finished_spans())
    return [spans[i : i + size] for i in range(0, len(spans), size)]


def _client(endpoint: str, batches: list[Any], start: Any, done: mp.Queue[tuple[int, int]]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=60)
    start.wait()
    ok = failed = 0
    for batch in batches:
        if exporter.export(batch) is SpanExportResult.SUCCESS:
            ok += len(batch)
        else:
            failed += len(batch)
    done.put((ok, failed))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(endpoint: str, all_batches: list[list[Any]], label: str, pid: int) -> tuple[float, int]:
    start = mp.Event()
    done: mp.Queue[tuple[int, int]] = mp.Queue()
    procs = [mp.Process(target=_client, args=(endpoint, b, start, done)) for b in all_batches]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every client import and build its exporter before the clock starts
    cpu = _cpu_seconds(pid)
    began = time.perf_counter()
    start.set()
    results = [done.get(timeout=900) for _ in procs]
    elapsed = time.perf_counter() - began
    cpu = _cpu_seconds(pid) - cpu
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    rate = ok / elapsed
    print(
        f"{label:<28} {ok:>8} spans in {elapsed:6.2f}s = {rate:>9,.0f} spans/s "
        f"(failed: {failed}); receiver CPU {cpu / max(ok, 1) * 1e6:5.1f} us/span"
    )
    return rate, ok


def _noop_round(batches: list[list[Any]], durable: bool = False) -> float:
    ports: mp.Queue[int] = mp.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bare.db") if durable else None
        noop = mp.Process(target=_noop_server, args=(ports, path), daemon=True)
        noop.start()
        port = ports.get(timeout=30)
        label = "bare durable receiver" if durable else "no-op OTLP receiver"
        try:
            assert noop.pid is not None
            return _run(f"http://127.0.0.1:{port}/v1/traces", batches, label, noop.pid)[0]
        finally:
            noop.terminate()
            noop.join()


def _serve_round(batches: list[list[Any]], total: int) -> tuple[float, bool]:
    from otel_audit.engine.ledger import open_ledger
    from otel_audit.engine.record import decode

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        serve = subprocess.Popen(
            [sys.executable, "-m", "otel_audit", "serve", "--ledger", db,
             "--listen", "127.0.0.1:0", "--grpc-listen", "off"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = serve.stdout.readline() if serve.stdout else ""
            match = re.search(r"127\.0\.0\.1:(\d+)/v1/traces", line)
            if not match:
                raise SystemExit(f"serve did not start: {line!r}")
            rate, _ = _run(
                f"http://127.0.0.1:{match.group(1)}/v1/traces",
                batches,
                "otel-audit serve (durable)",
                serve.pid,
            )
        finally:
            serve.terminate()
            _, err = serve.communicate(timeout=60)
        shared = re.search(r"\((\d+) requests, (\d+) transactions\)", err or "")
        if shared:
            requests, commits = int(shared.group(1)), int(shared.group(2))
            print(f"{'':<28} {requests} requests committed in {commits} ledger transactions")
        with open_ledger(db, create=False) as ledger:
            stored = ledger.count()
            keys = {
                (record.trace_id, record.span_id)
                for chain in ledger.chains()
                for record in (decode(row.body) for row in ledger.scan(chain))
            }
    exact = stored == total and len(keys) == total
    print(
        f"{'':<28} ledger holds {stored} records, {len(keys)} distinct spans, of {total} sent"
        + ("" if exact else "  (LOST OR DOUBLED)")
    )
    return rate, exact


def _where_the_time_goes(batches: list[list[Any]]) -> None:
    """serve's stages, in-process and single-threaded, on the same spans: us per span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from otel_audit.engine.checkpoints import Checkpointer
    from otel_audit.engine.ledger import open_ledger
    from otel_audit.engine.record import encode
    from otel_audit.policy.rules import load_policy
    from otel_audit.proof.chain import GENESIS, link_hash
    from otel_audit.transport.idempotent import IdempotentAppends
    from otel_audit.transport.otlp import parse_request, records_from_request

    bodies = [encode_spans(b).SerializeToString() for b in batches]
    count = sum(len(b) for b in batches)
    redact = load_policy().redactor.record
    stages: list[tuple[str, float]] = []

    def timed(name: str, fn: Any) -> Any:
        began = time.process_time()  # CPU: the machine is shared with the clients
        out = fn()
        stages.append((name, time.process_time() - began))
        return out

    requests = timed("parse protobuf", lambda: [parse_request(b) for b in bodies])
    records = timed(
        "records (select, clean)", lambda: [records_from_request(r)[0] for r in requests]
    )
    redacted = timed("redaction", lambda: [[redact(r) for r in rs] for rs in records])
    encoded = timed("canonical encoding", lambda: [[encode(r) for r in rs] for rs in redacted])
    # serve hands the ledger each record's ids (IdempotentAppends.expect): no body is parsed.
    keys = [[(r.trace_id, r.span_id) for r in rs] for rs in redacted]
    with tempfile.TemporaryDirectory() as tmp:
        with open_ledger(os.path.join(tmp, "stages.db")) as ledger:
            # Through serve's own wrapper: dedupe, and the bodies kept for the checkpoints.
            appends = IdempotentAppends(ledger)

            def append() -> list[Any]:
                out = []
                for e, k in zip(encoded, keys):
                    appends.expect(e, k)
                    out.append(appends.append("bench", e))
                return out

            appended = timed("ledger append (dedupe, hash)", append)
            checkpointer = Checkpointer("bench", None)

            def checkpoints() -> None:
                # At serve's default cadence: one checkpoint per 1,000 records, and at the end.
                since = 0
                for batch in appended:
                    since += len(batch)
                    if since >= 1000 or batch is appended[-1]:
                        checkpointer.make(appends, batch[-1], threading.Lock())
                        since = 0

            timed("checkpoints (Merkle root)", checkpoints)
            read_back = Checkpointer("bench", None)
            began = time.process_time()
            since = 0
            for batch in appended:  # the same, read back from the ledger (before: always)
                since += len(batch)
                if since >= 1000 or batch is appended[-1]:
                    read_back.make(ledger, batch[-1], threading.Lock())
                    since = 0
            reading = time.process_time() - began
    total = sum(seconds for _, seconds in stages)
    # Parts of the append, timed apart: the chain hash, and the dedupe lookup by key.
    began = time.process_time()
    for e in encoded:
        prev = GENESIS
        for body in e:
            prev = link_hash(prev, body)
    hashing = time.process_time() - began
    print(f"where serve's time goes, CPU per span (in-process, {count} spans):")
    for name, seconds in stages:
        print(f"  {name:<30} {seconds / count * 1e6:6.1f} us  ({seconds / total:4.0%})")
        if name.startswith("ledger append"):
            print(f"    {'of which SHA-256 chain hash':<28} {hashing / count * 1e6:6.1f} us")
        if name.startswith("checkpoints"):
            print(f"    {'(read back from the ledger)':<28} {reading / count * 1e6:6.1f} us")
    print(f"  {'total':<30} {total / count * 1e6:6.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30, help="batches per client")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each")
    args = parser.parse_args()
    mp.set_start_method("fork")
    total = args.clients * args.batches * args.batch_size
    print(
        f"{args.clients} OTLP/HTTP exporter processes x {args.batches} batches x "
        f"{args.batch_size} audit spans = {total} per round; cpus: {os.cpu_count()}"
    )
    noop_rates: list[float] = []
    bare_rates: list[float] = []
    serve_rates: list[float] = []
    exact = True
    for round_ in range(args.rounds):
        seed = 1000 * round_
        noop_batches = [_make_batches(seed + i, args.batches, args.batch_size)
                        for i in range(args.clients)]  # fmt: skip
        serve_batches = [_make_batches(seed + 100 + i, args.batches, args.batch_size)
                         for i in range(args.clients)]  # fmt: skip
        noop_rates.append(_noop_round(noop_batches))
        bare_rates.append(_noop_round(noop_batches, durable=True))
        rate, ok = _serve_round(serve_batches, total)
        serve_rates.append(rate)
        exact = exact and ok
    ratio = max(serve_rates) / max(noop_rates)
    print(
        f"best of {args.rounds}: serve {max(serve_rates):,.0f} spans/s / no-op "
        f"{max(noop_rates):,.0f} spans/s = {ratio:.2f}x   (goal: >= 0.8x)"
    )
    print(
        f"the floor: a bare durable receiver {max(bare_rates):,.0f} spans/s ="
        f" {max(bare_rates) / max(noop_rates):.2f}x the no-op one (the clients' own cost on"
        " the same cores bounds both)"
    )
    _where_the_time_goes(_make_batches(7, min(args.batches, 10), args.batch_size))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
