"""Forgery of a PostgreSQL ledger's schema and sequence (issue 11), on a real server.

The attacker is the table owner (or a superuser) who cannot recompute
signatures but can change DDL: replace the function behind the query
columns so search shows another actor, drop the ``seq > 0`` CHECK and plant
a record at seq 0 where no chain walk reads it, hide rows with row-level
security, add a trigger. Each is the attacker's script; verify and the
review commands must name the damage.
"""

from __future__ import annotations

import psycopg
import pytest

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger.postgres import SCHEMA, PostgresLedger
from otel_audit.errors import VerificationError
from otel_audit.proof.verify import verify_ledger

from .test_ledger_backends import rec


@pytest.fixture
def ledger_url(pg_url):
    with PostgresLedger(pg_url) as ledger:
        ledger.append("shop", [rec(i, **{v.ACTOR_ID: "alice"}) for i in range(1, 6)])
        assert ledger.schema_problems() == []
        assert verify_ledger(ledger).records == 5
    return pg_url


def attack(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as con:
        for statement in statements:
            con.execute(statement)  # type: ignore[arg-type]


def verify_fails(url: str, capsys, *expected: str) -> str:
    with PostgresLedger(url, readonly=True) as ledger, pytest.raises(VerificationError) as err:
        verify_ledger(ledger)
    message = str(err.value)
    for text in expected:
        assert text in message
    capsys.readouterr()
    assert main(["verify", "--ledger", url]) == 1
    out, errout = capsys.readouterr()
    assert "altered" in errout or "inserted" in errout, (out, errout)
    return message


def test_replaced_query_function_is_schema_damage(ledger_url, capsys):
    # Search by actor would now show every record as mallory's: nothing hashed changed.
    attack(
        ledger_url,
        f"""CREATE OR REPLACE FUNCTION {SCHEMA}.body_json(body bytea) RETURNS jsonb
            LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
            BEGIN
                RETURN jsonb_set(convert_from(body, 'UTF8')::jsonb,
                                 '{{attributes,{v.ACTOR_ID}}}', '"mallory"');
            END $$""",
    )
    message = verify_fails(ledger_url, capsys, "schema was altered", "function body_json")
    assert "replaced" in message
    # The review commands refuse to show what the hashes never covered.
    assert main(["search", "--ledger", ledger_url, "--actor", "alice"]) == 1


def test_dropped_check_and_a_record_at_seq_0(ledger_url, capsys):
    attack(
        ledger_url,
        f"ALTER TABLE {SCHEMA}.records DROP CONSTRAINT records_seq_check",
        # The guard refuses rows below the head: the owner disables it first.
        f"ALTER TABLE {SCHEMA}.records DISABLE TRIGGER records_append_at_head",
        f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
        f" SELECT chain, 0, prev_hash, hash, body FROM {SCHEMA}.records"
        " WHERE chain = 'shop' AND seq = 2",
    )
    verify_fails(ledger_url, capsys, "records_seq_check", "missing")
    with PostgresLedger(ledger_url, readonly=True) as ledger:
        # The planted row is read back as one no chain walk accounts for.
        assert ledger.stray_rows() == [("shop", 0, "seq 0 is outside every sequence")]
        assert [r.seq for r in ledger.scan("shop")] == [1, 2, 3, 4, 5]
    # Put a CHECK back that does not cover the old row: still not the schema we create.
    attack(
        ledger_url,
        f"ALTER TABLE {SCHEMA}.records ADD CONSTRAINT records_seq_check CHECK (seq > 0) NOT VALID",
    )
    verify_fails(ledger_url, capsys, "records_seq_check", "NOT VALID")


def test_negative_seq_is_an_unaccounted_row_for_verify(ledger_url, capsys):
    attack(
        ledger_url,
        f"ALTER TABLE {SCHEMA}.records DROP CONSTRAINT records_seq_check",
        # The guard refuses rows below the head: the owner disables it first.
        f"ALTER TABLE {SCHEMA}.records DISABLE TRIGGER records_append_at_head",
        f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
        f" SELECT chain, -7, prev_hash, hash, body FROM {SCHEMA}.records WHERE seq = 3",
    )
    verify_fails(ledger_url, capsys, "records_seq_check")
    with PostgresLedger(ledger_url, readonly=True) as ledger:
        assert ledger.stray_rows() == [("shop", -7, "seq -7 is outside every sequence")]
        assert ledger.count() == 6


@pytest.mark.parametrize(
    "statements, expected",
    [
        (
            [
                f"ALTER TABLE {SCHEMA}.records ENABLE ROW LEVEL SECURITY",
                f"ALTER TABLE {SCHEMA}.records FORCE ROW LEVEL SECURITY",
                f"CREATE POLICY hide ON {SCHEMA}.records USING (seq <> 3)",
            ],
            "row-level security",
        ),
        (
            [
                f"CREATE FUNCTION {SCHEMA}.keep() RETURNS trigger LANGUAGE plpgsql"
                " AS $$ BEGIN RETURN NEW; END $$",
                f"CREATE TRIGGER quiet BEFORE INSERT ON {SCHEMA}.records"
                f" FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.keep()",
            ],
            "trigger quiet",
        ),
        (
            [
                f"ALTER TABLE {SCHEMA}.records ALTER COLUMN doc DROP EXPRESSION",
            ],
            "column records.doc differs",
        ),
    ],
    ids=["row-level security", "trigger", "generated column dropped"],
)
def test_other_schema_changes_are_named(ledger_url, capsys, statements, expected):
    attack(ledger_url, *statements)
    verify_fails(ledger_url, capsys, "schema was altered", expected)


def test_a_reader_role_sees_the_same_schema(ledger_url, pg_server):
    # verify usually runs as a read-only reviewer: the catalog is readable to it.
    attack(
        ledger_url,
        "DO $$ BEGIN CREATE ROLE reviewer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO reviewer",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO reviewer",
    )
    dbname = psycopg.conninfo.conninfo_to_dict(ledger_url)["dbname"]
    url = pg_server.url(str(dbname), user="reviewer")
    with PostgresLedger(url, readonly=True) as ledger:
        assert ledger.schema_problems() == []
        assert verify_ledger(ledger).records == 5
