"""Ledger backends behind one interface; ``open_ledger(url)`` picks one by URL.

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, a bare
path (SQLite), or ``postgresql://...`` (needs ``otel-audit[postgres]``).
"""

from __future__ import annotations

from otel_audit.engine.ledger.base import Appended, Ledger, Query, RawRow, StoredRecord
from otel_audit.errors import ConfigError

__all__ = ["Appended", "Ledger", "Query", "RawRow", "StoredRecord", "open_ledger", "sqlite_path"]


def _split_query(url: str) -> tuple[str, dict[str, str]]:
    if "?" not in url:
        return url, {}
    base, _, query = url.partition("?")
    options = {}
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            options[key] = value
    return base, options


def sqlite_path(url: str) -> str | None:
    """The file path of a SQLite ledger URL, or None for another scheme."""
    url, _ = _split_query(url) if url.startswith("sqlite://") else (url, {})
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(f"ledger URL {url!r} has no path (use sqlite:///file.db)")
        return rest[1:]
    if "://" in url:
        return None
    return url


def open_ledger(url: str, *, create: bool = True, readonly: bool = False) -> Ledger:
    """Open the ledger at ``url``; ``create`` makes a new SQLite file when missing."""
    if not url or not isinstance(url, str):
        raise ConfigError("ledger URL is empty (set --ledger or OTEL_AUDIT_LEDGER)")
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from otel_audit.engine.ledger.postgres import PostgresLedger
        except ImportError as exc:  # psycopg missing
            raise ConfigError(
                "postgresql ledgers need psycopg: pip install 'otel-audit[postgres]'"
            ) from exc
        return PostgresLedger(url, readonly=readonly)
    path = sqlite_path(url)
    if path is None:
        scheme = url.split("://", 1)[0]
        raise ConfigError(
            f"ledger URL scheme {scheme!r} is not supported (use sqlite or postgresql)"
        )
    from otel_audit.engine.ledger.sqlite import SQLiteLedger

    options = _split_query(url)[1] if url.startswith("sqlite://") else {}
    unknown = sorted(set(options) - {"busy_timeout"})
    if unknown:
        raise ConfigError(
            f"ledger URL option {unknown[0]!r} is not supported (known: busy_timeout)"
        )
    timeout_ms = None
    if "busy_timeout" in options:
        try:
            timeout_ms = int(options["busy_timeout"])
            if timeout_ms < 0:
                raise ValueError
        except ValueError:
            raise ConfigError("ledger URL option busy_timeout must be milliseconds >= 0") from None
    return SQLiteLedger(path, create=create, readonly=readonly, busy_timeout_ms=timeout_ms)
