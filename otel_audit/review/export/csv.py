"""CSV: one row per record, the vocabulary as columns, for spreadsheets and SQL loaders.

RFC 4180 quoting, UTF-8, a header row. Text cells that a spreadsheet would
run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or CR) get a
leading apostrophe (OWASP's CSV-injection advice): the ledger holds what users
typed, and a reviewer opening the export must not execute it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import StoredRecord
from otel_audit.review.export.jsonl import iso

NAME = "csv"

COLUMNS = (
    "chain",
    "seq",
    "hash",
    "time",
    "end_time",
    "service",
    "name",
    "kind",
    "status",
    "actor_id",
    "actor_type",
    "action",
    "resource_type",
    "resource_id",
    "outcome",
    "reason",
    "effect",
    "trail_id",
    "trace_id",
    "span_id",
    "parent_span_id",
    "classification",
    "attributes",
)

_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = (
        value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    )
    if text.startswith(_FORMULA):
        return "'" + text
    return text


def row(stored: StoredRecord) -> list[str]:
    rec = stored.record
    a = rec.attributes
    values: list[Any] = [
        stored.chain,
        stored.seq,
        stored.hash.hex(),
        iso(rec.start),
        iso(rec.end),
        rec.service,
        rec.name,
        rec.kind,
        rec.status,
        a.get(v.ACTOR_ID),
        a.get(v.ACTOR_TYPE),
        a.get(v.ACTION),
        a.get(v.RESOURCE_TYPE),
        a.get(v.RESOURCE_ID),
        stored.outcome,
        a.get(v.REASON),
        a.get(v.EFFECT),
        a.get(v.TRAIL_ID),
        rec.trace_id,
        rec.span_id,
        rec.parent_span_id,
        a.get(v.DATA_CLASSIFICATION),
        json.dumps(a, ensure_ascii=False, sort_keys=True, separators=(",", ":")),
    ]
    return [_cell(x) for x in values]


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(COLUMNS)
    n = 0
    for stored in records:
        w.writerow(row(stored))
        n += 1
    return n
