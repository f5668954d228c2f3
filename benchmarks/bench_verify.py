"""Verify benchmark: ``verify_ledger`` against a bare SHA-256 chain loop over the same bytes.

Builds a SQLite ledger of N records (default 200,000; ``--records``) in 5
chains, with a signed checkpoint carrying a Merkle root every 10,000 records
per chain (what the writer does), then in the same run measures:

* the baseline: a bare loop ``prev = sha256(prev + body)`` over the same
  bodies already in memory (no reads, no checks);
* ``verify_ledger`` with the public key (reads every row, checks every link,
  every checkpoint signature and Merkle root, accounts for every row and the
  schema);
* their ratio (goal, issue 13: >= 0.5), and where verify's time goes: reading
  the rows, the link hashes, the Merkle leaf and node hashes, each timed alone
  (with ``--profile`` also cProfile's top functions by own time).

Run: .venv/bin/python benchmarks/bench_verify.py [--records N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import random
import sys
import tempfile
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.chain import GENESIS, Checkpoint
from otel_audit.proof.keys import Signer
from otel_audit.proof.merkle import Frontier
from otel_audit.proof.verify import verify_ledger

CHAINS = ["orders", "inventory", "billing", "shipping", "accounts"]
CHECKPOINT_EVERY = 10_000


def _body(i: int, rnd: random.Random, chain: str) -> bytes:
    attrs: dict[str, object] = {
        v.TRAIL_ID: f"{rnd.getrandbits(64):016x}",
        v.ACTOR_ID: f"user{rnd.randrange(1000)}",
        v.ACTOR_TYPE: "user",
    }
    if i % 3 == 0:
        attrs.update({v.EVENT: True, v.ACTION: "order.update", v.RESOURCE_TYPE: "order",
                      v.RESOURCE_ID: str(rnd.randrange(100_000)), v.OUTCOME: "success"})  # fmt: skip
    else:
        attrs.update({v.EFFECT: v.DATA_WRITE, "db.system": "postgresql",
                      "db.query.text": "UPDATE orders SET status = $1 WHERE id = $2"})  # fmt: skip
    t = 1_700_000_000_000_000_000 + i * 1_000_000
    rec = Record(trace_id=f"{rnd.getrandbits(128):032x}", span_id=f"{rnd.getrandbits(64):016x}",
                 parent_span_id=None, name="order.update", kind="INTERNAL", service=chain,
                 start=t, end=t + 500_000, attributes=attrs)  # fmt: skip
    return encode(rec)


def build(path: str, n: int, signer: Signer) -> dict[str, list[bytes]]:
    rnd = random.Random(7)
    ledger = open_ledger(f"sqlite:///{path}")
    bodies: dict[str, list[bytes]] = {c: [] for c in CHAINS}
    frontiers = {c: Frontier() for c in CHAINS}
    per_chain = n // len(CHAINS)
    for chain in CHAINS:
        for off in range(0, per_chain, CHECKPOINT_EVERY):
            batch = [
                _body(off + i, rnd, chain) for i in range(min(CHECKPOINT_EVERY, per_chain - off))
            ]
            appended = ledger.append(chain, batch)
            for b in batch:
                frontiers[chain].append(b)
            bodies[chain].extend(batch)
            last = appended[-1]
            cp = Checkpoint(chain, last.seq, last.hash, time.time_ns(),
                            merkle_root=frontiers[chain].root())  # fmt: skip
            ledger.add_checkpoint(Checkpoint(cp.chain, cp.seq, cp.head, cp.time,
                                             signer.sign(cp.message()), signer.key_id,
                                             cp.merkle_root))  # fmt: skip
    ledger.close()
    return bodies


def bare_chain(bodies: dict[str, list[bytes]]) -> int:
    """The baseline: one SHA-256 per record over (previous hash || body), nothing else."""
    sha256 = hashlib.sha256
    n = 0
    for chain_bodies in bodies.values():
        prev = GENESIS
        for body in chain_bodies:
            prev = sha256(prev + body).digest()
        n += len(chain_bodies)
    return n


def _fetch(ledger) -> None:  # type: ignore[no-untyped-def]
    for chain in CHAINS:
        for batch in ledger.scan_batches(chain):
            for _row in batch:
                pass


def _leaves(bodies: dict[str, list[bytes]]) -> None:
    """Leaf hashes and the n-1 inner nodes of each chain's tree, as verify builds them."""
    sha256 = hashlib.sha256
    for chain_bodies in bodies.values():
        level = [sha256(b"\x00" + body).digest() for body in chain_bodies]
        while len(level) > 1:
            level = [sha256(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2])]


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print where verify's time goes")
    args = ap.parse_args()
    signer = Signer(Ed25519PrivateKey.generate())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        t = time.perf_counter()
        bodies = build(path, args.records, signer)
        n = sum(len(b) for b in bodies.values())
        size = sum(len(x) for b in bodies.values() for x in b)
        print(
            f"build: {n:,} records ({size / n:.0f} bytes each) in {time.perf_counter() - t:.1f} s"
        )
        base_s = best_of(lambda: bare_chain(bodies), args.repeat)
        ledger = open_ledger(f"sqlite:///{path}", create=False, readonly=True)
        try:
            report = verify_ledger(ledger, signer.public_key)
            assert report.records == n, (report.records, n)
            verify_s = best_of(lambda: verify_ledger(ledger, signer.public_key), args.repeat)
            base_rate, verify_rate = n / base_s, n / verify_s
            print(
                f"bare SHA-256 chain loop  {base_rate:12,.0f} records/s  ({size / base_s / 1e6:.0f} MB/s)"
            )
            print(
                f"verify_ledger (key)      {verify_rate:12,.0f} records/s  ({size / verify_s / 1e6:.0f} MB/s)"
            )
            print(f"ratio verify/bare        {verify_rate / base_rate:12.2f}   (goal >= 0.5)")
            # Where the time goes: the parts of verify's work, each alone.
            fetch_s = best_of(lambda: _fetch(ledger), args.repeat)
            leaf_s = best_of(lambda: _leaves(bodies), args.repeat)
            print("where verify's time goes (each part alone, per record):")
            print(f"  read rows from SQLite      {fetch_s / n * 1e6:7.2f} us")
            print(f"  link hash (the bare loop)  {base_s / n * 1e6:7.2f} us")
            print(f"  Merkle leaf + node hashes  {leaf_s / n * 1e6:7.2f} us")
            print(f"  verify, all of it          {verify_s / n * 1e6:7.2f} us")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                verify_ledger(ledger, signer.public_key)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
                print("where verify's time goes (own time, top 12):")
                print(
                    "\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000]
                )
        finally:
            ledger.close()


if __name__ == "__main__":
    main()
