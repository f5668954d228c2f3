"""verify's fast path (issue 13): the Merkle helpers it uses give RFC 9162's hashes,
and the Merkle pass that stops after the last checkpoint with a root still checks
every root, every link and every row."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.errors import VerificationError
from otel_audit.proof import verify as verify_module
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer
from otel_audit.proof.merkle import (
    Frontier,
    Tree,
    leaf_hash,
    leaf_hashes,
    node_hash,
    parent_level,
    root_of,
    short_sha256,
)
from otel_audit.proof.verify import verify_ledger


@pytest.mark.parametrize("length", [0, 1, 31, 32, 33, 55, 56, 63, 64, 65, 119, 128, 460, 5000])
def test_short_sha256_is_sha256(length: int) -> None:
    data = bytes((i * 7) & 0xFF for i in range(length))
    assert short_sha256(data).digest() == hashlib.sha256(data).digest()


def test_leaf_and_node_helpers_are_rfc_9162() -> None:
    bodies = [bytes([i]) * i for i in range(40)]
    assert leaf_hashes(bodies) == [hashlib.sha256(b"\x00" + b).digest() for b in bodies]
    assert leaf_hashes(iter(bodies)) == [leaf_hash(b) for b in bodies]
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    level = leaf_hashes(bodies[:7])
    assert parent_level(level) == [node_hash(level[i], level[i + 1]) for i in (0, 2, 4)]
    assert parent_level(level[:1]) == [] and parent_level([]) == []
    for n in range(1, 40):
        assert Tree.from_bodies(bodies[:n]).root() == root_of(bodies[:n])


def _ledger(path: Path, signer: Signer, n: int, roots_at: set[int], plain_at: set[int]) -> None:
    """One chain 'c' of ``n`` records; signed checkpoints with a Merkle root at
    ``roots_at`` and without one at ``plain_at``."""
    ledger = open_ledger(f"sqlite:///{path}")
    frontier = Frontier()
    for seq in range(1, n + 1):
        body = b'{"n":%d,"pad":"%s"}' % (seq, b"x" * (seq % 13))
        (appended,) = ledger.append("c", [body])
        frontier.append(body)
        if seq in roots_at or seq in plain_at:
            root = frontier.root() if seq in roots_at else None
            cp = Checkpoint("c", seq, appended.hash, time.time_ns(), merkle_root=root)
            ledger.add_checkpoint(cp.signed(signer.sign(cp.message()), signer.key_id))
    ledger.close()


class _SmallBatches:
    """A ledger whose scans come in batches of 4 rows, counting the Merkle leaves verify hashes."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ledger = ledger
        self.leaves = 0
        real_scan = ledger.scan_batches
        real_leaves = verify_module.leaf_hashes

        def scan_batches(chain: str, after_seq: int = 0) -> Iterator[Sequence[Any]]:
            for batch in real_scan(chain, after_seq):
                for i in range(0, len(batch), 4):
                    yield batch[i : i + 4]

        def counted(bodies: Any) -> list[bytes]:
            out = real_leaves(bodies)
            self.leaves += len(out)
            return out

        monkeypatch.setattr(ledger, "scan_batches", scan_batches)
        monkeypatch.setattr(verify_module, "leaf_hashes", counted)


@pytest.fixture
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def test_merkle_pass_stops_after_the_last_root(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.db"
    _ledger(path, signer, 50, roots_at={5, 13}, plain_at={30})
    ledger = open_ledger(f"sqlite:///{path}", create=False, readonly=True)
    try:
        spy = _SmallBatches(ledger, monkeypatch)
        report = verify_ledger(ledger, signer.public_key)
        assert report.records == 50 and report.chains[0].signatures_checked == 3
        # Leaves up to the batch holding seq 13 (rows 13..16), none after it.
        assert spy.leaves == 16
    finally:
        ledger.close()


def test_merkle_pass_runs_to_a_root_at_the_end(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.db"
    _ledger(path, signer, 23, roots_at={3, 8, 16, 23}, plain_at=set())
    ledger = open_ledger(f"sqlite:///{path}", create=False, readonly=True)
    try:
        spy = _SmallBatches(ledger, monkeypatch)
        assert verify_ledger(ledger, signer.public_key).records == 23
        assert spy.leaves == 23
    finally:
        ledger.close()


def _edit(path: Path, sql: str, *args: object) -> None:
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()


@pytest.mark.parametrize("batches", ["small", "whole"])
def test_damage_is_named_the_same_before_and_after_the_last_root(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch, batches: str
) -> None:
    def verify_edited(sql: str, *args: object) -> VerificationError:
        path = tmp_path / f"l{len(list(tmp_path.iterdir()))}.db"
        _ledger(path, signer, 40, roots_at={4, 11}, plain_at={20})
        _edit(path, sql, *args)
        ledger = open_ledger(f"sqlite:///{path}", create=False, readonly=True)
        try:
            if batches == "small":
                _SmallBatches(ledger, monkeypatch)
            with pytest.raises(VerificationError) as info:
                verify_ledger(ledger, signer.public_key)
            return info.value
        finally:
            ledger.close()

    # The root of the last checkpoint that has one is still checked.
    err = verify_edited("UPDATE checkpoints SET merkle_root = ? WHERE seq = 11", b"\x01" * 32)
    assert err.kind == "bad signature" and err.seq == 11
    # A body after the last root: the chain names it.
    err = verify_edited("UPDATE records SET body = CAST('{}' AS BLOB) WHERE seq = 33")
    assert (err.kind, err.seq) == ("modified", 33)
    # A body before it.
    err = verify_edited("UPDATE records SET body = CAST('{}' AS BLOB) WHERE seq = 7")
    assert (err.kind, err.seq) == ("modified", 7)
    # A row gone after the last root and after the last checkpoint.
    err = verify_edited("DELETE FROM records WHERE seq = 27")
    assert (err.kind, err.seq) == ("deleted", 27)


def test_a_wrong_root_that_is_signed_is_still_found(tmp_path: Path, signer: Signer) -> None:
    """A signer that signed a wrong root (the hashes never covered it) at the last
    checkpoint with a root: the stopped Merkle pass must still have reached it."""
    path = tmp_path / "l.db"
    _ledger(path, signer, 30, roots_at={9}, plain_at={21})
    ledger = open_ledger(f"sqlite:///{path}")
    bad = Checkpoint("c", 21, ledger.checkpoints("c")[-1].head, 1, merkle_root=b"\x02" * 32)
    _edit(path, "DELETE FROM checkpoints WHERE seq = 21")
    ledger.add_checkpoint(bad.signed(signer.sign(bad.message()), signer.key_id))
    try:
        for key in (signer.public_key, None):
            with pytest.raises(VerificationError, match="merkle root of the checkpoint at seq 21"):
                verify_ledger(ledger, key)
    finally:
        ledger.close()
