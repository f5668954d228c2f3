"""``otel-audit keygen``: write an Ed25519 key pair for signing checkpoints."""

from __future__ import annotations

import argparse
import os

from otel_audit.errors import ConfigError
from otel_audit.proof.keys import generate_keypair


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keygen", help="write an Ed25519 key pair (private key mode 0600)")
    p.add_argument(
        "--out",
        metavar="PREFIX",
        default="audit-signing",
        help="writes PREFIX.key (private) and PREFIX.pub (public); default audit-signing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.basename(args.out):
        raise ConfigError(f"--out {args.out!r} must name a file prefix, e.g. keys/audit-signing")
    private, public = f"{args.out}.key", f"{args.out}.pub"
    kid = generate_keypair(private, public)
    print(f"wrote {private} (private, mode 0600) and {public} (public); key id {kid}")
    print("keep the private key out of the ledger's directory; give reviewers the .pub file")
    print(
        f"the signer remembers what it signed in {private}.state/ (beside the key, outside"
        " the ledger): the service account must be able to write there"
    )
    return 0
