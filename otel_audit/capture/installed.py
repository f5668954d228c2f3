"""Which audit pipeline is installed on which TracerProvider (private).

Keyed by provider and held weakly: two providers in one process each have
their own pipeline, health and tracer; nothing here is "the last one wins".
An action finds its pipeline from its scope, else from the global provider.
Thread-safe.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from opentelemetry import trace

from otel_audit.errors import LedgerUnavailable

if TYPE_CHECKING:
    from otel_audit.setup import AuditPipeline

_lock = threading.Lock()
_by_provider: weakref.WeakKeyDictionary[object, AuditPipeline] = weakref.WeakKeyDictionary()
_refusal: str | None = None


def install(provider: object, pipeline: AuditPipeline) -> None:
    with _lock:
        _by_provider[provider] = pipeline


def uninstall(provider: object, pipeline: AuditPipeline) -> None:
    with _lock:
        if _by_provider.get(provider) is pipeline:
            del _by_provider[provider]


def installed_on(provider: object) -> AuditPipeline | None:
    with _lock:
        return _by_provider.get(provider)


def global_pipeline() -> AuditPipeline | None:
    """The pipeline of the global TracerProvider, or the only pipeline there is."""
    with _lock:
        if len(_by_provider) == 1:
            # The only one, whichever provider is global: the common case, and
            # no global lookup (without a global provider the API reads the
            # environment on every call).
            return next(iter(_by_provider.values()))
        if not _by_provider:
            return None
        return _by_provider.get(trace.get_tracer_provider())


def refuse_actions(reason: str | None) -> None:
    """Refuse every audited action in this process (``reason``), or stop refusing (None).

    Used when the operator asked for auditing and setup failed: an action that
    cannot be recorded must not run (unless fail-open was chosen explicitly).
    """
    global _refusal
    _refusal = reason


def check_refusal() -> None:
    if _refusal is not None:
        raise LedgerUnavailable(f"auditing is not set up: {_refusal}")
