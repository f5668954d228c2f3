"""Merkle trees: RFC 9162 roots and proofs against the RFC's recursive definitions,
and checkpoints that carry a root the verifier checks."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_audit import audit_action
from otel_audit.engine.ledger import open_ledger
from otel_audit.errors import VerificationError
from otel_audit.proof.merkle import (
    EMPTY_ROOT,
    Frontier,
    Tree,
    extension_proof,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from otel_audit.proof.verify import verify_ledger

# -- the RFC 9162 definitions, written out literally (section 2.1) ---------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + rfc_mth(d[:k]) + rfc_mth(d[k:])).digest()


def rfc_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return rfc_path(m, d[:k]) + [rfc_mth(d[k:])]
    return rfc_path(m - k, d[k:]) + [rfc_mth(d[:k])]


def rfc_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [rfc_mth(d)]
    k = _k(n)
    if m <= k:
        return rfc_subproof(m, d[:k], b) + [rfc_mth(d[k:])]
    return rfc_subproof(m - k, d[k:], False) + [rfc_mth(d[:k])]


def leaves(n: int) -> list[bytes]:
    return [f"record-{i}".encode() for i in range(n)]


def test_known_vectors() -> None:
    assert root_of([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert root_of([b"a"]) == hashlib.sha256(b"\x00a").digest()
    two = hashlib.sha256(
        b"\x01" + hashlib.sha256(b"\x00a").digest() + hashlib.sha256(b"\x00b").digest()
    ).digest()
    assert root_of([b"a", b"b"]) == two
    # Three leaves: the left subtree is the largest power of two (2), not a balanced split.
    three = node_hash(two, leaf_hash(b"c"))
    assert root_of([b"a", b"b", b"c"]) == three


@pytest.mark.parametrize("n", list(range(1, 34)) + [63, 64, 65, 100])
def test_roots_and_every_proof_match_the_rfc(n: int) -> None:
    d = leaves(n)
    tree = Tree.from_bodies(d)
    assert tree.root() == rfc_mth(d)
    for size in range(1, n + 1):
        root = rfc_mth(d[:size])
        frontier = Frontier()
        for body in d[:size]:
            frontier.append(body)
        assert frontier.root() == root
        for m in range(size):
            proof = tree.inclusion_proof(m, size)
            assert proof == rfc_path(m, d[:size])
            verify_inclusion(leaf_hash(d[m]), m, size, proof, root)
        for old in range(1, size + 1):
            proof = tree.consistency_proof(old, size)
            assert proof == rfc_subproof(old, d[:size], True)
            verify_consistency(old, size, rfc_mth(d[:old]), root, proof)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_tampered_proofs_fail(n: int, data: st.DataObject) -> None:
    d = leaves(n)
    tree = Tree.from_bodies(d)
    m = data.draw(st.integers(0, n - 1))
    proof = tree.inclusion_proof(m)
    root = tree.root()
    with pytest.raises(VerificationError):
        verify_inclusion(leaf_hash(b"other"), m, n, proof, root)
    if n > 1:
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash(d[m]), (m + 1) % n, n, proof, root)
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash(d[m]), m, n, bad, root)
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash(d[m]), m, n, proof[:-1], root)
        old = data.draw(st.integers(1, n - 1))
        cproof = tree.consistency_proof(old)
        with pytest.raises(VerificationError):
            # A history rewritten inside the old tree is not a prefix any more.
            verify_consistency(old, n, rfc_mth([b"x"] + d[1:old]), root, cproof)
        with pytest.raises(VerificationError):
            verify_consistency(old, n, rfc_mth(d[:old]), root, cproof[:-1])


def test_checkpoints_carry_a_signed_root_the_verifier_checks(make_pipeline, tmp_path) -> None:
    from otel_audit.proof.keys import generate_keypair, load_public_key

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    pipeline, provider, _ = make_pipeline(
        url, service_name="shop", signing_key=str(tmp_path / "k.key"), checkpoint_every=3
    )
    tracer = provider.get_tracer("t")
    for i in range(10):
        with audit_action("order.create", resource=("order", str(i)), actor="alice", tracer=tracer):
            pass
    pipeline.shutdown()
    key = load_public_key(tmp_path / "k.pub")
    with open_ledger(url, readonly=True) as ledger:
        cps = ledger.checkpoints("shop")
        hashes = [r.hash for r in ledger.scan("shop")]
        assert [cp.seq for cp in cps] == [3, 6, 9, 10]
        for cp in cps:
            # Version 3: the leaves are the records' chain hashes.
            assert cp.merkle_root == rfc_mth(hashes[: cp.seq])
        report = verify_ledger(ledger, key)
        assert report.chains[0].signatures_checked == 4
    # A checkpoint whose root was replaced (and re-signed by nobody) fails on its signature;
    # without a key the root itself is checked against the records.
    con = sqlite3.connect(tmp_path / "audit.db")
    con.execute("UPDATE checkpoints SET merkle_root = ? WHERE seq = 6", (b"\x00" * 32,))
    con.commit()
    con.close()
    with open_ledger(url, readonly=True) as ledger:
        with pytest.raises(VerificationError, match="seq 6: bad signature"):
            verify_ledger(ledger, key)
        with pytest.raises(VerificationError, match="merkle root of the checkpoint at seq 6"):
            verify_ledger(ledger)


def test_root_is_right_when_two_writers_share_a_chain(make_pipeline, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    a, pa, _ = make_pipeline(url, service_name="shop", chain="shared", checkpoint_every=2)
    b, pb, _ = make_pipeline(url, service_name="shop", chain="shared", checkpoint_every=3)
    ta, tb = pa.get_tracer("a"), pb.get_tracer("b")
    for i in range(12):
        with audit_action("x.update", actor="alice", tracer=ta if i % 3 else tb):
            pass
    a.shutdown()
    b.shutdown()
    with open_ledger(url, readonly=True) as ledger:
        hashes = [r.hash for r in ledger.scan("shared")]
        cps = [cp for cp in ledger.checkpoints("shared") if cp.merkle_root is not None]
        assert len(hashes) == 12 and len(cps) >= 4
        for cp in cps:
            assert cp.merkle_root == rfc_mth(hashes[: cp.seq])
        verify_ledger(ledger)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 400), data=st.data())
def test_extension_proof_from_the_frontier_is_the_rfc_proof(n: int, data: st.DataObject) -> None:
    """What the signer checks before signing: the consistency proof built from the old
    tree's frontier and the new leaves only is RFC 9162's, and verifies."""
    d = leaves(n)
    old = data.draw(st.integers(1, n - 1))
    frontier = Frontier()
    for body in d[:old]:
        frontier.append(body)
    proof = extension_proof(frontier, [leaf_hash(b) for b in d[old:]])
    assert proof == rfc_subproof(old, d, True)
    verify_consistency(old, n, frontier.root(), rfc_mth(d), proof)
    # The same new leaves after a rewritten old tree give a proof the signed root rejects.
    forged = Frontier()
    for body in [b"forged"] + d[1:old]:
        forged.append(body)
    with pytest.raises(VerificationError):
        verify_consistency(
            old,
            n,
            frontier.root(),
            rfc_mth([b"forged"] + d[1:]),
            extension_proof(forged, [leaf_hash(b) for b in d[old:]]),
        )
