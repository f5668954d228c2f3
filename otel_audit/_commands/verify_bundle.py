"""``otel-audit verify-bundle``: check an evidence bundle offline (exit 0 intact, 1 damaged)."""

from __future__ import annotations

import argparse
import os

from otel_audit._progress import Progress
from otel_audit.errors import ConfigError
from otel_audit.proof.bundle import verify_bundle
from otel_audit.proof.keys import load_public_key


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify-bundle",
        help="verify an evidence bundle offline (exit 0 intact, 1 damaged, 2 unusable)",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the evidence bundle (.zip)")
    p.add_argument(
        "--public-key",
        metavar="PATH",
        required=True,
        help="your copy of the Ed25519 public key that signs the ledger's checkpoints",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    public_key = load_public_key(args.public_key)
    if not os.path.isfile(args.bundle):
        raise ConfigError(f"bundle {args.bundle!r} does not exist or is not a file")
    with Progress(None, "verifying") as bar:
        report = verify_bundle(args.bundle, public_key, progress=bar)
    print(
        f"ok: {report.records} records in {report.chains} chains proven against"
        f" {report.checkpoints} checkpoints signed by key {report.key_id}"
    )
    # What the bundle holds that its proofs do not cover (older formats), after the verdict.
    for note in report.notes:
        print(f"note: {note}")
    return 0
