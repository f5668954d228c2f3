"""``otel-audit search``: find records by actor, action, resource, outcome, time...

Results are in ledger order (chain, seq), a page at a time: the page ends with
a cursor (``CHAIN:SEQ`` of its last record) that ``--after`` continues from.
The order and the cursor depend only on where records sit in the ledger, so
pages never skip or repeat a record, even while writers append.

Every record shown is checked against its chain first (review/checked.py):
a damaged or unaccounted record is marked ``DAMAGED`` (table) or carries a
``verification`` member (jsonl), and search exits 1.
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
from otel_audit.errors import VerificationError
from otel_audit.proof.keys import load_public_key
from otel_audit.proof.parallel import default_jobs
from otel_audit.review.checked import Review, Verdict
from otel_audit.review.export.jsonl import as_dict

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
    "check",
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
    p.add_argument(
        "--public-key", metavar="PATH", help="Ed25519 public key: check checkpoint signatures too"
    )
    p.set_defaults(func=run)


def _ms_time(ns: int) -> str:
    when = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(stored: StoredRecord, verdict: Verdict) -> list[str]:
    place = format_cursor(str(stored.chain), stored.seq)
    if verdict.damaged:
        # Nothing read from a damaged record is shown as if it were true.
        return ["", place, "", "", "", "", "", "", "", "DAMAGED: " + verdict.detail]
    rec = stored.record
    a = rec.attributes
    resource = " ".join(str(x) for x in (a.get(v.RESOURCE_TYPE), a.get(v.RESOURCE_ID)) if x)
    return [
        _ms_time(rec.start),
        place,
        rec.service,
        str(a.get(v.ACTOR_ID) or ""),
        str(a.get(v.ACTION) or rec.name),
        resource,
        str(stored.outcome or ""),
        str(a.get(v.EFFECT) or ""),
        str(a.get(v.TRAIL_ID) or ""),
        verdict.status,
    ]


def _damaged_line(stored: StoredRecord, verdict: Verdict) -> dict[str, Any]:
    return {
        "chain": stored.chain if isinstance(stored.chain, str) else repr(stored.chain),
        "seq": stored.seq if type(stored.seq) is int else repr(stored.seq),
        "verification": {"status": verdict.status, "detail": verdict.detail},
    }


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(_COLUMNS, widths)).rstrip() + "\n")
    out.writelines("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def run(args: argparse.Namespace) -> int:
    check_limit(args.limit, "--limit")
    public_key = load_public_key(args.public_key) if args.public_key else None
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
    bad: list[Verdict] = []
    with open_for_reading(args) as ledger:
        review = Review(ledger, public_key, jobs=default_jobs())
        for stored, verdict in review.records(query):
            if args.limit and shown == args.limit:
                more = True
                break
            if verdict.damaged:
                bad.append(verdict)
            if args.format == "jsonl":
                data: dict[str, Any] = (
                    _damaged_line(stored, verdict) if verdict.damaged else as_dict(stored)
                )
                out.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
            else:
                rows.append(_row(stored, verdict))
            last = stored
            shown += 1
    if args.format == "table":
        if rows:
            _table(rows, out)
        else:
            print("no records match", file=sys.stderr)
    out.flush()
    if more and last is not None:
        cursor = format_cursor(str(last.chain), last.seq)
        print(f"more records: continue with --after {cursor}", file=sys.stderr)
    if bad:
        raise VerificationError(
            f"{len(bad)} of the records shown are damaged (run otel-audit verify): {bad[0].detail}"
        )
    return 0
