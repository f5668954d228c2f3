"""``otel-audit tail``: the newest records as JSON lines, optionally following.

Each record is checked against its chain first (review/checked.py): a damaged
one is printed as its place and a ``verification`` member only, and tail
exits 1 (without --follow) after the lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable

from otel_audit._commands._common import add_ledger_argument, open_for_reading, whole_number
from otel_audit.engine.ledger import Ledger, StoredRecord
from otel_audit.errors import VerificationError
from otel_audit.review.checked import Review, Verdict
from otel_audit.review.export.jsonl import as_dict


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tail", help="print the newest records as JSON lines")
    add_ledger_argument(p)
    p.add_argument(
        "-n", "--lines", type=whole_number(0), default=10, help="records per chain (default 10)"
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=_seconds, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _newest(ledger: Ledger, chain: str, n: int) -> list[StoredRecord]:
    head = ledger.head(chain)
    if head is None or n <= 0:
        return []
    return [
        StoredRecord(chain, r.seq, r.prev_hash, r.hash, r.body)
        for r in ledger.scan(chain, after_seq=max(0, head.seq - n))
    ]


def _write(review: Review, rows: Iterable[StoredRecord], bad: list[Verdict]) -> None:
    for stored in rows:
        verdict = review.judge(stored)
        if verdict.damaged:
            bad.append(verdict)
            line = {
                "chain": stored.chain,
                "seq": stored.seq,
                "verification": {"status": verdict.status, "detail": verdict.detail},
            }
        else:
            line = as_dict(review.concluded(stored))
        sys.stdout.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")


def run(args: argparse.Namespace) -> int:
    bad: list[Verdict] = []
    with open_for_reading(args) as ledger:
        review = Review(ledger)
        seen: dict[str, int] = {}
        for chain in ledger.chains():
            if not isinstance(chain, str):
                continue  # a row whose chain id is not text: verify names it
            _write(review, _newest(ledger, chain, args.lines), bad)
            head = ledger.head(chain)
            seen[chain] = head.seq if head else 0
        sys.stdout.flush()
        while args.follow:
            time.sleep(args.interval)
            for chain in ledger.chains():
                if not isinstance(chain, str):
                    continue
                new = [
                    StoredRecord(chain, r.seq, r.prev_hash, r.hash, r.body)
                    for r in ledger.scan(chain, after_seq=seen.get(chain, 0))
                ]
                if new:
                    _write(review, new, bad)
                    seen[chain] = new[-1].seq
            sys.stdout.flush()
    if bad:
        raise VerificationError(
            f"{len(bad)} of the records shown are damaged (run otel-audit verify): {bad[0].detail}"
        )
    return 0
