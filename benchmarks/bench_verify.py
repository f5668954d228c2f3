"""Verify benchmark: ``verify_ledger`` against a bare SHA-256 chain loop over the same bytes.

Builds a SQLite ledger of N records (default 200,000; ``--records``) in 5
chains, with a signed checkpoint carrying a Merkle root every 10,000 records
per chain (what the writer does: version 3, roots over the chain hashes;
``--roots bodies`` builds what versions before it signed, version 2 roots
over the bodies, for comparison), then in the same run measures, in CPU time
of this process (the machine is shared; best of ``--repeat``, the bare loop
and verify taken in turns so load hits both alike):

* the baseline: a bare loop ``prev = sha256(prev + body)`` over the same
  bodies already in memory (no reads, no checks);
* ``verify_ledger`` with the public key (reads every row, checks every link,
  every checkpoint signature and Merkle root, accounts for every row and the
  schema);
* their ratio (goal, issue 13: >= 0.5), and where verify's time goes: reading
  the rows, the link hashes, the Merkle leaf and node hashes, each timed alone
  with the code verify runs, their sum and the ratio that sum allows (what no
  rewrite of verify's Python can beat with this format), the SHA-256 blocks
  each record costs, and the same for the other kind of root; with
  ``--profile`` also cProfile's top functions by own time;
* then in wall time, taken in turns: the bare loop, verify in one process,
  and verify with ``jobs`` worker processes (the CPUs it may use, what
  ``otel-audit verify`` does by default), each ratio to the bare loop.

``--ledger PATH`` keeps the built ledger (and its key, PATH.key) and reuses it
on the next run (building takes about a minute).

Run: .venv/bin/python benchmarks/bench_verify.py [--records N] [--profile] [--ledger PATH]
     [--roots hashes|bodies]
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
from otel_audit.proof.merkle import Frontier, leaf_hashes, parent_level, record_leaves
from otel_audit.proof.parallel import default_jobs
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


def build(path: str, n: int, signer: Signer, over_hashes: bool) -> dict[str, list[bytes]]:
    """The ledger, signed as the writer signs: linked checkpoints, version 3 (roots
    over chain hashes) or, with ``over_hashes`` False, version 2 (over bodies)."""
    rnd = random.Random(7)
    ledger = open_ledger(f"sqlite:///{path}")
    bodies: dict[str, list[bytes]] = {c: [] for c in CHAINS}
    frontiers = {c: Frontier() for c in CHAINS}
    links = dict.fromkeys(CHAINS, GENESIS)
    per_chain = n // len(CHAINS)
    for chain in CHAINS:
        for off in range(0, per_chain, CHECKPOINT_EVERY):
            batch = [
                _body(off + i, rnd, chain) for i in range(min(CHECKPOINT_EVERY, per_chain - off))
            ]
            appended = ledger.append(chain, batch)
            if over_hashes:
                leaves = record_leaves(a.hash for a in appended)
            else:
                leaves = leaf_hashes(batch)
            for leaf in leaves:
                frontiers[chain].append_leaf_hash(leaf)
            bodies[chain].extend(batch)
            last = appended[-1]
            cp = Checkpoint(chain, last.seq, last.hash, time.time_ns(), key_id=signer.key_id,
                            merkle_root=frontiers[chain].root(),
                            version=3 if over_hashes else 2, prev=links[chain])  # fmt: skip
            cp = cp.signed(signer.sign(cp.message()), signer.key_id)
            ledger.add_checkpoint(cp)
            links[chain] = cp.digest()
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


def _stored(ledger) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:  # type: ignore[no-untyped-def]
    """Each chain's bodies and stored hashes, read back from the ledger."""
    bodies: dict[str, list[bytes]] = {c: [] for c in CHAINS}
    hashes: dict[str, list[bytes]] = {c: [] for c in CHAINS}
    for chain in CHAINS:
        for batch in ledger.scan_batches(chain):
            bodies[chain].extend(row[3] for row in batch)
            hashes[chain].extend(row[2] for row in batch)
    return bodies, hashes


def _leaves_over_bodies(bodies: dict[str, list[bytes]]) -> None:
    """The Merkle leaf hashes of version 2 roots, with the function verify uses."""
    for chain_bodies in bodies.values():
        leaf_hashes(chain_bodies)


def _merkle_nodes(leaves: dict[str, list[bytes]]) -> None:
    """The n-1 inner nodes of each chain's tree, level by level, as verify builds them."""
    for level in leaves.values():
        while len(level) > 1:
            level = parent_level(level)


def _leaves_over_hashes(hashes: dict[str, list[bytes]]) -> None:
    """The Merkle leaf hashes of version 3 roots, with the function verify uses."""
    for chain_hashes in hashes.values():
        record_leaves(chain_hashes)


def _blocks(length: int) -> int:
    """SHA-256 compression blocks for a message of ``length`` bytes (with its padding)."""
    return (length + 9 + 63) // 64


class Timer:
    """Best time per labelled function, the functions taken in turns.

    CPU time of this process by default; wall time (``clock=time.perf_counter``)
    for work done in other processes.
    """

    def __init__(self, clock=time.process_time) -> None:  # type: ignore[no-untyped-def]
        self.best: dict[str, float] = {}
        self.clock = clock

    def run(self, fns: dict[str, object], repeat: int) -> None:
        for _ in range(repeat):
            for label, fn in fns.items():
                t = self.clock()
                fn()  # type: ignore[operator]
                took = self.clock() - t
                self.best[label] = min(self.best.get(label, float("inf")), took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print where verify's time goes")
    ap.add_argument("--ledger", help="build the ledger here once and reuse it (key in PATH.key)")
    ap.add_argument(
        "--roots",
        choices=("hashes", "bodies"),
        default="hashes",
        help="what the checkpoints' Merkle roots are over: chain hashes (version 3, what"
        " the writer signs) or bodies (version 2, before it)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.ledger or os.path.join(tmp, "bench.db")
        if args.ledger and os.path.exists(path) and os.path.exists(path + ".key"):
            with open(path + ".key", "rb") as f:
                signer = Signer(Ed25519PrivateKey.from_private_bytes(f.read()))
        else:
            key = Ed25519PrivateKey.generate()
            signer = Signer(key)
            t = time.perf_counter()
            build(path, args.records, signer, args.roots == "hashes")
            print(f"build: {time.perf_counter() - t:.1f} s")
            if args.ledger:
                with open(path + ".key", "wb") as f:
                    f.write(key.private_bytes_raw())
        ledger = open_ledger(f"sqlite:///{path}", create=False, readonly=True)
        try:
            measure(ledger, signer, args.repeat, args.profile, args.roots == "hashes")
        finally:
            ledger.close()


def measure(ledger, signer: Signer, repeat: int, profile: bool, over_hashes: bool) -> None:  # type: ignore[no-untyped-def]
    bodies, hashes = _stored(ledger)
    n = sum(len(b) for b in bodies.values())
    size = sum(len(x) for b in bodies.values() for x in b)
    kind = "version 3, over chain hashes" if over_hashes else "version 2, over bodies"
    print(f"ledger: {n:,} records ({size / n:.0f} bytes each) in {len(CHAINS)} chains;"
          f" Merkle roots {kind}")  # fmt: skip
    report = verify_ledger(ledger, signer.public_key)
    assert report.records == n, (report.records, n)
    leaves = {c: record_leaves(h) if over_hashes else leaf_hashes(bodies[c])
              for c, h in hashes.items()}  # fmt: skip
    timer = Timer()
    timer.run(
        {
            "bare": lambda: bare_chain(bodies),
            "verify": lambda: verify_ledger(ledger, signer.public_key),
            "read": lambda: _fetch(ledger),
            "leaves over bodies": lambda: _leaves_over_bodies(bodies),
            "nodes": lambda: _merkle_nodes(leaves),
            "leaves over hashes": lambda: _leaves_over_hashes(hashes),
        },
        repeat,
    )
    us = {label: best / n * 1e6 for label, best in timer.best.items()}
    base_s, verify_s = timer.best["bare"], timer.best["verify"]
    print(f"CPU time of this process, best of {repeat}, taken in turns:")
    print(
        f"bare SHA-256 chain loop  {n / base_s:12,.0f} records/s  ({size / base_s / 1e6:.0f} MB/s)"
    )
    print(
        f"verify_ledger (key)      {n / verify_s:12,.0f} records/s  ({size / verify_s / 1e6:.0f} MB/s)"
    )
    print(f"ratio verify/bare        {base_s / verify_s:12.2f}   (goal >= 0.5)")
    mine, other = ("leaves over hashes", "leaves over bodies")[:: 1 if over_hashes else -1]
    parts = us["read"] + us["bare"] + us[mine] + us["nodes"]
    print("where verify's time goes (each part alone, per record):")
    print(f"  read rows from SQLite      {us['read']:7.2f} us")
    print(f"  link hash (the bare loop)  {us['bare']:7.2f} us")
    print(f"  Merkle leaf hashes         {us[mine]:7.2f} us  ({mine})")
    print(f"  Merkle node hashes         {us['nodes']:7.2f} us")
    print(
        f"  sum of the parts           {parts:7.2f} us  -> allows at most {us['bare'] / parts:.2f}x"
    )
    print(f"  verify, all of it          {us['verify']:7.2f} us  (checks and bookkeeping: "
          f"{us['verify'] - parts:.2f} us)")  # fmt: skip
    link_blocks = sum(_blocks(32 + len(x)) for b in bodies.values() for x in b) / n
    blocks = {
        "leaves over bodies": sum(_blocks(1 + len(x)) for b in bodies.values() for x in b) / n,
        "leaves over hashes": float(_blocks(33)),
    }
    node_blocks = _blocks(65) * (n - len(CHAINS)) / n
    total = link_blocks + blocks[mine] + node_blocks
    print(
        f"SHA-256 blocks per record: bare {link_blocks:.1f}; verify {total:.1f} (link"
        f" {link_blocks:.1f} + leaf {blocks[mine]:.1f} + nodes {node_blocks:.1f}):"
        f" at no cost per call and per row, at most {link_blocks / total:.2f}x"
    )
    alt = us["read"] + us["bare"] + us[other] + us["nodes"]
    alt_blocks = link_blocks + blocks[other] + node_blocks
    print(
        f"the other kind of root, {other} (version {2 if over_hashes else 3}): leaf"
        f" {us[other]:.2f} us, parts {alt:.2f} us -> at most {us['bare'] / alt:.2f}x;"
        f" {alt_blocks:.1f} blocks -> at most {link_blocks / alt_blocks:.2f}x"
    )
    jobs = default_jobs()
    wall = Timer(time.perf_counter)
    wall.run(
        {
            "bare": lambda: bare_chain(bodies),
            "verify 1": lambda: verify_ledger(ledger, signer.public_key),
            "verify jobs": lambda: verify_ledger(ledger, signer.public_key, jobs=jobs),
        },
        repeat,
    )
    base_w = wall.best["bare"]
    print(
        f"wall time, best of {repeat}, taken in turns; verify --jobs {jobs} (the default here:"
        f" the CPUs it may use) runs the chains in ranges on worker processes:"
    )
    print(f"bare SHA-256 chain loop  {n / base_w:12,.0f} records/s")
    for label in ("verify 1", "verify jobs"):
        took = wall.best[label]
        name = "verify_ledger, 1 process" if label == "verify 1" else f"verify_ledger, jobs={jobs}"
        print(f"{name:<25}{n / took:12,.0f} records/s  ratio {base_w / took:.2f}   (goal >= 0.5)")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        verify_ledger(ledger, signer.public_key)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print("where verify's time goes (own time, top 12):")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])


if __name__ == "__main__":
    main()
