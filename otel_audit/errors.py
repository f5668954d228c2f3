"""Errors raised by otel_audit.

Hierarchy::

    AuditError                      base; ``exit_code`` used by the CLI
    +-- ConfigError                 a bad setting or argument (exit 2)
    +-- LedgerError                 the ledger cannot be opened, read or written (exit 2)
    |   +-- LedgerUnavailable       the writer is failed or stopped; audited actions refuse
    |   +-- LedgerWriteError        one record could not be committed
    +-- VerificationError           the ledger or a bundle is damaged (exit 1)

Backend exceptions (sqlite3, psycopg) are mapped to these in the ledger modules
with ``raise ... from exc``; nothing above the ledger sees them.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every otel_audit error; the message is one lowercase sentence."""

    exit_code = 1

    def diagnostics(self) -> str:
        """A longer explanation for people; the message by default."""
        return str(self)


class ConfigError(AuditError, ValueError):
    """A setting or argument is invalid; the message names it."""

    exit_code = 2


class LedgerError(AuditError):
    """The ledger cannot be opened, read or written."""

    exit_code = 2


class LedgerUnavailable(LedgerError):
    """The audit writer cannot accept records, so audited actions must refuse."""


class LedgerWriteError(LedgerError):
    """A record was not committed; the audited action must be treated as failed."""


class CommitUncertain(LedgerWriteError):
    """The commit went through, but the ledger could not confirm it is where it
    should be (the SQLite file at its path was replaced during the commit): the
    action is treated as failed, and its record is not written a second time."""


class VerificationError(AuditError):
    """The ledger is damaged: ``chain``, ``seq`` and ``kind`` name the first damage."""

    exit_code = 1

    def __init__(self, message: str, *, chain: str = "", seq: int = 0, kind: str = "") -> None:
        super().__init__(message)
        self.chain = chain
        self.seq = seq
        self.kind = kind
