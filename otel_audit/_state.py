"""Process-wide state of the installed audit pipelines (private).

Kept in one place so audited actions can ask "may I proceed?" of every
pipeline without a reference to it. Thread-safe.
"""

from __future__ import annotations

import secrets
import threading
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from otel_audit.setup import AuditPipeline

_lock = threading.Lock()
_pipelines: list[AuditPipeline] = []


def register(pipeline: AuditPipeline) -> None:
    with _lock:
        _pipelines.append(pipeline)


def unregister(pipeline: AuditPipeline) -> None:
    with _lock:
        if pipeline in _pipelines:
            _pipelines.remove(pipeline)


def pipelines() -> list[AuditPipeline]:
    with _lock:
        return list(_pipelines)


def check_healthy() -> None:
    """Raise LedgerUnavailable when any installed pipeline cannot write."""
    for pipeline in pipelines():
        pipeline.writer.check()


def tracer() -> trace.Tracer:
    found = pipelines()
    if found:
        return found[-1].tracer
    return trace.get_tracer("otel_audit")


def random_trail_id() -> str:
    return secrets.token_hex(8)
