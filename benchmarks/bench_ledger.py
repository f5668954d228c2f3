"""Durable audit records/s into PostgreSQL and SQLite from 1, 4 and 16 writers.

A writer is one service instance: its own process, ``otel_audit.configure``
with sync durability (an action returns only after its record committed),
its own chain, and 4 threads running ``audit_action`` in a loop. Every writer
of a run starts together and runs for the same time; the script counts the
records committed. PostgreSQL is a temporary server started by this script
(fsync on, synchronous_commit on, like the test fixture); SQLite is one file
(WAL, synchronous=FULL) shared by the writers. Prints records/s per backend
side by side, the PostgreSQL/SQLite ratio, records per commit, and where the
time goes: CPU per record of the writer processes (process CPU over the
measured window: SDK, writer thread, driver) and of the PostgreSQL server
(postmaster and backends), and the disk's fsync latency, which bounds how
many SQLite commits the writers of one file can make per second.

A second table shows what the ledger itself takes, without the SDK: each
thread of each writer process appends batches of ready canonical bodies
(``--batch``, the size a busy writer's group commit reaches) to its own chain
through ``Ledger.append`` and waits for each commit. The gap between the two
tables is the per-record Python cost of the audited application (span,
record, policy, encode, writer hand-off), which bench_core.py breaks down.

A third table shows where the PostgreSQL server's time goes per record:
the same appends into the schema as it is, without its query indexes, and
without the generated ``doc`` column the indexes and review queries use.

    .venv/bin/python benchmarks/bench_ledger.py [--seconds 4] [--writers 1,4,16] [--batch 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

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
cpu = time.process_time()
for w in workers:
    w.start()
for w in workers:
    w.join()
cpu = time.process_time() - cpu
stats = pipeline.stats()
pipeline.shutdown()
print(json.dumps({"records": sum(counts), "p50": stats.commit_latency_p50_ms,
                  "p99": stats.commit_latency_p99_ms, "batches": stats.batches,
                  "cpu": cpu}), flush=True)
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
cpu = time.process_time()
for w in workers:
    w.start()
for w in workers:
    w.join()
cpu = time.process_time() - cpu
for ledger in ledgers:
    ledger.close()
lat = sorted(x for w in waits for x in w)
print(json.dumps({"records": sum(counts), "p50": lat[len(lat) // 2] * 1000 if lat else 0,
                  "p99": lat[int(len(lat) * 0.99)] * 1000 if lat else 0,
                  "batches": len(lat), "cpu": cpu}), flush=True)
"""


def _cpu_of(pid: int, reaped: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (Linux /proc; 0 when it is gone or elsewhere).

    ``reaped`` adds the CPU of its children that have exited and been waited for.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu(server: PostgresServer | None) -> float:
    """CPU seconds used so far by the PostgreSQL server: its postmaster and its children.

    Backends that exited (a writer closed its connection) count through the
    postmaster's reaped-children time, so the figure holds across the end of a run.
    """
    if server is None:
        return 0.0
    try:
        with open(os.path.join(server.data, "postmaster.pid")) as f:
            root = int(f.readline())
    except (OSError, ValueError):
        return 0.0
    total = _cpu_of(root, reaped=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == root:
                total += _cpu_of(int(entry))
    return total


def fsync_latency(directory: str, count: int = 100) -> float:
    """Median seconds of one fsync of a 4 KiB write in ``directory`` (what one commit waits)."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    waits = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            began = time.perf_counter()
            os.fsync(fd)
            waits.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(waits)[len(waits) // 2]


def run(
    url: str,
    writers: int,
    threads: int,
    seconds: float,
    batch: int | None = None,
    server: PostgresServer | None = None,
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
        time.sleep(max(0.0, start_at - time.time()))
        served = server_cpu(server)
        results = [json.loads(p.stdout.readline()) for p in procs]
        served = server_cpu(server) - served
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
        # CPU per record: the writer processes (SDK, writer thread, driver) and the server.
        "client_us": sum(r["cpu"] for r in results) / max(1, records) * 1e6,
        "server_us": served / max(1, records) * 1e6,
    }


# What the PostgreSQL server spends per record on the parts of the schema that
# serve review queries: the same appends into the schema as it is, without its
# six query indexes, and without the generated ``doc`` column (and the indexes
# over it). The two variants are experiments made here, not supported schemas.
_SCHEMA_VARIANTS = {
    "as it is": [],
    "no query indexes": [
        f"DROP INDEX otel_audit.records_{name}"
        for name in ("trace", "trail", "actor", "resource", "action", "start")
    ],
    "no doc column": ["ALTER TABLE otel_audit.records DROP COLUMN doc CASCADE"],
}


_BODY = (
    b'{"attributes":{"audit.action":"order.update","audit.actor.id":"user%d",'
    b'"audit.event":true,"audit.outcome":"success","audit.resource.id":"%d",'
    b'"audit.resource.type":"order"},"end":2,"kind":"INTERNAL","name":"order.update",'
    b'"parent_span_id":null,"service":"bench","span_id":"%016x","start":1,'
    b'"status":"UNSET","trace_id":"%032x","v":1}'
)


def _copy_until(con: Any, chain: str, end_at: float, batch: int, counts: list[int]) -> None:
    """Append chained rows to ``chain`` by COPY, ``batch`` per statement, until ``end_at``."""
    cur, n, prev = con.cursor(), 0, b"\0" * 32
    while time.time() < end_at:
        copy = "COPY otel_audit.records (chain, seq, prev_hash, hash, body) FROM STDIN"
        with cur.copy(copy) as rows:
            for _ in range(batch):
                n += 1
                body = _BODY % (n, n, n, n)
                digest = hashlib.sha256(prev + body).digest()
                rows.write_row((chain, n, prev, digest, body))
                prev = digest
    counts.append(n)


def schema_cost(
    server: PostgresServer, seconds: float, threads: int, batch: int
) -> dict[str, tuple[float, float]]:
    """records/s and server CPU us per record for each schema variant (COPY of ready rows)."""
    import psycopg

    from otel_audit.engine.ledger import open_ledger

    out = {}
    for i, (variant, statements) in enumerate(_SCHEMA_VARIANTS.items()):
        url = server.create_database(f"schema_{i}")
        open_ledger(url).close()  # the schema this version creates
        with psycopg.connect(url, autocommit=True) as con:
            for statement in statements:
                con.execute(statement)
        conns = [psycopg.connect(url, autocommit=True) for _ in range(threads)]
        counts: list[int] = []
        end_at = time.time() + seconds
        workers = [
            threading.Thread(target=_copy_until, args=(con, f"s/{t}", end_at, batch, counts))
            for t, con in enumerate(conns)
        ]
        began, served = time.time(), server_cpu(server)
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed, served = time.time() - began, server_cpu(server) - served
        for con in conns:
            con.close()
        records = sum(counts)
        out[variant] = (records / elapsed, served / max(1, records) * 1e6)
    return out


def _row(n: int, sqlite: dict[str, float], pg: dict[str, float]) -> None:
    print(
        f"{n:>7} {sqlite['rate']:>9.0f} {pg['rate']:>10.0f} {pg['rate'] / sqlite['rate']:>9.2f}"
        f" {sqlite['per_batch']:>8.1f} | {pg['per_batch']:<6.1f}"
        f" {sqlite['p99']:>6.1f} | {pg['p99']:<6.1f}"
        f" {sqlite['client_us']:>17.0f} | {pg['client_us']:>6.0f} + {pg['server_us']:<6.0f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per run")
    parser.add_argument("--writers", default="1,4,16", help="writer process counts")
    parser.add_argument("--threads", type=int, default=4, help="auditing threads per writer")
    parser.add_argument(
        "--batch", type=int, default=32, help="records per append, ledger-only runs"
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the ledger-only runs")
    parser.add_argument(
        "--no-schema-cost", action="store_true", help="skip the PostgreSQL schema breakdown"
    )
    args = parser.parse_args()
    counts = [int(x) for x in args.writers.split(",")]
    started = time.monotonic()
    server = PostgresServer().start()
    tmp = tempfile.mkdtemp(prefix="otel-audit-bench-")
    try:
        print(
            f"durable audit records/s, {args.threads} threads per writer process,"
            f" {args.seconds:g}s per run, {os.cpu_count()} CPUs"
            f" (goal: postgres >= 20,000/s with 16 writers, sqlite >= 10,000/s with 4)"
        )
        header = (
            f"{'writers':>7} {'sqlite/s':>9} {'postgres/s':>10} {'pg/sqlite':>9}"
            f" {'recs/commit sq|pg':>17} {'p99 ms sq|pg':>13}"
            f" {'CPU us/rec: sqlite writers | pg writers + server':>48}"
        )
        print(header)
        for n in counts:
            sqlite = run(f"sqlite:///{tmp}/bench-{n}.db", n, args.threads, args.seconds)
            pg_url = server.create_database(f"bench_{n}")
            pg = run(pg_url, n, args.threads, args.seconds, server=server)
            _row(n, sqlite, pg)
        if not args.no_raw:
            print(
                f"\nledger only: Ledger.append of {args.batch} ready bodies per call,"
                f" each thread its own chain and connection"
            )
            print(header)
            for n in counts:
                sqlite = run(
                    f"sqlite:///{tmp}/raw-{n}.db", n, args.threads, args.seconds, args.batch
                )
                pg_url = server.create_database(f"raw_{n}")
                pg = run(pg_url, n, args.threads, args.seconds, args.batch, server=server)
                _row(n, sqlite, pg)
        if not args.no_schema_cost:
            print(
                f"\nwhere the PostgreSQL server's time goes: COPY of {args.batch} ready rows per"
                f" statement, {args.threads} connections, one process; the review-query parts"
                f" of the schema taken away (experiments, not supported schemas)"
            )
            print(f"{'schema':>18} {'records/s':>10} {'server CPU us/rec':>18}")
            for variant, (rate, server_us) in schema_cost(
                server, args.seconds, args.threads, args.batch
            ).items():
                print(f"{variant:>18} {rate:>10.0f} {server_us:>18.1f}", flush=True)
        fsync = fsync_latency(tmp)
        print(
            f"\nfsync of this disk: {fsync * 1000:.2f} ms (median). A SQLite commit holds the"
            f" file's write lock through its fsync, so the writers of one file commit one at a"
            f" time: at most {1 / fsync:,.0f} commits/s; with sync durability a writer's commit"
            f" carries at most its {args.threads} threads' records."
        )
    finally:
        server.close()
    print(f"total {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
