"""``otel-audit trail``: one trail across services, as a tree, JSON or an HTML report."""

from __future__ import annotations

import argparse
import sys

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._progress import Progress, atomic_output
from otel_audit.errors import ConfigError
from otel_audit.proof.keys import load_public_key
from otel_audit.proof.parallel import default_jobs
from otel_audit.review.trail import (
    damaged,
    find_trail,
    render_html,
    render_text,
    to_json,
    verify_trail,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "trail",
        help="show one trail (user action and its effects, every service) as a tree;"
        " exit 1 when a record shown is damaged",
    )
    add_ledger_argument(p)
    p.add_argument("trail_id", metavar="TRAIL_ID", help="the audit.trail.id to show")
    p.add_argument(
        "--format",
        choices=["text", "json", "html"],
        default="text",
        help="output format (default text)",
    )
    p.add_argument("-o", "--output", metavar="PATH", help="write to PATH (default stdout)")
    p.add_argument(
        "--public-key", metavar="PATH", help="Ed25519 public key: check checkpoint signatures too"
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="verify the chains of the trail's records (default: on; --no-verify shows"
        " records unchecked, marked unverified in json and html)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    public_key = load_public_key(args.public_key) if args.public_key else None
    # Verified by default in every format: a review never presents a record
    # verification would reject (a forged seq-0 row, a row after a break).
    verify = args.verify if args.verify is not None else True
    with open_for_reading(args) as ledger:
        trail = find_trail(ledger, args.trail_id)
        if not trail.roots:
            raise ConfigError(f"no records of trail {args.trail_id!r} in the ledger")
        if verify:
            chains = {n.stored.chain for _, n in trail.nodes() if isinstance(n.stored.chain, str)}
            heads = [ledger.head(chain) for chain in chains]
            total = sum(head.seq for head in heads if head is not None)
            with Progress(total, "verifying") as bar:
                verify_trail(ledger, trail, public_key, progress=bar.update, jobs=default_jobs())
    if args.format == "json":
        text = to_json(trail)
    elif args.format == "html":
        text = render_html(trail)
    else:
        text = render_text(trail)
    with atomic_output(args.output) as out:
        out.write(text)
    if args.output:
        print(
            f"wrote trail {args.trail_id} ({len(trail)} records) to {args.output}", file=sys.stderr
        )
    bad = damaged(trail)
    if bad:
        # The report is written whole (it shows which records); the exit code
        # tells scripts the trail cannot be trusted, as verify's does.
        first = bad[0]
        print(
            f"otel-audit: {len(bad)} of {len(trail)} records of the trail are damaged:"
            f" {first.status_detail}",
            file=sys.stderr,
        )
        return 1
    return 0
