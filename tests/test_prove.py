"""``otel-audit prove``: a salted commitment checked against a value shown to a reviewer."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

import otel_audit
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger


@pytest.fixture
def committed(tmp_path, make_pipeline):
    """A ledger whose record 2 holds a commitment to a customer's tax id (and a list)."""
    policy = tmp_path / "p.toml"
    policy.write_text(
        textwrap.dedent(
            """\
            [[redact.attributes]]
            name = ["customer.tax_id", "customer.phones"]
            method = "commit"
            """
        )
    )
    pipeline, _, _ = make_pipeline(policy=str(policy))
    with otel_audit.audit_action("customer.view"):
        pass
    with otel_audit.audit_action(
        "customer.update",
        attributes={
            "customer.tax_id": "DE 123 456 789",
            "customer.phones": ["+1 555 0100", "+1 555 0199"],
        },
    ):
        pass
    pipeline.shutdown()
    url = pipeline.ledger_url
    with open_ledger(url, create=False, readonly=True) as ledger:
        rows = list(ledger.query(Query()))
    assert [r.seq for r in rows] == [1, 2]
    assert rows[1].record.attr("customer.tax_id").startswith("commit:sha256:")
    return url, rows[1].chain, tmp_path / "audit.db"


def test_match_exit_0(committed, capsys) -> None:
    url, _, db = committed
    assert b"DE 123 456 789" not in db.read_bytes()
    code = main(["prove", "--ledger", url, "--seq", "2", "--attribute", "customer.tax_id",
                 "--value", "DE 123 456 789"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.startswith("match: customer.tax_id of record shop:2 commits")


def test_list_items_are_committed_one_by_one(committed) -> None:
    url, chain, _ = committed
    args = [
        "prove",
        "--ledger",
        url,
        "--seq",
        "2",
        "--chain",
        chain,
        "--attribute",
        "customer.phones",
    ]
    assert main([*args, "--value", "+1 555 0199"]) == 0
    assert main([*args, "--value", "+1 555 0100"]) == 0
    assert main([*args, "--value", "+1 555 0101"]) == 1


def test_mismatch_exit_1(committed, capsys) -> None:
    url, _, _ = committed
    code = main(["prove", "--ledger", url, "--seq", "2", "--attribute", "customer.tax_id",
                 "--value", "DE 123 456 780"])  # fmt: skip
    assert code == 1
    assert capsys.readouterr().out.startswith("no match: customer.tax_id of record shop:2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq", "9", "--attribute", "customer.tax_id"], "chain 'shop' has no record 9"),
        (["--seq", "0", "--attribute", "customer.tax_id"], "chain 'shop' has no record 0"),
        (["--seq", "2", "--attribute", "nope"], "record shop:2 has no attribute 'nope'"),
        (["--seq", "2", "--attribute", "audit.action"],
         "attribute 'audit.action' of record shop:2: the value is not a commitment (commit:sha256:...)"),
        (["--seq", "2", "--chain", "other", "--attribute", "x"], "chain 'other' has no record 2"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2(committed, capsys, args, message) -> None:
    url, _, _ = committed
    assert main(["prove", "--ledger", url, *args, "--value", "v"]) == 2
    assert capsys.readouterr().err == f"otel-audit: {message}\n"


def test_missing_ledger_and_bad_flags_exit_2(tmp_path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "otel_audit", "prove", "--ledger", str(tmp_path / "none.db"),
         "--seq", "1", "--attribute", "a", "--value", "v"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "otel_audit", "prove", "--seq", "x", "--attribute", "a", "--value", "v"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid int value" in bad.stderr


def test_a_tampered_record_proves_nothing(committed, capsys) -> None:
    url, _, db = committed
    con = sqlite3.connect(db)
    (body,) = con.execute("SELECT body FROM records WHERE seq = 2").fetchone()
    con.execute(
        "UPDATE records SET body = ? WHERE seq = 2",
        (body.replace(b"customer.update", b"customer.delete"),),
    )
    con.commit()
    con.close()
    code = main(["prove", "--ledger", url, "--seq", "2", "--attribute", "customer.tax_id",
                 "--value", "DE 123 456 789"])  # fmt: skip
    assert code == 1
    assert "record shop:2 does not match its hash" in capsys.readouterr().err
