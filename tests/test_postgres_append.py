"""The PostgreSQL ledger's append after a remembered head, attacked on a real server.

A ledger that appended to a chain appends its next batch after the head it
remembers, without the chain lock: one autocommit COPY. The schema's
statement trigger (schema version 2) refuses any insert below a row already
there and any insert with a hole in it. These are the
insider's scripts against that shortcut (the table owner, or anyone with the
writer's credentials): a row planted far ahead of the head, which would leave
the writer appending below it where a forwarder that passed it never looks;
a trigger that silently skips some rows, which must never be acknowledged;
and another writer appending in between. The same attacks on SQLite are in
``test_sqlite_append.py``.
"""

from __future__ import annotations

import psycopg
import pytest

from otel_audit.engine.ledger.postgres import SCHEMA, PostgresLedger
from otel_audit.errors import LedgerWriteError, VerificationError
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.proof.verify import verify_ledger

from .test_ledger_backends import rec


def _sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as con:
        for statement in statements:
            con.execute(statement)  # type: ignore[arg-type]


def _plant(url: str, seq: int) -> None:
    """The insider's row at ``seq`` of chain "shop", with a made-up hash."""
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(
            f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
            " VALUES ('shop', %s, %s, %s, %s)",
            (seq, b"\0" * 32, b"\1" * 32, rec(seq)),
        )


def _seqs(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as con:
        rows = con.execute(
            f"SELECT seq FROM {SCHEMA}.records WHERE chain = 'shop' ORDER BY seq"
        ).fetchall()
    return [int(seq) for (seq,) in rows]


def test_a_row_planted_far_ahead_is_linked_onto_not_written_below(pg_url: str) -> None:
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1), rec(2), rec(3)])  # the head it remembers: 3
        _plant(pg_url, 1000)
        appended = ledger.append("shop", [rec(4), rec(5)])
        # Not at 4 and 5, below the planted row, where a forwarder whose cursor
        # already passed 1000 would never look: after it, as the locked path does.
        assert [a.seq for a in appended] == [1001, 1002]
        more = ledger.append("shop", [rec(6)])
        assert [a.seq for a in more] == [1003]
    assert _seqs(pg_url) == [1, 2, 3, 1000, 1001, 1002, 1003]
    with PostgresLedger(pg_url, readonly=True) as ro, pytest.raises(VerificationError):
        verify_ledger(ro)  # the planted row breaks the chain where it stands


def test_a_row_planted_at_the_next_position_is_linked_onto_not_overwritten(pg_url: str) -> None:
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1)])
        _plant(pg_url, 2)
        appended = ledger.append("shop", [rec(2), rec(3)])
    assert [a.seq for a in appended] == [3, 4]
    with psycopg.connect(pg_url, autocommit=True) as con:
        (planted,) = con.execute(
            f"SELECT hash FROM {SCHEMA}.records WHERE chain = 'shop' AND seq = 2"
        ).fetchone()
        (prev,) = con.execute(
            f"SELECT prev_hash FROM {SCHEMA}.records WHERE chain = 'shop' AND seq = 3"
        ).fetchone()
    assert bytes(planted) == b"\1" * 32 and bytes(prev) == b"\1" * 32
    with PostgresLedger(pg_url, readonly=True) as ro, pytest.raises(VerificationError):
        verify_ledger(ro)


@pytest.mark.parametrize("batch", [3, 40])
def test_records_a_planted_trigger_skips_are_never_acknowledged(pg_url: str, batch: int) -> None:
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1), rec(2)])
        _sql(
            pg_url,
            f"""CREATE FUNCTION {SCHEMA}.skip_even() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.seq % 2 = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$""",
            f"CREATE TRIGGER skip BEFORE INSERT ON {SCHEMA}.records"
            f" FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.skip_even()",
        )
        bodies = [rec(i) for i in range(3, 3 + batch)]
        # The remembered head's COPY, then the locked path's: the schema's
        # statement trigger sees the hole the planted one left and refuses
        # each whole, so a retry cannot store a record twice.
        for _ in range(2):
            with pytest.raises(LedgerWriteError, match="records of this append are missing"):
                ledger.append("shop", bodies)
    assert _seqs(pg_url) == [1, 2]
    with PostgresLedger(pg_url, readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.kind == "schema" and "skip" in str(err.value)


def test_two_ledgers_taking_turns_on_one_chain_never_fork_it(pg_url: str) -> None:
    first, second = PostgresLedger(pg_url), PostgresLedger(pg_url)
    expected = []
    try:
        for turn in range(6):
            ledger = first if turn % 2 == 0 else second
            bodies = [rec(100 * turn + i) for i in range(3)]
            expected += bodies
            ledger.append("shop", bodies)
            ledger.append("shop", [rec(100 * turn + 50)])  # after its own remembered head
            expected.append(rec(100 * turn + 50))
    finally:
        first.close()
        second.close()
    with PostgresLedger(pg_url, readonly=True) as ro:
        rows = list(ro.scan("shop"))
        assert [r.seq for r in rows] == list(range(1, len(expected) + 1))
        prev = GENESIS
        for row in rows:
            assert row.prev_hash == prev and row.hash == link_hash(prev, row.body)
            prev = row.hash
        assert [r.body for r in rows] == expected
        assert verify_ledger(ro).records == len(expected)


def test_bodies_arrive_byte_exact_after_the_remembered_head(pg_url: str) -> None:
    """Every byte value, empty-ish and large bodies: stored as sent, hashes agree."""
    bodies = [rec(1), bytes(range(256)) * 3, b"{}", rec(2) * 200]
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", bodies[:1])
        ledger.append("shop", bodies[1:])  # after the remembered head
        stored = [r.body for r in ledger.scan("shop")]
    assert stored == bodies


def test_a_planted_trigger_skipping_the_last_row_is_never_acknowledged(pg_url: str) -> None:
    """No hole for the statement trigger to see: the stored count is checked instead."""
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1)])
        _sql(
            pg_url,
            f"""CREATE FUNCTION {SCHEMA}.skip_four() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.seq = 4 THEN RETURN NULL; END IF; RETURN NEW; END $$""",
            f"CREATE TRIGGER skip BEFORE INSERT ON {SCHEMA}.records"
            f" FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.skip_four()",
        )
        with pytest.raises(LedgerWriteError, match=r"stored 2 of 3 records"):
            ledger.append("shop", [rec(2), rec(3), rec(4)])
    with PostgresLedger(pg_url, readonly=True) as ro, pytest.raises(VerificationError) as err:
        verify_ledger(ro)
    assert err.value.kind == "schema" and "skip" in str(err.value)


def test_the_guard_is_part_of_the_schema_verify_checks(pg_url: str) -> None:
    """The insider who drops or disables the statement trigger to plant rows ahead is named."""
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1), rec(2)])
        assert ledger.schema_problems() == []
    _sql(pg_url, f"ALTER TABLE {SCHEMA}.records DISABLE TRIGGER records_append_at_head")
    with PostgresLedger(pg_url, readonly=True) as ro:
        assert any("records_append_at_head" in p and "differs" in p for p in ro.schema_problems())
    _sql(pg_url, f"DROP TRIGGER records_append_at_head ON {SCHEMA}.records")
    with PostgresLedger(pg_url, readonly=True) as ro:
        assert "trigger records_append_at_head on records is missing" in ro.schema_problems()
        with pytest.raises(VerificationError, match="records_append_at_head"):
            verify_ledger(ro)


def test_a_version_1_ledger_is_migrated_by_a_writer_and_then_guarded(pg_url: str) -> None:
    from otel_audit.engine.ledger.postgres import _MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as con:  # what otel-audit 1 created
        for statement in _MIGRATIONS[0]:
            con.execute(statement)  # type: ignore[arg-type]
        con.execute(f"UPDATE {SCHEMA}.meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(Exception, match="schema version 1, expected 2"):
        PostgresLedger(pg_url, readonly=True)  # a reviewer cannot migrate: told to run init
    with PostgresLedger(pg_url) as ledger:  # a writer that may, does
        ledger.append("shop", [rec(1)])
        assert ledger.schema_problems() == []
        _plant(pg_url, 1000)
        assert [a.seq for a in ledger.append("shop", [rec(2)])] == [1001]


def _writer_role(pg_url: str, tag: str) -> str:
    """A login role with exactly the writer's grants (``init --writer-role``); its URL."""
    from otel_audit.engine.ledger.postgres import initialize

    role = f"{tag}_{pg_url.rsplit('/', 1)[1]}"
    _sql(pg_url, f"CREATE ROLE {role} LOGIN")
    PostgresLedger(pg_url).close()  # the schema, as the owner
    initialize(pg_url, writer_roles=[role])
    return pg_url.replace("postgresql://postgres@", f"postgresql://{role}@")


def test_the_writer_role_cannot_loosen_its_own_sessions(pg_url: str) -> None:
    """A role may set its own defaults for every later session of the real writer:
    an isolation whose snapshot predates a planted row, and a search path that puts
    a look-alike ``>`` before pg_catalog's. Neither reaches the guard."""
    writer = _writer_role(pg_url, "w_loose")
    role = writer.split("//", 1)[1].split("@", 1)[0]
    _sql(pg_url, f"GRANT CREATE ON SCHEMA public TO {role}")  # PostgreSQL <= 14 granted it to all
    _sql(
        writer,
        "CREATE FUNCTION public.never(bigint, bigint) RETURNS boolean"
        " LANGUAGE sql IMMUTABLE AS 'SELECT false'",
        "CREATE OPERATOR public.> (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.never)",
        f"ALTER ROLE {role} SET search_path = public, pg_catalog",
        f"ALTER ROLE {role} SET default_transaction_isolation = 'repeatable read'",
    )
    with PostgresLedger(writer) as ledger:  # the service (re)connects with those defaults
        ledger.append("shop", [rec(1), rec(2), rec(3)])
        # The insider's own session keeps them: its insert is refused outright.
        with pytest.raises(psycopg.errors.RaiseException, match="read committed isolation only"):
            _sql(
                writer,
                f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
                " VALUES ('shop', 1000, '\\x00', '\\x01', '{}')",
            )
        _plant(pg_url, 1000)  # planted anyway, as the owner
        appended = ledger.append("shop", [rec(4), rec(5)])  # after its remembered head, 3
        assert [a.seq for a in appended] == [1001, 1002]  # linked onto it, never below it
        assert ledger.schema_problems() == []


def test_a_child_table_that_forks_a_chain_is_named(pg_url: str) -> None:
    """The owner adds a table inheriting from records, in another schema, with a row at
    a seq the chain already has: no primary key of ours covers it."""
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1), rec(2)])
    _sql(
        pg_url,
        "CREATE SCHEMA shadow",
        f"CREATE TABLE shadow.extra () INHERITS ({SCHEMA}.records)",
        f"INSERT INTO shadow.extra (chain, seq, prev_hash, hash, body)"
        f" SELECT chain, seq, prev_hash, hash, body FROM {SCHEMA}.records WHERE seq = 2",
    )
    with PostgresLedger(pg_url, readonly=True) as ro:
        problems = ro.schema_problems()
        assert f"table shadow.extra inherits from {SCHEMA}.records" in " ".join(problems)
        with pytest.raises(VerificationError, match="shadow.extra"):
            verify_ledger(ro)


def test_a_row_planted_at_the_end_of_the_range_fails_appends_with_one_line(pg_url: str) -> None:
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(1)])
        _plant(pg_url, 2**63 - 1)
        for _ in range(2):  # after the remembered head, then under the lock
            with pytest.raises(LedgerWriteError, match=r"is at seq 9223372036854775807: no room"):
                ledger.append("shop", [rec(2)])


def test_the_guard_takes_the_same_chain_lock_as_the_locked_path(pg_url: str) -> None:
    """The trigger's SQL key and ``_lock_key`` must name one lock, or the guard would not
    wait for a writer reading the head under it."""
    from otel_audit.engine.ledger.postgres import _function_source, _lock_key

    source = _function_source("append_at_head")
    expression = source.split("pg_advisory_xact_lock(", 1)[1].split(");", 1)[0]
    with psycopg.connect(pg_url, autocommit=True) as con:
        for chain in ("shop", "svc/host/123", "ünï €", "", "a'b\\c"):
            (key,) = con.execute(
                f"SELECT {expression.replace('c,', '%s::text,')}", (chain,)
            ).fetchone()
            assert key == _lock_key(chain), chain
