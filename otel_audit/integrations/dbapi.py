"""sqlite3 connection shortcuts traced: ``conn.execute``, ``executemany``, ``executescript``.

opentelemetry-instrumentation-sqlite3 wraps ``sqlite3.connect`` and traces
statements run through ``conn.cursor().execute()`` only; the shortcuts on the
connection, which the Flask tutorial and most small apps use, reach the
real connection untraced (open-telemetry/opentelemetry-python-contrib#3082),
and their writes would be missing from every trail. We wrap ``connect``
once more, after the instrumentation: a traced connection gets the shortcuts
routed through its traced cursor (exactly what sqlite3's own shortcuts do:
make a cursor, run the statement on it, return it), and ``executescript``
its own CLIENT span.

No double records when upstream closes the gap: a shortcut is added only
where the instrumentation's connection class does not define it itself, and
only to connections the instrumentation traced (an untraced connection is
left alone; ``otel-audit doctor`` reports the missing instrumentation).
Thread-safe: the proxies hold no state of their own.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from types import FrameType
from typing import Any

import wrapt
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_audit.semantics.effects import sql_operation

__all__ = ["install_ledger_guard", "install_sqlite3_shortcuts", "is_traced_connection"]

_SHORTCUTS = ("execute", "executemany", "executescript")
# Modules whose connections are the audit's own storage (never traced).
_LEDGER_MODULES = ("otel_audit.engine.", "otel_audit.transport.", "otel_audit.proof.")
# wrapt 2 names the base of every proxy BaseObjectProxy (the instrumentations use it).
_PROXY: type[Any] = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)
_tracer = trace.get_tracer("otel_audit.integrations.dbapi")


def is_traced_connection(conn: Any) -> bool:
    """True for a connection returned by a DB-API instrumentation (its proxy, or ours around it)."""
    seen = 0
    while isinstance(conn, _PROXY) and seen < 8:
        if type(conn).__module__.startswith("opentelemetry.instrumentation"):
            return True
        conn = conn.__wrapped__
        seen += 1
    return False


def _missing(conn: Any) -> tuple[str, ...]:
    """The shortcuts the instrumentation's connection class leaves to the untraced connection."""
    return tuple(name for name in _SHORTCUTS if not hasattr(type(conn), name))


class _ShortcutConnection(wrapt.ObjectProxy[Any]):
    """A traced sqlite3 connection whose shortcuts go through the traced cursor."""

    def __init__(self, conn: Any, missing: tuple[str, ...]) -> None:
        super().__init__(conn)
        self._self_missing = missing

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        if "execute" not in self._self_missing:
            return self.__wrapped__.execute(sql, parameters)
        cursor = self.__wrapped__.cursor()
        cursor.execute(sql, parameters)
        return cursor

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        if "executemany" not in self._self_missing:
            return self.__wrapped__.executemany(sql, parameters)
        cursor = self.__wrapped__.cursor()
        cursor.executemany(sql, parameters)
        return cursor

    def executescript(self, script: str, /) -> Any:
        if "executescript" not in self._self_missing:
            return self.__wrapped__.executescript(script)
        operation = sql_operation({"db.statement": script}) or "SCRIPT"
        attrs = {
            "db.system": "sqlite",
            "db.system.name": "sqlite",
            "db.operation.name": operation,
            "db.statement": script,
            "db.query.text": script,
        }
        with _tracer.start_as_current_span(
            f"{operation} script", kind=SpanKind.CLIENT, attributes=attrs
        ):
            return self.__wrapped__.executescript(script)

    def __enter__(self) -> Any:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *args: Any) -> Any:
        return self.__wrapped__.__exit__(*args)


def _caller_module() -> str:
    """The module that called ``sqlite3.connect`` (skipping wrapt's own frames)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return ""
        name = str(frame.f_globals.get("__name__", ""))
        if not name.startswith("wrapt"):
            return name
        frame = frame.f_back
    return ""


def _untraced(conn: Any) -> Any:
    while isinstance(conn, _PROXY):
        conn = conn.__wrapped__
    return conn


def _connect_wrapper(wrapped: Any, _instance: Any, args: Any, kwargs: Any) -> Any:
    conn = wrapped(*args, **kwargs)
    if _caller_module().startswith(_LEDGER_MODULES):
        # The ledger's own statements are never traced: as spans inside a
        # request's trail they would become records of writing records.
        return _untraced(conn)
    if not is_traced_connection(conn):
        return conn
    missing = _missing(conn)
    return _ShortcutConnection(conn, missing) if missing else conn


_installed = False
_install_lock = threading.Lock()


def install_sqlite3_shortcuts() -> bool:
    """Wrap ``sqlite3.connect`` (and ``sqlite3.dbapi2.connect``) once; True when installed.

    Call after opentelemetry-instrumentation-sqlite3 wrapped ``connect``:
    our wrapper sits outside theirs and only touches traced connections.
    """
    global _installed
    with _install_lock:
        if not _installed:
            for module in (sqlite3, sqlite3.dbapi2):
                wrapt.wrap_function_wrapper(module, "connect", _connect_wrapper)
            _installed = True
    return True


def _psycopg_connect_wrapper(wrapped: Any, _instance: Any, args: Any, kwargs: Any) -> Any:
    conn = wrapped(*args, **kwargs)
    if _caller_module().startswith(_LEDGER_MODULES):
        # The PostgreSQL ledger's statements are never traced either (see above).
        import psycopg

        if str(getattr(conn.cursor_factory, "__module__", "")).startswith("opentelemetry."):
            conn.cursor_factory = psycopg.Cursor
    return conn


_guarded = False


def install_ledger_guard() -> None:
    """Keep the PostgreSQL ledger's own connections untraced when psycopg is instrumented."""
    global _guarded
    psycopg = sys.modules.get("psycopg")
    with _install_lock:
        if _guarded or psycopg is None:
            return
        wrapt.wrap_function_wrapper(psycopg, "connect", _psycopg_connect_wrapper)
        _guarded = True
