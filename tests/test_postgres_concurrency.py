"""8 processes x 4 threads audit into one PostgreSQL ledger at once, across a server crash."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger

PROCESSES = 8
THREADS = 4

# One service instance: the real configure() + audit_action, sync durability.
# It prints "ready", starts its threads on "go" and stops them on "stop"
# (lines on stdin), then writes what was acknowledged as JSON.
WORKER = r"""
import json, sys, threading, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
import otel_audit
from otel_audit.errors import LedgerError

url, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
provider = TracerProvider(shutdown_on_exit=False)
pipeline = otel_audit.configure(ledger=url, service_name="fleet", tracer_provider=provider,
                                handle_sigterm=False, checkpoint_every=64)
stop = threading.Event()
lock = threading.Lock()
acked, failed = [], []

def work(t):
    i = 0
    while not stop.is_set():
        i += 1
        try:
            with otel_audit.actor(f"user{t}"):
                with otel_audit.audit_action("order.update", resource=("order", f"{t}-{i}")):
                    ctx = trace.get_current_span().get_span_context()
        except LedgerError as exc:
            with lock:
                failed.append(str(exc))
            continue
        # Only here is the record acknowledged: audit_action returned normally.
        with lock:
            acked.append([format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), time.time()])

print("ready", pipeline.chain, flush=True)
assert sys.stdin.readline().strip() == "go"
workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
assert sys.stdin.readline().strip() == "stop"
stop.set()
for w in workers:
    w.join()
pipeline.shutdown()
with open(out, "w") as fh:
    json.dump({"chain": pipeline.chain, "acked": acked, "failed": failed}, fh)
"""


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def chain_heads(url: str) -> dict[str, int]:
    with open_ledger(url, readonly=True) as ledger:
        return {c: (ledger.head(c).seq if ledger.head(c) else 0) for c in ledger.chains()}


def test_many_processes_and_threads_survive_a_server_crash(pg_url, pg_server, tmp_path, capsys):
    open_ledger(pg_url).close()  # schema created once, as `otel-audit init` would
    procs = []
    try:
        for n in range(PROCESSES):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WORKER,
                        pg_url,
                        str(tmp_path / f"w{n}.json"),
                        str(THREADS),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        chains = []
        for p in procs:
            line = p.stdout.readline().split()  # blocks until configure() is done
            assert line[:1] == ["ready"], f"worker failed to start (exit {p.poll()})"
            chains.append(line[1])
        assert len(set(chains)) == PROCESSES  # one chain per service instance
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()

        wait_for(lambda: sum(chain_heads(pg_url).values()) >= 300, "300 records before the crash")
        # A crash, not a clean stop: committed data must come back from the WAL.
        pg_server.restart(mode="immediate")
        restarted = time.time()
        before = chain_heads(pg_url)
        wait_for(
            lambda: all(chain_heads(pg_url).get(c, 0) >= before.get(c, 0) + 30 for c in chains),
            "every writer to commit again after the restart",
        )
        for p in procs:
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    results = [json.loads((tmp_path / f"w{n}.json").read_text()) for n in range(PROCESSES)]
    acked = [(a[0], a[1]) for r in results for a in r["acked"]]
    failed = [f for r in results for f in r["failed"]]
    with open_ledger(pg_url, readonly=True) as ledger:
        stored = collections.Counter(
            (s.record.trace_id, s.record.span_id) for s in ledger.query(Query())
        )
        assert ledger.count() == sum(stored.values())
    # Every acknowledged record is present exactly once; nothing is stored twice.
    assert len(set(acked)) == len(acked)
    missing = [k for k in acked if stored[k] != 1]
    assert missing == []
    assert [k for k, n in stored.items() if n > 1] == []
    # The writers reconnected by themselves: each acknowledged records after the crash.
    for r in results:
        assert any(a[2] > restarted for a in r["acked"]), (r["chain"], failed[:3])
    # A failed action may still have been stored (its commit reply was lost): never the reverse.
    assert len(stored) >= len(acked)
    if not failed:
        assert set(stored) == set(acked)

    code = main(["verify", "--ledger", pg_url])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"in {PROCESSES} chains intact" in out
    assert f"ok: {len(stored)} records" in out
