"""The PostgreSQL ledger: one shared store for many services on many machines.

Every writer appends to its own chain (``default_chain`` is
``service/hostname/pid``), so there is no global lock and chains commit in
parallel. The chain head a writer appended last is kept in memory: the next
batch continues from it in one binary COPY, without reading the head or
taking a lock; the (chain, seq) primary key rejects it if anyone else
appended in between, and the schema's statement trigger rejects any insert
below a row already there (appended since, or planted far ahead), so a fork
is impossible and a writer never appends below a planted row. Rows a planted
trigger skips are never acknowledged. An append takes the per-chain
transaction-scoped advisory lock and reads the head in the same transaction
only after such a refusal, on a first append, after an unknown COMMIT
outcome, and for a chain another writer shares. ``synchronous_commit`` is forced on, so ``append``
returns only after PostgreSQL committed (and, with a synchronous standby,
replicated) the records.

Bodies are stored byte-exact (``bytea``): the same span gives the same bytes
and hash as in SQLite. Query columns are not stored beside the body: one
*generated* ``doc`` column (jsonb parsed from the body by an immutable
function) feeds expression indexes and filters, so no query value can
disagree with the hashed bytes.

A broken connection (server restart, failover) is reopened and the append
retried for up to ``retry_seconds``; an append whose COMMIT outcome is unknown
is resolved by reading back its first (seq, hash) before anything else is
written, so acknowledged records are never lost nor duplicated. Past that
window the append raises ``LedgerWriteError`` (fail-closed, as with SQLite).

Thread-safe: one connection, used by one thread at a time under a lock.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from otel_audit import vocabulary as v
from otel_audit.engine.ledger.base import (
    Appended,
    Ledger,
    Query,
    RawRow,
    SpanKey,
    StoredRecord,
    checkpoint_from_row,
    filter_clauses,
    span_keys,
)
from otel_audit.errors import ConfigError, LedgerError, LedgerWriteError, VerificationError
from otel_audit.proof.chain import GENESIS, Checkpoint, link_hash

SCHEMA = "otel_audit"
SCHEMA_VERSION = 2
#: How long an append keeps reconnecting and retrying before it fails.
RETRY_SECONDS = 10.0
_CONNECT_TIMEOUT = 5
_PAGE = 2000
_KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
# Key of the advisory lock that serialises schema creation and migration.
_INIT_LOCK = 0x6F74656C61756469  # "otelaudi"

T = TypeVar("T")


def _attr(name: str) -> str:
    return f"(doc -> 'attributes' ->> '{name}')"


# Filter name -> SQL expression over the generated ``doc`` column.
_QUERY_COLUMNS = {
    "actor": _attr(v.ACTOR_ID),
    "action": _attr(v.ACTION),
    "resource_type": _attr(v.RESOURCE_TYPE),
    "resource_id": _attr(v.RESOURCE_ID),
    "outcome": _attr(v.OUTCOME),
    "service": "(doc ->> 'service')",
    "trail_id": _attr(v.TRAIL_ID),
    "trace_id": "(doc ->> 'trace_id')",
    "chain": "chain",
}
_START = "((doc ->> 'start')::numeric)"

# Migration i takes the schema from version i to i + 1. Each runs in one
# transaction under an advisory lock, so concurrent ``init`` calls are safe.
_MIGRATIONS: list[list[str]] = [
    [
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
        f"CREATE TABLE {SCHEMA}.meta (key text PRIMARY KEY, value text NOT NULL)",
        # convert_from() is only STABLE because it depends on the database
        # encoding, which is fixed at CREATE DATABASE and checked to be UTF8 by
        # init: for us it is immutable. jsonb rejects the \u0000 escape, and a
        # body that is not JSON at all (a migrated, damaged record) must not
        # make its INSERT fail: both give a doc that hides only the filters.
        rf"""CREATE FUNCTION {SCHEMA}.body_json(body bytea) RETURNS jsonb
            LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
            DECLARE doc jsonb;
            BEGIN
                doc := replace(convert_from(body, 'UTF8'), '\u0000', '\ufffd')::jsonb;
                IF jsonb_typeof(doc) <> 'object'
                   OR jsonb_typeof(doc -> 'start') IS DISTINCT FROM 'number' THEN
                    RETURN NULL;
                END IF;
                RETURN doc;
            EXCEPTION WHEN others THEN
                RETURN NULL;
            END $$""",
        f"""CREATE TABLE {SCHEMA}.records (
            chain text COLLATE "C" NOT NULL,
            seq bigint NOT NULL CHECK (seq > 0),
            prev_hash bytea NOT NULL,
            hash bytea NOT NULL,
            body bytea NOT NULL,
            doc jsonb GENERATED ALWAYS AS ({SCHEMA}.body_json(body)) STORED,
            stored_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (chain, seq)
        )""",
        (
            f"CREATE INDEX records_trace ON {SCHEMA}.records"
            " ((doc ->> 'trace_id'), (doc ->> 'span_id'))"
        ),
        f"CREATE INDEX records_trail ON {SCHEMA}.records ({_attr(v.TRAIL_ID)})",
        f"CREATE INDEX records_actor ON {SCHEMA}.records ({_attr(v.ACTOR_ID)})",
        (
            f"CREATE INDEX records_resource ON {SCHEMA}.records"
            f" ({_attr(v.RESOURCE_TYPE)}, {_attr(v.RESOURCE_ID)})"
        ),
        f"CREATE INDEX records_action ON {SCHEMA}.records ({_attr(v.ACTION)})",
        f"CREATE INDEX records_start ON {SCHEMA}.records ({_START})",
        f"""CREATE TABLE {SCHEMA}.checkpoints (
            chain text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            head bytea NOT NULL,
            time bigint NOT NULL,
            signature bytea,
            key_id text,
            merkle_root bytea,
            PRIMARY KEY (chain, seq)
        )""",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {SCHEMA} FROM PUBLIC",
        f"INSERT INTO {SCHEMA}.meta (key, value) VALUES ('schema_version', '0')",
    ],
]
# Version 2: every insert into records is refused, as a whole, when a row of
# its chain already lies above the rows it adds (appended meanwhile, or
# planted far ahead by someone with write access): no writer ever appends
# below a planted row, where a forwarder or ``tail`` whose cursor has passed
# it would never look. Also refused: rows of one insert that are not
# contiguous (a planted BEFORE trigger skipped some of them without an
# error), and inserts under another isolation than read committed (whose
# snapshot could predate a planted row). The function takes the chain's
# advisory lock (the one a writer reading the head holds) before it looks,
# so a row another transaction is inserting in the chain is committed, and
# seen, first; it probes with max(seq), whose plan is always a backward
# index scan; and it resolves names in pg_catalog only, so no operator or
# function placed earlier on a search path can stand in for the checks.
# The error is a unique_violation, which a writer appending after its
# remembered head takes as "someone else appended": it reads the head under
# the lock and links onto what is there.
_MIGRATIONS.append(
    [
        rf"""CREATE FUNCTION {SCHEMA}.append_at_head() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            DECLARE
                c text; low bigint; top bigint; n bigint; highest bigint;
            BEGIN
                IF current_setting('transaction_isolation') <> 'read committed' THEN
                    RAISE EXCEPTION 'otel-audit: records are appended under read committed'
                          ' isolation only, not %', current_setting('transaction_isolation');
                END IF;
                FOR c, low, top, n IN
                    SELECT chain, min(seq), max(seq), count(*) FROM new_rows
                    GROUP BY chain ORDER BY chain
                LOOP
                    IF top - low + 1 <> n THEN
                        RAISE EXCEPTION 'otel-audit: records of this append are missing'
                              ' (seq % to % holds % rows: a trigger skipped some?)', low, top, n;
                    END IF;
                    PERFORM pg_advisory_xact_lock(
                        ('x' || left(encode(sha256(convert_to(c, 'UTF8')), 'hex'), 16))
                        ::bit(64)::bigint);
                    highest := (SELECT max(seq) FROM {SCHEMA}.records WHERE chain = c);
                    IF highest > top THEN
                        RAISE EXCEPTION 'otel-audit: chain % has rows above seq % (up to %)',
                              c, top, highest USING ERRCODE = 'unique_violation';
                    END IF;
                END LOOP;
                RETURN NULL;
            END $$""",
        f"CREATE TRIGGER records_append_at_head AFTER INSERT ON {SCHEMA}.records"
        f" REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
        f" EXECUTE FUNCTION {SCHEMA}.append_at_head()",
    ]
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


# -- the schema this version creates, as the catalog describes it ------------
# ``schema_problems`` compares the stored schema with these. Indexes are left
# out: they change how fast a query runs, never what it returns.

#: (table, column) -> (type, NOT NULL, generated, default or generation expression, collation)
_COLUMNS: dict[tuple[str, str], tuple[str, bool, str, str, str]] = {
    ("checkpoints", "chain"): ("text", True, "", "", "C"),
    ("checkpoints", "seq"): ("bigint", True, "", "", ""),
    ("checkpoints", "head"): ("bytea", True, "", "", ""),
    ("checkpoints", "time"): ("bigint", True, "", "", ""),
    ("checkpoints", "signature"): ("bytea", False, "", "", ""),
    ("checkpoints", "key_id"): ("text", False, "", "", "default"),
    ("checkpoints", "merkle_root"): ("bytea", False, "", "", ""),
    ("meta", "key"): ("text", True, "", "", "default"),
    ("meta", "value"): ("text", True, "", "", "default"),
    ("records", "chain"): ("text", True, "", "", "C"),
    ("records", "seq"): ("bigint", True, "", "", ""),
    ("records", "prev_hash"): ("bytea", True, "", "", ""),
    ("records", "hash"): ("bytea", True, "", "", ""),
    ("records", "body"): ("bytea", True, "", "", ""),
    ("records", "doc"): ("jsonb", False, "s", f"{SCHEMA}.body_json(body)", ""),
    ("records", "stored_at"): ("timestamp with time zone", True, "", "now()", ""),
}
#: (table, constraint) -> definition
_CONSTRAINTS = {
    ("checkpoints", "checkpoints_pkey"): "PRIMARY KEY (chain, seq)",
    ("meta", "meta_pkey"): "PRIMARY KEY (key)",
    ("records", "records_pkey"): "PRIMARY KEY (chain, seq)",
    ("records", "records_seq_check"): "CHECK ((seq > 0))",
}
_TABLES = ("checkpoints", "meta", "records")


def _function_source(name: str) -> str:
    """The body of function ``name`` exactly as the migrations create it (pg_proc.prosrc)."""
    for statements in _MIGRATIONS:
        for statement in statements:
            if statement.startswith(f"CREATE FUNCTION {SCHEMA}.{name}("):
                return statement.split("$$")[1]
    raise AssertionError(f"{name} is not in the migrations")


#: (name, identity arguments) -> (returns, language, volatility, strict, security definer,
#: settings, source)
_FUNCTIONS: dict[tuple[str, str], tuple[str, str, str, bool, bool, object, str]] = {
    ("body_json", "body bytea"): (
        "jsonb", "plpgsql", "i", True, False, None, _function_source("body_json")
    ),
    ("append_at_head", ""): (
        "trigger", "plpgsql", "v", False, False, ["search_path=pg_catalog, pg_temp"],
        _function_source("append_at_head"),
    ),
}  # fmt: skip
#: (table, trigger) -> pg_get_triggerdef
_TRIGGERS = {
    ("records", "records_append_at_head"): (
        f"CREATE TRIGGER records_append_at_head AFTER INSERT ON {SCHEMA}.records"
        f" REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
        f" EXECUTE FUNCTION {SCHEMA}.append_at_head()"
    ),
}


def _schema_problems(con: psycopg.Connection[Any]) -> list[str]:
    """How the ``otel_audit`` schema differs from the one this version creates."""
    with con.transaction():
        # Deparsed expressions name functions relative to the search path: fix it.
        con.execute("SET LOCAL search_path TO pg_catalog")
        return _compare_schema(con)


def _compare_schema(con: psycopg.Connection[Any]) -> list[str]:
    problems: list[str] = []
    ns = (SCHEMA,)
    rels = {
        str(name): (str(kind), bool(rls), bool(force))
        for name, kind, rls, force in con.execute(
            "SELECT c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity"
            " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind <> 'i'",
            ns,
        ).fetchall()
    }
    for table in _TABLES:
        if table not in rels:
            problems.append(f"table {table} is missing")
        elif rels[table][0] != "r":
            problems.append(f"{table} is no longer a plain table (relkind {rels[table][0]!r})")
        elif rels[table][1] or rels[table][2]:
            problems.append(f"table {table} has row-level security enabled (rows can be hidden)")
    for name in sorted(set(rels) - set(_TABLES)):
        problems.append(f"relation {name} is not part of the ledger schema")
    for table, persistence, partition in con.execute(
        "SELECT c.relname, c.relpersistence, c.relispartition FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (SCHEMA, list(_TABLES)),
    ).fetchall():
        if persistence != "p":
            problems.append(f"table {table} is not logged (a crash can lose its rows)")
        if partition:
            problems.append(f"table {table} is a partition of another table")
    # A child table (in any schema) adds rows to every scan of its parent that
    # no primary key of ours covers: a second row at a seq, a forked chain.
    for child, parent in con.execute(
        "SELECT format('%%I.%%I', cn.nspname, c.relname), format('%%I.%%I', pn.nspname, p.relname)"
        " FROM pg_catalog.pg_inherits i"
        " JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace"
        " JOIN pg_catalog.pg_class p ON p.oid = i.inhparent"
        " JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace"
        " WHERE cn.nspname = %s OR pn.nspname = %s ORDER BY 1, 2",
        (SCHEMA, SCHEMA),
    ).fetchall():
        problems.append(f"table {child} inherits from {parent}: not part of the ledger schema")
    found_cols = {
        (str(t), str(c)): (str(ty), bool(nn), str(gen), str(expr), str(coll))
        for t, c, ty, nn, gen, expr, coll in con.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " a.attgenerated, coalesce(pg_get_expr(d.adbin, d.adrelid), ''),"
            " coalesce(co.collname, '')"
            " FROM pg_catalog.pg_attribute a"
            " JOIN pg_catalog.pg_class c ON c.oid = a.attrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            " LEFT JOIN pg_catalog.pg_collation co"
            "   ON co.oid = a.attcollation AND a.attcollation <> 0"
            " WHERE n.nspname = %s AND c.relname = ANY(%s) AND a.attnum > 0"
            " AND NOT a.attisdropped",
            (SCHEMA, list(_TABLES)),
        ).fetchall()
    }
    for key, want in sorted(_COLUMNS.items()):
        table, column = key
        if table not in rels:
            continue
        got = found_cols.get(key)
        if got is None:
            problems.append(f"column {table}.{column} is missing")
        elif got != want:
            problems.append(
                f"column {table}.{column} differs from the one this version creates"
                f" ({_describe_column(got)} instead of {_describe_column(want)})"
            )
    for table, column in sorted(set(found_cols) - set(_COLUMNS)):
        problems.append(f"column {table}.{column} is not part of the ledger schema")
    found_cons = {
        (str(t), str(name)): str(definition)
        for t, name, definition in con.execute(
            "SELECT c.relname, con.conname, pg_get_constraintdef(con.oid)"
            " FROM pg_catalog.pg_constraint con JOIN pg_catalog.pg_class c ON c.oid = con.conrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s",
            ns,
        ).fetchall()
    }
    for key, want_def in sorted(_CONSTRAINTS.items()):
        if key[0] not in rels:
            continue
        if key not in found_cons:
            problems.append(f"constraint {key[1]} ({want_def}) on {key[0]} is missing")
        elif found_cons[key] != want_def:
            problems.append(
                f"constraint {key[1]} on {key[0]} is {found_cons[key]!r}, not {want_def!r}"
            )
    for key in sorted(set(found_cons) - set(_CONSTRAINTS)):
        problems.append(f"constraint {key[1]} on {key[0]} is not part of the ledger schema")
    found_funcs = {
        (str(name), str(args)): (
            str(ret),
            str(lang),
            str(vol),
            bool(strict),
            bool(secdef),
            conf,
            str(src),
        )
        for name, args, ret, lang, vol, strict, secdef, conf, src in con.execute(
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid),"
            " format_type(p.prorettype, NULL), l.lanname, p.provolatile, p.proisstrict,"
            " p.prosecdef, p.proconfig, p.prosrc"
            " FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
            " JOIN pg_catalog.pg_language l ON l.oid = p.prolang WHERE n.nspname = %s",
            ns,
        ).fetchall()
    }
    for fkey, fwant in sorted(_FUNCTIONS.items()):
        if fkey not in found_funcs:
            problems.append(f"function {fkey[0]}({fkey[1]}) is missing")
        elif found_funcs[fkey] != fwant:
            problems.append(
                f"function {fkey[0]}({fkey[1]}) differs from the one this version creates"
                " (replaced)"
            )
    for fkey in sorted(set(found_funcs) - set(_FUNCTIONS)):
        problems.append(f"function {fkey[0]}({fkey[1]}) is not part of the ledger schema")
    found_triggers = {
        (str(table), str(name)): (str(definition), str(enabled))
        for table, name, definition, enabled in con.execute(
            "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled"
            " FROM pg_catalog.pg_trigger t"
            " JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND NOT t.tgisinternal ORDER BY 1, 2",
            ns,
        ).fetchall()
    }
    for tkey, tdef in sorted(_TRIGGERS.items()):
        if tkey not in found_triggers:
            problems.append(f"trigger {tkey[1]} on {tkey[0]} is missing")
        elif found_triggers[tkey] != (tdef, "O"):
            problems.append(
                f"trigger {tkey[1]} on {tkey[0]} differs from the one this version creates"
                f" ({found_triggers[tkey][0]}, enabled {found_triggers[tkey][1]!r})"
            )
    for tkey in sorted(set(found_triggers) - set(_TRIGGERS)):
        problems.append(f"trigger {tkey[1]} on {tkey[0]} is not part of the ledger schema")
    for table, name in con.execute(
        "SELECT c.relname, r.rulename FROM pg_catalog.pg_rewrite r"
        " JOIN pg_catalog.pg_class c ON c.oid = r.ev_class"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1, 2",
        ns,
    ).fetchall():
        problems.append(f"rule {name} on {table} is not part of the ledger schema")
    for table, name in con.execute(
        "SELECT c.relname, p.polname FROM pg_catalog.pg_policy p"
        " JOIN pg_catalog.pg_class c ON c.oid = p.polrelid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s ORDER BY 1, 2",
        ns,
    ).fetchall():
        problems.append(
            f"row-level security policy {name} on {table} is not part of the ledger schema"
        )
    return problems


def _describe_column(desc: tuple[str, bool, str, str, str]) -> str:
    kind, not_null, generated, expr, collation = desc
    out = kind + (" NOT NULL" if not_null else "")
    if generated:
        out += f" GENERATED ALWAYS AS ({expr})"
    elif expr:
        out += f" DEFAULT {expr}"
    else:
        out += ""
    if collation and collation != "default":
        out += f' COLLATE "{collation}"'
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextmanager
def _mapped(what: str, error: type[LedgerError] = LedgerError) -> Iterator[None]:
    """Map psycopg errors to LedgerError (or ``error``), naming the operation: the one place."""
    try:
        yield
    except psycopg.Error as exc:
        raise error(f"postgresql ledger: {what} failed: {_one_line(exc)}") from exc


def redact(url: str) -> str:
    """``url`` without its password, for messages and ``Ledger.url``."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://<unparsable URL>"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _lock_key(chain: str) -> int:
    """A signed 64-bit advisory lock key for ``chain`` (collisions only serialise).

    The append guard (migration 2, ``append_at_head``) computes the same key in
    SQL, so that it waits for a writer holding this lock: the two must agree
    (``tests/test_postgres_append.py`` checks them).
    """
    import hashlib

    return int.from_bytes(hashlib.sha256(chain.encode("utf-8")).digest()[:8], "big", signed=True)


@dataclass
class _Pending:
    """An append whose COMMIT was sent but not confirmed."""

    first_seq: int
    first_hash: bytes
    appended: list[tuple[bytes, Appended]]


class _Retry(Exception):
    """A connection-level failure: reconnect and try again (internal)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(_one_line(cause))
        self.cause = cause


class _Conflict(Exception):
    """The remembered chain head is stale: another writer appended (internal)."""


_COPY = f"COPY {SCHEMA}.records (chain, seq, prev_hash, hash, body) FROM STDIN (FORMAT BINARY)"
# PostgreSQL's binary COPY format: signature, flags, header extension length;
# per row the field count and each field as a 4-byte length and its bytes;
# a field count of -1 ends it.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_SEQ_FIELD = struct.Struct("!iq").pack  # 8, seq
_MAX_SEQ = 2**63 - 1  # bigint
_LENGTH = struct.Struct("!i").pack


def _copy_data(chain: bytes, rows: list[tuple[int, bytes, bytes, bytes]]) -> bytes:
    """``rows`` (seq, prev_hash, hash, body) of ``chain`` (client-encoded) as binary COPY data.

    Built in one pass with ``struct`` instead of psycopg's per-row
    ``write_row`` (its dumpers cost ~10 us of Python per row): the fields
    are ``text, int8, bytea, bytea, bytea``, each bytea sent byte-exact.
    """
    head = struct.pack("!hi", 5, len(chain)) + chain
    length = _LENGTH
    parts = [_COPY_SIGNATURE]
    add = parts.append
    for seq, prev, digest, body in rows:
        add(head)
        add(_SEQ_FIELD(8, seq))
        add(length(len(prev)))
        add(prev)
        add(length(len(digest)))
        add(digest)
        add(length(len(body)))
        add(body)
    add(_COPY_TRAILER)
    return b"".join(parts)


def _insert(
    con: psycopg.Connection[Any], chain: str, rows: list[tuple[int, bytes, bytes, bytes]]
) -> None:
    """Insert ``rows`` (seq, prev_hash, hash, body) of ``chain`` in one statement.

    Binary COPY: the rows go to the server as one block of bytes, without
    per-value Python work (psycopg's array parameters, the alternative, cost
    ~40 us of Python per row).
    """
    try:
        name = chain.encode(con.info.encoding)
    except UnicodeEncodeError as exc:  # nothing was sent: a plain refusal
        raise psycopg.DataError(
            f"chain {chain!r} cannot be written in the connection's encoding {con.info.encoding}"
        ) from exc
    data = _copy_data(name, rows)
    with con.cursor() as cur:
        with cur.copy(_COPY) as copy:
            copy.write(data)
        stored = cur.rowcount
    if stored != len(rows):  # skipped without an error: never acknowledged
        raise LedgerWriteError(
            f"postgresql ledger: appending to chain {chain!r} stored {stored} of {len(rows)}"
            " records (the schema was altered: a trigger?)"
        )


def _check_room(chain: str, seq: int, count: int) -> None:
    """Refuse ``count`` more records after ``seq`` past bigint (a row planted at its end)."""
    if seq + count > _MAX_SEQ:
        raise LedgerWriteError(
            f"postgresql ledger: chain {chain!r} is at seq {seq}: no room for {count} more"
            " records (a row was planted at the end of the range?)"
        )


def _link(
    chain: str, seq: int, prev: bytes, bodies: Sequence[bytes]
) -> tuple[list[tuple[int, bytes, bytes, bytes]], list[tuple[bytes, Appended]]]:
    """Rows (seq, prev_hash, hash, body) continuing ``chain`` after (``seq``, ``prev``)."""
    _check_room(chain, seq, len(bodies))
    rows: list[tuple[int, bytes, bytes, bytes]] = []
    new: list[tuple[bytes, Appended]] = []
    for body in bodies:
        seq += 1
        digest = link_hash(prev, body)
        rows.append((seq, prev, digest, body))
        new.append((body, Appended(chain, seq, digest)))
        prev = digest
    return rows, new


class PostgresLedger(Ledger):
    """A ledger in a PostgreSQL database (schema ``otel_audit``); see the module docstring."""

    def __init__(
        self, url: str, *, readonly: bool = False, retry_seconds: float = RETRY_SECONDS
    ) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(
                f"ledger URL is not a valid PostgreSQL URL: {_one_line(exc)}"
            ) from exc
        params.setdefault("connect_timeout", str(_CONNECT_TIMEOUT))
        params.setdefault("application_name", "otel-audit")
        # A server that vanished without closing the connection (a host gone,
        # a network partition) is noticed in seconds, not after the kernel's
        # two-hour default, so a blocked append fails over or fails closed.
        for key, value in _KEEPALIVE.items():
            params.setdefault(key, value)
        self._conninfo = make_conninfo("", **params)
        self.url = redact(url)
        self.readonly = readonly
        self.retry_seconds = retry_seconds
        self._lock = threading.RLock()
        self._con: psycopg.Connection[Any] | None = None
        self._pid = 0
        self._unresolved: dict[str, list[_Pending]] = {}
        # Chain -> (seq, hash) this ledger appended last; chains another writer shares.
        self._heads: dict[str, tuple[int, bytes]] = {}
        self._shared: set[str] = set()
        with self._lock:
            self._con = self._connect()
            try:
                self._check_schema(self._con)
            except BaseException:
                self.close()
                raise

    # -- connection ----------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            con = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise LedgerError(
                f"postgresql ledger {self.url} is unreachable: {_one_line(exc)}"
            ) from exc
        try:
            # Session settings the guarantees rest on, whatever the server, database
            # or role default (a role may set its own): durable commits, statements
            # that see every commit made before them, and names resolved in
            # pg_catalog only (every name of ours is schema-qualified).
            con.execute("SET synchronous_commit = on")
            con.execute("SET default_transaction_isolation = 'read committed'")
            con.execute("SET search_path = pg_catalog, pg_temp")
            if self.readonly:
                con.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            con.close()
            raise LedgerError(f"postgresql ledger {self.url}: {_one_line(exc)}") from exc
        self._pid = os.getpid()
        return con

    def _connection(self, deadline: float) -> psycopg.Connection[Any]:
        """The live connection, reopened (with backoff until ``deadline``) when broken."""
        con = self._con
        if con is not None and not con.closed and not con.broken and self._pid == os.getpid():
            return con
        if con is not None and self._pid == os.getpid():
            try:
                con.close()
            except psycopg.Error:
                pass
        # A connection inherited across fork belongs to the parent: never use it
        # (psycopg does not close it from the child either).
        self._con = None
        backoff = 0.05
        while True:
            try:
                self._con = self._connect()
                return self._con
            except LedgerError:
                if time.monotonic() + backoff >= deadline:
                    raise
            time.sleep(backoff)  # reconnect backoff while the server restarts
            backoff = min(backoff * 2, 1.0)

    def _drop(self) -> None:
        self._heads.clear()
        con, self._con = self._con, None
        if con is not None and self._pid == os.getpid():
            try:
                con.close()
            except psycopg.Error:
                pass

    def _read(self, what: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn``, reconnecting and retrying within the retry window (reads are idempotent)."""
        deadline = time.monotonic() + self.retry_seconds
        with self._lock:
            while True:
                con = self._connection(deadline)
                try:
                    return fn(con)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._drop()
                    if time.monotonic() >= deadline:
                        raise LedgerError(
                            f"postgresql ledger: {what} failed: {_one_line(exc)}"
                        ) from exc
                except psycopg.Error as exc:
                    raise LedgerError(
                        f"postgresql ledger: {what} failed: {_one_line(exc)}"
                    ) from exc

    def _check_schema(self, con: psycopg.Connection[Any]) -> None:
        with _mapped(f"reading the schema version of {self.url}"):
            version = schema_version(con)
        if version < SCHEMA_VERSION and not self.readonly:
            try:
                version = _migrate_schema(con)[1]
            except psycopg.errors.InsufficientPrivilege as exc:
                what = (
                    "has no otel-audit schema and this role cannot create it"
                    if version == 0
                    else f"has schema version {version} and this role cannot migrate it"
                    f" to {SCHEMA_VERSION}"
                )
                raise LedgerError(
                    f"postgresql ledger {self.url} {what}:"
                    " run 'otel-audit init --ledger URL' as the database owner"
                ) from exc
            except psycopg.Error as exc:
                raise LedgerError(
                    f"postgresql ledger {self.url}: {'creating' if version == 0 else 'migrating'}"
                    f" the schema failed: {_one_line(exc)}"
                ) from exc
        if version == 0:
            raise LedgerError(
                f"postgresql ledger {self.url} has no otel-audit schema"
                " (run 'otel-audit init --ledger URL')"
            )
        if version != SCHEMA_VERSION:
            hint = (
                "run 'otel-audit init --ledger URL' to migrate it"
                if version < SCHEMA_VERSION
                else ("upgrade otel-audit")
            )
            raise LedgerError(
                f"postgresql ledger {self.url} has schema version {version},"
                f" expected {SCHEMA_VERSION}: {hint}"
            )

    # -- writing ---------------------------------------------------------

    def append(
        self,
        chain: str,
        bodies: Sequence[bytes],
        *,
        dedupe: bool = False,
        keys: Sequence[SpanKey | None] | None = None,
    ) -> list[Appended]:
        if self.readonly:
            raise LedgerWriteError(f"postgresql ledger {self.url} is open read-only")
        bodies = list(bodies)
        if not bodies:
            return []
        found = span_keys(bodies, keys) if dedupe else None
        deadline = time.monotonic() + self.retry_seconds
        what = f"appending to chain {chain!r}"
        with self._lock:
            while True:
                # Said when failing: a later append of the same chain settles it.
                unknown = " (commit outcome unknown)" if self._unresolved.get(chain) else ""
                try:
                    con = self._connection(deadline)
                except LedgerError as exc:
                    raise LedgerWriteError(
                        f"postgresql ledger: {what} failed{unknown}: {exc}"
                    ) from exc
                try:
                    head = None
                    if not dedupe and chain not in self._shared and not self._unresolved.get(chain):
                        head = self._heads.get(chain)
                    if head is not None:
                        return self._append_after(con, chain, bodies, head)
                    return self._append_once(con, chain, bodies, found, deadline)
                except _Conflict as exc:
                    # Someone else appended to this chain (one that skipped the
                    # lock, trusting its remembered head): nothing was written;
                    # from now on read this chain's head under the lock.
                    self._shared.add(chain)
                    if time.monotonic() >= deadline:
                        raise LedgerWriteError(f"postgresql ledger: {what} failed: {exc}") from exc
                except _Retry as exc:
                    self._drop()
                    if time.monotonic() >= deadline:
                        unknown = " (commit outcome unknown)" if self._unresolved.get(chain) else ""
                        raise LedgerWriteError(
                            f"postgresql ledger: {what} failed{unknown}: {exc}"
                        ) from exc.cause

    def _resolve(self, con: psycopg.Connection[Any], chain: str) -> dict[bytes, list[Appended]]:
        """Settle earlier appends of ``chain`` whose COMMIT reply was lost; call under the chain lock.

        Holding the lock means their transactions are over (a backend still
        committing holds it). Each one's records are either all present or
        all absent; the first record's (seq, hash) tells which, because the
        hash covers the whole chain before it. Returns the committed ones by body.
        """
        done: dict[bytes, list[Appended]] = {}
        for pending in self._unresolved.get(chain, ()):
            row = con.execute(
                f"SELECT hash FROM {SCHEMA}.records WHERE chain = %s AND seq = %s",
                (chain, pending.first_seq),
            ).fetchone()
            if row is not None and bytes(row[0]) == pending.first_hash:
                for body, appended in pending.appended:
                    done.setdefault(body, []).append(appended)
        return done

    def _append_once(
        self,
        con: psycopg.Connection[Any],
        chain: str,
        bodies: list[bytes],
        keys: list[SpanKey | None] | None,
        deadline: float,
    ) -> list[Appended]:
        """Append under the chain lock, reading the head; ``keys`` (one per body) dedupe."""
        out: list[Appended] = []
        mine: _Pending | None = None
        try:
            with con.transaction():
                # Wait for the chain lock no longer than the retry window allows.
                # (set_config first, in the same round trip; it is transaction-local.)
                wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
                con.execute(
                    "SELECT set_config('lock_timeout', %s, true), pg_advisory_xact_lock(%s)",
                    (str(wait_ms), _lock_key(chain)),
                )
                done = self._resolve(con, chain)
                # Read after the lock: in READ COMMITTED each statement sees every
                # commit made before it started, including the previous holder's.
                row = con.execute(
                    f"SELECT seq, hash FROM {SCHEMA}.records WHERE chain = %s"
                    " ORDER BY seq DESC LIMIT 1",
                    (chain,),
                ).fetchone()
                seq, prev = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)
                _check_room(chain, seq, len(bodies))
                stored = self._stored_keys(con, keys) if keys is not None else set()
                rows: list[tuple[int, bytes, bytes, bytes]] = []
                new: list[tuple[bytes, Appended]] = []
                for i, body in enumerate(bodies):
                    earlier = done.get(body)
                    if earlier:
                        out.append(earlier.pop(0))  # committed by an append we lost track of
                        continue
                    if keys is not None:
                        key = keys[i]
                        if key is not None:
                            if key in stored:
                                continue
                            stored.add(key)
                    seq += 1
                    digest = link_hash(prev, body)
                    rows.append((seq, prev, digest, body))
                    appended = Appended(chain, seq, digest)
                    new.append((body, appended))
                    out.append(appended)
                    prev = digest
                if rows:
                    _insert(con, chain, rows)
                    # From here the COMMIT may succeed without us hearing it.
                    mine = _Pending(rows[0][0], rows[0][2], new)
                    self._unresolved.setdefault(chain, []).append(mine)
            # Committed and confirmed: every earlier unknown outcome is settled too.
            self._unresolved.pop(chain, None)
            self._heads[chain] = (seq, prev)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _Retry(exc) from exc
        except psycopg.Error as exc:
            # The server answered with an error: this transaction did not commit.
            pending = self._unresolved.get(chain, [])
            if mine is not None and mine in pending:
                pending.remove(mine)
            if isinstance(exc, psycopg.errors.UniqueViolation):
                raise _Conflict(_one_line(exc)) from exc
            raise LedgerWriteError(
                f"postgresql ledger: appending to chain {chain!r} failed: {_one_line(exc)}"
            ) from exc
        return out

    def _append_after(
        self,
        con: psycopg.Connection[Any],
        chain: str,
        bodies: list[bytes],
        head: tuple[int, bytes],
    ) -> list[Appended]:
        """Append after the head this ledger wrote last: one COPY, its own transaction.

        No lock and no head read: if another writer appended in between, the
        first seq is taken and the primary key refuses the whole statement,
        and if any row lies above the new ones (appended since, or planted far
        ahead) the schema's statement trigger refuses it (``_Conflict`` both
        ways); nothing was written and the caller takes the locked path, which
        reads the head.
        """
        rows, new = _link(chain, head[0], head[1], bodies)
        mine = _Pending(rows[0][0], rows[0][2], new)
        self._unresolved.setdefault(chain, []).append(mine)
        try:
            # Autocommit: the statement is a transaction, committed (and
            # synchronous_commit waited for) when it returns.
            _insert(con, chain, rows)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._heads.pop(chain, None)
            raise _Retry(exc) from exc  # outcome unknown: ``mine`` stays pending
        except LedgerWriteError:  # a trigger skipped rows without an error
            self._heads.pop(chain, None)
            self._unresolved.pop(chain, None)
            raise
        except psycopg.Error as exc:
            self._heads.pop(chain, None)
            self._unresolved.pop(chain, None)  # refused: nothing of it was written
            if isinstance(exc, psycopg.errors.UniqueViolation):
                raise _Conflict(_one_line(exc)) from exc
            raise LedgerWriteError(
                f"postgresql ledger: appending to chain {chain!r} failed: {_one_line(exc)}"
            ) from exc
        self._unresolved.pop(chain, None)
        self._heads[chain] = (rows[-1][0], rows[-1][2])
        return [appended for _, appended in new]

    def _stored_keys(
        self, con: psycopg.Connection[Any], found: list[SpanKey | None]
    ) -> set[SpanKey]:
        keys = [k for k in found if k is not None]
        if not keys:
            return set()
        rows = con.execute(
            f"SELECT doc ->> 'trace_id', doc ->> 'span_id' FROM {SCHEMA}.records"
            " WHERE ((doc ->> 'trace_id'), (doc ->> 'span_id')) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {(str(t), str(s)) for t, s in rows}

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self.readonly:
            raise LedgerWriteError(f"postgresql ledger {self.url} is open read-only")

        def run(con: psycopg.Connection[Any]) -> None:
            con.execute(
                f"INSERT INTO {SCHEMA}.checkpoints"
                " (chain, seq, head, time, signature, key_id, merkle_root)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chain, seq) DO NOTHING",
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

        # Idempotent (ON CONFLICT DO NOTHING), so a retry after a lost reply is safe.
        try:
            self._read("storing a checkpoint", run)
        except LedgerError as exc:
            raise LedgerWriteError(str(exc)) from exc

    # -- reading ---------------------------------------------------------

    def head(self, chain: str) -> Appended | None:
        row = self._read(
            "reading chain head",
            lambda con: con.execute(
                f"SELECT seq, hash FROM {SCHEMA}.records WHERE chain = %s ORDER BY seq DESC LIMIT 1",
                (chain,),
            ).fetchone(),
        )
        return Appended(chain, int(row[0]), bytes(row[1])) if row else None

    def chains(self) -> list[str]:
        # A loose index scan over the primary key: one probe per chain, not a
        # pass over every record.
        rows = self._read(
            "listing chains",
            lambda con: con.execute(
                f"""WITH RECURSIVE c(chain) AS (
                    SELECT min(chain) FROM {SCHEMA}.records
                    UNION ALL
                    SELECT (SELECT min(r.chain) FROM {SCHEMA}.records r WHERE r.chain > c.chain)
                    FROM c WHERE c.chain IS NOT NULL
                )
                SELECT chain FROM c WHERE chain IS NOT NULL
                UNION SELECT DISTINCT chain FROM {SCHEMA}.checkpoints
                ORDER BY 1"""
            ).fetchall(),
        )
        return [str(r[0]) for r in rows]

    def scan(
        self, chain: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[RawRow]:
        # Keyset pages instead of a server-side cursor: no transaction stays
        # open between pages, and a reconnect in the middle resumes cleanly.
        last = after_seq
        until = _MAX_SEQ if until_seq is None else until_seq
        while True:
            rows = self._read(
                f"reading chain {chain!r}",
                lambda con: con.execute(
                    f"SELECT seq, prev_hash, hash, body FROM {SCHEMA}.records"
                    " WHERE chain = %s AND seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
                    (chain, last, until, _PAGE),  # noqa: B023 - called before ``last`` changes
                ).fetchall(),
            )
            for seq, prev, digest, body in rows:
                yield RawRow(int(seq), bytes(prev), bytes(digest), bytes(body))
            if len(rows) < _PAGE:
                return
            last = int(rows[-1][0])

    def checkpoints(self, chain: str | None = None) -> list[Checkpoint]:
        query = f"SELECT chain, seq, head, time, signature, key_id, merkle_root FROM {SCHEMA}.checkpoints"
        args: tuple[str, ...] = ()
        if chain is not None:
            query += " WHERE chain = %s"
            args = (chain,)
        rows = self._read(
            "reading checkpoints",
            lambda con: con.execute(query + " ORDER BY chain, seq", args).fetchall(),
        )
        return [checkpoint_from_row(row) for row in rows]

    def query(self, query: Query) -> Iterator[StoredRecord]:
        where, args = filter_clauses(query, _QUERY_COLUMNS, _START, "%s")
        for name, value in query.extra.items():
            where.append("(doc -> 'attributes' ->> %s) = %s")
            args.extend([name, str(value)])
        remaining = None if query.limit is None else max(0, int(query.limit))
        after = query.after
        base = f"SELECT chain, seq, prev_hash, hash, body FROM {SCHEMA}.records"
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            conds = list(where)
            page_args = list(args)
            if after is not None:
                conds.append("(chain, seq) > (%s, %s)")
                page_args.extend([after[0], int(after[1])])
            text = base + (" WHERE " + " AND ".join(conds) if conds else "")
            text += " ORDER BY chain, seq LIMIT %s"
            page_args.append(page)
            rows = self._read(
                "querying records",
                lambda con: con.execute(text, page_args).fetchall(),  # noqa: B023 - called at once
            )
            for chain, seq, prev, digest, body in rows:
                yield StoredRecord(str(chain), int(seq), bytes(prev), bytes(digest), bytes(body))
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            after = (str(rows[-1][0]), int(rows[-1][1]))

    def count(self) -> int:
        row = self._read(
            "counting records",
            lambda con: con.execute(f"SELECT count(*) FROM {SCHEMA}.records").fetchone(),
        )
        return int(row[0]) if row else 0

    def schema_problems(self) -> list[str]:
        """How the ``otel_audit`` schema differs from the one this version creates.

        Compares the catalog: tables, columns (types, NOT NULL, the expression
        generating ``doc``), constraints (the ``seq > 0`` CHECK), the functions
        (their source, language and volatility: the one behind the query
        columns, the one behind the append guard), the append guard's trigger
        (present and enabled), and that there is no other trigger, rule or
        row-level security policy on them.
        """
        return self._read("reading the schema", _schema_problems)

    def stray_rows(self, limit: int = 10) -> list[tuple[object, object, str]]:
        """Record rows no chain walk reaches: a seq below 1 (possible once the CHECK is gone)."""
        rows = self._read(
            "looking for rows outside every sequence",
            lambda con: con.execute(
                f"SELECT chain, seq FROM {SCHEMA}.records WHERE seq < 1 ORDER BY chain, seq"
                " LIMIT %s",
                (limit,),
            ).fetchall(),
        )
        return [(str(c), int(q), f"seq {int(q)} is outside every sequence") for c, q in rows]

    def check_generated(self) -> None:
        """Raise VerificationError when a stored ``doc`` differs from what its body gives.

        ``doc`` is a generated column, so only DDL by the table owner (dropping
        the generation expression, then updating it) can make the review
        filters disagree with the hashed bytes; this finds such a row. One
        server-side pass over the records.
        """
        row = self._read(
            "checking generated columns",
            lambda con: con.execute(
                "SELECT attgenerated FROM pg_catalog.pg_attribute"
                " WHERE attrelid = %s::regclass AND attname = 'doc'",
                (f"{SCHEMA}.records",),
            ).fetchone(),
        )
        generated = row is not None and row[0] == "s"
        bad = self._read(
            "checking generated columns",
            lambda con: con.execute(
                f"SELECT chain, seq FROM {SCHEMA}.records"
                f" WHERE doc IS DISTINCT FROM {SCHEMA}.body_json(body) ORDER BY chain, seq LIMIT 1"
            ).fetchone(),
        )
        if bad is not None:
            chain, seq = str(bad[0]), int(bad[1])
            raise VerificationError(
                f"chain {chain!r} seq {seq}: modified: the query columns do not match the"
                " record's bytes",
                chain=chain,
                seq=seq,
                kind="modified",
            )
        if not generated:
            raise VerificationError(
                f"{SCHEMA}.records.doc is no longer a generated column: its values can be"
                " changed without changing the records",
                kind="modified",
            )

    def default_chain(self, service: str) -> str:
        """``service/hostname/pid``: one chain per service instance, so writers never contend."""
        return f"{service}/{socket.gethostname()}/{os.getpid()}"

    def reopen_target(self) -> str | None:
        return self._conninfo

    def store_identity(self) -> tuple[object, ...] | None:
        """The server's start time, the database's and the records table's oids.

        Another server, or another database on this one (a copy made from
        it, say), differs in at least one of them.
        """
        row = self._read(
            "reading the store's identity",
            lambda con: con.execute(
                "SELECT pg_postmaster_start_time()::text, d.oid::bigint,"
                f" '{SCHEMA}.records'::regclass::oid::bigint"
                " FROM pg_database d WHERE d.datname = current_database()"
            ).fetchone(),
        )
        return ("postgresql", *row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            self._drop()


# -- schema management (used by ``otel-audit init``) ------------------------


def schema_version(con: psycopg.Connection[Any]) -> int:
    """The installed schema version; 0 when there is none."""
    # A plain MVCC read of the catalog, not to_regclass(): the syscache may not
    # yet see a schema another session created while we waited for the lock.
    row = con.execute(
        "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = 'meta'",
        (SCHEMA,),
    ).fetchone()
    if row is None or not row[0]:
        return 0
    row = con.execute(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _migrate_schema(con: psycopg.Connection[Any]) -> tuple[int, int]:
    """Create or upgrade the schema in one transaction; returns (from, to) versions."""
    with con.transaction():
        con.execute("SELECT pg_advisory_xact_lock(%s)", (_INIT_LOCK,))
        start = schema_version(con)
        if start > SCHEMA_VERSION:
            return start, start
        if start == 0:
            row = con.execute("SHOW server_encoding").fetchone()
            if row is None or str(row[0]).upper() not in ("UTF8", "UTF-8"):
                raise LedgerError(
                    f"the database encoding is {row[0] if row else None}, not UTF8:"
                    " create the ledger database with ENCODING 'UTF8'"
                )
        for version in range(start, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                con.execute(statement)
        con.execute(
            f"UPDATE {SCHEMA}.meta SET value = %s WHERE key = 'schema_version'",
            (str(SCHEMA_VERSION),),
        )
    return start, SCHEMA_VERSION


def writer_grants(role: str) -> list[sql.Composed]:
    """Statements giving ``role`` exactly INSERT and SELECT on the ledger (no UPDATE/DELETE)."""
    r = sql.Identifier(role)
    s = sql.Identifier(SCHEMA)
    return [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
        sql.SQL("GRANT SELECT, INSERT ON {}.records, {}.checkpoints TO {}").format(s, s, r),
        sql.SQL("GRANT SELECT ON {}.meta TO {}").format(s, r),
        sql.SQL("GRANT EXECUTE ON FUNCTION {}.body_json(bytea) TO {}").format(s, r),
    ]


def reader_grants(role: str) -> list[sql.Composed]:
    """Statements giving ``role`` read access only (reviewers, ``verify``, exports)."""
    r = sql.Identifier(role)
    s = sql.Identifier(SCHEMA)
    return [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
        sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
    ]


@dataclass
class InitResult:
    url: str
    from_version: int
    to_version: int
    granted: list[str]


def initialize(
    url: str, *, writer_roles: Sequence[str] = (), reader_roles: Sequence[str] = ()
) -> InitResult:
    """Create or migrate the schema at ``url`` and apply role grants; idempotent."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(f"ledger URL is not a valid PostgreSQL URL: {_one_line(exc)}") from exc
    params.setdefault("connect_timeout", str(_CONNECT_TIMEOUT))
    where = redact(url)
    try:
        con = psycopg.connect(make_conninfo("", **params), autocommit=True)
    except psycopg.Error as exc:
        raise LedgerError(f"postgresql ledger {where} is unreachable: {_one_line(exc)}") from exc
    granted: list[str] = []
    with con, _mapped(f"initialising {where}"):
        start, end = _migrate_schema(con)
        if start > SCHEMA_VERSION:
            raise LedgerError(
                f"postgresql ledger {where} has schema version {start}, newer than this"
                f" otel-audit ({SCHEMA_VERSION}): upgrade otel-audit"
            )
        for roles, grants in ((writer_roles, writer_grants), (reader_roles, reader_grants)):
            for role in roles:
                exists = con.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if exists.fetchone() is None:
                    raise LedgerError(
                        f"role {role!r} does not exist: CREATE ROLE {role} LOGIN PASSWORD '...'"
                        " first (passwords are never handled by otel-audit)"
                    )
                with con.transaction():
                    for statement in grants(role):
                        con.execute(statement)
                        granted.append(statement.as_string(con))
    return InitResult(where, start, end, granted)
