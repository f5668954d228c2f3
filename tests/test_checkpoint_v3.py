"""Version 3 checkpoints: Merkle roots over the records' chain hashes (issue 13).

A ledger an older otel-audit signed (version 2, roots over bodies) still
verifies, with and without a key, in one process and in workers; its signer
keeps signing version 2 roots, which extend the ones it signed provably; its
bundles prove records by their bodies. A root of one kind dressed as the
other is damage when a key tells the kind.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zipfile

import pytest

from otel_audit.cli import main
from otel_audit.engine.checkpoints import SignerState
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import canonical_json
from otel_audit.errors import ConfigError, LedgerError, VerificationError
from otel_audit.proof import parallel
from otel_audit.proof.bundle import verify_bundle
from otel_audit.proof.chain import GENESIS, Checkpoint, check_checkpoints
from otel_audit.proof.keys import Signer, generate_keypair, load_public_key
from otel_audit.proof.merkle import Tree, leaf_hashes, record_leaves, root_of
from otel_audit.proof.verify import verify_ledger
from otel_audit.transport.anchors import VERSION, checkpoint_attributes, checkpoint_from_attributes
from tests.test_bundle import members, rehash, rezip
from tests.test_checkpoint_links import bodies, run_writer


@pytest.fixture
def keys(tmp_path):
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(key, pub)
    return key, pub


def old_ledger(url: str, key, n: int = 6, every: int = 2) -> list[Checkpoint]:
    """What otel-audit signed before version 3: linked version 2 checkpoints whose
    roots are over bodies; the signer state remembers the last one, as it did."""
    signer = Signer.from_file(key)
    written = bodies(n)
    out: list[Checkpoint] = []
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", written)
        prev = GENESIS
        for upto in range(every, n + 1, every):
            cp = Checkpoint("shop", upto, appended[upto - 1].hash, time.time_ns(),
                            key_id=signer.key_id, merkle_root=root_of(written[:upto]),
                            version=2, prev=prev)  # fmt: skip
            cp = cp.signed(signer.sign(cp.message()), signer.key_id)
            ledger.add_checkpoint(cp)
            out.append(cp)
            prev = cp.digest()
    SignerState(signer.state_path).save(out[-1])
    return out


def forge_root(db, seq: int) -> None:  # type: ignore[no-untyped-def]
    """What an insider without the key does: write another root into a checkpoint."""
    con = sqlite3.connect(db)
    con.execute("UPDATE checkpoints SET merkle_root = ? WHERE seq = ?", (b"\x07" * 32, seq))
    con.commit()
    con.close()


def test_a_version_2_ledger_verifies_and_its_signer_keeps_signing_version_2(
    make_pipeline, tmp_path, keys, capsys
):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    old_ledger(url, key)
    # The upgraded service signs on: its key last signed a root over bodies, so
    # each new root is over bodies too (a consistency proof joins them).
    run_writer(make_pipeline, url, key, 4)
    public = load_public_key(pub)
    with open_ledger(url, readonly=True) as ledger:
        linked, damage = check_checkpoints(ledger.checkpoints("shop"), public)
        assert damage == []
        assert [(cp.seq, cp.version) for cp in linked] == [(2, 2), (4, 2), (6, 2), (8, 2), (10, 2)]
        rows = list(ledger.scan("shop"))
        for cp in linked:
            assert cp.merkle_root == Tree(leaf_hashes(r.body for r in rows[: cp.seq])).root()
        assert verify_ledger(ledger, public).chains[0].signatures_checked == 5
        assert verify_ledger(ledger).records == 10  # no key: either kind of root
    for args in (["--public-key", str(pub)], []):
        assert main(["verify", "--ledger", url, "-q", "--jobs", "2", *args]) == 0
    out = tmp_path / "e.zip"
    assert main(["bundle", "--ledger", url, "-o", str(out), "--public-key", str(pub)]) == 0
    capsys.readouterr()
    # Proven by their bodies: no prev_hash beside the records, and one added is refused.
    with zipfile.ZipFile(out) as zf:
        lines = zf.read("records.jsonl").decode().splitlines()
        manifest = json.loads(zf.read("manifest.json"))
    assert all(set(json.loads(line)) == {"chain", "seq", "body"} for line in lines)
    # Nothing in it needs bundle version 3: written as 2, which older verify-bundle reads.
    assert manifest["version"] == 2
    assert verify_bundle(str(out), public).records == 10


def test_a_new_chain_signs_version_3_roots_over_chain_hashes(make_pipeline, tmp_path, keys):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    run_writer(make_pipeline, url, key, 6)
    public = load_public_key(pub)
    with open_ledger(url, readonly=True) as ledger:
        linked, damage = check_checkpoints(ledger.checkpoints("shop"), public)
        assert damage == [] and {cp.version for cp in linked} == {3}
        rows = list(ledger.scan("shop"))
        for cp in linked:
            assert cp.merkle_root == Tree(record_leaves(r.hash for r in rows[: cp.seq])).root()
            # Not a root over bodies: the two kinds of tree differ.
            assert cp.merkle_root != Tree(leaf_hashes(r.body for r in rows[: cp.seq])).root()


def test_a_root_over_bodies_signed_as_version_3_is_damage_with_the_key(tmp_path, keys) -> None:
    """The key tells the kind of a root: the other kind's root does not pass for it."""
    key, pub = keys
    signer = Signer.from_file(key)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    written = bodies(4)
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", written)
        cp = Checkpoint("shop", 4, appended[-1].hash, time.time_ns(), key_id=signer.key_id,
                        merkle_root=root_of(written), version=3, prev=GENESIS)  # fmt: skip
        ledger.add_checkpoint(cp.signed(signer.sign(cp.message()), signer.key_id))
    with open_ledger(url, readonly=True) as ledger:
        with pytest.raises(
            VerificationError, match="seq 4: modified: merkle root of the checkpoint"
        ):
            verify_ledger(ledger, load_public_key(pub))
        # Without the key its version is unknown: a root over bodies is a root.
        assert verify_ledger(ledger).records == 4


def test_a_forged_root_matches_neither_tree_without_a_key(make_pipeline, tmp_path, keys) -> None:
    key, _pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    run_writer(make_pipeline, url, key, 6)
    forge_root(tmp_path / "audit.db", 4)
    for jobs in (1, 2):
        with open_ledger(url, readonly=True) as ledger:
            with pytest.raises(VerificationError, match="seq 4: modified: merkle root"):
                verify_ledger(ledger, jobs=jobs)


def test_unsigned_checkpoints_verify_without_a_key_before_and_after_the_upgrade(
    make_pipeline, tmp_path
) -> None:
    """Unsigned roots an older version wrote are over bodies, the new ones over chain
    hashes, and neither states which: verify without a key accepts each kind."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    written = bodies(4)
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", written)
        for upto in (2, 4):
            ledger.add_checkpoint(
                Checkpoint(
                    "shop",
                    upto,
                    appended[upto - 1].hash,
                    time.time_ns(),
                    merkle_root=root_of(written[:upto]),
                )  # fmt: skip
            )
    pipeline, _provider, _ = make_pipeline(url, checkpoint_every=2)
    for i in range(4):
        with pipeline.audit_action("order.update", resource=("order", str(i)), actor="alice"):
            pass
    pipeline.shutdown()
    with open_ledger(url, readonly=True) as ledger:
        cps = ledger.checkpoints("shop")
        rows = list(ledger.scan("shop"))
        assert [cp.seq for cp in cps] == [2, 4, 6, 8]
        assert cps[-1].merkle_root == Tree(record_leaves(r.hash for r in rows)).root()
        for jobs in (1, 2):
            assert verify_ledger(ledger, jobs=jobs).records == 8


def test_a_prev_hash_beside_a_record_proven_by_its_body_is_refused(
    make_pipeline, tmp_path, keys, capsys
):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    old_ledger(url, key)
    out = tmp_path / "e.zip"
    assert main(["bundle", "--ledger", url, "-o", str(out), "--public-key", str(pub)]) == 0
    capsys.readouterr()
    files = members(out.read_bytes())
    lines = files["records.jsonl"].decode().splitlines()
    rec = json.loads(lines[0])
    with open_ledger(url, readonly=True) as ledger:
        rec["prev_hash"] = next(iter(ledger.scan("shop"))).prev_hash.hex()
    lines[0] = canonical_json(rec)
    edited = {**files, "records.jsonl": ("\n".join(lines) + "\n").encode()}
    # A version 2 bundle has no place for it; in a version 3 one no proof covers it.
    with pytest.raises(VerificationError, match="line 1 does not have the expected fields"):
        verify_bundle(rezip(rehash(edited)), load_public_key(pub))
    manifest = json.loads(files["manifest.json"])
    assert manifest["version"] == 2
    manifest["version"] = 3
    edited["manifest.json"] = canonical_json(manifest).encode()
    with pytest.raises(VerificationError, match="prev_hash is not covered by its checkpoint"):
        verify_bundle(rezip(rehash(edited)), load_public_key(pub))


def test_an_anchor_of_an_unknown_version_is_refused(make_pipeline, tmp_path, keys) -> None:
    """An anchor's version says what its root is over: one this version cannot read is
    a clear error, not a guess."""
    key, _pub = keys
    emitted: list[Checkpoint] = []
    pipeline, _provider, _ = make_pipeline(
        f"sqlite:///{tmp_path / 'audit.db'}", signing_key=str(key), checkpoint_every=2
    )
    pipeline.writer.checkpoint_listeners.append(emitted.append)
    for i in range(2):
        with pipeline.audit_action("order.update", resource=("order", str(i)), actor="alice"):
            pass
    pipeline.shutdown()
    attrs = checkpoint_attributes(emitted[-1])
    assert checkpoint_from_attributes(attrs) == emitted[-1]
    attrs[VERSION] = 4
    with pytest.raises(ConfigError, match="anchor: checkpoint version 4 is not supported"):
        checkpoint_from_attributes(attrs)


def _unsigned_chain(url: str, kinds: str, every: int = 2) -> None:
    """One chain with an unsigned checkpoint every ``every`` records, its roots over
    chain hashes (``h``) or bodies (``b``) in the order of ``kinds``."""
    written = bodies(every * len(kinds))
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", written)
        for i, kind in enumerate(kinds):
            upto = every * (i + 1)
            if kind == "h":
                root = Tree(record_leaves(a.hash for a in appended[:upto])).root()
            else:
                root = root_of(written[:upto])
            ledger.add_checkpoint(
                Checkpoint("shop", upto, appended[upto - 1].hash, time.time_ns(), merkle_root=root)
            )


@pytest.mark.parametrize("kinds", ["hhhh", "bbhh", "hhbb", "hbhb"])
def test_roots_of_either_kind_in_any_order_verify_without_a_key(tmp_path, kinds) -> None:
    """Without a key the walk drops the tree over bodies once a root matched the one
    over chain hashes; a root over bodies after that is walked again, not damage."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, kinds)
    with open_ledger(url, readonly=True) as ledger:
        for jobs in (1, 2):
            assert verify_ledger(ledger, jobs=jobs).chains[0].checkpoints == 4


@pytest.mark.parametrize("kinds", ["hhhh", "hhbb"])
def test_a_forged_root_after_the_tree_over_bodies_was_dropped_is_damage(tmp_path, kinds) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, kinds)
    forge_root(tmp_path / "audit.db", 6)
    with open_ledger(url, readonly=True) as ledger:
        with pytest.raises(VerificationError, match="seq 6: modified: merkle root of the checkp"):
            verify_ledger(ledger)


def test_without_a_key_bodies_are_hashed_only_until_a_root_over_chain_hashes(
    tmp_path, monkeypatch
) -> None:
    from otel_audit.proof import verify as verify_module

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, "hhhh")
    hashed: list[int] = []
    real = verify_module.leaf_hashes

    def counted(batch_bodies):  # type: ignore[no-untyped-def]
        out = real(batch_bodies)
        hashed.append(len(out))
        return out

    monkeypatch.setattr(verify_module, "leaf_hashes", counted)
    with open_ledger(url, readonly=True) as ledger:
        real_scan = ledger.scan_batches

        def in_twos(chain, after_seq=0):  # type: ignore[no-untyped-def]
            for batch in real_scan(chain, after_seq):
                for i in range(0, len(batch), 2):
                    yield batch[i : i + 2]

        monkeypatch.setattr(ledger, "scan_batches", in_twos)
        assert verify_ledger(ledger).records == 8
    assert hashed == [2]  # the batch holding the first root, none after it


@pytest.mark.parametrize("kinds", ["hhhh", "bbhh", "hhbb", "hbhb"])
def test_workers_without_a_key_verify_roots_of_either_kind_like_one_process(
    tmp_path, monkeypatch, kinds
) -> None:
    """``verify --jobs`` without a key: a chain whose first root is over chain hashes
    is walked by workers with that tree only; any root over bodies after it sends the
    chain to the single walk. Same answers as one process, intact or forged."""
    monkeypatch.setattr(parallel, "MIN_RANGE", 64)
    monkeypatch.setattr(parallel, "SHORT", 16)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, kinds, every=100)
    with open_ledger(url, readonly=True) as ledger:
        walked, _tried = parallel.walk_chains(ledger, ["shop"], None, {}, 2)
        # Workers prove the chain when no root over bodies follows one over chain hashes.
        assert ("shop" in walked) == (kinds in ("hhhh", "bbhh"))
        assert verify_ledger(ledger, jobs=2).records == verify_ledger(ledger).records == 400
    forge_root(tmp_path / "audit.db", 300)
    with open_ledger(url, readonly=True) as ledger:
        for jobs in (1, 2):
            with pytest.raises(VerificationError, match="seq 300: modified: merkle root"):
                verify_ledger(ledger, jobs=jobs)


def _in_batches_of(ledger, size: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_scan = ledger.scan_batches

    def small(chain, after_seq=0, until_seq=None):  # type: ignore[no-untyped-def]
        for batch in real_scan(chain, after_seq, until_seq):
            for i in range(0, len(batch), size):
                yield batch[i : i + size]

    monkeypatch.setattr(ledger, "scan_batches", small)


@pytest.mark.parametrize("kinds", ["hhbb", "hbhb"])
def test_a_root_over_bodies_after_the_drop_is_walked_again_and_told_once(
    tmp_path, monkeypatch, kinds
) -> None:
    """Batches of 2 rows: the tree over bodies is dropped after the first root, so the
    root over bodies after it sends the chain to a second walk with both trees. The
    answer is the same as in one batch; the progress adds up to the records once."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, kinds)
    told: list[int] = []
    with open_ledger(url, readonly=True) as ledger:
        _in_batches_of(ledger, 2, monkeypatch)
        assert verify_ledger(ledger, progress=told.append).chains[0].checkpoints == 4
    assert sum(told) == 8
    forge_root(tmp_path / "audit.db", 8)
    with open_ledger(url, readonly=True) as ledger:
        _in_batches_of(ledger, 2, monkeypatch)
        with pytest.raises(VerificationError, match="seq 8: modified: merkle root"):
            verify_ledger(ledger)


def test_an_unreadable_row_before_the_first_root_is_named_alike_with_workers(
    tmp_path, monkeypatch
) -> None:
    """The parent's read up to the first root (no key) stops quietly at a row it cannot
    read; the walks name it, the same with and without workers."""
    monkeypatch.setattr(parallel, "MIN_RANGE", 64)
    monkeypatch.setattr(parallel, "SHORT", 16)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _unsigned_chain(url, "h", every=600)
    with open_ledger(url) as ledger:
        ledger.add_checkpoint(Checkpoint("shop", 5, b"\x05" * 32, time.time_ns()))
    con = sqlite3.connect(tmp_path / "audit.db")
    con.execute("UPDATE records SET prev_hash = CAST(x'ffff' AS TEXT) WHERE seq = 300")
    con.commit()
    con.close()
    outcomes = []
    for jobs in (1, 2):
        with open_ledger(url, readonly=True) as ledger:
            with pytest.raises((VerificationError, LedgerError)) as caught:
                verify_ledger(ledger, jobs=jobs)
        outcomes.append((type(caught.value), str(caught.value)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] is LedgerError and "reading chain 'shop' failed" in outcomes[0][1]
