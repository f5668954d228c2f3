"""``otel-audit export``: records in a standard format, to stdout or a file."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ..export import formats
from ..ledger import Query
from ._common import add_ledger_argument, open_for_reading
from ._filters import add_filter_arguments, query_from_args


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
        # Write beside the target and rename at the end: an interrupted export
        # never leaves a partial file under the requested name.
        directory = os.path.dirname(os.path.abspath(args.output))
        fd, tmp = tempfile.mkstemp(prefix=".otel-audit-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                n = write(ledger.query(query), fh)
            os.replace(tmp, args.output)
        except BaseException:
            os.unlink(tmp)
            raise
    print(f"wrote {n} records to {args.output}", file=sys.stderr)
    return 0
