"""SQLAlchemy statements traced through SQLAlchemy's public event API.

For SQLAlchemy versions opentelemetry-instrumentation-sqlalchemy refuses
(it declares ``sqlalchemy < 2.1``; it only logs "nothing can be instrumented"
and the audit would silently have no data effects) or when it is not
installed. Listeners on the ``Engine`` class (every engine, made before or
after) open a CLIENT span around each cursor execution, with the stable
and old database semantic conventions, so ``semantics.effects`` classifies
it as ``data.write`` / ``data.read`` like any other database span.

One span per statement: when the driver's own connection is already traced
by a DB-API instrumentation (sqlite3, psycopg, ...; its cursor comes from
the instrumentation), that span is the record and we add none. Parameters
are never recorded. Thread-safe: the span rides on SQLAlchemy's per-execution
context object.
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_audit.semantics.effects import sql_operation

__all__ = ["install_sqlalchemy_events"]

_SPAN = "_otel_audit_span"
_TOKEN = "_otel_audit_token"
_tracer = trace.get_tracer("otel_audit.integrations.sqlalchemy")
_installed = False
_lock = threading.Lock()


def _driver_traced(cursor: Any) -> bool:
    """The DB-API cursor comes from an OpenTelemetry instrumentation (it traces the statement)."""
    return type(cursor).__module__.startswith("opentelemetry.instrumentation")


def _before(
    conn: Any, cursor: Any, statement: str, _params: Any, context: Any, _many: bool
) -> None:
    if context is None or _driver_traced(cursor):
        return
    system = str(getattr(conn.dialect, "name", "") or "other_sql")
    operation = sql_operation({"db.statement": statement}) or "SQL"
    attrs: dict[str, Any] = {
        "db.system": system,
        "db.system.name": system,
        "db.operation.name": operation,
        "db.statement": statement,
        "db.query.text": statement,
    }
    url = getattr(conn.engine, "url", None)
    database = getattr(url, "database", None)
    if database:
        attrs["db.name"] = attrs["db.namespace"] = str(database)
    host = getattr(url, "host", None)
    if host:
        attrs["server.address"] = str(host)
    span = _tracer.start_span(operation, kind=SpanKind.CLIENT, attributes=attrs)
    setattr(context, _SPAN, span)
    setattr(context, _TOKEN, otel_context.attach(trace.set_span_in_context(span)))


def _end(context: Any, error: BaseException | None) -> None:
    span = getattr(context, _SPAN, None)
    if span is None:
        return
    token = getattr(context, _TOKEN, None)
    setattr(context, _SPAN, None)
    setattr(context, _TOKEN, None)
    if token is not None:
        try:
            otel_context.detach(token)
        except Exception:  # detached on another thread/task: nothing to restore
            pass
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attribute("error.type", type(error).__name__)
    span.end()


def _after(_conn: Any, _cursor: Any, _stmt: str, _params: Any, context: Any, _many: bool) -> None:
    _end(context, None)


def _error(exception_context: Any) -> None:
    context = getattr(exception_context, "execution_context", None)
    if context is not None:
        _end(context, exception_context.original_exception)


def install_sqlalchemy_events() -> bool:
    """Listen on every SQLAlchemy engine (once); False when SQLAlchemy is not installed."""
    global _installed
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
    except ImportError:
        return False
    with _lock:
        if not _installed:
            event.listen(Engine, "before_cursor_execute", _before)
            event.listen(Engine, "after_cursor_execute", _after)
            event.listen(Engine, "handle_error", _error)
            _installed = True
    return True


def upstream_instrumented() -> bool:
    """opentelemetry-instrumentation-sqlalchemy instrumented this process (it makes the spans)."""
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except Exception:
        return False
    return bool(getattr(SQLAlchemyInstrumentor(), "_is_instrumented_by_opentelemetry", False))
