"""otel_audit: audit trails for OpenTelemetry.

The public API is listed in ``__all__``; everything else is private.
"""

from __future__ import annotations

from otel_audit import vocabulary
from otel_audit.capture.actions import AuditAction, audit_action
from otel_audit.capture.context import (
    Actor,
    actor,
    continue_trail,
    current_actor,
    current_trail,
    reset_actor,
    set_actor,
)
from otel_audit.capture.processor import AuditSpanProcessor
from otel_audit.capture.sampler import AuditSampler
from otel_audit.engine.ledger import Ledger, open_ledger
from otel_audit.engine.record import Record
from otel_audit.engine.writer import LedgerWriter
from otel_audit.errors import (
    AuditError,
    ConfigError,
    LedgerError,
    LedgerUnavailable,
    LedgerWriteError,
    VerificationError,
)
from otel_audit.proof.verify import verify_ledger
from otel_audit.setup import AuditPipeline, configure

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
    "continue_trail",
    "current_actor",
    "current_trail",
    "open_ledger",
    "reset_actor",
    "set_actor",
    "verify_ledger",
    "vocabulary",
]
