"""Review-side benchmark: search, export, Merkle proofs and evidence bundles at scale.

Builds a SQLite ledger of N records (default 1,000,000; ``--records``) fast,
with ``ledger.append`` of canonical bodies in large batches (5 chains, 1000
actors, trails of 6 records), then measures:

* search latency by actor, by trail, by resource, first page and full result,
  against the same query with the review indexes dropped (a baseline in the
  same run: what the indexes buy);
* the insert cost of those indexes: group-commit-sized appends (100 bodies)
  with and without them;
* export records/s per format, over 20,000 records;
* Merkle tree build + inclusion proof generation records/s, and bundle
  writing and verification records/s.

Run: .venv/bin/python benchmarks/bench_review.py [--records N] [--keep PATH]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.bundle import verify_bundle, write_bundle
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer
from otel_audit.proof.merkle import Frontier, Tree, leaf_hash
from otel_audit.review.export import formats

CHAINS = ["orders", "inventory", "billing", "shipping", "accounts"]
ACTORS = 1000
REVIEW_INDEXES = {
    "records_actor": "CREATE INDEX records_actor ON records (actor_id)",
    "records_resource": "CREATE INDEX records_resource ON records (resource_type, resource_id)",
    "records_action": "CREATE INDEX records_action ON records (action)",
}


def make_bodies(n: int, start_ns: int, rnd: random.Random) -> list[tuple[str, bytes]]:
    out = []
    trail = None
    trace = None
    for i in range(n):
        if i % 6 == 0:
            trace = f"{rnd.getrandbits(128):032x}"
            trail = f"{rnd.getrandbits(64):016x}"
            actor = f"user{rnd.randrange(ACTORS)}"
            order = str(rnd.randrange(100_000))
        chain = CHAINS[(i // 6) % len(CHAINS)] if i % 6 < 3 else CHAINS[(i // 6 + 1) % len(CHAINS)]
        attrs = {v.TRAIL_ID: trail, v.ACTOR_ID: actor, v.ACTOR_TYPE: "user"}
        if i % 6 in (0, 3):
            attrs.update(
                {
                    v.EVENT: True,
                    v.ACTION: "order.update" if i % 12 else "order.create",
                    v.RESOURCE_TYPE: "order",
                    v.RESOURCE_ID: order,
                    v.OUTCOME: "success",
                }
            )
        else:
            attrs.update(
                {
                    v.EFFECT: v.DATA_WRITE,
                    "db.system": "postgresql",
                    "db.query.text": "UPDATE orders SET status = $1 WHERE id = $2",
                }
            )
        t = start_ns + i * 1_000_000
        rec = Record(trace_id=trace or "", span_id=f"{rnd.getrandbits(64):016x}",
                     parent_span_id=None if i % 3 == 0 else f"{rnd.getrandbits(64):016x}",
                     name="order.update", kind="INTERNAL", service=chain, start=t, end=t + 500_000,
                     attributes=attrs)  # fmt: skip
        out.append((chain, encode(rec)))
    return out


def build(path: str, n: int, signer: Signer) -> tuple[str, str, str]:
    rnd = random.Random(7)
    url = f"sqlite:///{path}"
    ledger = open_ledger(url)
    t0 = time.perf_counter()
    start = time.time_ns() - n * 1_000_000
    batch = 50_000
    sample_actor = sample_trail = sample_order = ""
    for off in range(0, n, batch):
        rows = make_bodies(min(batch, n - off), start + off * 1_000_000, rnd)
        by_chain: dict[str, list[bytes]] = {}
        for chain, body in rows:
            by_chain.setdefault(chain, []).append(body)
        for chain, bodies in by_chain.items():
            appended = ledger.append(chain, bodies)
            frontier = _frontiers.setdefault(chain, Frontier())
            for b in bodies:
                frontier.append(b)
            last = appended[-1]
            cp = Checkpoint(chain, last.seq, last.hash, time.time_ns(), merkle_root=frontier.root())
            ledger.add_checkpoint(Checkpoint(cp.chain, cp.seq, cp.head, cp.time, signer.sign(cp.message()),
                                             signer.key_id, cp.merkle_root))  # fmt: skip
        if off == n // 2 // batch * batch:
            import json

            d = json.loads(rows[0][1])
            sample_actor = d["attributes"][v.ACTOR_ID]
            sample_trail = d["attributes"][v.TRAIL_ID]
            sample_order = d["attributes"][v.RESOURCE_ID]
        print(f"\r  built {off + len(rows):,}/{n:,}", end="", file=sys.stderr)
    print(file=sys.stderr)
    ledger.close()
    print(f"build: {n:,} records in {time.perf_counter() - t0:.1f} s")
    return sample_actor, sample_trail, sample_order


_frontiers: dict[str, Frontier] = {}


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_search(url: str, actor: str, trail: str, order: str, path: str) -> None:
    queries = {
        "actor, first page (50)": Query(actor=actor, limit=50),
        "actor, all": Query(actor=actor),
        "trail, all": Query(trail_id=trail),
        "resource order/N, all": Query(resource_type="order", resource_id=order),
        "actor + since 1d": Query(actor=actor, since=time.time_ns() - 86_400 * 10**9),
    }
    results = {}
    with open_ledger(url, readonly=True) as ledger:
        for name, q in queries.items():
            count = sum(1 for _ in ledger.query(q))
            results[name] = (timed(lambda q=q: list(ledger.query(q))), count)
    con = sqlite3.connect(path)
    for idx in REVIEW_INDEXES:
        con.execute(f"DROP INDEX IF EXISTS {idx}")
    con.commit()
    base = {}
    with open_ledger(url, readonly=True) as ledger:
        for name, q in queries.items():
            if name.startswith("trail"):
                continue  # the trail index predates this work; no baseline to drop
            base[name] = timed(lambda q=q: list(ledger.query(q)), repeat=1)
    for sql in REVIEW_INDEXES.values():
        con.execute(sql)
    con.commit()
    con.close()
    print("\nsearch latency (median of 5):")
    for name, (t, count) in results.items():
        extra = (
            f"   without review indexes {base[name] * 1000:9.1f} ms (x{base[name] / t:,.0f})"
            if name in base
            else ""
        )
        print(f"  {name:28s} {t * 1000:8.2f} ms  ({count} records){extra}")


def bench_insert_cost(tmp: str) -> None:
    rnd = random.Random(3)
    bodies = [b for _, b in make_bodies(10_000, time.time_ns(), rnd)]
    rates: dict[str, list[float]] = {"with review indexes": [], "without": []}
    # Interleaved rounds, median: fsync times vary more than the indexes cost.
    for rnd_no in range(3):
        for label, samples in rates.items():
            path = os.path.join(tmp, f"ins-{label[:4]}-{rnd_no}.db")
            ledger = open_ledger(f"sqlite:///{path}")
            if label == "without":
                con = sqlite3.connect(path)
                for idx in REVIEW_INDEXES:
                    con.execute(f"DROP INDEX {idx}")
                con.commit()
                con.close()
            t = time.perf_counter()
            for i in range(0, len(bodies), 100):
                ledger.append("c", bodies[i : i + 100])
            samples.append(len(bodies) / (time.perf_counter() - t))
            ledger.close()
    med = {label: statistics.median(r) for label, r in rates.items()}
    print("\nappend throughput, batches of 100 (fsync each), median of 3 interleaved rounds:")
    for label, r in med.items():
        print(f"  {label:22s} {r:10,.0f} records/s")
    cost = 100 * (1 - med["with review indexes"] / med["without"])
    print(f"  cost of the review indexes: {cost:.1f}% fewer records/s")


def bench_export(url: str) -> None:
    with open_ledger(url, readonly=True) as ledger:
        rows = list(ledger.query(Query(chain="orders", limit=20_000)))
    print(f"\nexport ({len(rows):,} records, to memory):")
    base = None
    for name, write in sorted(formats().items(), key=lambda kv: kv[0] != "jsonl"):
        t = timed(lambda write=write: write(iter(rows), io.StringIO()), repeat=3)
        rate = len(rows) / t
        base = base or rate
        print(f"  {name:10s} {rate:10,.0f} records/s   ({rate / base:.2f} x jsonl)")


def bench_merkle_and_bundle(url: str, actor: str, signer: Signer, tmp: str) -> None:
    with open_ledger(url, readonly=True) as ledger:
        bodies = [r.body for r in ledger.scan("orders")]
    t = time.perf_counter()
    leaves = [leaf_hash(b) for b in bodies]
    tree = Tree(leaves)
    build_s = time.perf_counter() - t
    idx = random.Random(1).sample(range(len(leaves)), min(100_000, len(leaves)))
    t = time.perf_counter()
    for i in idx:
        tree.inclusion_proof(i)
    proof_s = time.perf_counter() - t
    print(f"\nmerkle (chain 'orders', {len(leaves):,} records):")
    print(f"  tree build      {len(leaves) / build_s:12,.0f} records/s")
    print(f"  inclusion proof {len(idx) / proof_s:12,.0f} proofs/s")
    out = os.path.join(tmp, "evidence.zip")
    with open_ledger(url, readonly=True) as ledger:
        q = Query(chain="orders", limit=50_000)
        t = time.perf_counter()
        with open(out, "wb") as fh:
            summary = write_bundle(ledger, q, fh, public_key=signer.public_key)
        bundle_s = time.perf_counter() - t
    t = time.perf_counter()
    report = verify_bundle(out, signer.public_key)
    verify_s = time.perf_counter() - t
    print(
        f"  bundle of {summary.records:,} records: written in {bundle_s:.1f} s (incl. one pass over the chain),"
        f" {os.path.getsize(out) / 1e6:.1f} MB"
    )
    print(f"  bundle verification {report.records / verify_s:10,.0f} records/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--keep", help="keep (or reuse) the ledger at this path")
    args = p.parse_args()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    tmp = tempfile.mkdtemp(prefix="bench-review-")
    try:
        path = args.keep or os.path.join(tmp, "ledger.db")
        actor, trail, order = build(path, args.records, signer)
        url = f"sqlite:///{path}"
        print(f"ledger file: {os.path.getsize(path) / 1e6:,.0f} MB")
        bench_search(url, actor, trail, order, path)
        bench_insert_cost(tmp)
        bench_export(url)
        bench_merkle_and_bundle(url, actor, signer, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
