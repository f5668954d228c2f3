"""``otel-audit init``: create or migrate a PostgreSQL ledger's schema, and grant roles."""

from __future__ import annotations

import argparse

from otel_audit._commands._common import add_ledger_argument, ledger_url
from otel_audit.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "init",
        help="create or migrate a PostgreSQL ledger schema (run as the database owner)",
    )
    add_ledger_argument(p)
    p.add_argument(
        "--writer-role",
        metavar="ROLE",
        action="append",
        default=[],
        help="grant ROLE exactly INSERT and SELECT (what services need); repeatable",
    )
    p.add_argument(
        "--reader-role",
        metavar="ROLE",
        action="append",
        default=[],
        help="grant ROLE SELECT only (reviewers, verify, export); repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = ledger_url(args)
    if not url.startswith(("postgresql://", "postgres://")):
        if args.writer_role or args.reader_role:
            raise ConfigError("--writer-role and --reader-role apply to postgresql:// ledgers only")
        # A SQLite ledger creates its schema on first open; init just does that.
        from otel_audit.engine.ledger import open_ledger

        with open_ledger(url, create=True) as ledger:
            print(f"ledger {ledger.url} is ready")
        return 0
    try:
        from otel_audit.engine.ledger.postgres import SCHEMA, initialize
    except ImportError as exc:
        raise ConfigError(
            "postgresql ledgers need psycopg: pip install 'otel-audit[postgres]'"
        ) from exc
    result = initialize(url, writer_roles=args.writer_role, reader_roles=args.reader_role)
    if result.from_version == result.to_version:
        print(f"ledger {result.url}: schema {SCHEMA} is at version {result.to_version}")
    elif result.from_version == 0:
        print(f"ledger {result.url}: created schema {SCHEMA} version {result.to_version}")
    else:
        print(
            f"ledger {result.url}: migrated schema {SCHEMA}"
            f" from version {result.from_version} to {result.to_version}"
        )
    for statement in result.granted:
        print(f"  {statement};")
    return 0
