"""``otel-audit search``: find records by actor, action, resource, outcome, time...

Results are in ledger order (chain, seq), a page at a time: the page ends with
a cursor (``CHAIN:SEQ`` of its last record) that ``--after`` continues from.
The order and the cursor depend only on where records sit in the ledger, so
pages never skip or repeat a record, even while writers append.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, TextIO

from otel_audit import vocabulary as v
from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._commands._filters import (
    add_filter_arguments,
    check_limit,
    format_cursor,
    parse_cursor,
    query_from_args,
)
from otel_audit.engine.ledger import StoredRecord
from otel_audit.export.jsonl import as_dict

_DEFAULT_LIMIT = 100
_COLUMNS = (
    "time",
    "record",
    "service",
    "actor",
    "action",
    "resource",
    "outcome",
    "effect",
    "trail",
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("search", help="find records (table for people, JSON lines for scripts)")
    add_ledger_argument(p)
    add_filter_arguments(p)
    p.add_argument("--format", choices=["table", "jsonl"], default="table", help="default table")
    p.add_argument(
        "--limit",
        type=int,
        default=_DEFAULT_LIMIT,
        help=f"records per page (default {_DEFAULT_LIMIT}; 0 for all)",
    )
    p.add_argument("--after", metavar="CURSOR", help="continue after this cursor (CHAIN:SEQ)")
    p.set_defaults(func=run)


def _ms_time(ns: int) -> str:
    when = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(stored: StoredRecord) -> list[str]:
    rec = stored.record
    a = rec.attributes
    resource = " ".join(str(x) for x in (a.get(v.RESOURCE_TYPE), a.get(v.RESOURCE_ID)) if x)
    outcome = a.get(v.OUTCOME) or ("failure" if rec.status == "ERROR" else "")
    return [
        _ms_time(rec.start),
        format_cursor(stored.chain, stored.seq),
        rec.service,
        str(a.get(v.ACTOR_ID) or ""),
        str(a.get(v.ACTION) or rec.name),
        resource,
        str(outcome),
        str(a.get(v.EFFECT) or ""),
        str(a.get(v.TRAIL_ID) or ""),
    ]


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(_COLUMNS, widths)).rstrip() + "\n")
    out.writelines("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def run(args: argparse.Namespace) -> int:
    check_limit(args.limit, "--limit")
    query = query_from_args(args)
    if args.after:
        query = replace(query, after=parse_cursor(args.after))
    if args.limit:
        # One more than asked: tells whether there is a next page without a second query.
        query = replace(query, limit=args.limit + 1)
    out = sys.stdout
    shown = 0
    last: StoredRecord | None = None
    more = False
    rows: list[list[str]] = []
    with open_for_reading(args) as ledger:
        for stored in ledger.query(query):
            if args.limit and shown == args.limit:
                more = True
                break
            if args.format == "jsonl":
                data: dict[str, Any] = as_dict(stored)
                out.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
            else:
                rows.append(_row(stored))
            last = stored
            shown += 1
    if args.format == "table":
        if rows:
            _table(rows, out)
        else:
            print("no records match", file=sys.stderr)
    out.flush()
    if more and last is not None:
        cursor = format_cursor(last.chain, last.seq)
        print(f"more records: continue with --after {cursor}", file=sys.stderr)
    return 0
