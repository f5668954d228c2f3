"""Checkpoint benchmark: what the rollback defence costs per checkpoint.

Builds a SQLite ledger of N records (default 200,000; ``--records``) in one
chain and, in the same run, measures ``Checkpointer.make`` (engine/checkpoints.py)
every ``--every`` records (default 1,000, the writer's default):

* the baseline: unsigned checkpoints (Merkle frontier, storage), what every
  checkpoint cost before signing existed;
* signed: the same plus the signer state (file lock, read, consistency check
  with an RFC 9162 proof built from the frontier, signature, atomic fsynced
  state write, restore check);
* a cold start: a new process's first signed checkpoint on the whole chain
  (reads every record once to check the signed root).

Run: .venv/bin/python benchmarks/bench_checkpoints.py [--records N] [--every K]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otel_audit import vocabulary as v
from otel_audit.engine.checkpoints import Checkpointer
from otel_audit.engine.ledger import Appended, open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.keys import Signer


def bodies(n: int) -> list[bytes]:
    return [
        encode(Record(trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", parent_span_id=None,
                      name="order.update", kind="INTERNAL", service="shop", start=10**18 + i,
                      end=10**18 + i + 5,
                      attributes={v.EVENT: True, v.ACTION: "order.update",
                                  v.ACTOR_ID: f"user{i % 50}"}))
        for i in range(n)
    ]  # fmt: skip


def run(url: str, heads: list[Appended], every: int, signer: Signer | None) -> float:
    """Mean seconds per checkpoint over the chain, one every ``every`` records."""
    maker = Checkpointer("shop", signer)
    lock = threading.Lock()
    took = 0.0
    count = 0
    with open_ledger(url) as ledger:
        for i in range(every - 1, len(heads), every):
            started = time.perf_counter()
            maker.make(ledger, heads[i], lock)
            took += time.perf_counter() - started
            count += 1
    return took / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        heads: list[Appended] = []
        urls = [f"sqlite:///{tmp}/plain.db", f"sqlite:///{tmp}/signed.db"]
        data = bodies(args.records)
        for url in urls:
            with open_ledger(url) as ledger:
                appended = []
                for start in range(0, len(data), 10_000):
                    appended += ledger.append("shop", data[start : start + 10_000])
            heads = appended
        signer = Signer(Ed25519PrivateKey.generate(), state_path=f"{tmp}/key.state")
        plain = run(urls[0], heads, args.every, None)
        signed = run(urls[1], heads, args.every, signer)
        # Cold start: a new process, the state at the last checkpoint, one more head.
        with open_ledger(urls[1]) as ledger:
            more = ledger.append("shop", bodies(args.every))
            started = time.perf_counter()
            Checkpointer("shop", signer).make(ledger, more[-1], threading.Lock())
            cold = time.perf_counter() - started
    n = args.records // args.every
    print(f"{args.records:,} records, a checkpoint every {args.every:,} ({n} checkpoints)")
    print(f"unsigned (baseline): {plain * 1000:.2f} ms per checkpoint")
    print(
        f"signed with signer state: {signed * 1000:.2f} ms per checkpoint = {signed / plain:.2f}x"
    )
    print(f"  per record: {(signed - plain) / args.every * 1e6:.2f} us more than unsigned")
    print(f"cold start (first signed checkpoint of a process): {cold * 1000:.0f} ms")


if __name__ == "__main__":
    main()
