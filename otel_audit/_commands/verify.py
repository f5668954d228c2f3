"""``otel-audit verify``: check every chain, checkpoint and signature of a ledger."""

from __future__ import annotations

import argparse

from otel_audit._commands._common import add_ledger_argument, open_for_reading, whole_number
from otel_audit._progress import Progress
from otel_audit.errors import ConfigError
from otel_audit.proof.keys import load_public_key
from otel_audit.proof.parallel import default_jobs
from otel_audit.proof.verify import verify_ledger
from otel_audit.transport.anchors import read_anchors


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="verify a ledger (exit 0 intact, 1 damaged, 2 unusable)")
    add_ledger_argument(p)
    p.add_argument("--public-key", metavar="PATH", help="Ed25519 public key that signs checkpoints")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when intact")
    p.add_argument(
        "--anchors", metavar="FILE", help="JSONL export of checkpoint log records to check against"
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="worker processes for long chains (default: the CPUs verify may use;"
        " 1: one process); the result is the same",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    public_key = load_public_key(args.public_key) if args.public_key else None
    anchors = read_anchors(args.anchors) if args.anchors else []
    if args.anchors and not anchors:
        raise ConfigError(f"no checkpoint log records found in {args.anchors!r}")
    with open_for_reading(args) as ledger:
        with Progress(None, "verifying") as bar:
            if bar.enabled:
                bar.total = ledger.count()
            report = verify_ledger(
                ledger,
                public_key,
                anchors=anchors,
                progress=bar.update,
                jobs=args.jobs or default_jobs(),
            )
    if args.quiet:
        return 0
    for c in report.chains:
        tail = f", {c.unanchored} after the last checkpoint" if c.unanchored else ""
        print(
            f"chain {c.chain!r}: {c.records} records, {c.checkpoints} checkpoints"
            f" ({c.signatures_checked} signatures verified){tail}"
        )
    if public_key is None:
        print("signatures not checked: pass --public-key to detect a recomputed chain")
    print(f"ok: {report.records} records in {len(report.chains)} chains intact")
    return 0
