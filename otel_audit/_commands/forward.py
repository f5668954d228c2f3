"""``otel-audit forward``: ship a local ledger to a remote ``otel-audit serve`` (store-and-forward)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from otel_audit._commands._common import (
    add_ledger_argument,
    ledger_url,
    termination_signals,
    wait_until,
)
from otel_audit.errors import ConfigError
from otel_audit.settings import (
    OTEL_AUDIT_FORWARD_ENDPOINT,
    OTEL_AUDIT_FORWARD_HEADERS,
    OTEL_AUDIT_FORWARD_TOKEN,
)
from otel_audit.transport.forward import (
    Forwarder,
    ForwarderStats,
    forwarder_from_env,
    parse_headers,
)

#: ``--once`` is run by a person or a cron job: another forwarder holding the
#: outbox is a failure to report, not a reason to wait for ever.
_DEFAULT_ONCE_LOCK_TIMEOUT = 10.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "forward",
        help="send a local ledger's records to a remote OTLP receiver, resumably",
        description="Store-and-forward: send every record of the local ledger to an OTLP/HTTP "
        "receiver (otel-audit serve), keeping a cursor so restarts and outages lose nothing.",
    )
    add_ledger_argument(p)
    p.add_argument(
        "--endpoint", metavar="URL", help=f"receiver URL (default ${OTEL_AUDIT_FORWARD_ENDPOINT})"
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"bearer token file (default ${OTEL_AUDIT_FORWARD_TOKEN})",
    )
    p.add_argument(
        "--header",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=f"extra header (also ${OTEL_AUDIT_FORWARD_HEADERS})",
    )
    p.add_argument(
        "--state", metavar="PATH", help="cursor file (default <ledger file>.forward.json)"
    )
    p.add_argument(
        "--once", action="store_true", help="exit once everything is sent (or on the first failure)"
    )
    p.add_argument(
        "--lock-timeout",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_ONCE_LOCK_TIMEOUT,
        help="with --once: fail when another forwarder holds the outbox this long "
        "(default %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.lock_timeout >= 0:
        raise ConfigError("--lock-timeout must be a number of seconds, 0 or more")
    url = ledger_url(args)
    env = dict(os.environ)
    if args.endpoint:
        env[OTEL_AUDIT_FORWARD_ENDPOINT] = args.endpoint
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                env[OTEL_AUDIT_FORWARD_TOKEN] = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --token-file {args.token_file!r}: {exc.strerror}"
            ) from None
    if args.state:
        env["OTEL_AUDIT_FORWARD_STATE"] = args.state
    forwarder = forwarder_from_env(url, env)
    if forwarder is None:
        raise ConfigError(
            f"no receiver given: pass --endpoint URL or set {OTEL_AUDIT_FORWARD_ENDPOINT}"
        )
    for item in args.header:
        forwarder.headers.update(parse_headers(item, "--header"))
    if args.once:
        forwarder.lock_timeout = args.lock_timeout
        return _once(forwarder)
    with termination_signals() as stop:
        try:
            forwarder.start()
            print(f"otel-audit forward: {url} -> {forwarder.url}", flush=True)
            wait_until(stop)
        finally:
            forwarder.stop()
    stats = forwarder.stats()
    print(
        f"otel-audit forward: stopped; {stats.forwarded} records sent{_edited(stats)}",
        file=sys.stderr,
    )
    return 0


def _edited(stats: ForwarderStats) -> str:
    """Said in the summary: the outbox was edited under the forwarder (see the errors logged)."""
    said = ""
    if stats.rewinds:
        said += (
            f"; {stats.rewinds} chain(s) resent from the start because the record at the"
            " cursor was deleted or changed (the outbox was edited outside the writer)"
        )
    if stats.breaks:
        said += (
            f"; records already sent were replaced or removed at {stats.breaks} place(s) (the"
            " outbox was edited outside the writer): their chains were sent again from the start"
        )
    if stats.late:
        said += (
            f"; {stats.late} record(s) found, and sent, in gaps the cursor had passed"
            " (the outbox was edited outside the writer)"
        )
    return said


def _once(forwarder: Forwarder) -> int:
    # The failure is reported once below; the retry warnings are for long-running forwarders.
    logging.getLogger("otel_audit.transport.forward").setLevel(logging.ERROR)
    forwarder.max_backoff = 0.0  # fail at once rather than wait: the caller retries
    forwarder.start()
    done = _healthy_run(forwarder)
    forwarder.stop()
    stats = forwarder.stats()
    if not done:
        reason = stats.last_error or "the forwarding thread stopped"
        print(f"otel-audit: forwarding failed: {reason}", file=sys.stderr)
        return 1
    print(f"otel-audit forward: {stats.forwarded} records sent{_edited(stats)}")
    return 0


def _healthy_run(forwarder: Forwarder) -> bool:
    """Wait for the first idle pass, giving up at the first failure (or a dead thread)."""
    while True:
        if forwarder.flush(timeout=0.2):
            return True
        # flush() returns at once when the thread has ended: without this check
        # a thread that died would turn this loop into a busy spin for ever.
        if forwarder.stats().failures or not forwarder.running:
            return False
