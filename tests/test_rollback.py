"""Rollback: an insider deletes the newest signed checkpoints, rewrites the records they
covered (recomputing every hash) and waits for the service to restart. The restarted
signer must refuse to sign the forged history, and neither verify nor verify-bundle
may accept it. The service is a real process that calls configure() with a key."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from otel_audit.engine.checkpoints import SignerState, check_against_state
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import canonical_json
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.proof.keys import generate_keypair

SERVICE = """
import dataclasses, json, sys
import otel_audit
from opentelemetry.sdk.trace import TracerProvider

url, key, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
provider = TracerProvider()
pipeline = otel_audit.configure(
    ledger=url, service_name="shop", tracer_provider=provider, signing_key=key,
    checkpoint_every=4, handle_sigterm=False,
)
for i in range(first, first + count):
    with pipeline.audit_action("order.update", resource=("order", str(i)), actor="alice"):
        pass
pipeline.shutdown()
print(json.dumps(dataclasses.asdict(pipeline.stats())))
"""


def run_service(url: str, key: Path, first: int, count: int) -> tuple[dict, str]:
    """One life of the audited service: start, ``count`` actions, clean shutdown."""
    done = subprocess.run(
        [sys.executable, "-c", SERVICE, url, str(key), str(first), str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OTEL_AUDIT_LEDGER="", OTEL_TRACES_EXPORTER="none"),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", *args], capture_output=True, text=True, timeout=120
    )


def checkpoint_seqs(db: Path) -> list[int]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT seq FROM checkpoints ORDER BY seq")]


def forge(db: Path, keep_checkpoints_upto: int) -> None:
    """The insider: drop the newer checkpoints, rewrite every record after them as
    mallory's, and recompute the chain so that every link holds."""
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM checkpoints WHERE seq > ?", (keep_checkpoints_upto,))
        rows = con.execute(
            "SELECT seq, prev_hash, hash, body FROM records WHERE chain = 'shop' ORDER BY seq"
        ).fetchall()
        prev = GENESIS
        for seq, _, digest, body in rows:
            if seq > keep_checkpoints_upto:
                body = body.replace(b'"alice"', b'"mallory"')
                digest = link_hash(prev, body)
                con.execute(
                    "UPDATE records SET prev_hash = ?, hash = ?, body = ? WHERE chain = 'shop'"
                    " AND seq = ?",
                    (prev, digest, body, seq),
                )
            prev = digest


@pytest.fixture
def service(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    key, pub = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    key.parent.mkdir()
    generate_keypair(key, pub)
    db = tmp_path / "audit.db"
    return f"sqlite:///{db}", db, key, pub


def test_restarted_signer_refuses_a_rolled_back_history(service, tmp_path: Path) -> None:
    url, db, key, pub = service
    stats, _ = run_service(url, key, 0, 12)
    assert (stats["checkpoints"], stats["checkpoint_errors"]) == (3, 0)
    assert checkpoint_seqs(db) == [4, 8, 12]
    # The signer's memory lives beside the key, outside the ledger, readable by no one else.
    state_dir = Path(str(key) + ".state")
    (state,) = [p for p in state_dir.iterdir() if p.suffix == ".json"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["seq"] == 12
    genuine = tmp_path / "genuine.zip"
    assert (
        cli("bundle", "--ledger", url, "-o", str(genuine), "--public-key", str(pub)).returncode == 0
    )

    forge(db, keep_checkpoints_upto=4)
    # Before any restart the ledger alone cannot tell: records 5..12 are an unsigned tail,
    # and verify says so rather than vouching for them.
    before = cli("verify", "--ledger", url, "--public-key", str(pub))
    assert before.returncode == 0 and "8 after the last checkpoint" in before.stdout, before

    # The restart the insider waited for.
    stats, log = run_service(url, key, 12, 3)
    assert stats["checkpoints"] == 0 and stats["checkpoint_errors"] >= 1
    assert (
        "ALERT: refusing to sign chain 'shop' at seq 15: the key last signed seq 12 with head"
        in log
    )
    assert "(rolled back or rewritten)" in log
    # No signature over the forged history; the checkpoint the key really signed is back.
    with open_ledger(url) as ledger:
        cps = {cp.seq: cp for cp in ledger.checkpoints("shop")}
    assert sorted(cps) == [4, 12]
    assert cps[12].digest().hex() == json.loads(state.read_text())["digest"]

    # verify names the rewritten records.
    after = cli("verify", "--ledger", url, "--public-key", str(pub))
    assert after.returncode == 1, after
    # The restored checkpoint links to the deleted one at seq 8: the first thing verify sees.
    assert after.stderr == (
        "otel-audit: chain 'shop' seq 12: bad signature: checkpoint at seq 12: signature does"
        " not verify with the public key: the checkpoint was edited, or a checkpoint between it"
        " and the one before it (seq 4) was deleted\n"
    )
    # No bundle of the forged history can be made...
    forged_zip = tmp_path / "forged.zip"
    made = cli("bundle", "--ledger", url, "-o", str(forged_zip), "--public-key", str(pub))
    assert made.returncode == 1 and not forged_zip.exists(), made
    # ...nor forged from a genuine one: mallory's bodies in place of alice's are refused.
    with zipfile.ZipFile(genuine) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    with open_ledger(url) as ledger:
        forged = {row.seq: row.body for row in ledger.scan("shop")}
    lines = []
    for line in files["records.jsonl"].decode().splitlines():
        rec = json.loads(line)
        if rec["chain"] == "shop" and 5 <= rec["seq"] <= 12:
            rec["body"] = base64.b64encode(forged[rec["seq"]]).decode()
        lines.append(canonical_json(rec))
    files["records.jsonl"] = ("\n".join(lines) + "\n").encode()
    manifest = json.loads(files["manifest.json"])
    manifest["files"] = {n: hashlib.sha256(files[n]).hexdigest() for n in manifest["files"]}
    files["manifest.json"] = canonical_json(manifest).encode()
    with zipfile.ZipFile(forged_zip, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    checked = cli("verify-bundle", str(forged_zip), "--public-key", str(pub))
    assert checked.returncode == 1, checked
    assert "inclusion proof does not lead to the checkpoint's merkle root" in checked.stderr


def test_the_signer_keeps_refusing_and_restoring(service) -> None:
    """The insider deletes the restored checkpoint again: every restart puts it back,
    and the key never signs the forged chain."""
    url, db, key, pub = service
    run_service(url, key, 0, 8)
    forge(db, keep_checkpoints_upto=4)
    for first in (8, 10):
        stats, log = run_service(url, key, first, 2)
        assert stats["checkpoints"] == 0 and "ALERT: refusing to sign" in log
        assert checkpoint_seqs(db) == [4, 8]
        assert cli("verify", "--ledger", url, "--public-key", str(pub)).returncode == 1
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM checkpoints WHERE seq > 4")


def test_records_deleted_after_the_last_checkpoint_are_refused_too(service) -> None:
    """Truncation: the newest checkpoints and the records they covered are gone."""
    url, db, key, pub = service
    run_service(url, key, 0, 8)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM checkpoints WHERE seq > 4")
        con.execute("DELETE FROM records WHERE seq > 5")
    stats, log = run_service(url, key, 8, 5)
    assert stats["checkpoints"] == 0
    assert "the key last signed seq 8" in log and "now has hash" in log
    result = cli("verify", "--ledger", url, "--public-key", str(pub))
    assert result.returncode == 1, result


def test_an_honest_restart_signs_on_and_links(service) -> None:
    url, db, key, pub = service
    run_service(url, key, 0, 6)
    stats, log = run_service(url, key, 6, 6)
    assert stats["checkpoint_errors"] == 0 and "ALERT" not in log
    assert checkpoint_seqs(db) == [4, 6, 10, 12]
    result = cli("verify", "--ledger", url, "--public-key", str(pub))
    assert result.returncode == 0, result.stderr
    # Two services (processes) on one chain with one key: each extends the other's head.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SERVICE, url, str(key), str(100 * n), "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OTEL_AUDIT_LEDGER="", OTEL_TRACES_EXPORTER="none"),
        )
        for n in (1, 2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "ALERT" not in err, err
    result = cli("verify", "--ledger", url, "--public-key", str(pub))
    assert result.returncode == 0, result.stderr


def test_a_replaced_key_starts_its_own_memory(service) -> None:
    """The key file replaced by a new key at the same path: the old key's state
    says nothing about the new key, which signs on (and says so)."""
    url, db, key, pub = service
    run_service(url, key, 0, 4)
    key.unlink()
    pub.unlink()
    generate_keypair(key, pub)
    stats, log = run_service(url, key, 4, 4)
    assert stats["checkpoint_errors"] == 0 and "ALERT" not in log
    assert "starting anew" in log
    assert checkpoint_seqs(db) == [4, 8]


def test_a_worker_forked_while_the_state_is_locked_can_still_sign(tmp_path: Path) -> None:
    """gunicorn forks workers at any moment: a child must not inherit the parent's
    held state lock (thread lock or file lock) for good."""
    state = SignerState(str(tmp_path / "k.key.state"))
    marker = tmp_path / "child-signed"
    with state.locked("shop"):
        pid = os.fork()
        if pid == 0:  # the child: waits for the parent's release, then takes the lock
            try:
                with state.locked("shop"):
                    marker.write_text("ok")
            finally:
                os._exit(0)
        assert not marker.exists()  # still the parent's
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child never got the signer state lock")
    assert os.waitstatus_to_exitcode(status) == 0 and marker.read_text() == "ok"


def test_the_signer_state_shows_a_rollback_before_any_restart(service) -> None:
    """Where the key's directory is readable, the window before the signer's next
    attempt closes too: the ledger is compared with what the key remembers."""
    url, db, key, pub = service
    run_service(url, key, 0, 8)
    state = SignerState(str(key) + ".state")
    with open_ledger(url) as ledger:
        assert check_against_state(ledger, state) == []
    forge(db, keep_checkpoints_upto=4)
    with open_ledger(url) as ledger:
        (damage,) = check_against_state(ledger, state)
    assert (damage.chain, damage.seq, damage.kind) == ("shop", 8, "modified")
    assert "the key last signed head" in damage.detail


def test_the_signer_state_names_a_deleted_newest_checkpoint(service) -> None:
    url, db, key, pub = service
    run_service(url, key, 0, 4)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM checkpoints WHERE seq = 4")
    with open_ledger(url) as ledger:
        (damage,) = check_against_state(ledger, SignerState(str(key) + ".state"))
    assert (damage.chain, damage.seq, damage.kind) == ("shop", 4, "deleted")
    assert str(damage) == (
        "chain 'shop' seq 4: deleted: the checkpoint the key last signed at seq 4"
        " (signer state) is not in the ledger"
    )
