"""Benchmark: audit spans/s that ``otel-audit serve`` commits durably, against a no-op receiver.

N client processes, each a real ``OTLPSpanExporter`` (OTLP/HTTP protobuf) on
loopback, send pre-built batches of audit spans (every span new, so nothing is
deduplicated away). The same clients run twice in the same run:

* against a no-op OTLP/HTTP receiver (reads the body, answers success): the
  transport baseline;
* against ``otel-audit serve`` on a SQLite ledger (synchronous=FULL, WAL):
  success only after the spans are committed.

Prints spans/s for both and the ratio, and checks that the ledger holds every
span sent. Goal (issue 4): >= 20k spans/s durable and >= 0.5x the no-op.

    .venv/bin/python benchmarks/bench_serve.py [--clients 4] [--batches 30] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _noop_server(port_out: mp.Queue[int]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    reply = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_out.put(server.server_address[1])
    server.serve_forever()


def _make_batches(seed: int, batches: int, size: int) -> list:
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


def _client(endpoint: str, batches: list, start: mp.Event, done: mp.Queue[tuple[int, int]]) -> None:
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


def _run(endpoint: str, all_batches: list[list], label: str) -> float:
    start = mp.Event()
    done: mp.Queue[tuple[int, int]] = mp.Queue()
    procs = [mp.Process(target=_client, args=(endpoint, b, start, done)) for b in all_batches]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every client import and build its exporter before the clock starts
    began = time.perf_counter()
    start.set()
    results = [done.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - began
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    rate = ok / elapsed
    print(
        f"{label:<28} {ok:>8} spans in {elapsed:6.2f}s = {rate:>9,.0f} spans/s (failed: {failed})"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30, help="batches per client")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    mp.set_start_method("fork")
    total = args.clients * args.batches * args.batch_size
    print(
        f"{args.clients} OTLP/HTTP exporter processes x {args.batches} batches x {args.batch_size} audit spans = {total} per receiver"
    )
    print(f"cpus: {os.cpu_count()}; building spans...")
    noop_batches = [_make_batches(i, args.batches, args.batch_size) for i in range(args.clients)]
    serve_batches = [
        _make_batches(100 + i, args.batches, args.batch_size) for i in range(args.clients)
    ]

    ports: mp.Queue[int] = mp.Queue()
    noop = mp.Process(target=_noop_server, args=(ports,), daemon=True)
    noop.start()
    noop_port = ports.get(timeout=30)
    try:
        noop_rate = _run(
            f"http://127.0.0.1:{noop_port}/v1/traces", noop_batches, "no-op OTLP receiver"
        )
    finally:
        noop.terminate()
        noop.join()

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        serve = subprocess.Popen(
            [sys.executable, "-m", "otel_audit", "serve", "--ledger", db,
             "--listen", "127.0.0.1:0", "--grpc-listen", "off"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = serve.stdout.readline() if serve.stdout else ""
            match = re.search(r"127\.0\.0\.1:(\d+)/v1/traces", line)
            if not match:
                print(f"serve did not start: {line!r}")
                return 1
            serve_rate = _run(
                f"http://127.0.0.1:{match.group(1)}/v1/traces",
                serve_batches,
                "otel-audit serve (durable)",
            )
        finally:
            serve.terminate()
            serve.wait(60)
        from otel_audit.engine.ledger import open_ledger

        with open_ledger(db, create=False) as ledger:
            stored = ledger.count()
    print(
        f"ledger holds {stored} of {total} spans sent{' (all)' if stored == total else ' (MISSING SPANS)'}"
    )
    ratio = serve_rate / noop_rate
    print(f"durable / no-op = {ratio:.2f}x   (goal: >= 20,000 spans/s and >= 0.5x)")
    return 0 if stored == total else 1


if __name__ == "__main__":
    sys.exit(main())
