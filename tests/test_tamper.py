"""Tamper detection: random single mutations of a real SQLite ledger are named by verify."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import otel_audit
from otel_audit.engine.ledger import open_ledger
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import link_hash
from otel_audit.proof.keys import generate_keypair, load_public_key
from otel_audit.proof.merkle import root_of
from otel_audit.proof.verify import verify_ledger

N_RECORDS = 120
CHECKPOINT_EVERY = 25


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """A ledger of N_RECORDS signed every CHECKPOINT_EVERY, and its public key."""
    from opentelemetry.sdk.trace import TracerProvider

    d = tmp_path_factory.mktemp("pristine")
    generate_keypair(d / "k.key", d / "k.pub")
    provider = TracerProvider(shutdown_on_exit=False)
    pipeline = otel_audit.configure(
        ledger=str(d / "audit.db"),
        service_name="shop",
        tracer_provider=provider,
        signing_key=str(d / "k.key"),
        checkpoint_every=CHECKPOINT_EVERY,
        handle_sigterm=False,
    )
    for i in range(N_RECORDS):
        with otel_audit.actor(f"user{i % 7}"):
            with otel_audit.audit_action("order.update", resource=("order", i)):
                pass
    pipeline.shutdown()
    con = sqlite3.connect(d / "audit.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return d / "audit.db", d / "k.pub"


def copy(pristine_db: Path, tmp_path: Path) -> Path:
    target = tmp_path / "audit.db"
    shutil.copy(pristine_db, target)
    return target


def run_verify(db: Path, pub: Path | None = None):
    with open_ledger(str(db), readonly=True) as ledger:
        return verify_ledger(ledger, load_public_key(pub) if pub else None)


def damage(db: Path, pub: Path | None = None) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        run_verify(db, pub)
    return info.value


def row(con, seq):
    return con.execute(
        "SELECT prev_hash, hash, body FROM records WHERE chain='shop' AND seq=?", (seq,)
    ).fetchone()


def checkpoint_seqs(con) -> list[int]:
    return [s for (s,) in con.execute("SELECT seq FROM checkpoints ORDER BY seq")]


def test_untouched_ledger_verifies(pristine):
    db, pub = pristine
    report = run_verify(db, pub)
    assert report.records == N_RECORDS
    assert report.chains[0].signatures_checked == N_RECORDS // CHECKPOINT_EVERY + 1


def _flip_in_attribute(body: bytes, rng: random.Random) -> bytes:
    # Change one character inside an attribute value, keeping valid JSON (a
    # raw editor would do the same to stay unnoticed by the database).
    data = json.loads(body)
    key = rng.choice(sorted(k for k, val in data["attributes"].items() if isinstance(val, str)))
    value = data["attributes"][key]
    i = rng.randrange(len(value))
    new_char = "Z" if value[i] != "Z" else "Y"
    needle = json.dumps(value, ensure_ascii=False).encode()
    changed = json.dumps(value[:i] + new_char + value[i + 1 :], ensure_ascii=False).encode()
    assert needle in body
    return body.replace(needle, changed, 1)


def _flip_byte(value: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(value))
    return value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1 :]


MUTATIONS = [
    "attribute",
    "hash",
    "prev_hash",
    "seq",
    "chain",
    "delete",
    "swap",
    "insert",
    "insert_bogus",
    "truncate",
]


def mutate(con, kind: str, rng: random.Random) -> tuple[int, str]:
    """Apply one mutation; return (seq verify must name, damage kind)."""
    cps = checkpoint_seqs(con)
    seq = rng.randint(1, N_RECORDS - 1)
    prev, digest, body = row(con, seq)
    where = "chain='shop' AND seq=?"
    if kind == "attribute":
        con.execute(
            f"UPDATE records SET body=? WHERE {where}", (_flip_in_attribute(body, rng), seq)
        )
        return seq, "modified"
    if kind == "hash":
        con.execute(f"UPDATE records SET hash=? WHERE {where}", (_flip_byte(digest, rng), seq))
        return seq, "modified"
    if kind == "prev_hash":
        con.execute(f"UPDATE records SET prev_hash=? WHERE {where}", (_flip_byte(prev, rng), seq))
        return seq, "modified"
    if kind == "seq":
        con.execute(f"UPDATE records SET seq=? WHERE {where}", (N_RECORDS + 1000, seq))
        return seq, "deleted"
    if kind == "chain":
        con.execute(f"UPDATE records SET chain='other' WHERE {where}", (seq,))
        return seq, "deleted"
    if kind == "delete":
        con.execute(f"DELETE FROM records WHERE {where}", (seq,))
        return seq, "deleted"
    if kind == "swap":
        other = rng.choice([s for s in range(1, N_RECORDS + 1) if s != seq])
        a, b = row(con, seq), row(con, other)
        con.execute(f"UPDATE records SET prev_hash=?, hash=?, body=? WHERE {where}", (*b, seq))
        con.execute(f"UPDATE records SET prev_hash=?, hash=?, body=? WHERE {where}", (*a, other))
        return min(seq, other), "reordered"
    if kind in ("insert", "insert_bogus"):
        # Make room at seq (renumber the rest up by one), then insert a forged record.
        con.execute("UPDATE records SET seq = -seq - 1 WHERE chain='shop' AND seq >= ?", (seq,))
        con.execute("UPDATE records SET seq = -seq WHERE chain='shop' AND seq < 0")
        forged = body.replace(b'"order.update"', b'"order.delete"')
        before = row(con, seq - 1)[1] if seq > 1 else bytes(32)
        new_hash = link_hash(before, forged) if kind == "insert" else _flip_byte(digest, rng)
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES ('shop', ?, ?, ?, ?)",
            (seq, before, new_hash, forged),
        )
        return seq, "inserted"
    if kind == "truncate":
        covered = [c for c in cps if c < N_RECORDS]
        cut = rng.randint(1, max(covered))
        con.execute("DELETE FROM records WHERE chain='shop' AND seq >= ?", (cut,))
        return cut, "truncated"
    raise AssertionError(kind)


@pytest.mark.parametrize("case", range(60))
def test_random_single_mutation_is_named(pristine, tmp_path, case):
    db_src, pub = pristine
    rng = random.Random(case)
    kind = MUTATIONS[case % len(MUTATIONS)]
    db = copy(db_src, tmp_path)
    con = sqlite3.connect(db)
    expected_seq, expected_kind = mutate(con, kind, rng)
    con.commit()
    con.close()
    for key in (None, pub):
        err = damage(db, key)
        assert (err.seq, err.kind) == (expected_seq, expected_kind), (kind, str(err))
        assert err.chain == "shop"


def test_insider_recomputing_the_chain_is_caught_only_with_the_key(pristine, tmp_path):
    db_src, pub = pristine
    db = copy(db_src, tmp_path)
    con = sqlite3.connect(db)
    target = 40
    rows = con.execute(
        "SELECT seq, body FROM records WHERE chain='shop' AND seq >= ? ORDER BY seq", (target,)
    ).fetchall()
    prev = row(con, target - 1)[1]
    for seq, body in rows:
        if seq == target:
            body = body.replace(b'"order.update"', b'"order.cancel"')
        digest = link_hash(prev, body)
        con.execute(
            "UPDATE records SET prev_hash=?, hash=?, body=? WHERE chain='shop' AND seq=?",
            (prev, digest, body, seq),
        )
        prev = digest
    # The insider also rewrites every checkpoint head and Merkle root, but cannot sign them.
    for (seq,) in con.execute("SELECT seq FROM checkpoints WHERE seq >= ?", (target,)).fetchall():
        bodies = [
            b
            for (b,) in con.execute("SELECT body FROM records WHERE seq <= ? ORDER BY seq", (seq,))
        ]
        con.execute(
            "UPDATE checkpoints SET head=?, merkle_root=? WHERE seq=?",
            (row(con, seq)[1], root_of(bodies), seq),
        )
    con.commit()
    con.close()
    # Without the public key the rewritten chain is self-consistent...
    assert run_verify(db).records == N_RECORDS
    # ...with it, the first re-headed checkpoint fails its signature.
    err = damage(db, pub)
    assert err.kind == "bad signature" and err.seq == 50


def test_insider_keeping_checkpoints_is_caught_by_head_mismatch(pristine, tmp_path):
    db_src, pub = pristine
    db = copy(db_src, tmp_path)
    con = sqlite3.connect(db)
    prev = row(con, 59)[1]
    for seq in range(60, N_RECORDS + 1):
        body = row(con, seq)[2]
        if seq == 60:
            body = body.replace(b'"order.update"', b'"order.cancel"')
        digest = link_hash(prev, body)
        con.execute(
            "UPDATE records SET prev_hash=?, hash=?, body=? WHERE seq=?", (prev, digest, body, seq)
        )
        prev = digest
    con.commit()
    con.close()
    err = damage(db, pub)
    assert err.kind == "modified" and err.seq == 51  # between checkpoints 50 and 75
    assert "history rewritten between seq 51 and 75" in str(err)


def test_forged_signature_is_bad_signature(pristine, tmp_path):
    db_src, pub = pristine
    db = copy(db_src, tmp_path)
    con = sqlite3.connect(db)
    sig = con.execute("SELECT signature FROM checkpoints WHERE seq=25").fetchone()[0]
    con.execute(
        "UPDATE checkpoints SET signature=? WHERE seq=25", (_flip_byte(sig, random.Random(1)),)
    )
    con.commit()
    con.close()
    assert run_verify(db).records == N_RECORDS  # no key: not checked
    err = damage(db, pub)
    assert (err.kind, err.seq) == ("bad signature", 25)


def test_cli_exit_codes_for_damage(pristine, tmp_path):
    db_src, pub = pristine
    db = copy(db_src, tmp_path)
    cli = [
        sys.executable,
        "-m",
        "otel_audit",
        "verify",
        "--ledger",
        f"sqlite:///{db}",
        "--public-key",
        str(pub),
    ]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"ok: {N_RECORDS} records in 1 chains intact" in ok.stdout
    con = sqlite3.connect(db)
    con.execute("DELETE FROM records WHERE seq = 17")
    con.commit()
    con.close()
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "otel-audit: chain 'shop' seq 17: deleted: record missing (next present is seq 18)"
    )
    assert "Traceback" not in bad.stderr


def test_insider_deleting_every_checkpoint_is_caught_with_the_key(pristine, tmp_path):
    db_src, pub = pristine
    db = copy(db_src, tmp_path)
    con = sqlite3.connect(db)
    prev = row(con, 2)[1]
    for seq in range(3, N_RECORDS + 1):
        body = row(con, seq)[2]
        if seq == 3:
            body = body.replace(b'"order.update"', b'"order.cancel"')
        digest = link_hash(prev, body)
        con.execute(
            "UPDATE records SET prev_hash=?, hash=?, body=? WHERE seq=?", (prev, digest, body, seq)
        )
        prev = digest
    con.execute("DELETE FROM checkpoints")
    con.commit()
    con.close()
    assert run_verify(db).records == N_RECORDS  # without the key nothing can tell
    err = damage(db, pub)
    assert (err.kind, err.seq) == ("bad signature", 1)
    assert "no signed checkpoint" in str(err)
