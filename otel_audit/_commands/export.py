"""``otel-audit export``: records in a standard format, to stdout or a file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, cast

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._commands._filters import add_filter_arguments, query_from_args
from otel_audit._progress import Progress, atomic_output
from otel_audit.engine.ledger import Query, StoredRecord
from otel_audit.export import formats


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="export records (jsonl, ...)")
    add_ledger_argument(p)
    p.add_argument("--format", default="jsonl", choices=sorted(formats()), help="output format")
    p.add_argument("-o", "--output", metavar="PATH", help="write to PATH (default stdout)")
    add_filter_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    write = formats()[args.format]
    query: Query = query_from_args(args)
    with open_for_reading(args) as ledger:
        if not args.output:
            write(ledger.query(query), sys.stdout)
            return 0
        # atomic_output renames into place only on success: Ctrl-C or an
        # error never leaves a partial file under the requested name.
        with Progress(None, f"exporting {args.format}") as bar, atomic_output(args.output) as fh:
            n = write(_counted(ledger.query(query), bar), cast(TextIO, fh))
    print(f"wrote {n} records to {args.output}", file=sys.stderr)
    return 0


def _counted(records: Iterable[StoredRecord], bar: Progress) -> Iterator[StoredRecord]:
    for record in records:
        bar.update()
        yield record
