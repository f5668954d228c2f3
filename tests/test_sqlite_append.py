"""The SQLite ledger's one-statement append (after the head this connection wrote).

A connection that appended to a chain appends its next batch in one
autocommit INSERT after the head it remembers; the primary key refuses that
statement when anyone else appended meanwhile, and the append then reads the
head under the write lock as before. These tests are the attacks on that
shortcut: another connection or process appending in between, a row planted
at the next position, the newest rows deleted under a running writer.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from otel_audit.engine.ledger import open_ledger
from otel_audit.errors import LedgerWriteError, VerificationError
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.proof.verify import verify_ledger


def _bodies(tag: str, n: int) -> list[bytes]:
    return [b'{"n":%d,"tag":"%s"}' % (i, tag.encode()) for i in range(n)]


def _chain(path: Path, chain: str) -> list[tuple[int, bytes, bytes, bytes]]:
    with sqlite3.connect(path) as con:
        return [
            (seq, bytes(prev), bytes(digest), bytes(body))
            for seq, prev, digest, body in con.execute(
                "SELECT seq, prev_hash, hash, body FROM records WHERE chain = ? ORDER BY seq",
                (chain,),
            )
        ]


def _plant(db: Path, seq: int) -> None:
    """The insider's row at ``seq`` of chain "shop", with a made-up hash."""
    with sqlite3.connect(db) as con:
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)",
            ("shop", seq, b"\0" * 32, b"\1" * 32, b'{"planted":true}'),
        )


def _assert_one_unbroken_chain(path: Path, chain: str, expected: list[bytes]) -> None:
    rows = _chain(path, chain)
    assert [seq for seq, *_ in rows] == list(range(1, len(expected) + 1))
    prev = GENESIS
    for _seq, stored_prev, digest, body in rows:
        assert stored_prev == prev and digest == link_hash(prev, body)
        prev = digest
    assert sorted(body for *_, body in rows) == sorted(expected)
    with open_ledger(str(path), readonly=True) as ledger:
        report = verify_ledger(ledger)
    assert [(c.chain, c.last_seq) for c in report.chains] == [(chain, len(expected))]


def test_two_connections_taking_turns_on_one_chain_never_fork_it(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    a = open_ledger(str(db))
    b = open_ledger(str(db))
    written: list[bytes] = []
    try:
        for turn in range(20):
            for who, ledger in (("a", a), ("b", b)):
                batch = _bodies(f"{who}{turn}", 1 + turn % 4)
                appended = ledger.append("shop", batch)
                written += batch
                # Each answer names where its records are: contiguous, at the end.
                assert [x.seq for x in appended] == list(
                    range(len(written) - len(batch) + 1, len(written) + 1)
                )
    finally:
        a.close()
        b.close()
    _assert_one_unbroken_chain(db, "shop", written)


def test_a_row_planted_at_the_next_position_is_linked_onto_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("first", 3))
        _plant(db, 4)  # the insider writes seq 4 directly, with a made-up hash
        appended = ledger.append("shop", _bodies("next", 2))
    finally:
        ledger.close()
    # The append did not stop at the planted row or write over it: it read the
    # head again and continued after it, and verify names the forged link.
    assert [x.seq for x in appended] == [5, 6]
    assert _chain(db, "shop")[3][3] == b'{"planted":true}'
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.seq == 4


def test_newest_rows_deleted_under_a_running_writer_leave_a_gap_verify_reports(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("kept", 5))
        ledger.append("shop", _bodies("evidence", 3))
        with sqlite3.connect(db) as con:  # the insider removes the newest records
            con.execute("DELETE FROM records WHERE chain = 'shop' AND seq > 5")
        appended = ledger.append("shop", _bodies("later", 2))
    finally:
        ledger.close()
    # The writer continues after the head it wrote, so the deleted positions
    # stay missing instead of being filled with new records.
    assert [x.seq for x in appended] == [9, 10]
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.seq in (6, 9)


_APPENDER = """
import sys
from otel_audit.engine.ledger import open_ledger
ledger = open_ledger(sys.argv[1])
for i in range(int(sys.argv[3])):
    ledger.append("shop", [b'{"p":"%s","i":%d,"j":%d}' % (sys.argv[2].encode(), i, j)
                           for j in range(1 + i % 3)])
ledger.close()
"""


def test_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    open_ledger(str(db)).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(db), f"p{n}", "200"])
        for n in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    expected = [
        b'{"p":"p%d","i":%d,"j":%d}' % (n, i, j)
        for n in range(4)
        for i in range(200)
        for j in range(1 + i % 3)
    ]
    _assert_one_unbroken_chain(db, "shop", expected)


def test_a_statement_refused_by_a_held_lock_fails_alone_and_the_next_append_continues(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("a", 2))
        # Another connection holds the write lock past this one's patience.
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        ledger._con.execute("PRAGMA busy_timeout = 50")
        with pytest.raises(LedgerWriteError, match="locked"):
            ledger.append("shop", _bodies("b", 1))
        blocker.execute("INSERT INTO records (chain, seq, prev_hash, hash, body) "
                        "SELECT chain, seq + 1, hash, ?, ? FROM records WHERE seq = 2",
                        (b"\2" * 32, b'{"x":1}'))  # fmt: skip
        blocker.execute("ROLLBACK")
        blocker.close()
        appended = ledger.append("shop", _bodies("c", 1))
    finally:
        ledger.close()
    assert [x.seq for x in appended] == [3]
    _assert_one_unbroken_chain(db, "shop", _bodies("a", 2) + _bodies("c", 1))


def test_a_connection_left_inside_a_transaction_is_refused_not_acknowledged(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("first", 1))
        # What an exception landing right after a BEGIN leaves behind (a
        # KeyboardInterrupt between the BEGIN and its try): an open transaction.
        ledger._con.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerWriteError, match="transaction"):
            ledger.append("shop", _bodies("second", 3))
        # The failed append rolled the stray transaction back: the next one works.
        appended = ledger.append("shop", _bodies("third", 1))
    finally:
        ledger.close()
    assert [x.seq for x in appended] == [2]
    _assert_one_unbroken_chain(db, "shop", _bodies("first", 1) + _bodies("third", 1))


def test_a_planted_trigger_fails_the_append_loudly_and_verify_names_it(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("a", 5))
        with sqlite3.connect(db) as con:  # the insider's trigger refuses one record
            con.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON records"
                """ WHEN NEW.seq = 7 AND NEW.body = CAST('{"n":1,"tag":"b"}' AS BLOB)"""
                " BEGIN SELECT RAISE(FAIL, 'refused by a planted trigger'); END"
            )
        # Not taken for another writer's append (a retry after re-reading the
        # head would go round the trigger): the caller is told.
        with pytest.raises(LedgerWriteError, match="refused by a planted trigger"):
            ledger.append("shop", _bodies("b", 3))
    finally:
        ledger.close()
    stored = [body for *_, body in _chain(db, "shop")]
    assert len(stored) == len(set(stored))  # no record was written twice
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.kind == "schema" and "refuse" in str(err.value)


def test_a_row_planted_far_ahead_is_linked_onto_not_written_below(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("first", 3))
        _plant(db, 1000)  # the insider plants seq 1000
        appended = ledger.append("shop", _bodies("next", 2))
    finally:
        ledger.close()
    # Not at 4 and 5, below the planted row, where a forwarder whose cursor
    # already passed 1000 would never look: after it, as the locked path does.
    assert [x.seq for x in appended] == [1001, 1002]
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError):
        verify_ledger(ro)


def test_records_a_planted_trigger_skips_silently_are_never_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("a", 2))
        with sqlite3.connect(db) as con:  # drops one record of every insert without an error
            con.execute(
                "CREATE TRIGGER skip BEFORE INSERT ON records WHEN NEW.seq % 2 = 0"
                " BEGIN SELECT RAISE(IGNORE); END"
            )
        # One statement after the remembered head, then (from then on) the locked path.
        for batch, told in ((_bodies("b", 3), "stored 2 of 3"), (_bodies("c", 600), "250 of 500")):
            with pytest.raises(LedgerWriteError, match=told):
                ledger.append("shop", batch)
    finally:
        ledger.close()
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.kind == "schema"


def test_a_row_planted_at_a_negative_seq_is_not_a_head(tmp_path: Path) -> None:
    """A first append to a chain never continues from a row below seq 1, where no
    forwarder or chain walk looks."""
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("other", _bodies("o", 1))  # the file exists; "shop" has no records
        _plant(db, -1000)
        appended = ledger.append("shop", _bodies("a", 3))
    finally:
        ledger.close()
    assert [x.seq for x in appended] == [1, 2, 3]
    with open_ledger(str(db), readonly=True) as ro:
        assert ro.stray_rows() == [("shop", -1000, "seq -1000 is outside every sequence")]


def test_rows_deleted_under_a_writer_are_not_refilled_by_its_locked_path(tmp_path: Path) -> None:
    """A batch too big for the one-statement append reads the head under the lock: after
    the newest rows were deleted, it still goes on after what this connection wrote."""
    db = tmp_path / "audit.db"
    ledger = open_ledger(str(db))
    try:
        ledger.append("shop", _bodies("first", 10))
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM records WHERE chain = 'shop' AND seq > 4")
        con.close()
        appended = ledger.append("shop", _bodies("big", 600))  # more than one statement takes
    finally:
        ledger.close()
    assert appended[0].seq == 11  # not 5: seqs a forwarder may have sent are never reused
    with open_ledger(str(db), readonly=True) as ro, pytest.raises(VerificationError):
        verify_ledger(ro)
