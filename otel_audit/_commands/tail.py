"""``otel-audit tail``: the newest records as JSON lines, optionally following."""

from __future__ import annotations

import argparse
import sys
import time

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit.engine.ledger import Ledger, StoredRecord
from otel_audit.export.jsonl import write


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tail", help="print the newest records as JSON lines")
    add_ledger_argument(p)
    p.add_argument("-n", "--lines", type=_count, default=10, help="records per chain (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=_seconds, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


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


def run(args: argparse.Namespace) -> int:
    with open_for_reading(args) as ledger:
        seen: dict[str, int] = {}
        for chain in ledger.chains():
            rows = _newest(ledger, chain, args.lines)
            write(rows, sys.stdout)
            head = ledger.head(chain)
            seen[chain] = head.seq if head else 0
        sys.stdout.flush()
        while args.follow:
            time.sleep(args.interval)
            for chain in ledger.chains():
                new = [
                    StoredRecord(chain, r.seq, r.prev_hash, r.hash, r.body)
                    for r in ledger.scan(chain, after_seq=seen.get(chain, 0))
                ]
                if new:
                    write(new, sys.stdout)
                    seen[chain] = new[-1].seq
            sys.stdout.flush()
    return 0
