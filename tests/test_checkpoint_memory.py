"""Checkpoint Merkle leaves hashed from the bodies a writer just committed.

The writer keeps what it committed since the last checkpoint and the
checkpointer hashes the leaves from it, unless the range is not exactly its
own records (another writer appended to the chain between them, a receiver
skipped duplicates): then it reads the ledger, as before. Either way the
signed root must be the one verify recomputes from the stored bodies.
"""

from __future__ import annotations

from pathlib import Path

from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.writer import LedgerWriter
from otel_audit.proof.keys import Signer, generate_keypair, load_public_key
from otel_audit.proof.verify import verify_ledger


def body(n: int, who: str) -> bytes:
    return (
        b'{"attributes":{"audit.event":true,"who":"%s"},"end":2,"kind":"INTERNAL","name":"x",'
        b'"parent_span_id":null,"service":"s","span_id":"%016x","start":1,"status":"UNSET",'
        b'"trace_id":"%032x","v":1}' % (who.encode(), n, n)
    )


def test_roots_from_memory_and_from_an_interleaved_chain_both_verify(tmp_path: Path) -> None:
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(str(key), str(pub))
    url = str(tmp_path / "l.db")
    one = LedgerWriter(url, "c", checkpoint_every=7, signer=Signer.from_file(str(key)))
    two = LedgerWriter(url, "c", checkpoint_every=5, signer=Signer.from_file(str(key)))
    try:
        n = 0
        for round_ in range(12):
            # Alone for a while (leaves from memory), then interleaved (read back).
            writers = [one] if round_ < 6 else [one, two]
            for writer in writers:
                for _ in range(3):
                    n += 1
                    writer.write(body(n, "one" if writer is one else "two"))
    finally:
        one.shutdown()
        two.shutdown()
    with open_ledger(url, readonly=True) as ledger:
        checkpoints = ledger.checkpoints("c")
        assert len(checkpoints) >= 6 and all(cp.merkle_root for cp in checkpoints)
        # Raises VerificationError on any wrong root, link or signature.
        report = verify_ledger(ledger, public_key=load_public_key(pub))
    assert report.records == n
