"""Requests/s of the example inventory service under real HTTP load, three ways in one run.

Run: .venv/bin/python benchmarks/bench_flask.py [--requests N] [--concurrency C]

The service (``otel_audit._demo.inventory`` under gunicorn, gthread workers,
on loopback) answers ``POST /stock/apple/release``: two SQLite writes (stock
and the notification's outbox row) and a background job. Three runs:

- plain: gunicorn alone;
- instrumented: under ``opentelemetry-instrument`` (stock SDK, Flask +
  sqlite3 instrumentations, BatchSpanProcessor exporting OTLP/HTTP to a
  receiver in this process that discards);
- audited: the same plus ``OTEL_AUDIT_LEDGER`` (SQLite) and every other
  setting at its default: sync durability (each request's audit records are
  committed before it answers) and the default audit of state-changing
  requests, including the request record written before the view runs;
- floor: instrumented, plus the two durable commits an audited request needs
  and nothing else (``_bare_durable.py``: one row before the view, four
  after it, autocommit INSERTs into a plain SQLite table, WAL,
  synchronous=FULL), shared by the workers like the ledger: what the audited
  run's durability costs done barely (each request's commits on their own).

Besides the ratio it prints, per request and per record, what auditing
costs the service: the records each request wrote (counted in the ledger)
and the server time the audited run spent beyond the instrumented one.

The load generator is a separate process (keep-alive connections, a bounded
number of requests after a warm-up). Ratios are against the instrumented
run of the same invocation; absolute numbers vary on shared machines.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parents[1]
BODY = json.dumps({"qty": 1}).encode()
HEADERS = {"Content-Type": "application/json", "X-Shop-Internal": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sink() -> tuple[ThreadingHTTPServer, str]:
    """An OTLP/HTTP endpoint that accepts and discards (the Collector is not what we measure)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def load(port: int, total: int, concurrency: int) -> float:
    """Load-generator process body: requests/s over ``total`` requests."""
    per_worker = total // concurrency

    def worker(_: int) -> int:
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        ok = 0
        for _ in range(per_worker):
            con.request("POST", "/stock/apple/release", BODY, HEADERS)
            reply = con.getresponse()
            reply.read()
            ok += reply.status == 200
        con.close()
        return ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = sum(pool.map(worker, range(concurrency)))
    elapsed = time.perf_counter() - start
    if ok != per_worker * concurrency:
        raise SystemExit(f"only {ok} of {per_worker * concurrency} requests succeeded")
    return ok / elapsed


RECORDS: dict[str, int] = {}


def run_mode(mode: str, sink: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix=f"bench-flask-{mode}-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SHOP_"))}
        env.update(
            SHOP_DATA_DIR=tmp,
            PYTHONPATH=str(ROOT),
            OTEL_SERVICE_NAME="inventory",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=sink,
        )
        target = "otel_audit._demo.inventory:app"
        if mode == "floor":
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
            target = "_bare_durable:app"
        if mode == "audited":
            env.update(OTEL_AUDIT_LEDGER=f"sqlite:///{tmp}/audit.db")
            if args.durability:
                env.update(OTEL_AUDIT_DURABILITY=args.durability)
            if args.writer:
                env.update(OTEL_AUDIT_WRITER=args.writer)
        cmd = [
            str(BIN / "gunicorn"), "-w", str(args.workers), "-k", "gthread",
            "--threads", str(args.threads), "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", target,
        ]  # fmt: skip
        if mode != "plain":
            cmd = [str(BIN / "opentelemetry-instrument")] + cmd
        server = subprocess.Popen(cmd, env=env, cwd=tmp, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    con = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    con.request("GET", "/healthz")
                    if con.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{mode}: the service did not start")
                time.sleep(0.05)
            warm = [sys.executable, __file__, "--load", str(port), "--requests",
                    str(args.warmup), "--concurrency", str(args.concurrency)]  # fmt: skip
            measure = [sys.executable, __file__, "--load", str(port), "--requests",
                       str(args.requests), "--concurrency", str(args.concurrency)]  # fmt: skip
            for argv in (warm, measure):
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode:
                    said = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
                    raise SystemExit(f"{mode}: the load generator failed: {said}")
            return float(done.stdout.strip())
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
            if mode == "audited" and server.returncode is not None:
                from otel_audit.engine.ledger import open_ledger

                with open_ledger(f"sqlite:///{tmp}/audit.db", readonly=True) as ledger:
                    RECORDS["audited"] = ledger.count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--durability", choices=["sync", "async"], help="default: the package default (sync)"
    )
    parser.add_argument(
        "--writer", choices=["thread", "process"], help="default: the package default (thread)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="repeat each mode, keep the best")
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(load(args.load, args.requests, args.concurrency))
        return
    sink_server, sink = start_sink()
    results: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in ("plain", "instrumented", "audited", "floor"):
            results[mode] = max(results.get(mode, 0.0), run_mode(mode, sink, args))
    sink_server.shutdown()
    base = results["instrumented"]
    print(f"POST /stock/apple/release, {args.requests} requests, {args.concurrency} clients, "
          f"gunicorn {args.workers}x{args.threads} gthread")  # fmt: skip
    for mode, rps in results.items():
        print(f"  {mode:13s} {rps:8.1f} req/s   {rps / base:5.2f}x instrumented")
    ratio = results["audited"] / base
    per_request = RECORDS.get("audited", 0) / (args.requests + args.warmup)
    extra_ms = 1000 / results["audited"] - 1000 / base
    print(f"  audit records per request: {per_request:.1f}; the audited run's extra server"
          f" time: {extra_ms:.2f} ms per request = {extra_ms / max(per_request, 1e-9):.2f} ms"
          " per record (what bench_core.py breaks down)")  # fmt: skip
    print(
        f"audited / instrumented = {ratio:.2f} (goal >= 0.85); the floor (two bare durable"
        f" commits per request, nothing else) = {results['floor'] / base:.2f}"
    )


if __name__ == "__main__":
    main()
