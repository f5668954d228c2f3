"""PostgreSQL ledger: schema and roles, clear errors, tampering through SQL, via the real CLI."""

from __future__ import annotations

import socket

import psycopg
import pytest

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.engine.ledger.postgres import SCHEMA, SCHEMA_VERSION, PostgresLedger
from otel_audit.errors import ConfigError, LedgerError, VerificationError

from .test_ledger_backends import rec


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def with_user(url: str, user: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://{user}@")


def populate(make_pipeline, url: str, n: int = 5) -> str:
    """Audit ``n`` actions into ``url`` through the real pipeline; returns the chain."""
    pipeline, _, _ = make_pipeline(ledger=url, checkpoint_every=3)
    for i in range(n):
        with (
            otel_audit.actor("alice"),
            otel_audit.audit_action("order.update", resource=("order", i)),
        ):
            pass
    chain = pipeline.chain
    pipeline.shutdown()
    return chain


# -- schema, init, roles -------------------------------------------------


def test_init_creates_schema_once_and_reports_version(pg_url, capsys):
    code, out, _ = cli(capsys, "init", "--ledger", pg_url)
    assert code == 0 and f"created schema {SCHEMA} version {SCHEMA_VERSION}" in out
    code, out, _ = cli(capsys, "init", "--ledger", pg_url)
    assert code == 0 and f"is at version {SCHEMA_VERSION}" in out
    with psycopg.connect(pg_url) as con:
        indexes = {r[0] for r in con.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (SCHEMA,))}  # fmt: skip
        assert {"records_trace", "records_trail", "records_actor", "records_resource",
                "records_action", "records_start"} <= indexes  # fmt: skip
        version = con.execute(f"SELECT value FROM {SCHEMA}.meta").fetchone()
        assert version == (str(SCHEMA_VERSION),)


def test_default_chain_is_one_per_service_instance(pg_url):
    import os

    with open_ledger(pg_url) as ledger:
        assert ledger.default_chain("shop") == f"shop/{socket.gethostname()}/{os.getpid()}"


def test_writer_role_can_only_insert_and_select(pg_url, capsys):
    role = "writer_" + pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {role} LOGIN")
    code, out, _ = cli(capsys, "init", "--ledger", pg_url, "--writer-role", role)
    assert code == 0 and "GRANT SELECT, INSERT ON" in out and role in out
    writer_url = with_user(pg_url, role)
    # The writer's ordinary work goes through.
    with open_ledger(writer_url) as ledger:
        appended = ledger.append("svc", [rec(1), rec(2)])
        ledger.add_checkpoint(otel_audit.proof.chain.Checkpoint("svc", 2, appended[1].hash, 1))
        assert [r.seq for r in ledger.query(Query(chain="svc"))] == [1, 2]
    # Anything that rewrites history is refused by the server.
    with psycopg.connect(writer_url, autocommit=True) as con:
        for statement in (
            f"UPDATE {SCHEMA}.records SET body = body WHERE seq = 1",
            f"DELETE FROM {SCHEMA}.records WHERE seq = 2",
            f"TRUNCATE {SCHEMA}.records",
            f"UPDATE {SCHEMA}.checkpoints SET time = 0",
            f"DELETE FROM {SCHEMA}.checkpoints",
            f"UPDATE {SCHEMA}.meta SET value = '0'",
            f"ALTER TABLE {SCHEMA}.records ALTER COLUMN doc DROP EXPRESSION",
            f"DROP TABLE {SCHEMA}.records",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                con.execute(statement)
    with open_ledger(pg_url, readonly=True) as ledger:
        assert ledger.count() == 2 and len(ledger.checkpoints()) == 1


def test_writer_role_without_schema_is_told_to_run_init(pg_url, pg_server):
    role = "nobody_" + pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {role} LOGIN")
        con.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        con.execute(f"REVOKE CREATE ON DATABASE {pg_url.rsplit('/', 1)[1]} FROM PUBLIC")
    with pytest.raises(LedgerError, match="cannot create it: run 'otel-audit init"):
        open_ledger(with_user(pg_url, role))
    with pytest.raises(LedgerError, match=r"has no otel-audit schema \(run 'otel-audit init"):
        open_ledger(pg_url, readonly=True)


def test_init_refuses_a_role_that_does_not_exist(pg_url, capsys):
    code, _, err = cli(capsys, "init", "--ledger", pg_url, "--writer-role", "no_such_role")
    assert code == 2
    assert err.strip().splitlines() == [
        (
            "otel-audit: role 'no_such_role' does not exist: CREATE ROLE no_such_role LOGIN"
            " PASSWORD '...' first (passwords are never handled by otel-audit)"
        )
    ]


def test_newer_schema_is_refused(pg_url):
    open_ledger(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"UPDATE {SCHEMA}.meta SET value = '99'")
    with pytest.raises(
        LedgerError, match=f"schema version 99, expected {SCHEMA_VERSION}: upgrade otel-audit"
    ):
        open_ledger(pg_url)


# -- errors ----------------------------------------------------------------


def test_unreachable_server_is_one_clear_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        url = f"postgresql://audit:s3cret@127.0.0.1:{port}/audit"
        code, out, err = cli(capsys, "verify", "--ledger", url)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(
            f"otel-audit: postgresql ledger postgresql://audit@127.0.0.1:{port}/audit is unreachable:"
        )
        assert "s3cret" not in err and "Traceback" not in err
        with pytest.raises(LedgerError, match="is unreachable"):
            otel_audit.configure(ledger=url, service_name="shop", handle_sigterm=False,
                                 tracer_provider=otel_audit.setup.TracerProvider())  # fmt: skip


def test_malformed_url_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
        open_ledger("postgresql://127.0.0.1/db?no_such_option=1")


def test_writes_fail_closed_while_the_server_is_down_and_resume(pg_url, pg_server):
    ledger = PostgresLedger(pg_url, retry_seconds=1.0)
    writer = otel_audit.engine.writer.LedgerWriter(pg_url, "down", ledger=ledger)
    try:
        assert writer.write(rec(1)).seq == 1
        pg_server.stop()
        try:
            with pytest.raises(
                otel_audit.errors.LedgerWriteError, match="appending to chain 'down' failed"
            ):
                writer.write(rec(2))
            with pytest.raises(otel_audit.errors.LedgerUnavailable, match="unavailable"):
                writer.check()
        finally:
            pg_server.start()
        # Back up: the same ledger object reconnects and the chain continues.
        appended = ledger.append("down", [rec(3)])
        assert appended[0].seq == 2
        assert [r.body for r in ledger.scan("down")] == [rec(1), rec(3)]
    finally:
        writer.shutdown()


# -- tampering through SQL ---------------------------------------------------


def verify(capsys, url: str) -> tuple[int, str, str]:
    return cli(capsys, "verify", "--ledger", url)


def test_intact_ledger_verifies(pg_url, make_pipeline, capsys):
    chain = populate(make_pipeline, pg_url)
    code, out, err = verify(capsys, pg_url)
    assert code == 0, err
    assert f"chain {chain!r}: 5 records, 2 checkpoints" in out


def test_updated_attribute_is_found_and_query_columns_follow_the_body(
    pg_url, make_pipeline, capsys
):
    chain = populate(make_pipeline, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(
            f"UPDATE {SCHEMA}.records SET body = convert_to(replace(convert_from(body, 'UTF8'),"
            " '\"alice\"', '\"mallory\"'), 'UTF8') WHERE chain = %s AND seq = 4",
            (chain,),
        )
    code, _, err = verify(capsys, pg_url)
    assert code == 1
    assert (
        err
        == f"otel-audit: chain {chain!r} seq 4: modified: hash does not match the record's bytes\n"
    )
    # The review columns are generated from the body: they cannot tell another story.
    with open_ledger(pg_url, readonly=True) as ledger:
        assert [r.seq for r in ledger.query(Query(actor="mallory"))] == [4]


def test_deleted_row_is_found(pg_url, make_pipeline, capsys):
    chain = populate(make_pipeline, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"DELETE FROM {SCHEMA}.records WHERE chain = %s AND seq = 2", (chain,))
    code, _, err = verify(capsys, pg_url)
    assert code == 1
    assert err == (
        f"otel-audit: chain {chain!r} seq 2: deleted: record missing (next present is seq 3)\n"
    )


def test_deleted_tail_after_a_checkpoint_is_found(pg_url, make_pipeline, capsys):
    chain = populate(make_pipeline, pg_url)  # checkpoints at 3 and 5
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"DELETE FROM {SCHEMA}.records WHERE chain = %s AND seq >= 4", (chain,))
    code, _, err = verify(capsys, pg_url)
    assert code == 1
    assert err.startswith(f"otel-audit: chain {chain!r} seq 4: truncated: records 4..5 are gone")


def test_inserted_forged_rows_are_found(pg_url, make_pipeline, capsys):
    chain = populate(make_pipeline, pg_url)
    forged = rec(99, **{v.ACTOR_ID: "mallory", v.ACTION: "order.delete"})
    with psycopg.connect(pg_url, autocommit=True) as con:
        # Make room at seq 3 (two steps: the primary key is checked row by row).
        con.execute(
            f"UPDATE {SCHEMA}.records SET seq = seq + 1000 WHERE chain = %s AND seq >= 3", (chain,)
        )
        con.execute(
            f"UPDATE {SCHEMA}.records SET seq = seq - 999 WHERE chain = %s AND seq > 1000", (chain,)
        )
        prev = con.execute(
            f"SELECT hash FROM {SCHEMA}.records WHERE chain = %s AND seq = 2", (chain,)
        ).fetchone()[0]
        # The append guard refuses a row below the head: the owner turns it
        # off for the insert and back on, leaving the schema as it was.
        con.execute(f"ALTER TABLE {SCHEMA}.records DISABLE TRIGGER records_append_at_head")
        con.execute(
            f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
            " VALUES (%s, 3, %s, %s, %s)",
            (chain, prev, b"\x07" * 32, forged),
        )
        con.execute(f"ALTER TABLE {SCHEMA}.records ENABLE TRIGGER records_append_at_head")
    code, _, err = verify(capsys, pg_url)
    assert code == 1
    assert (
        err
        == f"otel-audit: chain {chain!r} seq 3: inserted: record is not part of the chain around it\n"
    )


def test_forged_row_appended_at_the_end_is_found(pg_url, make_pipeline, capsys):
    chain = populate(make_pipeline, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as con:
        prev = con.execute(
            f"SELECT hash FROM {SCHEMA}.records WHERE chain = %s AND seq = 5", (chain,)
        ).fetchone()[0]
        con.execute(
            f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
            " VALUES (%s, 6, %s, %s, %s)",
            (chain, prev, b"\x07" * 32, rec(98)),
        )
    code, _, err = verify(capsys, pg_url)
    assert code == 1
    assert (
        err
        == f"otel-audit: chain {chain!r} seq 6: modified: hash does not match the record's bytes\n"
    )


def test_reader_role_can_verify_but_not_write(pg_url, make_pipeline, capsys):
    populate(make_pipeline, pg_url)
    role = "reader_" + pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {role} LOGIN")
    assert cli(capsys, "init", "--ledger", pg_url, "--reader-role", role)[0] == 0
    reader_url = with_user(pg_url, role)
    code, out, err = cli(capsys, "verify", "--ledger", reader_url)
    assert code == 0 and "ok: 5 records in 1 chains intact" in out, err
    with (
        psycopg.connect(reader_url, autocommit=True) as con,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        con.execute(
            f"INSERT INTO {SCHEMA}.records (chain, seq, prev_hash, hash, body)"
            " VALUES ('x', 1, '', '', '')"
        )


def test_readonly_ledger_refuses_writes(pg_url):
    open_ledger(pg_url).close()
    with (
        open_ledger(pg_url, readonly=True) as ledger,
        pytest.raises(otel_audit.errors.LedgerWriteError, match="open read-only"),
    ):
        ledger.append("a", [rec(1)])


def test_many_first_opens_at_once_create_the_schema_once(pg_url):
    import threading

    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            open_ledger(pg_url).close()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as con:
        assert con.execute(f"SELECT count(*) FROM {SCHEMA}.meta").fetchone() == (1,)


def test_init_on_a_sqlite_ledger_creates_it(tmp_path, capsys):
    path = tmp_path / "a.db"
    code, out, _ = cli(capsys, "init", "--ledger", f"sqlite:///{path}")
    assert code == 0 and path.exists() and "is ready" in out
    code, _, err = cli(capsys, "init", "--ledger", f"sqlite:///{path}", "--writer-role", "x")
    assert code == 2
    assert (
        err == "otel-audit: --writer-role and --reader-role apply to postgresql:// ledgers only\n"
    )


def test_forked_workers_reconnect_and_keep_the_parent_connection(pg_url, make_pipeline, capsys):
    """Pre-fork servers (gunicorn) configure in the parent: the child opens its own
    connection, and the parent's keeps working (psycopg never closes it from the child)."""
    import os
    import warnings

    pipeline, _, _ = make_pipeline(ledger=pg_url)
    with otel_audit.audit_action("before.fork"):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with a writer thread
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            with otel_audit.audit_action("in.child"):
                pass
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with otel_audit.audit_action("after.fork"):
        pass
    pipeline.flush()
    with open_ledger(pg_url, readonly=True) as ledger:
        actions = sorted(
            r.record.attr(v.ACTION) for r in ledger.query(Query()) if r.record.attr(v.EVENT)
        )
    assert actions == ["after.fork", "before.fork", "in.child"]
    code, _, err = cli(capsys, "verify", "--ledger", pg_url)
    assert code == 0, err


def test_query_columns_changed_by_ddl_are_found(pg_url, make_pipeline):
    chain = populate(make_pipeline, pg_url)
    with open_ledger(pg_url, readonly=True) as ledger:
        ledger.check_generated()  # intact
    with psycopg.connect(pg_url, autocommit=True) as con:
        # Only the owner can do this: turn the generated column into a plain one, then lie.
        con.execute(f"ALTER TABLE {SCHEMA}.records ALTER COLUMN doc DROP EXPRESSION")
        with (
            open_ledger(pg_url, readonly=True) as ledger,
            pytest.raises(VerificationError, match="no longer a generated column"),
        ):
            ledger.check_generated()
        con.execute(
            f"UPDATE {SCHEMA}.records SET doc = jsonb_set(doc, '{{attributes,audit.actor.id}}',"
            " '\"mallory\"') WHERE chain = %s AND seq = 2",
            (chain,),
        )
    with open_ledger(pg_url, readonly=True) as ledger:
        with pytest.raises(VerificationError) as info:
            ledger.check_generated()
        assert str(info.value) == (
            f"chain {chain!r} seq 2: modified: the query columns do not match the record's bytes"
        )
        assert (info.value.chain, info.value.seq) == (chain, 2)
