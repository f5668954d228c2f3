"""The forwarder's cursor check: an insider who edits the outbox cannot blind the receiver.

The attack ("plant, pass, delete"): a row planted far ahead of a chain's head
is sent, which moves the forwarder's cursor there; the row is deleted, the
writer goes on appending after the real head, at seqs the cursor has passed.
The forwarder remembers the hash of the last record it sent and checks it at
the start of each pass; these tests run the attack, and its variants, with a
real SQLite outbox, the real Forwarder and a real ``otel-audit serve``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sqlite3
import time

import pytest

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.proof.chain import link_hash
from otel_audit.transport.forward import Forwarder

from .test_forward import _fill, _free_port, _received
from .test_serve import _deadline_wait


@pytest.fixture
def db(tmp_path):
    return tmp_path / "outbox.db"


@pytest.fixture
def outbox(db):
    return f"sqlite:///{db}"


@pytest.fixture
def server(make_server, tmp_path):
    """The receiver: a real ``otel-audit serve`` on loopback, with its own ledger."""
    return make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")


def _record(n: int, action: str = "order.update") -> bytes:
    """A well-formed record body with span ids no ``_fill`` record uses."""
    return encode(
        Record(
            trace_id=f"{0xF000 + n:032x}",
            span_id=f"{0xF000 + n:016x}",
            parent_span_id=None,
            name=action,
            kind="SERVER",
            service="shop",
            start=1_700_000_000_000_000_000,
            end=1_700_000_000_000_000_100,
            attributes={v.EVENT: True, v.ACTION: action, v.ACTOR_ID: "mallory"},
            scope="shop.orders",
        )
    )


def _plant(db: pathlib.Path, seq: int, body: bytes) -> None:
    """The insider's row at ``seq`` of chain "shop", written with sqlite3 directly.

    A careful insider: it links onto the row below when there is one, and its
    hash is that of its bytes, so only what these tests are about can tell.
    """
    with sqlite3.connect(db) as con:
        below = con.execute(
            "SELECT hash FROM records WHERE chain = 'shop' AND seq = ?", (seq - 1,)
        ).fetchone()
        prev = below[0] if below else b"\0" * 32
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)",
            ("shop", seq, prev, link_hash(prev, body), body),
        )
    con.close()


def _delete(db: pathlib.Path, seq: int) -> None:
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM records WHERE chain = 'shop' AND seq = ?", (seq,))
    con.close()


def _seqs(db: pathlib.Path) -> list[int]:
    with sqlite3.connect(db) as con:
        seqs = [
            s for (s,) in con.execute("SELECT seq FROM records WHERE chain = 'shop' ORDER BY seq")
        ]
    con.close()
    return seqs


def _cursor(forwarder: Forwarder) -> dict:
    (entry,) = json.loads(pathlib.Path(forwarder.state_path).read_text()).values()
    return entry


def _forwarder(outbox: str, server, **options) -> Forwarder:
    """A forwarder that makes a pass only when a test asks (start, ``flush``), not on a timer."""
    host, port = server.http_address
    return Forwarder(outbox, f"http://{host}:{port}", poll_interval=30, **options).start()


def _errors(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "otel_audit.transport.forward" and r.levelno >= logging.ERROR
    ]


def test_a_row_planted_ahead_sent_then_deleted_hides_no_later_record(server, db, outbox, caplog):
    real = _fill(outbox, 10)
    forwarder = _forwarder(outbox, server)
    try:
        assert forwarder.flush(30)
        planted = _record(1)
        _plant(db, 1000, planted)  # the insider: far ahead of the head (10)
        assert forwarder.flush(30)
        assert _cursor(forwarder)["chains"] == {"shop": 1000}  # the pass took it
        _delete(db, 1000)  # ... and the insider removes it again
        real += _fill(outbox, 5, start=10)  # the writer appends after the real head
        assert _seqs(db) == list(range(1, 16))
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    received = _received(server)
    assert sorted(received) == sorted(real + [planted])  # every record, each once
    assert forwarder.stats().rewinds == 1
    assert forwarder.stats().failures == 0
    (error,) = _errors(caplog)
    assert error.startswith(
        "otel-audit forward: chain 'shop': the record at the forward cursor"
        " (seq 1000, the last one sent) is gone: the outbox was edited outside the writer"
    )
    assert "no record written below seq 1000 is skipped" in error
    with open_ledger(outbox, create=False) as ledger:
        head = ledger.head("shop")
    assert _cursor(forwarder)["chains"] == {"shop": 15}
    assert _cursor(forwarder)["hashes"] == {"shop": head.hash.hex()}


def test_records_written_past_the_vanished_row_are_caught_by_its_hash(server, db, outbox, caplog):
    """The writer refilled past the planted seq before the next pass: the row there is real now.

    The forwarder is stopped while the insider and the writer act (a sidecar
    run with ``--once``, or one restarted), so its next pass sees both.
    """
    real = _fill(outbox, 10)
    first = _forwarder(outbox, server)
    try:
        assert first.flush(30)
        planted = _record(1)
        _plant(db, 30, planted)
        assert first.flush(30)
    finally:
        first.stop()
    _delete(db, 30)
    real += _fill(outbox, 25, start=10)  # seqs 11..35: 30 is one of the writer's
    assert _seqs(db) == list(range(1, 36))
    second = _forwarder(outbox, server)
    try:
        assert second.flush(30)
    finally:
        second.stop()
    assert sorted(_received(server)) == sorted(real + [planted])
    assert (first.stats().rewinds, second.stats().rewinds) == (0, 1)
    (error,) = _errors(caplog)
    assert "(seq 30, the last one sent) was changed (hash now " in error


def test_a_record_rewritten_in_place_at_the_cursor_is_detected_and_counted(
    server, db, outbox, caplog
):
    real = _fill(outbox, 10)
    forwarder = _forwarder(outbox, server)
    try:
        assert forwarder.flush(30)
        # The insider rewrites the last record sent, body and hash, same span ids.
        forged = real[-1].replace(b'"alice"', b'"mallory"')
        assert forged != real[-1]
        with sqlite3.connect(db) as con:
            (prev,) = con.execute(
                "SELECT prev_hash FROM records WHERE chain = 'shop' AND seq = 10"
            ).fetchone()
            con.execute(
                "UPDATE records SET body = ?, hash = ? WHERE chain = 'shop' AND seq = 10",
                (forged, link_hash(prev, forged)),
            )
        con.close()
        assert forwarder.flush(30)
        assert forwarder.stats().rewinds == 1
        # It goes on sending, and the next passes find the cursor intact.
        real += _fill(outbox, 3, start=10)
        assert forwarder.flush(30)
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert forwarder.stats().rewinds == 1
    assert sorted(_received(server)) == sorted(real)  # the receiver kept what was sent first
    assert server.stats().duplicates == 10  # the chain was sent again from seq 1
    (error,) = _errors(caplog)
    assert "(seq 10, the last one sent) was changed" in error


def test_the_rewound_cursor_is_persisted_before_anything_is_resent(
    make_server, db, outbox, tmp_path, caplog
):
    port = _free_port()
    central = f"sqlite:///{tmp_path / 'central.db'}"
    server = make_server(ledger=central, http=("127.0.0.1", port), grpc_address=None)
    real = _fill(outbox, 10)
    first = _forwarder(outbox, server)
    try:
        assert first.flush(30)
        _plant(db, 1000, _record(1))
        assert first.flush(30)
    finally:
        first.stop()
    _delete(db, 1000)
    real += _fill(outbox, 5, start=10)
    server.stop()  # the receiver is down when the next pass finds the row gone
    second = Forwarder(
        outbox, f"http://127.0.0.1:{port}", poll_interval=30, max_backoff=0.1
    ).start()
    try:
        _deadline_wait(lambda: second.stats().failures >= 1, what="a send failing while down")
    finally:
        second.stop()
    assert second.stats().rewinds == 1
    assert _cursor(second)["chains"] == {"shop": 0}  # rewound on disk, nothing resent yet
    assert _cursor(second)["hashes"] == {}
    server = make_server(ledger=central, http=("127.0.0.1", port), grpc_address=None)
    third = _forwarder(outbox, server)
    try:
        assert third.flush(30)
    finally:
        third.stop()
    assert third.stats().rewinds == 0
    assert third.stats().forwarded == 15
    assert set(real) <= set(_received(server))
    assert len(_errors(caplog)) == 1


def test_an_old_cursor_file_without_hashes_is_read_and_checks_start_at_the_next_send(
    server, db, outbox, caplog
):
    real = _fill(outbox, 10)
    first = _forwarder(outbox, server)
    assert first.flush(30)
    first.stop()
    # The cursor file as a forwarder without hashes wrote it.
    state = json.loads(pathlib.Path(first.state_path).read_text())
    for entry in state.values():
        del entry["hashes"]
    pathlib.Path(first.state_path).write_text(json.dumps(state))
    second = _forwarder(outbox, server)
    try:
        assert second.flush(30)
        assert second.stats().forwarded == 0  # resumed at seq 10, nothing resent
        real += _fill(outbox, 5, start=10)
        assert second.flush(30)
        assert second.stats().forwarded == 5
        assert set(_cursor(second)["hashes"]) == {"shop"}  # recorded by that send
        _delete(db, 15)  # from now on the record at the cursor is checked
        assert second.flush(30)
    finally:
        second.stop()
    assert second.stats().rewinds == 1
    assert second.stats().forwarded == 5 + 14  # the rest of the chain, sent again
    assert sorted(_received(server)) == sorted(real)
    (error,) = _errors(caplog)
    assert "(seq 15, the last one sent) is gone" in error


def test_forwarding_without_tampering_never_rewinds(server, db, outbox, caplog):
    """Writes racing passes, small batches, two chains and a restart: no rewind, nothing twice."""
    host, port = server.http_address
    endpoint = f"http://{host}:{port}"
    written = []
    forwarders = []
    start = 0
    for _restart in range(2):
        forwarder = Forwarder(
            outbox, endpoint, batch_size=7, poll_interval=0.01, check_interval=0, check_slice=5
        ).start()
        forwarders.append(forwarder)
        try:
            for i in range(12):
                chain = ("shop", "billing")[i % 2]
                written += _fill(outbox, 1 + i % 5, chain=chain, start=start)
                start += 1 + i % 5
                forwarder.wake()
            assert forwarder.flush(30)
        finally:
            forwarder.stop()
    received = _received(server)
    assert sorted(received) == sorted(written)
    assert server.stats().duplicates == 0
    assert sum(f.stats().forwarded for f in forwarders) == len(written)
    assert [f.stats().rewinds for f in forwarders] == [0, 0]
    assert [f.stats().late for f in forwarders] == [0, 0]
    assert [f.stats().breaks for f in forwarders] == [0, 0]  # links walked again and again
    assert _cursor(forwarders[-1])["holes"] == {}
    assert _cursor(forwarders[-1])["breaks"] == {}
    assert _errors(caplog) == []


def test_a_planted_row_deleted_and_put_back_unchanged_hides_nothing(server, db, outbox, caplog):
    """The row at the cursor is back, same hash, when the forwarder looks again: the
    records the writer appended in the gap below it are found there and sent.

    The forwarder is stopped while the insider and the writer act (a sidecar
    run with ``--once``, or one restarted), so no pass falls between them.
    """
    real = _fill(outbox, 10)
    first = _forwarder(outbox, server)
    try:
        assert first.flush(30)
        planted = _record(1)
        _plant(db, 1000, planted)
        assert first.flush(30)
    finally:
        first.stop()
    assert _cursor(first)["holes"] == {"shop": [[11, 999]]}
    _delete(db, 1000)
    real += _fill(outbox, 5, start=10)  # 11..15, in the gap the cursor passed
    _plant(db, 1000, planted)  # back, byte for byte: the cursor check passes
    forwarder = _forwarder(outbox, server)
    try:
        assert forwarder.flush(30)
        real += _fill(outbox, 2, start=15)  # the writer links these onto it: 1001, 1002
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert _seqs(db)[-3:] == [1000, 1001, 1002]
    assert sorted(_received(server)) == sorted(real + [planted])  # every record, each once
    assert (first.stats().rewinds, forwarder.stats().rewinds) == (0, 0)
    assert forwarder.stats().late == 5
    assert _cursor(forwarder)["holes"] == {"shop": [[16, 999]]}
    (error,) = _errors(caplog)
    assert error.startswith(
        "otel-audit forward: chain 'shop': 5 record(s) appeared below the forward cursor,"
        " in gaps between seqs 11 and 15 that held no record when it passed them"
    )


def test_gaps_are_kept_across_restarts(server, db, outbox, caplog):
    """Many gaps, a forwarder restarted: a record written into one of them later is sent."""
    real = _fill(outbox, 3)
    planted = [_record(seq) for seq in range(10, 110, 2)]
    for seq, body in zip(range(10, 110, 2), planted):  # 50 one-seq gaps above 4..9
        _plant(db, seq, body)
    first = _forwarder(outbox, server)
    try:
        assert first.flush(30)
    finally:
        first.stop()
    gaps = _cursor(first)["holes"]["shop"]
    assert gaps[0] == [4, 9] and gaps[1:] == [[seq, seq] for seq in range(11, 109, 2)]
    with sqlite3.connect(db) as con:  # the insider fills one gap in the middle
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)",
            ("shop", 51, b"\0" * 32, b"\2" * 32, _record(51)),
        )
    con.close()
    second = _forwarder(outbox, server)
    try:
        assert second.flush(30)
        assert second.flush(30)  # nothing new: nothing sent again, nothing logged again
    finally:
        second.stop()
    assert (first.stats().late, second.stats().late) == (0, 1)
    assert sorted(_received(server)) == sorted(real + planted + [_record(51)])
    assert [51, 51] not in _cursor(second)["holes"]["shop"]
    assert len(_errors(caplog)) == 1


def test_a_row_planted_at_a_fractional_seq_beside_the_cursor_is_not_a_rewind(
    server, db, outbox, caplog
):
    real = _fill(outbox, 10)
    forwarder = _forwarder(outbox, server)
    try:
        assert forwarder.flush(30)
        with sqlite3.connect(db) as con:  # a REAL seq sorts between 9 and 10
            con.execute(
                "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)",
                ("shop", 9.5, b"\0" * 32, b"\1" * 32, _record(3)),
            )
        con.close()
        real += _fill(outbox, 2, start=10)
        assert forwarder.flush(30)
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert forwarder.stats().rewinds == 0
    assert sorted(_received(server)) == sorted(real)
    assert server.stats().duplicates == 0


def test_forward_once_says_when_it_resent_a_chain(server, db, outbox, capsys):
    """The sidecar command run from cron: its summary names the rewind, not only the log."""
    from otel_audit.cli import main

    host, port = server.http_address
    args = ["forward", "--ledger", outbox, "--endpoint", f"http://{host}:{port}", "--once"]
    real = _fill(outbox, 10)
    assert main(args) == 0
    assert capsys.readouterr().out == "otel-audit forward: 10 records sent\n"
    planted = _record(1)
    _plant(db, 1000, planted)
    assert main(args) == 0
    capsys.readouterr()
    _delete(db, 1000)
    real += _fill(outbox, 5, start=10)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("otel-audit forward: 15 records sent; 1 chain(s) resent from the start")
    assert "found, and sent, in gaps" not in out  # a rewind drops the gaps
    assert "the record at the cursor was deleted or changed" in out
    assert sorted(_received(server)) == sorted(real + [planted])


def _rows(db: pathlib.Path, low: int, high: int) -> list[tuple]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT chain, seq, prev_hash, hash, body FROM records"
            " WHERE chain = 'shop' AND seq BETWEEN ? AND ? ORDER BY seq",
            (low, high),
        ).fetchall()
    con.close()
    return rows


def _put_back(db: pathlib.Path, rows: list[tuple]) -> None:
    with sqlite3.connect(db) as con:
        con.executemany(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)", rows
        )
    con.close()


def _replace_newest(db: pathlib.Path, outbox: str, total: int) -> list[bytes]:
    """Review D1: the newest three records, already sent, are deleted; a restarted
    writer appends two new ones at their seqs; the old last row is put back above
    them, byte for byte. The record at the cursor is the one sent, no gap was
    made: only the link from the new records to the old row breaks."""
    old = _rows(db, total - 2, total)
    for seq in range(total - 2, total + 1):
        _delete(db, seq)
    new = _fill(outbox, 2, start=10_000)  # a fresh ledger connection: seqs total-2, total-1
    _put_back(db, old[2:])
    assert _seqs(db) == list(range(1, total + 1))
    return new


def test_sent_records_replaced_under_an_unchanged_cursor_are_sent(server, db, outbox, caplog):
    real = _fill(outbox, 10)
    first = _forwarder(outbox, server, check_interval=0)
    try:
        assert first.flush(30)
    finally:
        first.stop()
    new = _replace_newest(db, outbox, 10)
    forwarder = _forwarder(outbox, server, check_interval=0)
    try:
        assert forwarder.flush(30)
        assert forwarder.flush(30)  # the break stays in the outbox: reported once
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert sorted(_received(server)) == sorted(real + new)  # the new records too, each once
    assert server.stats().duplicates == 8  # the chain was sent again from its start
    assert (forwarder.stats().breaks, forwarder.stats().rewinds) == (1, 0)
    (place,) = _cursor(forwarder)["breaks"]["shop"]  # remembered: reported once
    assert place.startswith("10:") and f":{_rows(db, 10, 10)[0][2].hex()}:" in place
    assert _errors(caplog) == [
        "otel-audit forward: chain 'shop': seq 10: it does not link to the record before it:"
        " records already sent were replaced or removed outside the writer (run otel-audit"
        " verify)",
        "otel-audit forward: chain 'shop': sending it again from its first record, so that"
        " the records which replaced those already sent reach the receiver",
    ]


def test_the_link_walk_goes_a_slice_per_pass_and_resumes_after_a_restart(
    server, db, outbox, caplog
):
    """A long outbox is walked a slice at a time (the pass stays short), and the
    walk goes on from where a stopped forwarder left it (kept in the cursor file)."""
    real = _fill(outbox, 1000)
    first = _forwarder(outbox, server, check_interval=3600, check_slice=300)
    try:
        assert first.flush(30)
    finally:
        first.stop()
    walked = _cursor(first)["sweeps"]["shop"][0]
    assert walked in (300, 600, 900)  # one slice per pass, not the whole chain at once
    new = _replace_newest(db, outbox, 1000)
    forwarder = _forwarder(outbox, server, check_interval=3600, check_slice=300)
    try:
        for _ in range(5):
            assert forwarder.flush(30)
            if forwarder.stats().breaks:
                break
    finally:
        forwarder.stop()
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + new)
    assert len(_errors(caplog)) == 2  # the place, and the resend


def test_forward_once_says_when_sent_records_were_replaced(server, db, outbox, capsys):
    from otel_audit.cli import main

    host, port = server.http_address
    args = ["forward", "--ledger", outbox, "--endpoint", f"http://{host}:{port}", "--once"]
    real = _fill(outbox, 10)
    assert main(args) == 0
    capsys.readouterr()
    new = _replace_newest(db, outbox, 10)
    # The links are walked again check_interval (10 minutes) after the last walk began.
    state = pathlib.Path(f"{db}.forward.json")
    data = json.loads(state.read_text())
    for entry in data.values():
        for walk in entry["sweeps"].values():
            walk[3] -= 601  # when the walk began
    state.write_text(json.dumps(data))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "records already sent were replaced or removed at 1 place(s)" in out
    assert sorted(_received(server)) == sorted(real + new)


def _forward_until_quiet(outbox: str, server, **options) -> Forwarder:
    forwarder = _forwarder(outbox, server, check_interval=0, **options)
    try:
        for _ in range(4):
            assert forwarder.flush(30)
    finally:
        forwarder.stop()
    return forwarder


def test_the_same_replacement_made_twice_is_caught_twice(server, db, outbox):
    """The second time the old row 10 goes back above other new records: the
    place looks the same (seq 10, its prev_hash) but the record before it is new."""
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    old = _rows(db, 10, 10)
    new = _replace_newest(db, outbox, 10)
    _forward_until_quiet(outbox, server)
    for seq in (8, 9, 10):
        _delete(db, seq)
    again = _fill(outbox, 2, start=20_000)
    _put_back(db, old)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + new + again)


def test_a_record_removed_below_the_cursor_is_caught(server, db, outbox, caplog):
    """Delete 8..10, a restarted writer appends one record (8), the old 10 goes
    back: 9 is now a gap the forwarder never saw, and the new 8 must be sent."""
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    old = _rows(db, 10, 10)
    for seq in (8, 9, 10):
        _delete(db, seq)
    new = _fill(outbox, 1, start=30_000)
    _put_back(db, old)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + new)
    assert "seq 10: seqs 9 to 9 were removed" in _errors(caplog)[0]


def test_a_put_back_row_relinked_onto_the_new_records_is_caught_by_its_hash(
    server, db, outbox, caplog
):
    """The old row 10 goes back with its prev_hash set to the new 9's hash (its
    stored hash kept, so the cursor check passes): every stored link matches,
    only the hash of its bytes does not."""
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    new = _replace_newest(db, outbox, 10)
    with sqlite3.connect(db) as con:
        con.execute(
            "UPDATE records SET prev_hash = (SELECT hash FROM records WHERE chain = 'shop'"
            " AND seq = 9) WHERE chain = 'shop' AND seq = 10"
        )
    con.close()
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + new)
    assert "seq 10: its hash does not match its bytes" in _errors(caplog)[0]


def test_many_broken_links_send_the_chain_again_at_most_twice_a_walk(server, db, outbox, caplog):
    """One UPDATE breaking every 100th link must not resend the chain once per link."""
    real = _fill(outbox, 2000)
    _forward_until_quiet(outbox, server)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE records SET prev_hash = randomblob(32) WHERE seq % 100 = 0")
    con.close()
    before = server.stats().duplicates
    forwarder = _forward_until_quiet(outbox, server)  # check_slice 1024: two slices a walk
    assert forwarder.stats().breaks == 20
    assert server.stats().duplicates - before <= 2 * 2000
    assert sorted(_received(server)) == sorted(real)
    assert len(_errors(caplog)) <= 2 * 5 + 2 + 2  # at most 5 places logged a slice, summed up


def test_records_replaced_below_a_gap_are_caught_by_the_record_below_it(server, db, outbox, caplog):
    """A row planted ahead (hashing right) is sent: a gap 11..999 the forwarder
    knows. Then 8..10 and the planted row are deleted, a restarted writer
    appends three new records at 8..10, and the planted row goes back. Every
    link and hash holds and the gap is known; only the record below the gap
    is not the one that was there."""
    real = _fill(outbox, 10)
    planted = _record(7)
    _forward_until_quiet(outbox, server)
    _plant(db, 1000, planted)
    _forward_until_quiet(outbox, server)
    old = [r for r in _rows(db, 1000, 1000)]
    for seq in (8, 9, 10, 1000):
        _delete(db, seq)
    new = _fill(outbox, 3, start=40_000)
    _put_back(db, old)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + [planted] + new)
    assert "the record below the gap at seq 11 was replaced" in _errors(caplog)[0]


def test_a_place_reported_before_is_not_a_cover_for_a_new_record(server, db, outbox, caplog):
    """A decoy edit of seq 5's prev_hash is reported; then 5..10 are deleted, a
    restarted writer appends a new 5, whose stored prev_hash and hash the
    insider sets to the decoy's, and the old 6..10 go back. Its bytes differ,
    so it is a new place."""
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    decoy = b"\x07" * 32
    with sqlite3.connect(db) as con:
        con.execute("UPDATE records SET prev_hash = ? WHERE chain = 'shop' AND seq = 5", (decoy,))
    con.close()
    _forward_until_quiet(outbox, server)
    old = _rows(db, 5, 10)
    for seq in range(5, 11):
        _delete(db, seq)
    new = _fill(outbox, 1, start=50_000)
    with sqlite3.connect(db) as con:
        con.execute(
            "UPDATE records SET prev_hash = ?, hash = ? WHERE chain = 'shop' AND seq = 5",
            (decoy, old[0][3]),
        )
    con.close()
    _put_back(db, old[1:])
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks >= 1
    assert set(new) <= set(_received(server))
    assert set(real) <= set(_received(server))


def test_a_long_chain_does_not_keep_the_others_from_being_walked(server, db, outbox, caplog):
    """Chains are walked in turn from one budget: a chain sorted first and long
    enough to restart its walk every pass must not starve the one after it."""
    _fill(outbox, 500, chain="a")
    real = _fill(outbox, 10, start=1_000)
    host, port = server.http_address
    options = {"poll_interval": 0.05, "check_interval": 0.3, "check_slice": 5}
    first = Forwarder(outbox, f"http://{host}:{port}", **options).start()
    try:
        assert first.flush(30)
    finally:
        first.stop()
    new = _replace_newest(db, outbox, 10)
    forwarder = Forwarder(outbox, f"http://{host}:{port}", **options).start()
    try:
        deadline = time.monotonic() + 20
        while not forwarder.stats().breaks and time.monotonic() < deadline:
            time.sleep(0.1)
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert forwarder.stats().breaks == 1
    assert set(real + new) <= set(_received(server))


def test_hundreds_of_damaged_places_do_not_resend_the_chain_for_ever(server, db, outbox, caplog):
    real = _fill(outbox, 3000)
    _forward_until_quiet(outbox, server)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE records SET prev_hash = randomblob(32) WHERE seq % 10 = 0")
    con.close()
    before = server.stats().duplicates
    state = pathlib.Path(f"{db}.forward.json")  # a new walk at once (as 10 minutes later)
    data = json.loads(state.read_text())
    for entry in data.values():
        entry["sweeps"] = {}
    state.write_text(json.dumps(data))
    forwarder = _forwarder(outbox, server, check_interval=600)
    try:
        for _ in range(8):
            assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert forwarder.stats().breaks == 300  # each place once
    assert server.stats().duplicates - before <= 3000  # one resend: the next waits 10 minutes
    assert sorted(_received(server)) == sorted(real)


def test_a_row_with_a_chain_id_that_is_not_text_does_not_stop_the_walk(server, db, outbox, caplog):
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    with sqlite3.connect(db) as con:
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) SELECT ?, seq, prev_hash,"
            " hash, body FROM records WHERE chain = 'shop' AND seq = 1",
            (b"zz",),
        )
    con.close()
    new = _replace_newest(db, outbox, 10)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert forwarder.stats().failures == 0
    assert sorted(_received(server)) == sorted(real + new)
    assert any("chain id is not text" in e for e in _errors(caplog))


def test_places_over_the_remembered_number_still_count(server, db, outbox):
    """The oldest places are forgotten, not the new ones: with the list full, an
    edit made afterwards is still caught."""
    real = _fill(outbox, 60)
    host, port = server.http_address
    forwarder = Forwarder(
        outbox, f"http://{host}:{port}", poll_interval=30, check_interval=0
    ).start()
    try:
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    from otel_audit.transport import forward

    keep = forward._KEEP_BREAKS
    forward._KEEP_BREAKS = 20  # a full list with few records
    try:
        with sqlite3.connect(db) as con:
            con.execute("UPDATE records SET prev_hash = randomblob(32) WHERE seq <= 40")
        con.close()
        # 40 places, 20 remembered: with no pause between walks (check_interval
        # 0) the forgotten ones are found again and again, so no pass is idle.
        busy = Forwarder(outbox, f"http://{host}:{port}", poll_interval=0.05, check_interval=0)
        busy.start()
        time.sleep(2)
        busy.stop()
        assert busy.stats().breaks >= 40
        with sqlite3.connect(db) as con:  # the insider puts the links right again...
            for seq in range(2, 41):
                con.execute(
                    "UPDATE records SET prev_hash = (SELECT hash FROM records WHERE chain ="
                    " 'shop' AND seq = ?) WHERE chain = 'shop' AND seq = ?",
                    (seq - 1, seq),
                )
            con.execute("UPDATE records SET prev_hash = ? WHERE seq = 1", (b"\0" * 32,))
        con.close()
        new = _replace_newest(db, outbox, 60)  # ...and makes the edit that matters
        forwarder = _forward_until_quiet(outbox, server)
    finally:
        forward._KEEP_BREAKS = keep
    assert forwarder.stats().breaks >= 1
    assert set(real + new) <= set(_received(server))


def test_a_record_sent_before_that_no_longer_decodes_does_not_hold_the_chain(
    server, db, outbox, caplog
):
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE records SET body = CAST('{}' AS BLOB) WHERE chain = 'shop' AND seq = 2")
    con.close()
    forwarder = _forward_until_quiet(outbox, server)
    more = _fill(outbox, 3, start=60_000)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().failures == 0
    assert set(real + more) <= set(_received(server))
    assert any("record 2, sent before, no longer decodes" in e for e in _errors(caplog))


def test_a_chain_deleted_whole_is_said_and_leaves_the_cursor_file(server, db, outbox, caplog):
    _fill(outbox, 5, chain="gone")
    _fill(outbox, 5, start=100)
    _forward_until_quiet(outbox, server)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM records WHERE chain = 'gone'")
    con.close()
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert "gone" not in _cursor(forwarder)["chains"]
    assert any("chain 'gone' is gone from the outbox, 5 record(s) of it sent" in e
               for e in _errors(caplog))  # fmt: skip


def test_a_clock_set_back_does_not_stop_the_walks(server, db, outbox, caplog):
    """A walk that began while the clock was a year ahead: once the clock is
    right again, walks go on (they do not wait a year)."""
    real = _fill(outbox, 10)
    _forward_until_quiet(outbox, server)
    state = pathlib.Path(f"{db}.forward.json")
    data = json.loads(state.read_text())
    for entry in data.values():
        for walk in entry["sweeps"].values():
            walk[3] += 365 * 24 * 3600  # began "in a year"
    state.write_text(json.dumps(data))
    new = _replace_newest(db, outbox, 10)
    forwarder = _forward_until_quiet(outbox, server)
    assert forwarder.stats().breaks == 1
    assert sorted(_received(server)) == sorted(real + new)
