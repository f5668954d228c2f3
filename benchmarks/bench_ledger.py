"""Durable audit records/s into PostgreSQL and SQLite from 1, 4 and 16 writers.

A writer is one service instance: its own process, ``otel_audit.configure``
with sync durability (an action returns only after its record committed),
its own chain, and 4 threads running ``audit_action`` in a loop. Every writer
of a run starts together and runs for the same time; the script counts the
records committed. PostgreSQL is a temporary server started by this script
(fsync on, synchronous_commit on, like the test fixture); SQLite is one file
(WAL, synchronous=FULL) shared by the writers. Prints records/s per backend
and the PostgreSQL/SQLite ratio.

A second table shows what the ledger itself takes, without the SDK: each
thread of each writer process appends batches of ready canonical bodies
(``--batch``, the size a busy writer's group commit reaches) to its own chain
through ``Ledger.append`` and waits for each commit. The gap between the two
tables is the per-record Python cost of the audited application (span,
record, policy, encode, writer hand-off), which bench_core.py breaks down.

    .venv/bin/python benchmarks/bench_ledger.py [--seconds 4] [--writers 1,4,16] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.pgserver import PostgresServer

WORKER = r"""
import json, sys, threading, time
from opentelemetry.sdk.trace import TracerProvider
import otel_audit

url, chain, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
provider = TracerProvider(shutdown_on_exit=False)
pipeline = otel_audit.configure(ledger=url, service_name="bench", tracer_provider=provider,
                                chain=chain, durability="sync", handle_sigterm=False)
counts = [0] * threads
print("ready", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
end_at = start_at + seconds

def work(t):
    n = 0
    with otel_audit.actor(f"user{t}"):
        while time.time() < end_at:
            with otel_audit.audit_action("order.update", resource=("order", str(n))):
                pass
            n += 1
    counts[t] = n

workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
stats = pipeline.stats()
pipeline.shutdown()
print(json.dumps({"records": sum(counts), "p50": stats.commit_latency_p50_ms,
                  "p99": stats.commit_latency_p99_ms, "batches": stats.batches}), flush=True)
"""


RAW_WORKER = r"""
import json, sys, threading, time
from otel_audit.engine.ledger import open_ledger

url, chain, threads, seconds, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
body = (b'{"attributes":{"audit.action":"order.update","audit.actor.id":"user%d","audit.event":true,'
        b'"audit.outcome":"success","audit.resource.id":"%d","audit.resource.type":"order"},'
        b'"end":2,"kind":"INTERNAL","name":"order.update","parent_span_id":null,"service":"bench",'
        b'"span_id":"%016x","start":1,"status":"UNSET","trace_id":"%032x","v":1}')
ledgers = [open_ledger(url) for _ in range(threads)]
counts, waits = [0] * threads, [[] for _ in range(threads)]
print("ready", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
end_at = start_at + seconds

def work(t):
    n = 0
    ledger = ledgers[t]
    while time.time() < end_at:
        bodies = [body % (t, n + i, n + i, n + i) for i in range(batch)]
        t0 = time.perf_counter()
        ledger.append(f"{chain}/{t}", bodies)
        waits[t].append(time.perf_counter() - t0)
        n += batch
    counts[t] = n

workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
for ledger in ledgers:
    ledger.close()
lat = sorted(x for w in waits for x in w)
print(json.dumps({"records": sum(counts), "p50": lat[len(lat) // 2] * 1000 if lat else 0,
                  "p99": lat[int(len(lat) * 0.99)] * 1000 if lat else 0,
                  "batches": len(lat)}), flush=True)
"""


def run(
    url: str, writers: int, threads: int, seconds: float, batch: int | None = None
) -> dict[str, float]:
    script, extra = (WORKER, []) if batch is None else (RAW_WORKER, [str(batch)])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                url,
                f"bench/{writers}/{i}",
                str(threads),
                str(seconds),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"writer failed to start: {line!r} (exit {p.wait()})")
        start_at = time.time() + 0.5
        for p in procs:
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    records = sum(r["records"] for r in results)
    return {
        "rate": records / seconds,
        "records": records,
        "p50": max(r["p50"] for r in results),
        "p99": max(r["p99"] for r in results),
        "per_batch": records / max(1, sum(r["batches"] for r in results)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per run")
    parser.add_argument("--writers", default="1,4,16", help="writer process counts")
    parser.add_argument("--threads", type=int, default=4, help="auditing threads per writer")
    parser.add_argument(
        "--batch", type=int, default=32, help="records per append, ledger-only runs"
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the ledger-only runs")
    args = parser.parse_args()
    counts = [int(x) for x in args.writers.split(",")]
    started = time.monotonic()
    server = PostgresServer().start()
    tmp = tempfile.mkdtemp(prefix="otel-audit-bench-")
    try:
        print(
            f"durable audit records/s, {args.threads} threads per writer process,"
            f" {args.seconds:g}s per run, {os.cpu_count()} CPUs"
        )
        print(f"{'writers':>7} {'sqlite/s':>10} {'postgres/s':>11} {'pg/sqlite':>9}"
              f" {'pg p99 ms':>9} {'pg recs/commit':>14}")  # fmt: skip
        for n in counts:
            sqlite = run(f"sqlite:///{tmp}/bench-{n}.db", n, args.threads, args.seconds)
            pg_url = server.create_database(f"bench_{n}")
            pg = run(pg_url, n, args.threads, args.seconds)
            print(
                f"{n:>7} {sqlite['rate']:>10.0f} {pg['rate']:>11.0f}"
                f" {pg['rate'] / sqlite['rate']:>9.2f} {pg['p99']:>9.1f} {pg['per_batch']:>14.1f}",
                flush=True,
            )
        if not args.no_raw:
            print(
                f"\nledger only: Ledger.append of {args.batch} ready bodies per call,"
                f" each thread its own chain and connection"
            )
            print(f"{'writers':>7} {'sqlite/s':>10} {'postgres/s':>11} {'pg/sqlite':>9}"
                  f" {'sqlite p50 ms':>13} {'pg p50 ms':>9} {'pg p99 ms':>9}")  # fmt: skip
            for n in counts:
                sqlite = run(
                    f"sqlite:///{tmp}/raw-{n}.db", n, args.threads, args.seconds, args.batch
                )
                pg_url = server.create_database(f"raw_{n}")
                pg = run(pg_url, n, args.threads, args.seconds, args.batch)
                print(
                    f"{n:>7} {sqlite['rate']:>10.0f} {pg['rate']:>11.0f}"
                    f" {pg['rate'] / sqlite['rate']:>9.2f} {sqlite['p50']:>13.1f}"
                    f" {pg['p50']:>9.1f} {pg['p99']:>9.1f}",
                    flush=True,
                )
    finally:
        server.close()
    print(f"total {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
