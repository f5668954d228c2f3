"""The otel-audit CLI run as a real process: exit codes, one-line errors, output fields."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import otel_audit

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", *args],
        capture_output=True, text=True, cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(REPO), OTEL_AUDIT_LEDGER=""),
    )  # fmt: skip


@pytest.fixture
def ledger(make_pipeline, tmp_path):
    pipeline, _, _ = make_pipeline()
    with otel_audit.actor("alice"):
        with otel_audit.audit_action("order.create", resource=("order", "42")):
            pass
        with otel_audit.audit_action("order.delete", resource=("order", "43")) as a:
            a.deny("not owner")
    pipeline.shutdown()
    return tmp_path / "audit.db"


def test_keygen_writes_private_key_0600_and_never_overwrites(tmp_path):
    result = cli("keygen", "--out", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    mode = stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode)
    assert mode == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = cli("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 2
    assert again.stderr == f"otel-audit: key file '{tmp_path / 'k.key'}' already exists\n"


def test_verify_usage_and_unreadable_ledgers_exit_2(tmp_path, ledger):
    missing = cli("verify", "--ledger", str(tmp_path / "missing.db"))
    assert missing.returncode == 2
    assert missing.stderr == f"otel-audit: ledger file '{tmp_path / 'missing.db'}' does not exist\n"
    no_ledger = cli("verify")
    assert no_ledger.returncode == 2
    assert "no ledger given" in no_ledger.stderr
    bad_flag = cli("verify", "--ledger", str(ledger), "--frobnicate")
    assert bad_flag.returncode == 2 and "unrecognized arguments: --frobnicate" in bad_flag.stderr
    (tmp_path / "bad.pub").write_text("not a key")
    bad_key = cli("verify", "--ledger", str(ledger), "--public-key", str(tmp_path / "bad.pub"))
    assert bad_key.returncode == 2
    assert (
        bad_key.stderr
        == f"otel-audit: public key '{tmp_path / 'bad.pub'}' is not a PEM public key\n"
    )
    not_ledger = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(not_ledger).execute("CREATE TABLE t (a)").connection.commit()
    wrong = cli("verify", "--ledger", f"sqlite:///{not_ledger}")
    assert wrong.returncode == 2 and "is not an otel-audit ledger" in wrong.stderr
    for r in (missing, no_ledger, bad_key, wrong):
        assert "Traceback" not in r.stderr


def test_verify_ok_output(ledger):
    result = cli("verify", "--ledger", f"sqlite:///{ledger}")
    assert result.returncode == 0
    assert "ok: 2 records in 1 chains intact" in result.stdout


def test_export_and_tail_jsonl_fields(ledger, tmp_path):
    out = tmp_path / "out.jsonl"
    result = cli("export", "--ledger", str(ledger), "--format", "jsonl", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [1, 2]
    for key in ("seq", "chain", "hash", "trace_id", "span_id", "parent_span_id", "name",
                "service", "start", "end", "attributes"):  # fmt: skip
        assert key in rows[0]
    assert rows[1]["attributes"]["audit.outcome"] == "denied"
    tail = cli("tail", "--ledger", str(ledger), "-n", "1")
    assert tail.returncode == 0
    (only,) = [json.loads(line) for line in tail.stdout.splitlines()]
    assert only["seq"] == 2 and only["name"] == "order.delete"
    filtered = cli("export", "--ledger", str(ledger), "--outcome", "denied")
    assert [json.loads(x)["seq"] for x in filtered.stdout.splitlines()] == [2]
    bad_since = cli("export", "--ledger", str(ledger), "--since", "last tuesday")
    assert bad_since.returncode == 2
    assert "--since 'last tuesday' is neither ISO 8601 nor relative" in bad_since.stderr


def _edit(db: Path, *statements: str) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()


def test_tampered_rows_of_any_type_are_named_not_a_traceback(ledger, tmp_path):
    import shutil

    cases = {
        "cp_seq": ("UPDATE checkpoints SET seq = 'abc'", 1, "checkpoint row (seq 'abc'"),
        "schema": ("UPDATE meta SET value = 'x'", 2, "has schema version x, expected 1"),
    }
    for name, (sql, code, message) in cases.items():
        db = tmp_path / f"{name}.db"
        shutil.copy(ledger, db)
        _edit(db, sql)
        result = cli("verify", "--ledger", str(db))
        assert result.returncode == code, result.stderr
        assert message in result.stderr and result.stderr.count("\n") == 1


def test_a_body_that_is_not_a_record_stops_readers_with_its_seq(ledger, tmp_path):
    import shutil

    db = tmp_path / "body.db"
    shutil.copy(ledger, db)
    # Indexes on the body's fields would refuse the edit; a raw editor has no such scruple.
    _edit(
        db,
        *[
            f"DROP INDEX {i}"
            for i in (
                "records_trace",
                "records_trail",
                "records_actor",
                "records_resource",
                "records_action",
            )
        ],  # fmt: skip
        "UPDATE records SET body = CAST('{\"v\":1}' AS BLOB) WHERE seq = 2",
    )
    for args in (["export"], ["tail"], ["search"]):
        result = cli(*args, "--ledger", f"sqlite:///{db}")
        assert result.returncode == 1, (args, result.stderr)
        # Review commands check records against the chain before decoding them.
        assert "chain 'shop' seq 2: modified: " in result.stderr, (args, result.stderr)
        assert "run otel-audit verify" in result.stderr
        assert "Traceback" not in result.stderr
