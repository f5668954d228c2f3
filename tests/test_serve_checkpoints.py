"""serve's checkpoints hash their Merkle leaves from the bodies it just committed.

The writer cannot keep them when the idempotent receiver pads positions, so
``IdempotentAppends`` keeps what each of its appends committed when every
body was new; the checkpointer uses it only when it is exactly the range
(no other writer appended between, no retry skipped a duplicate), and reads
the ledger back otherwise. Either way every stored root must be the one
computed from the ledger's bodies, and verify must pass.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.engine.writer import LedgerWriter
from otel_audit.proof.chain import link_hash
from otel_audit.proof.keys import Signer, generate_keypair, load_public_key
from otel_audit.proof.merkle import Tree, record_leaves
from otel_audit.proof.verify import verify_ledger
from otel_audit.transport.idempotent import IdempotentAppends
from otel_audit.transport.serve import AuditServer

from .test_serve import _spans


def _body(n: int, who: str = "one") -> bytes:
    return (
        b'{"attributes":{"audit.event":true,"who":"%s"},"end":2,"kind":"INTERNAL","name":"x",'
        b'"parent_span_id":null,"service":"s","span_id":"%016x","start":1,"status":"UNSET",'
        b'"trace_id":"%032x","v":1}' % (who.encode(), n, n)
    )


def _keypair(tmp_path: Path) -> tuple[Path, Path]:
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(str(key), str(pub))
    return key, pub


def _check_roots(url: str, chain: str, public: Path) -> int:
    """Every checkpoint's root is the RFC 9162 root over the chain hashes of records 1..seq
    (version 3); verify passes."""
    with open_ledger(url, readonly=True) as ledger:
        rows = list(ledger.scan(chain))
        bodies = [row.body for row in rows]
        leaves = record_leaves(link_hash(row.prev_hash, row.body) for row in rows)
        checkpoints = ledger.checkpoints(chain)
        assert checkpoints
        for checkpoint in checkpoints:
            assert checkpoint.merkle_root == Tree(leaves[: checkpoint.seq]).root(), checkpoint.seq
        # Raises VerificationError on any wrong root, link or signature.
        report = verify_ledger(ledger, public_key=load_public_key(str(public)))
    assert report.records == len(bodies)
    return len(checkpoints)


class _CountingScans:
    """A real ledger that counts the chain read-backs (``scan``) made of it."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.scans = 0

    def scan(self, chain: str, after_seq: int = 0, until_seq: int | None = None) -> Any:
        self.scans += 1
        return self._ledger.scan(chain, after_seq, until_seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)


def _writer(url: str, key: Path, every: int) -> tuple[LedgerWriter, _CountingScans]:
    counting = _CountingScans(open_ledger(url))
    appends = IdempotentAppends(counting)  # type: ignore[arg-type]
    writer = LedgerWriter(
        url,
        "c",
        checkpoint_every=every,
        signer=Signer.from_file(str(key)),
        ledger=appends,  # type: ignore[arg-type]
    )
    return writer, counting


def _wait_checkpoints(writer: LedgerWriter, count: int) -> None:
    # A checkpoint is made after the commit's tickets resolve: wait for it.
    deadline = time.monotonic() + 20
    while writer.stats().checkpoints < count:
        assert time.monotonic() < deadline, writer.stats()
        time.sleep(0.01)
    assert writer.stats().checkpoints == count


def test_alone_the_leaves_come_from_memory_and_a_retry_or_a_second_writer_reads_back(
    tmp_path: Path,
) -> None:
    key, pub = _keypair(tmp_path)
    url = str(tmp_path / "l.db")
    one, counting = _writer(url, key, every=6)
    two, _ = _writer(url, key, every=4)
    try:
        for start in range(0, 15, 3):  # seqs 1..15: checkpoints at 6 and 12, from memory
            one.write_many([_body(n) for n in range(start + 1, start + 4)])
        _wait_checkpoints(one, 2)
        assert counting.scans == 0
        # A retried request whose spans are all stored: nothing appended,
        # positions padded; what is kept is still the chain's own.
        one.write_many([_body(14), _body(15)])
        one.write_many([_body(16)])  # 6 positions since: checkpoint at seq 16
        _wait_checkpoints(one, 3)
        assert counting.scans == 0
        # New spans mixed with a stored one: which body holds which position
        # is the ledger's to say, so what is kept is dropped and read back once.
        one.write_many([_body(17), _body(18), _body(3)])
        one.write_many([_body(n) for n in range(19, 22)])  # checkpoint at seq 21
        _wait_checkpoints(one, 4)
        assert counting.scans >= 1
        settled = counting.scans
        one.write_many([_body(n) for n in range(22, 28)])  # checkpoint at 27, from memory
        _wait_checkpoints(one, 5)
        assert counting.scans == settled
        # Two writers taking turns on one chain: neither holds the whole range.
        n = 27
        for _ in range(6):
            for writer, who in ((one, "one"), (two, "two")):
                writer.write_many([_body(n + i, who) for i in range(1, 3)])
                n += 2
    finally:
        one.shutdown()
        two.shutdown()
    assert counting.scans > settled
    assert _check_roots(url, "c", pub) >= 8
    with open_ledger(url, readonly=True) as ledger:
        assert ledger.count() == n


def _export(server: AuditServer, spans: list[Any]) -> None:
    assert server.http_address is not None
    host, port = server.http_address
    exporter = OTLPSpanExporter(endpoint=f"http://{host}:{port}/v1/traces", timeout=10)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


def test_two_serve_instances_on_one_chain_store_verifiable_roots(tmp_path: Path) -> None:
    key, pub = _keypair(tmp_path)
    url = str(tmp_path / "central.db")
    options: dict[str, Any] = dict(
        http_address=("127.0.0.1", 0),
        grpc_address=None,
        chain="c",
        checkpoint_every=5,
        signer=Signer.from_file(str(key)),
    )
    first = AuditServer(url, **options).start()
    second = AuditServer(url, **options).start()
    try:
        sent = 0
        for _ in range(3):  # alone: checkpoints from memory
            _export(first, _spans(4, 1))
            sent += 4
        retried = _spans(3, 0)
        _export(first, retried)
        _export(first, retried)  # a sender's retry: stored once
        sent += 3
        for _ in range(4):  # interleaved on one chain
            _export(first, _spans(3, 0))
            _export(second, _spans(2, 1))
            sent += 5
        _export(second, retried)  # a retry reaching the other instance
        assert first.stats().duplicates == 3 and second.stats().duplicates == 3
    finally:
        first.stop()
        second.stop()
    assert first.stats().checkpoints + second.stats().checkpoints >= 5
    assert _check_roots(url, "c", pub) >= 5
    with open_ledger(url, readonly=True) as ledger:
        assert ledger.count() == sent
