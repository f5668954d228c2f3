"""JSON Lines: one record per line, the canonical fields plus its place in the ledger."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, TextIO

from otel_audit.engine.ledger import StoredRecord

NAME = "jsonl"


def iso(ns: int) -> str:
    """Unix nanoseconds as ISO 8601 UTC with microseconds."""
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def as_dict(stored: StoredRecord) -> dict[str, Any]:
    rec = stored.record.to_dict()
    out: dict[str, Any] = {
        "chain": stored.chain,
        "seq": stored.seq,
        "hash": stored.hash.hex(),
        "prev_hash": stored.prev_hash.hex(),
    }
    out.update(rec)
    out["time"] = iso(rec["start"])
    # The outcome a reviewer sees (StoredRecord.outcome): 'unknown' for an
    # action whose request record was written and whose outcome never was.
    out["outcome"] = stored.outcome
    return out


def write_lines(
    records: Iterable[StoredRecord], out: TextIO, convert: Callable[[StoredRecord], Any]
) -> int:
    """One JSON object per record, one per line; returns how many were written."""
    n = 0
    for stored in records:
        out.write(json.dumps(convert(stored), ensure_ascii=False, sort_keys=True))
        out.write("\n")
        n += 1
    return n


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    return write_lines(records, out, as_dict)
