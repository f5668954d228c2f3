"""Checkpoints link to their predecessor: deleting one is seen by verify, and the
checkpoints older versions signed (unlinked, version 1) still verify."""

from __future__ import annotations

import sqlite3
import time

import pytest

from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.bundle import verify_bundle
from otel_audit.proof.chain import GENESIS, Checkpoint, check_checkpoints, link_hash
from otel_audit.proof.keys import Signer, generate_keypair, load_public_key
from otel_audit.proof.merkle import root_of
from otel_audit.transport.anchors import checkpoint_attributes, checkpoint_from_attributes


def bodies(n: int, start: int = 0) -> list[bytes]:
    return [
        encode(Record(trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", parent_span_id=None,
                      name="order.update", kind="INTERNAL", service="shop", start=10**18 + i,
                      end=10**18 + i + 5,
                      attributes={"audit.event": True, "audit.action": "order.update",
                                  "audit.actor.id": "alice"}))
        for i in range(start, start + n)
    ]  # fmt: skip


@pytest.fixture
def keys(tmp_path):
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(key, pub)
    return key, pub


def run_writer(make_pipeline, url: str, key, actions: int) -> str:
    """One life of a signing service; returns its chain."""
    pipeline, provider, _ = make_pipeline(url, signing_key=str(key), checkpoint_every=2)
    for i in range(actions):
        with pipeline.audit_action("order.update", resource=("order", str(i)), actor="alice"):
            pass
    pipeline.shutdown()
    return pipeline.chain


def test_deleting_a_checkpoint_in_the_middle_is_damage(make_pipeline, tmp_path, keys, capsys):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    run_writer(make_pipeline, url, key, 6)
    with open_ledger(url) as ledger:
        stored = ledger.checkpoints("shop")
    assert [cp.seq for cp in stored] == [2, 4, 6]
    linked, damage = check_checkpoints(stored, load_public_key(pub))
    assert damage == [] and [cp.version for cp in linked] == [3, 3, 3]
    assert linked[0].prev == GENESIS and linked[2].prev == linked[1].digest()
    assert main(["verify", "--ledger", url, "--public-key", str(pub), "-q"]) == 0
    capsys.readouterr()
    # The insider removes the checkpoint at seq 4 (its records are untouched).
    with sqlite3.connect(tmp_path / "audit.db") as con:
        con.execute("DELETE FROM checkpoints WHERE seq = 4")
    assert main(["verify", "--ledger", url, "--public-key", str(pub)]) == 1
    assert capsys.readouterr().err == (
        "otel-audit: chain 'shop' seq 6: bad signature: checkpoint at seq 6: signature does not"
        " verify with the public key: the checkpoint was edited, or a checkpoint between it and"
        " the one before it (seq 2) was deleted\n"
    )
    # Without the key nothing is signed and nothing is claimed.
    assert main(["verify", "--ledger", url, "-q"]) == 0


def test_a_stated_link_that_skips_a_checkpoint_is_named_deleted(make_pipeline, tmp_path, keys):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    run_writer(make_pipeline, url, key, 6)
    public = load_public_key(pub)
    with open_ledger(url) as ledger:
        linked, _ = check_checkpoints(ledger.checkpoints("shop"), public)
    # Anchors and bundles state the link they were signed with.
    _, damage = check_checkpoints([linked[0], linked[2]], public)
    assert [(d.seq, d.kind) for d in damage] == [(6, "deleted")]
    assert str(damage[0]) == (
        "chain 'shop' seq 6: deleted: checkpoint at seq 6 links to a checkpoint that is gone"
        " (after seq 2)"
    )


def test_unlinked_checkpoints_of_older_versions_still_verify(make_pipeline, tmp_path, keys, capsys):
    """A ledger an older otel-audit wrote (version 1 checkpoints), then upgraded."""
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    signer = Signer.from_file(key)
    old = bodies(4)
    with open_ledger(url) as ledger:
        appended = ledger.append("shop", old)
        for upto in (2, 4):
            cp = Checkpoint("shop", upto, appended[upto - 1].hash, time.time_ns(),
                            merkle_root=root_of(old[:upto]))  # fmt: skip
            assert b'"v":1' in cp.message() and b"prev" not in cp.message()
            ledger.add_checkpoint(cp.signed(signer.sign(cp.message()), signer.key_id))
    # The upgraded service signs on, linked to the last unlinked checkpoint.
    run_writer(make_pipeline, url, key, 4)
    with open_ledger(url) as ledger:
        linked, damage = check_checkpoints(ledger.checkpoints("shop"), load_public_key(pub))
    assert damage == []
    assert [(cp.seq, cp.version) for cp in linked] == [(2, 1), (4, 1), (6, 3), (8, 3)]
    assert linked[2].prev == linked[1].digest()
    assert main(["verify", "--ledger", url, "--public-key", str(pub), "-q"]) == 0
    out = tmp_path / "e.zip"
    assert main(["bundle", "--ledger", url, "-o", str(out), "--public-key", str(pub)]) == 0
    report = verify_bundle(str(out), load_public_key(pub))
    # The old roots are over bodies, the new ones over chain hashes: no proof
    # joins the two, so every record is proven by the new checkpoints.
    assert report.records == 8 and report.checkpoints == 2 and report.notes == []


def test_linked_checkpoints_round_trip_through_anchors_and_dicts(make_pipeline, tmp_path, keys):
    key, pub = keys
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    emitted: list[Checkpoint] = []
    pipeline, provider, _ = make_pipeline(url, signing_key=str(key), checkpoint_every=2)
    pipeline.writer.checkpoint_listeners.append(emitted.append)
    for i in range(4):
        with pipeline.audit_action("order.update", resource=("order", str(i)), actor="alice"):
            pass
    pipeline.shutdown()
    assert [(cp.seq, cp.version) for cp in emitted] == [(2, 3), (4, 3)]
    for cp in emitted:
        assert checkpoint_from_attributes(checkpoint_attributes(cp)) == cp
        assert Checkpoint.from_dict(cp.to_dict()) == cp
    v1 = Checkpoint("shop", 1, b"\x01" * 32, 5, b"\x02" * 64, "kid", None)
    assert set(v1.to_dict()) == {"chain", "seq", "head", "time", "signature", "key_id",
                                 "merkle_root"}  # fmt: skip
    assert Checkpoint.from_dict(v1.to_dict()) == v1
    # The anchors of linked checkpoints verify with the key, and a gap between them is named.
    _, damage = check_checkpoints(emitted, load_public_key(pub))
    assert damage == []
    with pytest.raises(ValueError, match="checkpoint prev is not a hex string"):
        Checkpoint.from_dict({**emitted[0].to_dict(), "prev": None})


def _sql(url: str, statements: list[tuple[str, tuple]]) -> None:
    """An insider with direct database access (superuser on PostgreSQL)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as con:
            for sql, args in statements:
                con.execute(sql.replace("%s", "?").replace("{s}.", ""), args)
        return
    import psycopg

    from otel_audit.engine.ledger.postgres import SCHEMA

    with psycopg.connect(url) as con:
        for sql, args in statements:
            con.execute(sql.replace("{s}", SCHEMA), args)


def test_deleted_checkpoint_and_rollback_on_both_backends(
    make_pipeline, keys, capsys, ledger_kind, ledger_url_for
):
    key, pub = keys
    url = ledger_url_for(ledger_kind)
    chain = run_writer(make_pipeline, url, key, 8)  # checkpoints at 2, 4, 6, 8
    # 1. A checkpoint deleted from the middle.
    _sql(url, [("DELETE FROM {s}.checkpoints WHERE chain = %s AND seq = 4", (chain,))])
    assert main(["verify", "--ledger", url, "--public-key", str(pub)]) == 1
    assert f"chain {chain!r} seq 6: bad signature" in capsys.readouterr().err
    # 2. The newest ones deleted and their records rewritten, hashes recomputed.
    with open_ledger(url) as ledger:
        rows = list(ledger.scan(chain))
    prev = rows[3].hash
    rewrite = [("DELETE FROM {s}.checkpoints WHERE chain = %s AND seq > 2", (chain,))]
    for row in rows[4:]:
        body = row.body.replace(b'"alice"', b'"mallory"')
        digest = link_hash(prev, body)
        rewrite.append(
            (
                "UPDATE {s}.records SET prev_hash = %s, hash = %s, body = %s"
                " WHERE chain = %s AND seq = %s",
                (prev, digest, body, chain, row.seq),
            )
        )
        prev = digest
    _sql(url, rewrite)
    # The service restarts (a new pipeline on the same key) and must not sign.
    pipeline, _, _ = make_pipeline(url, signing_key=str(key), checkpoint_every=2)
    for i in range(2):
        with pipeline.audit_action("order.update", resource=("order", str(i)), actor="bob"):
            pass
    pipeline.shutdown()
    stats = pipeline.stats()
    assert stats.checkpoints == 0 and stats.checkpoint_errors >= 1
    with open_ledger(url) as ledger:
        assert [cp.seq for cp in ledger.checkpoints(chain)] == [2, 8]  # 8 restored
    assert main(["verify", "--ledger", url, "--public-key", str(pub)]) == 1
    assert f"chain {chain!r} seq 8: bad signature" in capsys.readouterr().err
