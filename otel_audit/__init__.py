"""otel_audit: audit trails for OpenTelemetry.

The public API is listed in ``__all__``; everything else is private.
"""

from __future__ import annotations

from . import vocabulary
from .actions import AuditAction, audit_action
from .context import Actor, actor, current_actor, current_trail, reset_actor, set_actor
from .errors import (
    AuditError,
    ConfigError,
    LedgerError,
    LedgerUnavailable,
    LedgerWriteError,
    VerificationError,
)
from .ledger import Ledger, open_ledger
from .processor import AuditSpanProcessor
from .record import Record
from .sampler import AuditSampler
from .setup import AuditPipeline, configure
from .verify import verify_ledger
from .writer import LedgerWriter

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "AuditAction",
    "AuditError",
    "AuditPipeline",
    "AuditSampler",
    "AuditSpanProcessor",
    "ConfigError",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "LedgerWriteError",
    "LedgerWriter",
    "Record",
    "VerificationError",
    "actor",
    "audit_action",
    "configure",
    "current_actor",
    "current_trail",
    "open_ledger",
    "reset_actor",
    "set_actor",
    "verify_ledger",
    "vocabulary",
]
