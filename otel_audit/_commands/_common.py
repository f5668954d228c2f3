"""Arguments and helpers shared by subcommands (private)."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from ..ledger import Ledger, open_ledger
from ..settings import OTEL_AUDIT_LEDGER


def add_ledger_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        metavar="URL",
        default=None,
        help=f"ledger URL: sqlite:///path.db, a path, or postgresql://... (default ${OTEL_AUDIT_LEDGER})",
    )


def ledger_url(args: argparse.Namespace) -> str:
    url = args.ledger or os.environ.get(OTEL_AUDIT_LEDGER)
    if not url:
        raise ConfigError("no ledger given: pass --ledger URL or set OTEL_AUDIT_LEDGER")
    return str(url)


def open_for_reading(args: argparse.Namespace) -> Ledger:
    """Open an existing ledger read-only; a missing or unreadable one is a LedgerError."""
    return open_ledger(ledger_url(args), create=False, readonly=True)
