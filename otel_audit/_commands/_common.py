"""Arguments and helpers shared by subcommands (private)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.errors import ConfigError
from otel_audit.settings import OTEL_AUDIT_LEDGER


def add_ledger_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        metavar="URL",
        default=None,
        help=f"ledger URL: sqlite:///path.db, a path, or postgresql://... (default ${OTEL_AUDIT_LEDGER})",
    )


def whole_number(minimum: int) -> Any:
    """An argparse ``type``: a whole number of at least ``minimum`` (one-line errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {minimum} or more")
        return value

    return parse


def ledger_url(args: argparse.Namespace) -> str:
    url = args.ledger or os.environ.get(OTEL_AUDIT_LEDGER)
    if not url:
        raise ConfigError("no ledger given: pass --ledger URL or set OTEL_AUDIT_LEDGER")
    return str(url)


def open_for_reading(args: argparse.Namespace) -> Ledger:
    """Open an existing ledger read-only; a missing or unreadable one is a LedgerError."""
    return open_ledger(ledger_url(args), create=False, readonly=True)


@contextmanager
def termination_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; old handlers restored after."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_until(stop: threading.Event) -> None:
    """Block until ``stop`` is set.

    Short waits: the kernel may deliver SIGTERM/SIGINT to another thread (a
    grpc or worker thread), which does not interrupt a long wait; the Python
    handler then runs only when the main thread next wakes.
    """
    while not stop.wait(0.5):
        pass
