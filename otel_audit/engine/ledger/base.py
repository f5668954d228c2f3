"""The ledger interface: append-only chains of canonical records, and checkpoints.

Every other part (writer, verify, export, serve, migrate) works through this
interface; each backend (``sqlite``, ``postgres``) implements it and maps its
own exceptions to ``LedgerError`` in one place. Instances are not shared
between threads unless the backend says so; open one per thread or process.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from otel_audit.engine.record import Record, decode
from otel_audit.errors import VerificationError
from otel_audit.proof.chain import Checkpoint
from otel_audit.vocabulary import FAILURE, INTENT, OUTCOME, UNKNOWN

try:  # the C parser the record encoder already depends on; json is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - a dependency
    _orjson = None  # type: ignore[assignment]

#: The (trace id, span id) of a record body: what ``append(..., dedupe=True)`` keys on.
SpanKey = tuple[str, str]


@dataclass(frozen=True)
class Appended:
    """Where one record landed: its chain, sequence number and hash."""

    chain: str
    seq: int
    hash: bytes


class RawRow(NamedTuple):
    """One stored record exactly as the backend holds it (what verify reads)."""

    seq: int
    prev_hash: bytes
    hash: bytes
    body: bytes


@dataclass(frozen=True)
class StoredRecord:
    """A record with its place in the ledger."""

    chain: str
    seq: int
    prev_hash: bytes
    hash: bytes
    body: bytes
    #: For an intent record (``audit.intent``, written before a state-changing
    #: action ran): True once a review found the record of its outcome.
    concluded: bool = False

    @cached_property
    def record(self) -> Record:
        """The decoded record; a body that is not one is damage, named by chain and seq."""
        try:
            return decode(self.body)
        except ValueError as exc:
            raise VerificationError(
                f"chain {self.chain!r} seq {self.seq}: modified: {exc} (run otel-audit verify)",
                chain=self.chain,
                seq=self.seq,
                kind="modified",
            ) from None

    @property
    def outcome(self) -> str | None:
        """The outcome a reviewer sees, the one derivation every review command and export uses.

        ``audit.outcome`` when recorded; ``failure`` for a span that ended in
        error; ``unknown`` for an intent no outcome record concluded (the action
        may have run, and its result was never recorded); None otherwise.
        """
        rec = self.record
        if rec.attr(INTENT) is True:
            return None if self.concluded else UNKNOWN
        out = rec.attr(OUTCOME)
        if isinstance(out, str):
            return out
        if rec.status == "ERROR":
            return FAILURE
        return None


@dataclass
class Query:
    """Filters for review queries; every field is optional and they combine with AND.

    ``since``/``until`` are Unix nanoseconds on the record's start time.
    ``after`` is a pagination cursor: (chain, seq) of the last row already seen.
    """

    actor: str | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    service: str | None = None
    trail_id: str | None = None
    trace_id: str | None = None
    since: int | None = None
    until: int | None = None
    chain: str | None = None
    after: tuple[str, int] | None = None
    limit: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Ledger(abc.ABC):
    """An append-only store of hash-chained records and signed checkpoints."""

    url: str
    #: True when ``append`` may return padded positions (duplicates skipped,
    #: transport/idempotent.py): a position then does not name its body.
    pads_positions: bool = False

    @abc.abstractmethod
    def append(
        self,
        chain: str,
        bodies: Sequence[bytes],
        *,
        dedupe: bool = False,
        keys: Sequence[SpanKey | None] | None = None,
    ) -> list[Appended]:
        """Append ``bodies`` to ``chain`` in one transaction; durable when it returns.

        With ``dedupe``, a body whose (trace id, span id) is already stored is
        skipped (an OTLP retry), and only the appended ones are returned.
        ``keys``, one per body, are those ids when the caller already knows
        them (serve built the records): each is checked against its body's
        bytes, and a body without one (or whose bytes do not hold it) is
        parsed instead (``span_keys``).
        """

    @abc.abstractmethod
    def head(self, chain: str) -> Appended | None:
        """The last record of ``chain``, or None when it is empty."""

    @abc.abstractmethod
    def chains(self) -> list[str]:
        """Every chain id that has records or checkpoints, sorted."""

    @abc.abstractmethod
    def scan(
        self, chain: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[RawRow]:
        """Rows of ``chain`` with seq > ``after_seq`` (and <= ``until_seq``), in seq order."""

    def scan_batches(
        self, chain: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[Sequence[RawRow]]:
        """``scan`` in batches of (seq, prev_hash, hash, body) tuples, for verify's hot loop.

        A backend may yield plain tuples exactly as stored, so a value of the
        wrong type (text where bytes belong) is left for verify to name.
        """
        batch: list[RawRow] = []
        for row in self.scan(chain, after_seq, until_seq):
            batch.append(row)
            if len(batch) == 4096:
                yield batch
                batch = []
        if batch:
            yield batch

    @abc.abstractmethod
    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint (idempotent for the same chain and seq)."""

    @abc.abstractmethod
    def checkpoints(self, chain: str | None = None) -> list[Checkpoint]:
        """Checkpoints, by chain then seq."""

    @abc.abstractmethod
    def query(self, query: Query) -> Iterator[StoredRecord]:
        """Records matching ``query``, ordered by (chain, seq)."""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of records in every chain."""

    def reopen_target(self) -> str | None:
        """What opens this same store read-only in another process (``verify --jobs``).

        A file's absolute path as a URL, or PostgreSQL's full connection
        string (credentials included: hand it to no one but a worker). None
        when the backend has no such thing: verify then walks in one process.
        """
        return None

    def store_identity(self) -> tuple[object, ...] | None:
        """What tells the store this ledger reads from any other store, now.

        A worker of ``verify --jobs`` opens the ledger again and must find
        the same identity, or its walk is not used: a path may name another
        file by then, a connection string another database. None: unknown.
        """
        return None

    def schema_problems(self) -> list[str]:
        """How the stored schema differs from the one this version creates; empty when equal.

        Query columns, indexes, triggers, functions and constraints decide what
        search, trail and export show a reviewer; a schema rebuilt with another
        expression behind a query column shows records the hashes never
        covered, so ``verify`` fails on any problem listed here. Each backend
        overrides this with its own comparison; this default knows no schema.
        """
        return []

    def stray_rows(self, limit: int = 10) -> list[tuple[object, object, str]]:
        """Up to ``limit`` record rows in no chain's sequence: (chain, seq, why).

        A seq below 1, or a value of another type than the column's (a chain
        stored as bytes, a seq as text), places a row where no chain walk
        reaches it; verify reports each as inserted. This default reads every
        row through ``query``; a backend whose columns can hold any type
        overrides it to see the stored types.
        """
        out: list[tuple[object, object, str]] = []
        for stored in self.query(Query()):
            chain, seq = stored.chain, stored.seq
            if not isinstance(chain, str):
                out.append((chain, seq, f"chain is {type(chain).__name__}, not text"))
            elif type(seq) is not int:
                out.append((chain, seq, f"seq is {type(seq).__name__}, not an integer"))
            elif seq < 1:
                out.append((chain, seq, f"seq {seq} is outside every sequence"))
            else:
                continue
            if len(out) >= limit:
                break
        return out

    def default_chain(self, service: str) -> str:
        """The chain a writer of ``service`` appends to when none is configured."""
        return service

    def close(self) -> None:  # noqa: B027 - optional hook: a backend may hold nothing
        """Release the connection; the ledger object is unusable afterwards."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers every backend shares --------------------------------------------


def as_bytes(value: object) -> bytes:
    """A stored hash or body as bytes, whatever type a driver (or a tamperer) left there."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # TEXT where a BLOB belongs: verify must still see it
        return value.encode("utf-8", "surrogateescape")
    if value is None:
        return b""
    return str(value).encode("ascii")


def span_key(body: bytes) -> SpanKey | None:
    """(trace id, span id) of a record body by parsing it; None when it is not a record."""
    data: Any = None
    if _orjson is not None:
        try:
            data = _orjson.loads(body)
        except ValueError:  # NaN, a lone surrogate, a huge int: the standard parser reads them
            data = None
    if data is None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
    if not isinstance(data, dict):
        return None
    try:
        return str(data["trace_id"]), str(data["span_id"])
    except KeyError:
        return None


def span_keys(
    bodies: Sequence[bytes], keys: Sequence[SpanKey | None] | None
) -> list[SpanKey | None]:
    """The (trace id, span id) of each body: the caller's ``keys`` where the body holds them.

    A given key is used only when the body's own ``span_id`` and ``trace_id``
    fields are exactly those ids (read from the bytes, without a parse), so a
    key that belongs to another body can never make a new span look stored;
    a body without a key, or that does not hold it, is parsed (``span_key``).

    How the bytes are read: in a canonical record (sorted keys) the record's
    own ``"span_id":"`` is the last one in the body, because every top-level
    field after it (start, status, status_message, trace_id, truncated, v)
    is a number, a string or a list of strings, none of which can hold the
    unescaped quote the pattern begins with; the first ``"trace_id":"`` after
    it is the record's own for the same reason. A value is compared as raw
    bytes followed by the closing quote; a key holding a backslash (which
    could match an escape of another value) is left to the parser.
    """
    if keys is None or len(keys) != len(bodies):
        return [span_key(body) for body in bodies]
    out: list[SpanKey | None] = []
    add = out.append
    for body, key in zip(bodies, keys):
        if key is not None:
            trace, span = key
            at = body.rfind(b'"span_id":"')
            if at >= 0 and body.startswith(span.encode() + b'"', at + 11):
                at = body.find(b'"trace_id":"', at)
                if (
                    at >= 0
                    and body.startswith(trace.encode() + b'"', at + 12)
                    and "\\" not in trace
                    and "\\" not in span
                ):
                    add(key)
                    continue
        add(span_key(body))
    return out


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    """(chain, seq, head, time, signature, key_id, merkle_root) -> Checkpoint.

    A row whose numbers are not numbers was edited by hand: that is damage,
    named like any other.
    """
    chain, seq, head, at, signature, key, root = row
    if type(seq) is not int or type(at) is not int:
        raise VerificationError(
            f"chain {chain!r}: checkpoint row (seq {seq!r}, time {at!r}) is not well-formed:"
            " the checkpoints table was edited",
            chain=str(chain),
            seq=seq if type(seq) is int else 0,
            kind="modified",
        )
    return Checkpoint(
        str(chain),
        seq,
        as_bytes(head),
        at,
        as_bytes(signature) if signature is not None else None,
        key,
        as_bytes(root) if root is not None else None,
    )


def filter_clauses(
    query: Query, columns: Mapping[str, str], start: str, mark: str
) -> tuple[list[str], list[object]]:
    """WHERE conditions and arguments for the equality and time filters of ``query``.

    ``columns`` maps Query fields to the backend's column expressions, ``start``
    is its start-time expression and ``mark`` its parameter placeholder.
    """
    where: list[str] = []
    args: list[object] = []
    for name, column in columns.items():
        value = getattr(query, name)
        if value is not None:
            where.append(f"{column} = {mark}")
            args.append(str(value))
    if query.since is not None:
        where.append(f"{start} >= {mark}")
        args.append(int(query.since))
    if query.until is not None:
        where.append(f"{start} < {mark}")
        args.append(int(query.until))
    return where, args
