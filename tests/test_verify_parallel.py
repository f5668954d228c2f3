"""verify --jobs: chains cut into ranges walked by worker processes.

The promise: the same report, and the same damage named (chain, seq, kind,
message), whatever the number of processes. Each attack below is the
insider's edit of a real ledger file (or PostgreSQL database); the single walk
(jobs=1) is the reference. Ranges are made small here (the module's
MIN_RANGE, 64 records instead of 32,768) so a few hundred records make many
ranges, and damage can be put exactly at their edges.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.errors import VerificationError
from otel_audit.proof import parallel
from otel_audit.proof.chain import Checkpoint, link_hash
from otel_audit.proof.keys import Signer
from otel_audit.proof.merkle import Frontier
from otel_audit.proof.verify import verify_ledger

# Records per chain: range edges (of 128, see below) fall inside "long" and "mid".
CHAINS = {"long": 600, "mid": 300, "short": 50}
CHECKPOINT_EVERY = 37
JOBS = 3


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> int:
    """Ranges of 64 records at the least (with 950 records and 3 jobs, 64: edges at 128, 256, ... too).
    Chains of 16 records or more are planned (32 records would make a task)."""
    monkeypatch.setattr(parallel, "MIN_RANGE", 64)
    monkeypatch.setattr(parallel, "SHORT", 16)
    return 128


def _body(chain: str, i: int, rnd: random.Random) -> bytes:
    t = 1_700_000_000_000_000_000 + i * 1_000_000
    attrs: dict[str, object] = {
        v.ACTOR_ID: f"user{rnd.randrange(9)}",
        v.ACTION: "order.update",
        v.RESOURCE_TYPE: "order",
        v.RESOURCE_ID: str(i),
        v.OUTCOME: "success",
    }
    return encode(
        Record(
            trace_id=f"{rnd.getrandbits(128):032x}",
            span_id=f"{rnd.getrandbits(64):016x}",
            parent_span_id=None,
            name="order.update",
            kind="INTERNAL",
            service=chain,
            start=t,
            end=t + 1000,
            attributes=attrs,
        )  # fmt: skip
    )


def build(
    url: str, signer: Signer, chains: dict[str, int] = CHAINS, every: int = CHECKPOINT_EVERY
) -> None:
    """Chains of records with a signed checkpoint carrying a Merkle root every ``every``."""
    rnd = random.Random(11)
    with open_ledger(url) as ledger:
        for chain, n in chains.items():
            frontier = Frontier()
            for start in range(0, n, every):
                bodies = [_body(chain, i, rnd) for i in range(start, min(n, start + every))]
                last = ledger.append(chain, bodies)[-1]
                for body in bodies:
                    frontier.append(body)
                cp = Checkpoint(
                    chain, last.seq, last.hash, time.time_ns(), merkle_root=frontier.root()
                )
                ledger.add_checkpoint(
                    Checkpoint(
                        cp.chain,
                        cp.seq,
                        cp.head,
                        cp.time,
                        signer.sign(cp.message()),
                        signer.key_id,
                        cp.merkle_root,
                    )  # fmt: skip
                )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Path:
    path = tmp_path_factory.mktemp("parallel") / "audit.db"
    build(f"sqlite:///{path}", signer)
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "audit.db"
    target.write_bytes(pristine.read_bytes())
    return target


def _outcome(url: str, key, jobs: int, anchors=()) -> object:  # type: ignore[no-untyped-def]
    """The report's chains, or the damage named: what a reviewer sees."""
    with open_ledger(url, create=False, readonly=True) as ledger:
        try:
            report = verify_ledger(ledger, key, jobs=jobs, anchors=anchors)
        except VerificationError as exc:
            return ("damaged", exc.chain, exc.seq, exc.kind, str(exc))
    return [vars(c) for c in report.chains]


def test_ranges_in_workers_give_the_single_walks_report(pristine, signer, small_ranges):
    url = f"sqlite:///{pristine}"
    key = signer.public_key
    one = _outcome(url, key, 1)
    assert [c["records"] for c in one] == [600, 300, 50]  # type: ignore[index]
    assert _outcome(url, key, JOBS) == one
    assert _outcome(url, None, JOBS) == _outcome(url, None, 1)
    # The workers did the walking: every chain came back assembled from its ranges.
    with open_ledger(url, readonly=True) as ledger:
        walked, _tried = parallel.walk_chains(ledger, list(CHAINS), key, {}, JOBS)
    assert sorted(walked) == sorted(CHAINS)
    assert [vars(walked[c["chain"]]) for c in one] == one  # type: ignore[index]


def test_anchors_inside_ranges_are_checked(pristine, signer, small_ranges):
    url = f"sqlite:///{pristine}"
    with open_ledger(url, readonly=True) as ledger:
        head = ledger.head("long")
        row = next(iter(ledger.scan("long", 199, 200)))

    def signed(seq: int, digest: bytes) -> Checkpoint:
        cp = Checkpoint("long", seq, digest, 1)
        return Checkpoint("long", seq, digest, 1, signer.sign(cp.message()), signer.key_id)

    good = [signed(200, row.hash), signed(head.seq, head.hash)]
    bad = [signed(200, bytes(32))]
    for key in (signer.public_key, None):
        assert _outcome(url, key, JOBS, good) == _outcome(url, key, 1, good)
        assert _outcome(url, key, JOBS, good) != _outcome(url, key, 1)  # anchors counted
        damaged = _outcome(url, key, JOBS, bad)
        assert damaged == _outcome(url, key, 1, bad)
        assert damaged[:4] == ("damaged", "long", 186, "modified")  # type: ignore[index]


def _row(con: sqlite3.Connection, seq: int, chain: str = "long") -> tuple[bytes, bytes, bytes]:
    return con.execute(
        "SELECT prev_hash, hash, body FROM records WHERE chain = ? AND seq = ?", (chain, seq)
    ).fetchone()


def _edited(pristine: Path, tmp_path: Path, kind: str, seq: int) -> Path:
    """A copy of the pristine ledger with the insider's edit (``_edit``) made."""
    db = _copy(pristine, tmp_path)
    con = sqlite3.connect(db)
    _edit(con, kind, seq)
    con.commit()
    con.close()
    return db


def _edit(con: sqlite3.Connection, kind: str, seq: int) -> None:
    """The insider's edit of chain "long" at ``seq``."""
    where = "chain = 'long' AND seq = ?"
    if kind == "merkle_root":
        con.execute(
            "UPDATE checkpoints SET merkle_root = ? WHERE chain = 'long' AND seq = ?",
            (bytes(32), seq),
        )
        return
    prev, digest, body = _row(con, seq)
    if kind == "body":
        con.execute(
            f"UPDATE records SET body = ? WHERE {where}", (body.replace(b"user", b"usEr", 1), seq)
        )
    elif kind == "hash":
        con.execute(f"UPDATE records SET hash = ? WHERE {where}", (bytes(32), seq))
    elif kind == "prev_hash":
        con.execute(f"UPDATE records SET prev_hash = ? WHERE {where}", (b"\x01" * 32, seq))
    elif kind == "delete":
        con.execute(f"DELETE FROM records WHERE {where}", (seq,))
    elif kind == "swap":
        other = 601 - seq if seq != 300 else 10
        a, b = _row(con, seq), _row(con, other)
        con.execute(f"UPDATE records SET prev_hash=?, hash=?, body=? WHERE {where}", (*b, seq))
        con.execute(f"UPDATE records SET prev_hash=?, hash=?, body=? WHERE {where}", (*a, other))
    elif kind == "insert":
        con.execute("UPDATE records SET seq = -seq - 1 WHERE chain = 'long' AND seq >= ?", (seq,))
        con.execute("UPDATE records SET seq = -seq WHERE chain = 'long' AND seq < 0")
        before = _row(con, seq - 1)[1] if seq > 1 else bytes(32)
        forged = body.replace(b"order.update", b"order.delete")
        con.execute(
            "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES ('long', ?, ?, ?, ?)",
            (seq, before, link_hash(before, forged), forged),
        )
    elif kind == "text_hash":
        con.execute(f"UPDATE records SET hash = ? WHERE {where}", (digest.hex(), seq))
    elif kind == "truncate":
        con.execute("DELETE FROM records WHERE chain = 'long' AND seq >= ?", (seq,))
    elif kind == "rewrite":
        # Change one record and recompute every hash after it: only a signature tells.
        rows = con.execute(
            "SELECT seq, body FROM records WHERE chain = 'long' AND seq >= ? ORDER BY seq", (seq,)
        ).fetchall()
        for s, b in rows:
            if s == seq:
                b = b.replace(b"order.update", b"order.cancel")
            digest = link_hash(prev, b)
            con.execute(
                f"UPDATE records SET prev_hash = ?, hash = ?, body = ? WHERE {where}",
                (prev, digest, b, s),
            )
            prev = digest
    else:
        raise AssertionError(kind)


EDITS = [
    "body",
    "hash",
    "prev_hash",
    "delete",
    "swap",
    "insert",
    "text_hash",
    "truncate",
    "rewrite",
]
# Range edges at 128, 256, 384, 512: the rows on each side of one, inside one, the ends.
PLACES = [1, 127, 128, 129, 256, 257, 300, 599, 600]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", EDITS)
def test_damage_is_named_as_the_single_walk_names_it(
    pristine, signer, tmp_path, small_ranges, kind, place
):
    if kind == "truncate" and place == 600:
        place = 560  # a checkpoint must cover what is cut (592 does)
    db = _edited(pristine, tmp_path, kind, place)
    url = f"sqlite:///{db}"
    for key in (signer.public_key, None):
        one = _outcome(url, key, 1)
        assert _outcome(url, key, JOBS) == one, (kind, place, key is not None)
        if key is not None:
            assert one[0] == "damaged", (kind, place)  # type: ignore[index]
            assert one[1] == "long"  # type: ignore[index]


def test_a_forged_merkle_root_and_a_stray_row_are_named_alike(
    pristine, signer, tmp_path, small_ranges
):
    db = _copy(pristine, tmp_path)
    con = sqlite3.connect(db)
    _edit(con, "merkle_root", 407)  # a checkpoint inside the range (384, 512]
    con.execute(
        "INSERT INTO records (chain, seq, prev_hash, hash, body) SELECT chain, 0, prev_hash, hash,"
        " body FROM records WHERE chain = 'mid' AND seq = 5"
    )
    con.commit()
    con.close()
    url = f"sqlite:///{db}"
    for key in (signer.public_key, None):
        one = _outcome(url, key, 1)
        assert one[0] == "damaged"  # type: ignore[index]
        assert _outcome(url, key, JOBS) == one


def test_only_the_damaged_chain_is_walked_again(pristine, signer, tmp_path, small_ranges):
    db = _edited(pristine, tmp_path, "body", 300)
    with open_ledger(f"sqlite:///{db}", readonly=True) as ledger:
        walked, _tried = parallel.walk_chains(ledger, list(CHAINS), signer.public_key, {}, JOBS)
    assert sorted(walked) == ["mid", "short"]


def test_a_wrong_merkle_root_fails_the_assembly_without_a_key(pristine, tmp_path, small_ranges):
    """Only the root differs (no key checks the signature): the frontier of the ranges tells."""
    db = _edited(pristine, tmp_path, "merkle_root", 407)
    with open_ledger(f"sqlite:///{db}", readonly=True) as ledger:
        walked, _tried = parallel.walk_chains(ledger, list(CHAINS), None, {}, JOBS)
    assert sorted(walked) == ["mid", "short"]
    damaged = _outcome(f"sqlite:///{db}", None, JOBS)
    assert damaged[:4] == ("damaged", "long", 407, "modified")  # type: ignore[index]
    assert "merkle root" in damaged[4]  # type: ignore[index]


def test_postgresql_ledger_in_workers(pg_url, signer, small_ranges):
    build(pg_url, signer)
    key = signer.public_key
    one = _outcome(pg_url, key, 1)
    assert _outcome(pg_url, key, JOBS) == one
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("DELETE FROM otel_audit.records WHERE chain = 'long' AND seq = 129")
    damaged = _outcome(pg_url, key, JOBS)
    assert damaged == _outcome(pg_url, key, 1)
    assert damaged[:4] == ("damaged", "long", 129, "deleted")  # type: ignore[index]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> tuple[Path, Path]:
    """A ledger long enough for real ranges (2 x 32,768 records and more), and its key."""
    d = tmp_path_factory.mktemp("big")
    db = d / "big.db"
    build(f"sqlite:///{db}", signer, {"orders": 70_000, "small": 500}, every=10_000)
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    pub = d / "k.pub"
    pub.write_bytes(_pem(signer))
    return db, pub


def _cli(*args: str, one_cpu: bool = False) -> subprocess.CompletedProcess[str]:
    """``otel-audit ARGS``; ``one_cpu``: on one CPU, so its default is one process."""
    return subprocess.run(
        [sys.executable, "-m", "otel_audit.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
        if one_cpu
        else None,
    )


def test_cli_jobs_on_a_long_ledger(big, tmp_path):
    """The command line, fork or spawn alike: --jobs 2 says what --jobs 1 says."""
    db = _copy(big[0], tmp_path)
    cmd = ["verify", "--ledger", str(db), "--public-key", str(big[1])]
    one, two = _cli(*cmd, "--jobs", "1"), _cli(*cmd, "--jobs", "2")
    assert one.returncode == 0, one.stderr
    assert (two.returncode, two.stdout) == (0, one.stdout)
    assert "ok: 70500 records in 2 chains intact" in two.stdout
    con = sqlite3.connect(db)
    con.execute(
        "UPDATE records SET body = CAST(body || ' ' AS BLOB) WHERE chain = 'orders' AND seq = 32769"
    )
    con.commit()
    con.close()
    one, two = _cli(*cmd, "--jobs", "1"), _cli(*cmd, "--jobs", "2")
    assert one.returncode == 1
    assert (two.returncode, two.stderr) == (1, one.stderr)
    assert "seq 32769: modified" in two.stderr


def test_search_and_migrate_verify_in_workers_alike(big, tmp_path):
    """search, export and migrate verify the chains they touch with one process per CPU."""
    db = _copy(big[0], tmp_path)
    con = sqlite3.connect(db)
    con.execute(
        "UPDATE records SET body = CAST(body || ' ' AS BLOB) WHERE chain = 'orders' AND seq = 40000"
    )
    con.commit()
    con.close()
    search = ["search", "--ledger", str(db), "--public-key", str(big[1]), "--format", "jsonl"]
    search += ["--actor", "user3", "--chain", "orders", "--limit", "70000"]
    many, one = _cli(*search), _cli(*search, one_cpu=True)
    assert (many.returncode, many.stdout, many.stderr) == (one.returncode, one.stdout, one.stderr)
    assert many.stdout.count("\n") > 5000
    lines = many.stdout.splitlines()
    damaged = [line for line in lines if '"status": "damaged"' in line]
    assert 0 < len(damaged) < len(lines)  # those from seq 40000 on; the others are shown clean
    target = tmp_path / "copy.db"
    moved = _cli("migrate", "--from", str(big[0]), "--to", f"sqlite:///{target}")
    assert moved.returncode == 0, moved.stderr
    assert "70500 records" in moved.stdout
    refused = _cli("migrate", "--from", str(db), "--to", f"sqlite:///{tmp_path / 'no.db'}")
    assert refused.returncode == 1
    assert "seq 40000: modified" in refused.stderr


def _pem(signer: Signer) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return signer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_cli_refuses_a_bad_jobs_count_in_one_line(tmp_path, bad):
    db = tmp_path / "a.db"
    open_ledger(f"sqlite:///{db}").close()
    out = subprocess.run(
        [sys.executable, "-m", "otel_audit.cli", "verify", "--ledger", str(db), "--jobs", bad],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--jobs" in out.stderr and "Traceback" not in out.stderr


# -- the reviewer's attacks on the workers' way to the ledger ---------------


def test_a_file_swapped_under_an_open_ledger_is_not_what_workers_walk(
    pristine, signer, tmp_path, small_ranges
):
    """The insider puts an untouched copy at the path once verify has the
    edited file open: workers that open the path would vouch for the copy."""
    db = _copy(pristine, tmp_path)
    (tmp_path / "clean").mkdir()
    clean = _copy(pristine, tmp_path / "clean")
    con = sqlite3.connect(db)
    _edit(con, "body", 300)
    con.commit()
    con.close()
    with open_ledger(f"sqlite:///{db}", create=False, readonly=True) as ledger:
        ledger.count()
        clean.replace(db)  # the path now names the untouched copy
        outcomes = []
        for jobs in (1, JOBS):
            with pytest.raises(VerificationError) as info:
                verify_ledger(ledger, signer.public_key, jobs=jobs)
            outcomes.append((info.value.chain, info.value.seq, info.value.kind, str(info.value)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][:3] == ("long", 300, "modified")


def test_workers_open_the_file_the_caller_named_after_a_chdir(
    pristine, signer, tmp_path, small_ranges, monkeypatch
):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    edited = _copy(pristine, tmp_path / "a")
    _copy(pristine, tmp_path / "b")
    con = sqlite3.connect(edited)
    _edit(con, "body", 300)
    con.commit()
    con.close()
    monkeypatch.chdir(tmp_path / "a")
    with open_ledger("audit.db", create=False, readonly=True) as ledger:
        monkeypatch.chdir(tmp_path / "b")  # an untouched audit.db here
        with pytest.raises(VerificationError) as info:
            verify_ledger(ledger, signer.public_key, jobs=JOBS)
    assert (info.value.chain, info.value.seq, info.value.kind) == ("long", 300, "modified")


def test_a_connection_that_reaches_another_database_is_not_used(
    pg_server, signer, small_ranges, monkeypatch
):
    """The URL names no database; the environment does, and it changes before
    the workers connect, to a copy made before the edit. Their walk is refused."""
    import psycopg

    real = pg_server.create_database("parallel_real")
    build(real, signer)
    with psycopg.connect(pg_server.url(), autocommit=True) as con:
        con.execute('CREATE DATABASE "parallel_decoy" TEMPLATE "parallel_real"')
    with psycopg.connect(real, autocommit=True) as con:
        con.execute(
            "UPDATE otel_audit.records SET body = body || '\\x20'::bytea"
            " WHERE chain = 'long' AND seq = 300"
        )
    url = real.rsplit("/", 1)[0] + "/"
    monkeypatch.setenv("PGDATABASE", "parallel_real")
    with open_ledger(url, create=False, readonly=True) as ledger:
        monkeypatch.setenv("PGDATABASE", "parallel_decoy")
        outcomes = []
        for jobs in (1, JOBS):
            with pytest.raises(VerificationError) as info:
                verify_ledger(ledger, signer.public_key, jobs=jobs)
            outcomes.append(str(info.value))
    assert outcomes[0] == outcomes[1]
    assert "chain 'long' seq 300: modified" in outcomes[0]


def test_a_row_planted_at_a_huge_seq_is_walked_here_not_planned(
    pristine, signer, tmp_path, small_ranges
):
    """Ranges are planned from a chain's last seq: a row at 2**62 must not make
    2**55 of them (the reviewer's run ran out of memory)."""
    db = _copy(pristine, tmp_path)
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO records (chain, seq, prev_hash, hash, body) SELECT chain, ?, prev_hash,"
        " hash, body FROM records WHERE chain = 'long' AND seq = 5",
        (2**62,),
    )
    con.commit()
    con.close()
    url = f"sqlite:///{db}"
    began = time.monotonic()
    damaged = _outcome(url, signer.public_key, JOBS)
    assert time.monotonic() - began < 20
    assert damaged == _outcome(url, signer.public_key, 1)
    assert damaged[:4] == ("damaged", "long", 601, "deleted")  # type: ignore[index]


def test_progress_counts_each_record_once(pristine, signer, tmp_path, small_ranges):
    db = _edited(pristine, tmp_path, "body", 599)
    counted = {1: 0, JOBS: 0}
    for jobs in counted:

        def tell(n: int, jobs: int = jobs) -> None:
            counted[jobs] += n

        with open_ledger(f"sqlite:///{db}", readonly=True) as ledger:
            with pytest.raises(VerificationError):
                verify_ledger(ledger, signer.public_key, jobs=jobs, progress=tell)
    assert 0 < counted[JOBS] <= 950
    assert counted[1] <= 950


def test_many_short_chains_take_no_longer_with_workers(tmp_path):
    """34,000 chains of two records (real range sizes): none is planned, so
    --jobs costs about what one process does (the reviewer's run: 50x)."""
    import hashlib

    db = tmp_path / "many.db"
    open_ledger(f"sqlite:///{db}").close()
    rows = []
    rnd = random.Random(5)
    for i in range(34_000):
        prev = bytes(32)
        for seq in (1, 2):
            body = _body(f"c{i}", seq, rnd)
            digest = hashlib.sha256(prev + body).digest()
            rows.append((f"c{i}", seq, prev, digest, body))
            prev = digest
    con = sqlite3.connect(db)
    con.executemany(
        "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES (?, ?, ?, ?, ?)", rows
    )
    con.commit()
    con.close()
    took, seen = {}, {}
    for jobs in (1, 2):
        began = time.monotonic()
        seen[jobs] = _outcome(f"sqlite:///{db}", None, jobs)
        took[jobs] = time.monotonic() - began
    assert seen[2] == seen[1] and len(seen[1]) == 34_000  # type: ignore[arg-type]
    assert took[2] < 2 * took[1] + 2


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_wal_file_swapped_under_an_open_ledger_is_not_what_workers_read(
    pristine, signer, tmp_path, small_ranges, start
):
    """The edit sits in the -wal only (its writer died before a checkpoint); once
    verify has the ledger open, the insider moves the -wal and -shm aside, so a
    new connection would read the clean main file. Workers are spawned (fresh
    processes) when the caller runs other threads, forked otherwise: both."""
    db = _copy(pristine, tmp_path)
    tamper = (
        "import os, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1])\n"
        "con.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "con.execute(\"UPDATE records SET body = CAST(body || ' ' AS BLOB)"
        " WHERE chain = 'long' AND seq = 300\")\n"
        "con.commit()\n"
        "os._exit(0)  # no close, no checkpoint: the edit stays in the -wal\n"
    )
    subprocess.run([sys.executable, "-c", tamper, str(db)], check=True)
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    assert wal.stat().st_size > 0
    with open_ledger(f"sqlite:///{db}", create=False, readonly=True) as ledger:
        ledger.count()
        wal.rename(tmp_path / "aside-wal")
        shm.rename(tmp_path / "aside-shm")
        outcomes = []
        done = threading.Event()
        other = threading.Thread(target=done.wait, daemon=True)
        if start == "spawn":
            other.start()  # a caller's thread: workers are spawned, not forked
        try:
            for jobs in (1, JOBS):
                with pytest.raises(VerificationError) as info:
                    verify_ledger(ledger, signer.public_key, jobs=jobs)
                outcomes.append(str(info.value))
        finally:
            done.set()
    assert outcomes[0] == outcomes[1]
    assert "chain 'long' seq 300: modified" in outcomes[0]
