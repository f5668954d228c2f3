"""The embedded SQLite ledger (the default).

WAL journal with synchronous=FULL: a commit returns after its fsync. Appends
take the database write lock (BEGIN IMMEDIATE), read the chain head and insert
inside one transaction, so several processes (gunicorn workers) can append to
one chain without breaking it. A connection's next append to a chain it
wrote last is one autocommit INSERT after the head it remembers, which writes
nothing when any row lies above that head (anyone appended in between, or a
row was planted ahead); the append then falls back to the locked read of the
head. Rows a planted trigger skips are never acknowledged. Query columns are *virtual* generated columns
computed from the canonical body, so no stored column can disagree with the
hashed bytes; ``schema_problems`` names any change to that schema (another
expression behind a query column, a trigger, a view). Every commit checks that
the path still names the file the connection writes (device and inode), so a
ledger deleted or replaced under a running writer fails every later append
instead of acknowledging records written to an unlinked file. One instance
per thread (the writer thread owns its own).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from otel_audit import vocabulary as v
from otel_audit.engine.ledger.base import (
    Appended,
    Ledger,
    Query,
    RawRow,
    SpanKey,
    StoredRecord,
    as_bytes,
    checkpoint_from_row,
    filter_clauses,
    span_keys,
)
from otel_audit.errors import CommitUncertain, LedgerError, LedgerWriteError
from otel_audit.proof.chain import GENESIS, Checkpoint, link_hash

SCHEMA_VERSION = 1
_log = logging.getLogger("otel_audit")
_BUSY_TIMEOUT_MS = 60_000
_ROWS_PER_INSERT = 500  # 2,500 bound values, well under SQLite's limit


def _attr(name: str) -> str:
    return f"""json_extract(CAST(body AS TEXT), '$.attributes."{name}"')"""


# The query indexes but the trace one are partial: a record without the field
# (an effect has no action or resource; an anonymous actor no actor id) adds
# no entry, so a commit writes fewer index pages. A filter ``col = ?``
# implies ``col IS NOT NULL``, so every search still uses them. Files made
# before hold full indexes under the same names: those answer the same
# queries, and ``schema_problems`` accepts them (_FORMER_INDEXES).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    trace_id TEXT GENERATED ALWAYS AS (json_extract(CAST(body AS TEXT), '$.trace_id')) VIRTUAL,
    span_id TEXT GENERATED ALWAYS AS (json_extract(CAST(body AS TEXT), '$.span_id')) VIRTUAL,
    start_ns INTEGER GENERATED ALWAYS AS (json_extract(CAST(body AS TEXT), '$.start')) VIRTUAL,
    service TEXT GENERATED ALWAYS AS (json_extract(CAST(body AS TEXT), '$.service')) VIRTUAL,
    trail_id TEXT GENERATED ALWAYS AS ({_attr(v.TRAIL_ID)}) VIRTUAL,
    action TEXT GENERATED ALWAYS AS ({_attr(v.ACTION)}) VIRTUAL,
    actor_id TEXT GENERATED ALWAYS AS ({_attr(v.ACTOR_ID)}) VIRTUAL,
    resource_type TEXT GENERATED ALWAYS AS ({_attr(v.RESOURCE_TYPE)}) VIRTUAL,
    resource_id TEXT GENERATED ALWAYS AS ({_attr(v.RESOURCE_ID)}) VIRTUAL,
    outcome TEXT GENERATED ALWAYS AS ({_attr(v.OUTCOME)}) VIRTUAL,
    PRIMARY KEY (chain, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_trace ON records (trace_id, span_id);
CREATE INDEX IF NOT EXISTS records_trail ON records (trail_id) WHERE trail_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_actor ON records (actor_id) WHERE actor_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_resource ON records (resource_type, resource_id)
    WHERE resource_type IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_action ON records (action) WHERE action IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkpoints (
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    time INTEGER NOT NULL,
    signature BLOB,
    key_id TEXT,
    merkle_root BLOB,
    PRIMARY KEY (chain, seq)
) WITHOUT ROWID;
"""

# The head is the highest *integer* seq: a row planted with a text or real seq
# (it sorts above every integer) must not become the seq appends continue from.
_HEAD = (
    "SELECT seq, hash FROM records WHERE chain = ? AND typeof(seq) = 'integer' AND seq > 0"
    " ORDER BY seq DESC LIMIT 1"
)

# A chain's rows in seq order. Rows with a seq of another type (text sorts
# after every integer, a real between two) are in no sequence: stray_rows
# names them, and the walk goes on over the real sequence around them.
_SCAN = (
    "SELECT seq, prev_hash, hash, body FROM records"
    " WHERE chain = ? AND seq > ? AND typeof(seq) = 'integer' ORDER BY seq"
)

_SCAN_RANGE = _SCAN.replace(" ORDER BY seq", " AND seq <= ? ORDER BY seq")

_QUERY_COLUMNS = {
    "actor": "actor_id",
    "action": "action",
    "resource_type": "resource_type",
    "resource_id": "resource_id",
    "outcome": "outcome",
    "service": "service",
    "trail_id": "trail_id",
    "trace_id": "trace_id",
    "chain": "chain",
}


# Column types every row must have: a row with another type (a chain stored as
# a blob, a seq as text, a hash as a string) is in no chain's sequence.
_ROW_TYPES = {
    "chain": "text",
    "seq": "integer",
    "prev_hash": "blob",
    "hash": "blob",
    "body": "blob",
}


#: Index definitions of earlier versions that still answer every query the same.
_FORMER_INDEXES = {
    ("index", "records_trail"): "CREATE INDEX records_trail ON records (trail_id)",
    ("index", "records_actor"): "CREATE INDEX records_actor ON records (actor_id)",
    ("index", "records_resource"): (
        "CREATE INDEX records_resource ON records (resource_type, resource_id)"
    ),
    ("index", "records_action"): "CREATE INDEX records_action ON records (action)",
}


def _expected_schema() -> dict[tuple[str, str], str | None]:
    """(type, name) -> normalised SQL of what this version creates, read back from SQLite."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(_SCHEMA)
        return _schema_of(con)
    finally:
        con.close()


def _schema_of(con: sqlite3.Connection) -> dict[tuple[str, str], str | None]:
    rows = con.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    return {
        (str(kind), str(name)): (" ".join(str(sql).split()) if sql is not None else None)
        for kind, name, sql in rows
        # sqlite_stat* tables are SQLite's own (ANALYZE); they derive nothing shown.
        if not (str(kind) == "table" and str(name).startswith("sqlite_stat"))
    }


@contextmanager
def _mapped(what: str, error: type[LedgerError] = LedgerError) -> Iterator[None]:
    """Map sqlite3 errors to LedgerError, naming the operation."""
    try:
        yield
    except sqlite3.Error as exc:
        raise error(f"sqlite ledger: {what} failed: {exc}") from exc


class SQLiteLedger(Ledger):
    """A ledger in one SQLite file; see the module docstring for guarantees."""

    def __init__(
        self,
        path: str,
        *,
        create: bool = True,
        readonly: bool = False,
        busy_timeout_ms: int | None = None,
    ) -> None:
        self.path = path
        self.url = "sqlite:///" + path
        busy = _BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise LedgerError(f"ledger directory {directory!r} does not exist")
        exists = os.path.exists(path)
        if not exists and (readonly or not create):
            raise LedgerError(f"ledger file {path!r} does not exist")
        if exists and os.path.isdir(path):
            raise LedgerError(f"ledger path {path!r} is a directory")
        # chain -> (seq, hash) of the last record this connection appended.
        self._heads: dict[str, tuple[int, bytes]] = {}
        self._locked_only = False
        uri = "file:" + _quote(os.path.abspath(path)) + ("?mode=ro" if readonly else "")
        with _mapped(f"opening {path!r}"):
            self._con = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=busy / 1000
            )
        try:
            with _mapped(f"opening {path!r}"):
                self._con.execute(f"PRAGMA busy_timeout = {int(busy)}")
                if readonly:
                    # Reading a file that is not a database fails here, not later.
                    self._con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                    self._check_schema()
                else:
                    self._prepare(busy / 1000)
                    self._check_schema()
            # The identity of the file the connection opened: a commit that
            # finds another file (or none) at the path wrote to an orphan.
            try:
                # Absolute: a process that changes directory later still names this file.
                self._abspath = os.path.abspath(path)
                self._identity = _identity(self._abspath) if not readonly else None
            except OSError as exc:
                raise LedgerError(f"ledger file {path!r} vanished while opening: {exc}") from exc
        except BaseException:
            self._con.close()
            raise

    def _check_file(self, committed: bool = True) -> None:
        """Raise LedgerWriteError when the path no longer names the file this connection
        writes; CommitUncertain when found right after a commit (``committed``)."""
        if self._identity is None:
            return
        try:
            now = _identity(self._abspath)
        except OSError:
            now = None
        if now != self._identity:
            raise (CommitUncertain if committed else LedgerWriteError)(
                f"sqlite ledger: {self.path!r} was deleted or replaced while open;"
                " records committed now would be lost with the old file (reopen the ledger)"
            )

    def _prepare(self, patience: float) -> None:
        """WAL mode and the schema, in one write transaction.

        Two processes creating the same new file at once (a service and its
        forwarder) race to switch it to WAL, and SQLite answers that race
        "database is locked" without waiting: retry it until ``patience`` runs out.
        """
        deadline = time.monotonic() + patience
        while True:
            try:
                self._con.execute("PRAGMA journal_mode = WAL").fetchone()
                self._con.execute("PRAGMA synchronous = FULL")
                self._con.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._con.execute(statement)
                    self._con.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                    self._con.execute("COMMIT")
                except BaseException:
                    if self._con.in_transaction:
                        self._con.execute("ROLLBACK")
                    raise
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _check_schema(self) -> None:
        try:
            row = self._con.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            raise LedgerError(f"{self.path!r} is not an otel-audit ledger") from exc
        if row is None or str(row[0]) != str(SCHEMA_VERSION):
            raise LedgerError(
                f"ledger {self.path!r} has schema version {row[0] if row else None}, "
                f"expected {SCHEMA_VERSION}"
            )

    def append(
        self,
        chain: str,
        bodies: Sequence[bytes],
        *,
        dedupe: bool = False,
        keys: Sequence[SpanKey | None] | None = None,
    ) -> list[Appended]:
        # Before, so nothing is written to a file swapped since the last commit
        # (its WAL, which keeps the path's name, would show it at the path);
        # and after (below), for a swap during the commit.
        self._check_file(committed=False)
        if (
            not dedupe
            and 0 < len(bodies) <= _ROWS_PER_INSERT
            and chain in self._heads
            and not self._locked_only
        ):
            done = self._append_one_statement(chain, bodies)
            if done is not None:
                return done
        con = self._con
        with _mapped(f"appending to chain {chain!r}", LedgerWriteError):
            try:
                # Inside the try: an exception right after it (a KeyboardInterrupt)
                # must not leave the connection in a transaction.
                con.execute("BEGIN IMMEDIATE")
                row = con.execute(
                    _HEAD,
                    (chain,),
                ).fetchone()
                seq, prev = (row[0], as_bytes(row[1])) if row else (0, GENESIS)
                mine = self._heads.get(chain)
                if mine is not None and mine[0] > seq:
                    # Rows this connection wrote are gone (deleted under it): go on
                    # after them, as the one-statement append does, leaving the gap
                    # verify reports, never refilling seqs a forwarder already sent.
                    _log.error(
                        "otel-audit: sqlite ledger: chain %r ends at seq %d, below seq %d"
                        " this connection wrote: records were deleted; appending after %d",
                        chain, seq, mine[0], mine[0],
                    )  # fmt: skip
                    seq, prev = mine
                rows = []
                out = []
                found: list[SpanKey | None] = []
                seen: set[SpanKey] = set()
                if dedupe:
                    found = span_keys(bodies, keys)
                    seen = self._stored_keys([k for k in found if k is not None])
                for i, body in enumerate(bodies):
                    if dedupe:
                        key = found[i]
                        if key is not None:
                            if key in seen:
                                continue
                            seen.add(key)
                    seq += 1
                    digest = link_hash(prev, body)
                    rows.append((chain, seq, prev, digest, body))
                    out.append(Appended(chain, seq, digest))
                    prev = digest
                # One multi-row INSERT per chunk, not executemany: each statement
                # step gives the interpreter lock back and must win it again,
                # and under load from application threads every round trip
                # can cost a whole switch interval.
                for start in range(0, len(rows), _ROWS_PER_INSERT):
                    chunk = rows[start : start + _ROWS_PER_INSERT]
                    inserted = con.execute(
                        "INSERT INTO records (chain, seq, prev_hash, hash, body) VALUES "
                        + ",".join(["(?, ?, ?, ?, ?)"] * len(chunk)),
                        [value for row in chunk for value in row],
                    ).rowcount
                    if inserted != len(chunk):  # skipped without an error: never acknowledged
                        raise LedgerWriteError(
                            f"sqlite ledger: appending to chain {chain!r} stored {inserted}"
                            f" of {len(chunk)} records (the schema was altered: a trigger?)"
                        )
                con.execute("COMMIT")
            except BaseException:
                self._heads.pop(chain, None)
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        self._heads[chain] = (seq, prev)
        # After the commit, so a file swapped at any moment before it is seen:
        # one stat per transaction, not per record.
        self._check_file()
        return out

    def _append_one_statement(self, chain: str, bodies: Sequence[bytes]) -> list[Appended] | None:
        """Append after the head this connection last wrote, in one autocommit statement.

        One call into SQLite instead of four (BEGIN, head, INSERT, COMMIT):
        each call gives the interpreter lock back and must win it again, and
        with busy application threads every round trip costs the writer
        about a millisecond. The statement is its own transaction, durable
        when it returns (WAL, synchronous=FULL). It writes nothing when any
        row lies above the remembered head: another connection appended since,
        or a row was planted far ahead (which would otherwise leave this writer
        appending below it, under the cursor of a forwarder that has already
        passed it). Then, or when the primary key (chain, seq) refuses it,
        None sends the caller to the locked path, which reads the head again:
        the chain is never forked.
        """
        if self._con.in_transaction:
            # Whoever opened it did not finish: an INSERT now would join that
            # transaction and be acknowledged uncommitted. The locked path
            # refuses it loudly instead.
            del self._heads[chain]
            return None
        seq, prev = self._heads[chain]
        rows: list[object] = []
        out = []
        for body in bodies:
            seq += 1
            digest = link_hash(prev, body)
            rows += (chain, seq, prev, digest, body)
            out.append(Appended(chain, seq, digest))
            prev = digest
        try:
            inserted = self._con.execute(
                "INSERT INTO records (chain, seq, prev_hash, hash, body) SELECT * FROM (VALUES "
                + ",".join(["(?, ?, ?, ?, ?)"] * len(bodies))
                + ") WHERE NOT EXISTS (SELECT 1 FROM records WHERE chain = ? AND seq > ?"
                " AND typeof(seq) = 'integer')",
                [*rows, chain, self._heads[chain][0]],
            ).rowcount
        except sqlite3.IntegrityError as exc:
            del self._heads[chain]
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_PRIMARYKEY":
                return None  # another writer appended (nothing was written): read the head again
            # Anything else (a CHECK or a trigger someone added) is not a race:
            # it fails loudly, and this connection appends under the lock from now on.
            self._locked_only = True
            raise LedgerWriteError(
                f"sqlite ledger: appending to chain {chain!r} failed: {exc}"
            ) from exc
        except sqlite3.Error as exc:
            self._heads.pop(chain, None)
            raise LedgerWriteError(
                f"sqlite ledger: appending to chain {chain!r} failed: {exc}"
            ) from exc
        if inserted == 0:
            # A row above the remembered head (another writer's, or one planted
            # far ahead): nothing was written; the locked path reads the head.
            del self._heads[chain]
            return None
        if inserted != len(bodies):  # rows skipped without an error: a planted trigger
            del self._heads[chain]
            self._locked_only = True
            raise LedgerWriteError(
                f"sqlite ledger: appending to chain {chain!r} stored {inserted} of"
                f" {len(bodies)} records (the schema was altered: a trigger?)"
            )
        self._heads[chain] = (seq, prev)
        self._check_file()
        return out

    def _stored_keys(self, keys: list[SpanKey]) -> set[SpanKey]:
        """Which (trace id, span id) of ``keys`` are already stored: one query per 400 keys."""
        wanted = set(keys)
        traces = sorted({trace for trace, _ in wanted})
        found: set[SpanKey] = set()
        for start in range(0, len(traces), 500):
            chunk = traces[start : start + 500]
            marks = ",".join("?" * len(chunk))
            # trace_id IN (...) seeks the (trace_id, span_id) index; a row-value IN does not.
            for trace, span in self._con.execute(
                f"SELECT trace_id, span_id FROM records WHERE trace_id IN ({marks})", chunk
            ):
                if (trace, span) in wanted:
                    found.add((trace, span))
        return found

    def head(self, chain: str) -> Appended | None:
        with _mapped("reading chain head"):
            row = self._con.execute(_HEAD, (chain,)).fetchone()
        return Appended(chain, row[0], as_bytes(row[1])) if row else None

    def chains(self) -> list[str]:
        with _mapped("listing chains"):
            rows = self._con.execute(
                "SELECT chain FROM (SELECT DISTINCT chain FROM records"
                " UNION SELECT DISTINCT chain FROM checkpoints) ORDER BY chain"
            ).fetchall()
        return [r[0] for r in rows]

    def scan(
        self, chain: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[RawRow]:
        with _mapped(f"reading chain {chain!r}"):
            if until_seq is None:
                cur = self._con.execute(_SCAN, (chain, after_seq))
            else:
                cur = self._con.execute(_SCAN_RANGE, (chain, after_seq, until_seq))
            while True:
                rows = cur.fetchmany(4096)
                if not rows:
                    return
                for seq, prev, digest, body in rows:
                    if type(prev) is bytes and type(digest) is bytes and type(body) is bytes:
                        yield RawRow(seq, prev, digest, body)
                    else:
                        yield RawRow(seq, as_bytes(prev), as_bytes(digest), as_bytes(body))

    def scan_batches(
        self, chain: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[Sequence[RawRow]]:
        with _mapped(f"reading chain {chain!r}"):
            if until_seq is None:
                cur = self._con.execute(_SCAN, (chain, after_seq))
            else:
                cur = self._con.execute(_SCAN_RANGE, (chain, after_seq, until_seq))
            while True:
                rows = cur.fetchmany(8192)
                if not rows:
                    return
                yield rows

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with _mapped("storing a checkpoint", LedgerWriteError):
            self._con.execute(
                "INSERT OR IGNORE INTO checkpoints"
                " (chain, seq, head, time, signature, key_id, merkle_root)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    checkpoint.chain,
                    checkpoint.seq,
                    checkpoint.head,
                    checkpoint.time,
                    checkpoint.signature,
                    checkpoint.key_id,
                    checkpoint.merkle_root,
                ),
            )
        self._check_file()

    def checkpoints(self, chain: str | None = None) -> list[Checkpoint]:
        sql = "SELECT chain, seq, head, time, signature, key_id, merkle_root FROM checkpoints"
        args: tuple[str, ...] = ()
        if chain is not None:
            sql += " WHERE chain = ?"
            args = (chain,)
        with _mapped("reading checkpoints"):
            rows = self._con.execute(sql + " ORDER BY chain, seq", args).fetchall()
        return [checkpoint_from_row(row) for row in rows]

    def query(self, query: Query) -> Iterator[StoredRecord]:
        where, args = filter_clauses(query, _QUERY_COLUMNS, "start_ns", "?")
        if query.after is not None:
            # A row value, so an index ending in (chain, seq) can seek to the cursor.
            where.append("(chain, seq) > (?, ?)")
            args.extend([query.after[0], query.after[1]])
        sql = "SELECT chain, seq, prev_hash, hash, body FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY chain, seq"
        if query.limit is not None:
            sql += " LIMIT ?"
            args.append(int(query.limit))
        with _mapped("querying records"):
            cur = self._con.execute(sql, args)
            while True:
                rows = cur.fetchmany(1024)
                if not rows:
                    return
                for chain, seq, prev, digest, body in rows:
                    yield StoredRecord(chain, seq, as_bytes(prev), as_bytes(digest), as_bytes(body))

    def count(self) -> int:
        # From the table itself, never an index: an index is a second copy an
        # insider can make disagree with its definition (its stored SQL edited
        # under writable_schema), and verify trusts this count to find rows
        # outside every chain's sequence.
        with _mapped("counting records"):
            return int(self._con.execute("SELECT count(*) FROM records NOT INDEXED").fetchone()[0])

    def stray_rows(self, limit: int = 10) -> list[tuple[object, object, str]]:
        # Type checks in SQL: the table is not STRICT, so any value fits any column.
        checks = " OR ".join(f"typeof({col}) != '{kind}'" for col, kind in _ROW_TYPES.items())
        sql = (
            "SELECT chain, seq, typeof(chain), typeof(seq), typeof(prev_hash), typeof(hash),"
            f" typeof(body) FROM records WHERE {checks} OR seq < 1 LIMIT ?"
        )
        with _mapped("checking record rows"):
            rows = self._con.execute(sql, (int(limit),)).fetchall()
        out: list[tuple[object, object, str]] = []
        for chain, seq, *types in rows:
            wrong = [
                f"{col} is {kind_found}, not {kind}"
                for (col, kind), kind_found in zip(_ROW_TYPES.items(), types)
                if kind_found != kind
            ]
            out.append((chain, seq, "; ".join(wrong) or f"seq {seq} is outside every sequence"))
        return out

    def schema_problems(self) -> list[str]:
        with _mapped("reading the schema"):
            found = _schema_of(self._con)
        expected = _expected_schema()
        problems = []
        for key, sql in sorted(expected.items()):
            kind, name = key
            if key not in found:
                # An index only makes queries faster (files made before an index
                # existed lack it until opened for writing); anything else is gone.
                if kind != "index":
                    problems.append(f"{kind} {name} is missing")
            elif found[key] != sql and found[key] != _FORMER_INDEXES.get(key):
                problems.append(f"{kind} {name} differs from the one this version creates")
        for kind, name in sorted(set(found) - set(expected)):
            problems.append(f"{kind} {name} is not part of the ledger schema")
        return problems

    def reopen_target(self) -> str | None:
        return f"sqlite:///{self._abspath}"

    def store_identity(self) -> tuple[object, ...] | None:
        """(device, inode) of the database file, its ``-wal`` and its ``-shm`` that
        this process has open at the ledger's path.

        Read from the open descriptors (Linux ``/proc/self/fd``), not from the
        paths, which may name other files by now (a clean copy's ``-wal``
        renamed into place changes what a new connection reads, and so what
        the records are). None when the process holds more than one file at
        one of those paths (one was replaced), or there is no ``/proc``.
        """
        base = {self._abspath, os.path.realpath(self._abspath)}
        kinds: dict[str, str] = {}
        for suffix in ("", "-wal", "-shm"):
            for name in base:
                kinds[name + suffix] = suffix or "db"
                kinds[f"{name}{suffix} (deleted)"] = suffix or "db"
        held: dict[str, set[tuple[int, int]]] = {"db": set(), "-wal": set(), "-shm": set()}
        try:
            descriptors = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for fd in descriptors:
            link = f"/proc/self/fd/{fd}"
            try:
                kind = kinds.get(os.readlink(link))
                if kind is not None:
                    st = os.stat(link)
                    held[kind].add((st.st_dev, st.st_ino))
            except OSError:  # closed meanwhile
                continue
        if len(held["db"]) != 1 or any(len(ids) > 1 for ids in held.values()):
            return None
        return ("sqlite", *(tuple(sorted(held[k])) for k in ("db", "-wal", "-shm")))

    def close(self) -> None:
        try:
            self._con.close()
        except sqlite3.Error:
            pass


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _quote(path: str) -> str:
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
