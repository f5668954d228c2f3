"""``otel-audit export``: records in a standard format, to stdout or a file.

Every record is checked against its chain before it is written
(review/checked.py). A damaged or unaccounted record is never exported: to a
file, the export is refused whole (nothing is written under the name); to
stdout, the damaged records are left out and named on stderr. Exit 1 either way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, cast

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._commands._filters import add_filter_arguments, query_from_args
from otel_audit._progress import Progress, atomic_output
from otel_audit.engine.ledger import Query, StoredRecord
from otel_audit.errors import VerificationError
from otel_audit.proof.keys import load_public_key
from otel_audit.proof.parallel import default_jobs
from otel_audit.review.checked import Review, Verdict, checked
from otel_audit.review.export import formats


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="export records (jsonl, ...)")
    add_ledger_argument(p)
    p.add_argument("--format", default="jsonl", choices=sorted(formats()), help="output format")
    p.add_argument("-o", "--output", metavar="PATH", help="write to PATH (default stdout)")
    p.add_argument(
        "--public-key", metavar="PATH", help="Ed25519 public key: check checkpoint signatures too"
    )
    add_filter_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    write = formats()[args.format]
    public_key = load_public_key(args.public_key) if args.public_key else None
    query: Query = query_from_args(args)
    bad: list[Verdict] = []
    with open_for_reading(args) as ledger:
        review = Review(ledger, public_key, jobs=default_jobs())
        records = checked(review.records(query), bad)
        if not args.output:
            write(records, sys.stdout)
            sys.stdout.flush()
            _refuse(bad, "left out of the export")
            return 0
        # atomic_output renames into place only on success: Ctrl-C, an error
        # or a damaged record never leaves a partial file under the requested name.
        with Progress(None, f"exporting {args.format}") as bar, atomic_output(args.output) as fh:
            n = write(_counted(records, bar), cast(TextIO, fh))
            _refuse(bad, f"so nothing was written to {args.output}")
    print(f"wrote {n} records to {args.output}", file=sys.stderr)
    return 0


def _refuse(bad: list[Verdict], what: str) -> None:
    if bad:
        raise VerificationError(
            f"{len(bad)} damaged records {what} (run otel-audit verify): {bad[0].detail}"
        )


def _counted(records: Iterable[StoredRecord], bar: Progress) -> Iterator[StoredRecord]:
    for record in records:
        bar.update()
        yield record
