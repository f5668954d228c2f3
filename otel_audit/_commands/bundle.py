"""``otel-audit bundle``: an evidence bundle (zip) of selected records with Merkle proofs."""

from __future__ import annotations

import argparse
import sys

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._commands._filters import add_filter_arguments, query_from_args
from otel_audit._progress import Progress, atomic_output
from otel_audit.proof.bundle import write_bundle
from otel_audit.proof.keys import load_public_key

_FILTERS = (
    "actor", "action", "resource_type", "resource_id", "outcome", "service",
    "trail_id", "trace_id", "chain", "since", "until",
)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bundle",
        help="write an evidence bundle (records, proofs, checkpoints) that verifies offline",
    )
    add_ledger_argument(p)
    add_filter_arguments(p)
    p.add_argument(
        "-o", "--output", metavar="PATH", required=True, help="the bundle to write (.zip)"
    )
    p.add_argument(
        "--public-key",
        metavar="PATH",
        help="include this public key, and use only checkpoints signed by it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    query = query_from_args(args)
    public_key = load_public_key(args.public_key) if args.public_key else None
    filters = {name: getattr(args, name) for name in _FILTERS if getattr(args, name) is not None}
    with (
        open_for_reading(args) as ledger,
        Progress(None, "bundling") as bar,
        atomic_output(args.output, "wb") as out,
    ):
        summary = write_bundle(
            ledger, query, out, public_key=public_key, filters=filters, progress=bar
        )
    for chain, n in sorted(summary.skipped.items()):
        print(
            f"note: {n} selected records of chain {chain!r} are not covered by a signed checkpoint"
            " with a merkle root yet and are not in the bundle",
            file=sys.stderr,
        )
    print(
        f"wrote {summary.records} records from {summary.chains} chains with"
        f" {summary.checkpoints} checkpoints to {args.output}",
        file=sys.stderr,
    )
    return 0
