"""Zero-code: what ``opentelemetry-instrument`` loads to audit an unchanged service.

Registered as an ``opentelemetry_post_instrument`` entry point. The loader
of opentelemetry-instrumentation runs, in order: the distro, the
configurator, every instrumentor, then the post-instrument hooks. Running
last means the SDK is already set up by whichever distro/configurator the
operator chose (we never compete with it: only one distro and one
configurator are loaded, so registering as either would silently replace the
operator's), and opentelemetry-instrumentation-flask has already replaced
``flask.Flask``, which we then extend. Without opentelemetry-distro nothing
sets up the SDK, so we do what the distro does (OTLP exporters by default,
the SDK configurator) before installing the audit pipeline.

Active only when ``OTEL_AUDIT_LEDGER`` is set, and not when
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``otel_audit``: installing
the package must not start writing ledgers in every instrumented process.
A bad setting is logged as one error and the service runs unaudited: the
hook must never crash the host application.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace

from otel_audit.settings import OTEL_AUDIT_LEDGER

_log = logging.getLogger("otel_audit.integrations.auto")

#: Name to put in OTEL_PYTHON_DISABLED_INSTRUMENTATIONS to turn the hook off.
NAME = "otel_audit"

_installed = False


def _disabled() -> bool:
    names = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    listed = {n.strip() for n in names.split(",")}
    return NAME in listed or "*" in listed


def _configure_sdk() -> None:
    """Set up the SDK as opentelemetry-distro would, for a process without a distro."""
    from opentelemetry.environment_variables import (
        OTEL_LOGS_EXPORTER,
        OTEL_METRICS_EXPORTER,
        OTEL_TRACES_EXPORTER,
    )
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator
    from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_PROTOCOL

    os.environ.setdefault(OTEL_TRACES_EXPORTER, "otlp")
    os.environ.setdefault(OTEL_METRICS_EXPORTER, "otlp")
    os.environ.setdefault(OTEL_LOGS_EXPORTER, "otlp")
    os.environ.setdefault(OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")
    _OTelSDKConfigurator().configure()  # type: ignore[no-untyped-call]


def _install_flask() -> None:
    """Make every Flask app created from now on an audited one (if Flask is installed)."""
    try:
        import flask
    except ImportError:
        return
    from otel_audit.integrations.flask import AuditFlask

    base: Any = flask.Flask
    if getattr(base, "_otel_audit_auto", False):
        return

    class AuditedFlask(base):  # type: ignore[misc]
        _otel_audit_auto = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Registered after the instrumentation's hooks (made by the base
            # __init__), as AuditFlask requires.
            AuditFlask(self)

    AuditedFlask.__name__ = AuditedFlask.__qualname__ = "Flask"
    AuditedFlask.__module__ = base.__module__
    flask.Flask = AuditedFlask  # type: ignore[misc]


def initialize() -> None:
    """The post-instrument hook: install the audit pipeline and the Flask integration."""
    global _installed
    if _installed or _disabled() or not os.environ.get(OTEL_AUDIT_LEDGER, "").strip():
        return
    from opentelemetry.sdk.trace import TracerProvider

    from otel_audit.errors import AuditError
    from otel_audit.setup import configure

    try:
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            _configure_sdk()
        configure()
        _install_flask()
        _installed = True
    except AuditError as exc:
        _log.error("otel-audit: not auditing this process: %s", exc)
    except Exception:
        _log.exception("otel-audit: not auditing this process: setup failed")
