"""``otel-audit migrate`` between SQLite and a real PostgreSQL server, both directions."""

from __future__ import annotations

import sqlite3

import pytest

import otel_audit
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.errors import LedgerError
from otel_audit.proof import merkle
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer, generate_keypair

from .test_ledger_backends import span_bodies


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keypair(tmp_path):
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(str(key), str(pub))
    return str(key), str(pub)


def fill(make_pipeline, url: str, key: str, services=("shop", "billing")) -> None:
    """Audit through the real pipeline into ``url``: two chains, signed checkpoints."""
    for service in services:
        pipeline, _, _ = make_pipeline(
            ledger=url, service_name=service, signing_key=key, checkpoint_every=4,
            chain=f"{service}/1",
        )  # fmt: skip
        for i in range(10):
            with (
                otel_audit.actor("alice"),
                otel_audit.audit_action("order.update", resource=("order", i)),
            ):
                pass
        pipeline.shutdown()
    with open_ledger(url) as ledger:
        odd_bodies = span_bodies(2)
        odd = ledger.append("odd", odd_bodies)  # NUL, NaN, bytes, lone surrogates
        # Signed too (with the key, verify vouches only for signed chains), with a
        # Merkle root, as an older version wrote them (unlinked): copied as is. A
        # checkpoint inserted between a writer's linked ones would break their links.
        root = merkle.root_of(odd_bodies)
        plain = Checkpoint("odd", odd[-1].seq, odd[-1].hash, 6, merkle_root=root)
        signer = Signer.from_file(key)
        ledger.add_checkpoint(plain.signed(signer.sign(plain.message()), signer.key_id))


def snapshot(url: str):
    with open_ledger(url, readonly=True) as ledger:
        return {c: list(ledger.scan(c)) for c in ledger.chains()}, ledger.checkpoints()


@pytest.mark.parametrize("direction", ["sqlite->postgres", "postgres->sqlite"])
def test_migrate_copies_chains_and_checkpoints_intact(
    direction, ledger_url_for, make_pipeline, keypair, capsys
):
    src_kind, dst_kind = direction.split("->")
    source, target = ledger_url_for(src_kind), ledger_url_for(dst_kind)
    fill(make_pipeline, source, keypair[0])
    code, out, err = cli(capsys, "migrate", "--from", source, "--to", target)
    assert code == 0, err
    assert "copied 22 records and 7 checkpoints in 3 chains" in out
    assert snapshot(target) == snapshot(source)  # same seqs, hashes, bodies, checkpoints
    code, out, err = cli(capsys, "verify", "--ledger", target, "--public-key", keypair[1])
    assert code == 0, err
    assert "ok: 22 records in 3 chains intact" in out
    # And back again into a fresh ledger of the first kind: still identical.
    again = ledger_url_for(src_kind)
    assert cli(capsys, "migrate", "--from", target, "--to", again)[0] == 0
    assert snapshot(again) == snapshot(source)


def test_migrate_refuses_a_non_empty_target_chain(ledger_url_for, make_pipeline, keypair, capsys):
    source, target = ledger_url_for("sqlite"), ledger_url_for("postgres")
    fill(make_pipeline, source, keypair[0])
    with open_ledger(target) as ledger:
        ledger.append("billing/1", span_bodies(1))
    before = snapshot(target)
    code, out, err = cli(capsys, "migrate", "--from", source, "--to", target)
    assert code == 2 and out == ""
    assert err.startswith("otel-audit: target chain 'billing/1' in postgresql://")
    assert err.endswith("is not empty: nothing was copied\n")
    assert snapshot(target) == before


def test_migrate_refuses_a_damaged_source(ledger_url_for, make_pipeline, keypair, capsys, tmp_path):
    source, target = ledger_url_for("sqlite"), ledger_url_for("postgres")
    fill(make_pipeline, source, keypair[0])
    con = sqlite3.connect(source[len("sqlite:///") :])
    con.execute("DELETE FROM records WHERE chain = 'shop/1' AND seq = 3")
    con.commit()
    con.close()
    code, _, err = cli(capsys, "migrate", "--from", source, "--to", target)
    assert code == 1
    assert (
        err == "otel-audit: chain 'shop/1' seq 3: deleted: record missing (next present is seq 4)\n"
    )
    with pytest.raises(LedgerError, match="has no otel-audit schema"):
        open_ledger(target, readonly=True)  # the target was not even touched


def test_migrate_missing_source_is_a_clear_error(tmp_path, ledger_url_for, capsys):
    code, _, err = cli(
        capsys, "migrate", "--from", f"sqlite:///{tmp_path / 'nope.db'}", "--to",
        ledger_url_for("postgres"),
    )  # fmt: skip
    assert code == 2
    assert err == f"otel-audit: ledger file {str(tmp_path / 'nope.db')!r} does not exist\n"
