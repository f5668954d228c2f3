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

The hook never crashes the host application. When the operator asked for
auditing and setup fails (bad ledger URL, missing directory or signing key,
bad durability or any other bad ``OTEL_AUDIT_*`` value), the failure is
logged as one error and the process *refuses* what it cannot audit: Flask
requests that would be audited get 503 and ``audit_action`` raises
``LedgerUnavailable``, until the setting is fixed and the process restarted.
``OTEL_AUDIT_FAIL_OPEN=true`` chooses instead to run unaudited.

It also closes gaps of the standard instrumentations (sqlite3 connection
shortcuts; SQLAlchemy versions its instrumentation refuses) and logs one
line per installed database or HTTP library whose effects would not be
audited (``otel-audit doctor`` prints the same).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace

from otel_audit.errors import AuditError
from otel_audit.settings import OTEL_AUDIT_FAIL_OPEN, OTEL_AUDIT_LEDGER

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


def _install_flask(refusal: str | None = None) -> None:
    """Make every Flask app created from now on an audited one (if Flask is installed).

    ``refusal``: setup failed; the apps refuse (503) what they would audit.
    """
    try:
        import flask
    except ImportError:
        return
    from otel_audit.integrations.flask import AuditFlask, install_refusal, refuse_requests

    if refusal is not None:
        refuse_requests(refusal)
    base: Any = flask.Flask
    if getattr(base, "_otel_audit_auto", False):
        return

    class AuditedFlask(base):  # type: ignore[misc]
        _otel_audit_auto = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Registered after the instrumentation's hooks (made by the base
            # __init__), as AuditFlask requires.
            try:
                AuditFlask(self)
            except Exception as exc:  # bad integration settings: refuse, never crash
                reason = str(exc) if isinstance(exc, AuditError) else type(exc).__name__
                if _fail_open():
                    _log.error("otel-audit: not auditing this app: %s", reason)
                    return
                _log.error("otel-audit: %s; refusing audited requests (503)", reason)
                install_refusal(self, reason)

    AuditedFlask.__name__ = AuditedFlask.__qualname__ = "Flask"
    AuditedFlask.__module__ = base.__module__
    flask.Flask = AuditedFlask  # type: ignore[misc]


def _fail_open() -> bool:
    """``OTEL_AUDIT_FAIL_OPEN``: true runs unaudited when setup fails; a bad value is false."""
    from otel_audit.integrations.flask import parse_bool

    try:
        return parse_bool(os.environ.get(OTEL_AUDIT_FAIL_OPEN), OTEL_AUDIT_FAIL_OPEN)
    except AuditError:
        return False


def _install_effects() -> None:
    """Trace the writes the standard instrumentations miss; log the libraries still untraced."""
    from otel_audit.integrations.coverage import FALLBACK, MISSING, survey
    from otel_audit.integrations.sqlalchemy_events import (
        install_sqlalchemy_events,
        upstream_instrumented,
    )

    fallbacks = set()
    if not upstream_instrumented() and install_sqlalchemy_events():
        fallbacks.add("sqlalchemy")
    for finding in survey(in_process=True, fallbacks=frozenset(fallbacks)):
        if finding.status == MISSING:
            _log.warning("otel-audit: %s", finding.line())
        elif finding.status == FALLBACK:
            _log.info("otel-audit: %s", finding.line())


def _refuse(reason: str) -> None:
    """Refuse audited work in this process: ``audit_action`` raises, Flask answers 503."""
    from otel_audit.setup import refuse_actions

    refuse_actions(reason)
    _install_flask(refusal=reason)


def initialize() -> None:
    """The post-instrument hook: install the audit pipeline and the Flask integration."""
    global _installed
    if _installed or _disabled() or not os.environ.get(OTEL_AUDIT_LEDGER, "").strip():
        return
    from opentelemetry.sdk.trace import TracerProvider

    from otel_audit.integrations.dbapi import install_ledger_guard, install_sqlite3_shortcuts
    from otel_audit.integrations.flask import settings_from_env
    from otel_audit.setup import configure

    try:
        # Before the ledger is opened: its own connections must stay untraced.
        install_sqlite3_shortcuts()
        install_ledger_guard()
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            _configure_sdk()
        settings_from_env()  # a bad Flask setting is a setup failure too
        configure()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, AuditError) else f"setup failed: {exc!r}"
        if _fail_open():
            _log.error("otel-audit: not auditing this process (%s=true): %s",
                       OTEL_AUDIT_FAIL_OPEN, reason)  # fmt: skip
            return
        _log.error(
            "otel-audit: audit setup failed: %s; refusing audited requests (503) and actions"
            " until it is fixed (%s=true runs unaudited instead)", reason, OTEL_AUDIT_FAIL_OPEN,
        )  # fmt: skip
        _refuse(reason)
        _installed = True
        return
    try:
        _install_effects()
    except Exception:
        _log.exception("otel-audit: could not install the database effect tracing")
    _install_flask()
    _installed = True
