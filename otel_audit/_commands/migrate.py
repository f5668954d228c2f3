"""``otel-audit migrate``: copy a ledger to another backend, chains intact."""

from __future__ import annotations

import argparse

from otel_audit.engine.migrate import migrate
from otel_audit.proof.parallel import default_jobs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "migrate",
        help="copy a ledger (sqlite <-> postgresql) with the same seqs, hashes and checkpoints",
    )
    p.add_argument("--from", dest="source", metavar="URL", required=True, help="source ledger URL")
    p.add_argument("--to", dest="target", metavar="URL", required=True, help="target ledger URL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = migrate(args.source, args.target, jobs=default_jobs())
    print(
        f"copied {report.records} records and {report.checkpoints} checkpoints"
        f" in {report.chains} chains from {report.source} to {report.target}; target verified"
    )
    return 0
