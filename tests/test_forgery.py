"""Forgery: an attacker with write access to the SQLite file plants records reviewers see.

Each test is the attacker's script against a copy of a real signed ledger, and
the defence asserted: verify (with and without the key) names the damage, and
search, export (every format) and trail never show the forged record as good.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode, encode
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.proof.keys import generate_keypair, load_public_key
from otel_audit.proof.verify import verify_ledger
from otel_audit.review.export import formats

FORGED_ACTION = "account.delete"


@dataclasses.dataclass
class Shop:
    db: Path
    pub: Path
    victim_trail: str


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Shop:
    """alice and bob act in service 'shop'; checkpoints signed; the file checkpointed."""
    from opentelemetry.sdk.trace import TracerProvider

    d = tmp_path_factory.mktemp("forgery")
    generate_keypair(d / "k.key", d / "k.pub")
    provider = TracerProvider(shutdown_on_exit=False)
    pipeline = otel_audit.configure(
        ledger=str(d / "audit.db"),
        service_name="shop",
        tracer_provider=provider,
        signing_key=str(d / "k.key"),
        checkpoint_every=5,
        handle_sigterm=False,
    )
    for i in range(12):
        with otel_audit.actor("alice" if i % 2 == 0 else "bob"):
            with otel_audit.audit_action("order.update", resource=("order", i)):
                pass
    pipeline.shutdown()
    provider.shutdown()
    con = sqlite3.connect(d / "audit.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    trail = con.execute(
        "SELECT trail_id FROM records WHERE actor_id = 'alice' ORDER BY seq LIMIT 1"
    ).fetchone()[0]
    con.close()
    return Shop(d / "audit.db", d / "k.pub", trail)


@pytest.fixture
def shop(pristine: Shop, tmp_path: Path) -> Shop:
    db = tmp_path / "audit.db"
    shutil.copy(pristine.db, db)
    return Shop(db, pristine.pub, pristine.victim_trail)


def forged_body(con: sqlite3.Connection) -> bytes:
    """A well-formed record: alice did account.delete, in her first trail."""
    body = con.execute(
        "SELECT body FROM records WHERE actor_id = 'alice' ORDER BY seq LIMIT 1"
    ).fetchone()[0]
    rec = decode(body)
    attrs = dict(rec.attributes)
    attrs[v.ACTION] = FORGED_ACTION
    return encode(dataclasses.replace(rec, span_id="00000000000000ff", attributes=attrs))


def plant(db: Path, seq: object, chain: object = "shop") -> None:
    """The attack: insert a forged record outside the chain's sequence, hashed correctly."""
    con = sqlite3.connect(db)
    body = forged_body(con)
    con.execute(
        "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)",
        (chain, seq, GENESIS, link_hash(GENESIS, body), body),
    )
    con.commit()
    con.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", *args], capture_output=True, text=True, timeout=120
    )


def assert_verify_fails(shop: Shop, *expected: str) -> None:
    for key in ([], ["--public-key", str(shop.pub)]):
        done = cli("verify", "--ledger", str(shop.db), *key)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr
        line = done.stderr.strip()
        assert len(line.splitlines()) == 1
        for text in expected:
            assert text in line, line


def assert_reviews_refuse(shop: Shop, capsys, tmp_path: Path) -> None:
    """search, export (every format, file and stdout) and trail never show the forgery as good."""
    url = str(shop.db)
    # search: the forged row is marked DAMAGED with nothing of its content, exit 1
    assert main(["search", "--ledger", url, "--actor", "alice", "--limit", "0"]) == 1
    out, err = capsys.readouterr()
    assert FORGED_ACTION not in out
    assert "DAMAGED" in out and "damaged" in err
    assert main(["search", "--ledger", url, "--actor", "alice", "--format", "jsonl"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(FORGED_ACTION not in json.dumps(line) for line in lines)
    assert [line["verification"]["status"] for line in lines if "verification" in line] == [
        "damaged"
    ]
    # export: to a file, refused whole; to stdout, the forged record is left out
    for fmt in sorted(formats()):
        target = tmp_path / f"out.{fmt}"
        assert main(["export", "--ledger", url, "--format", fmt, "-o", str(target)]) == 1, fmt
        assert not target.exists()
        assert "damaged records" in capsys.readouterr().err
        assert main(["export", "--ledger", url, "--format", fmt, "--actor", "alice"]) == 1, fmt
        out, err = capsys.readouterr()
        assert FORGED_ACTION not in out and "left out of the export" in err, fmt
    # trail, text and json, with and without the key: the forged record is damaged, exit 1
    for key in ([], ["--public-key", str(shop.pub)]):
        assert main(["trail", "--ledger", url, shop.victim_trail, *key]) == 1
        out, err = capsys.readouterr()
        assert "damaged" in err
        assert all("<damaged>" in line for line in out.splitlines() if FORGED_ACTION in line)
        assert main(["trail", "--ledger", url, shop.victim_trail, "--format", "json", *key]) == 1
        data = json.loads(capsys.readouterr().out)
        statuses = [s for root in data["roots"] for s in _statuses(root)]
        assert all(status == "damaged" for action, status in statuses if action == FORGED_ACTION)


def _statuses(node):
    yield node["action"], node["verification"]["status"]
    for child in node["children"]:
        yield from _statuses(child)


def test_untouched_copy_verifies_and_reviews_exit_0(shop: Shop, capsys) -> None:
    assert cli("verify", "--ledger", str(shop.db), "--public-key", str(shop.pub)).returncode == 0
    assert main(["search", "--ledger", str(shop.db), "--actor", "alice"]) == 0
    assert main(["export", "--ledger", str(shop.db), "--format", "csv"]) == 0
    assert main(["trail", "--ledger", str(shop.db), shop.victim_trail]) == 0


@pytest.mark.parametrize("seq", [0, -1])
def test_record_planted_outside_the_sequence(shop: Shop, capsys, tmp_path, seq) -> None:
    plant(shop.db, seq)
    assert_verify_fails(shop, f"chain 'shop' seq {seq}: inserted")
    assert_reviews_refuse(shop, capsys, tmp_path)


@pytest.mark.parametrize(
    "chain, seq, expected",
    [
        (b"shop", 3, "chain is blob, not text"),  # same PK text, but a blob: a second 'shop' seq 3
        ("shop", "x3", "seq is text, not integer"),
        ("shop", 2.5, "seq is real, not integer"),
    ],
)
def test_type_confusion_in_the_key_is_damage(shop: Shop, capsys, tmp_path, chain, seq, expected):
    plant(shop.db, seq, chain)
    assert_verify_fails(shop, "inserted", expected)
    assert_reviews_refuse(shop, capsys, tmp_path)


@pytest.mark.parametrize(
    "column, value, expected",
    [
        ("hash", "hex", "hash is text, not blob"),
        ("prev_hash", "hex", "prev_hash is text, not blob"),
        ("body", "text", "body is text, not blob"),
    ],
)
def test_values_stored_as_text_are_damage(shop: Shop, column, value, expected) -> None:
    # A body stored as TEXT still hashes the same: only the type tells.
    con = sqlite3.connect(shop.db)
    (stored,) = con.execute(f"SELECT {column} FROM records WHERE chain='shop' AND seq=4").fetchone()
    text = stored.hex() if value == "hex" else stored.decode()
    con.execute(f"UPDATE records SET {column} = ? WHERE chain='shop' AND seq=4", (text,))
    con.commit()
    con.close()
    assert_verify_fails(shop, "chain 'shop' seq 4", expected)
    # tail shows the newest records: seq 4 onwards is damaged, marked, exit 1
    done = cli("tail", "--ledger", str(shop.db), "-n", "20")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["seq"] for line in lines if "verification" in line][0] == 4


def test_rebuilt_table_with_another_query_expression(shop: Shop, capsys, tmp_path) -> None:
    # The attacker rebuilds records so actor_id comes from the resource id:
    # search --actor would then find (and hide) whatever they choose.
    con = sqlite3.connect(shop.db)
    (ddl,) = con.execute("SELECT sql FROM sqlite_master WHERE name='records'").fetchone()
    evil = ddl.replace('"audit.actor.id"', '"audit.resource.id"').replace(
        "CREATE TABLE records", "CREATE TABLE records_new"
    )
    assert evil != ddl
    con.executescript(
        f"""
        BEGIN;
        {evil};
        INSERT INTO records_new (chain, seq, prev_hash, hash, body)
            SELECT chain, seq, prev_hash, hash, body FROM records;
        DROP TABLE records;
        ALTER TABLE records_new RENAME TO records;
        CREATE INDEX records_trace ON records (trace_id, span_id);
        CREATE INDEX records_trail ON records (trail_id);
        COMMIT;
        """
    )
    con.close()
    assert_verify_fails(shop, "ledger schema was altered", "table records differs")
    # search by the forged column: refused, nothing shown, exit 1
    assert main(["search", "--ledger", str(shop.db), "--actor", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "ledger schema was altered" in err
    assert main(["export", "--ledger", str(shop.db), "-o", str(tmp_path / "x.jsonl")]) == 1
    assert not (tmp_path / "x.jsonl").exists()
    assert main(["trail", "--ledger", str(shop.db), shop.victim_trail]) == 1


def test_query_column_edited_in_sqlite_master(shop: Shop, capsys) -> None:
    # writable_schema: the generated expression changes without touching a row.
    con = sqlite3.connect(shop.db)
    con.execute("PRAGMA writable_schema = ON")
    con.execute(
        "UPDATE sqlite_master SET sql = replace(sql, '\"audit.outcome\"', '\"audit.action\"')"
        " WHERE name = 'records'"
    )
    con.commit()
    con.close()
    assert_verify_fails(shop, "ledger schema was altered")
    # The altered column hides every success: an empty answer is refused too.
    assert main(["search", "--ledger", str(shop.db), "--outcome", "success"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("otel-audit: ledger schema was altered: table records")


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TRIGGER hide AFTER INSERT ON records BEGIN SELECT 1; END",
        "CREATE VIEW records_view AS SELECT * FROM records",
        "CREATE TABLE extra (x)",
    ],
)
def test_objects_added_to_the_schema(shop: Shop, ddl) -> None:
    con = sqlite3.connect(shop.db)
    con.execute(ddl)
    con.commit()
    con.close()
    assert_verify_fails(shop, "is not part of the ledger schema")


def test_rows_planted_behind_an_index_whose_definition_was_edited(shop: Shop) -> None:
    # The attacker (review of 2026-12-01) builds the action index over only
    # some rows, then edits its stored SQL (writable_schema) to a form the
    # schema check accepts, without rebuilding it: SQLite would count the
    # rows from that index, so rows planted outside the chain's sequence, as
    # many as it lacks, would make the count match the walk. The count
    # verify compares is the table's own.
    con = sqlite3.connect(shop.db)
    total = con.execute("SELECT count(*) FROM records").fetchone()[0]
    con.execute("DROP INDEX records_action")
    con.execute("CREATE INDEX records_action ON records (action) WHERE seq > 3")
    con.execute("PRAGMA writable_schema = ON")
    con.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX records_action ON records (action)'"
        " WHERE name = 'records_action'"
    )
    con.commit()
    con.close()
    con = sqlite3.connect(shop.db)
    lacking = total - con.execute("SELECT count(*) FROM records").fetchone()[0]
    con.close()
    assert lacking == 3  # what SQLite's own count now says, through the index
    for k in range(lacking):
        plant(shop.db, -k)
    assert_verify_fails(shop, "chain 'shop' seq ", "inserted")


def test_verify_api_names_planted_row(shop: Shop) -> None:
    plant(shop.db, 0)
    with open_ledger(str(shop.db), readonly=True) as ledger:
        with pytest.raises(VerificationError) as info:
            verify_ledger(ledger, load_public_key(shop.pub))
        assert ledger.stray_rows() == [("shop", 0, "seq 0 is outside every sequence")]
        assert ledger.schema_problems() == []
    assert (info.value.chain, info.value.seq, info.value.kind) == ("shop", 0, "inserted")


@pytest.mark.parametrize(
    "chain, seq, expected",
    [
        ("shop", 0, "chain 'shop' seq 0: "),  # without the key: inserted; with it: bad signature
        (b"shop", 5, "inserted: checkpoint row is in no chain"),
    ],
)
def test_checkpoint_rows_outside_every_chain(shop: Shop, chain, seq, expected) -> None:
    con = sqlite3.connect(shop.db)
    row = con.execute(
        "SELECT head, time, signature, key_id, merkle_root FROM checkpoints ORDER BY seq LIMIT 1"
    ).fetchone()
    con.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)", (chain, seq, *row))
    con.commit()
    con.close()
    assert_verify_fails(shop, expected)
