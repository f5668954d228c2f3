"""An inline LedgerWriter: no thread, its owner calls ``turn`` (the writer process's worker).

Same rules as the writer thread, on real SQLite files: what is queued is
committed in one group; while the ledger cannot be written, async records
wait for a retry after a backoff and sync records fail at the next attempt;
a timed checkpoint is made when due; shutdown commits what is queued and
writes a final checkpoint.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.ledger.sqlite import SQLiteLedger
from otel_audit.engine.writer import LedgerWriter
from otel_audit.errors import LedgerWriteError
from otel_audit.proof.verify import verify_ledger


def _inline(db: Path, **kwargs: object) -> LedgerWriter:
    ledger = SQLiteLedger(str(db), busy_timeout_ms=50)
    writer = LedgerWriter(f"sqlite:///{db}", "svc", ledger=ledger, **kwargs)  # type: ignore[arg-type]
    writer.inline = True
    return writer


def _count(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT count(*) FROM records").fetchone()[0])


def test_turn_commits_everything_queued_in_one_group(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    writer = _inline(db, checkpoint_every=10_000, checkpoint_interval=60.0)
    tickets = [writer.enqueue(b'{"n":%d}' % i) for i in range(50)]
    for i in range(50):
        writer.submit(b'{"m":%d}' % i)
    assert _count(db) == 0 and writer._thread is None  # nothing happens without a turn
    wait = writer.turn()
    assert _count(db) == 100 and writer.stats().batches == 1
    assert [t.appended.seq for t in tickets if t.appended] == list(range(1, 51))
    # Nothing queued: the next round is the timed checkpoint's.
    assert wait is not None and 0 < wait <= 60.0
    writer.shutdown()
    with open_ledger(str(db), readonly=True) as ro:
        report = verify_ledger(ro)
    assert report.chains[0].last_seq == 100


def test_an_outage_retries_async_records_and_fails_sync_ones(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    writer = _inline(db, checkpoint_every=10_000)
    writer.submit(b'{"first":1}')
    writer.turn()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another connection holds the ledger: a real outage
    try:
        writer.submit(b'{"async":1}')
        wait = writer.turn()
        assert wait is not None and wait > 0  # backing off, not spinning
        assert not writer.healthy and "locked" in (writer.last_error or "")
        # A sync record queued during the outage fails at the next attempt
        # instead of waiting out the outage behind the retried async one.
        ticket = writer.enqueue(b'{"sync":1}')
        time.sleep(wait)
        writer.turn()
        assert ticket.done
        with pytest.raises(LedgerWriteError):
            ticket.wait(writer)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    deadline = time.monotonic() + 10
    while _count(db) < 2 and time.monotonic() < deadline:
        time.sleep(min(writer.turn() or 0.01, 0.05))
    assert _count(db) == 2 and writer.healthy  # the async record got in after the outage
    writer.shutdown()


def test_shutdown_commits_what_is_queued_and_checkpoints(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    writer = _inline(db, checkpoint_every=10_000)
    for i in range(30):
        writer.submit(b'{"n":%d}' % i)
    writer.shutdown()
    assert _count(db) == 30
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT max(seq) FROM checkpoints").fetchone()[0] == 30


def test_a_timed_checkpoint_is_made_when_due(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    writer = _inline(db, checkpoint_every=10_000, checkpoint_interval=0.2)
    writer.submit(b'{"n":1}')
    wait = writer.turn()
    assert wait is not None
    time.sleep(wait)
    assert writer.turn() is None  # made; nothing new since
    assert writer.stats().checkpoints == 1
    writer.shutdown()
