"""Which database and HTTP libraries are traced, and which would silently leave no effects.

Effects (``data.write``, ``http.call``) come from the standard OpenTelemetry
instrumentations. When one is not installed, is disabled, or refuses the
installed library version (it only logs "nothing can be instrumented"), the
audit silently loses those effects. ``survey()`` says so for every library
of the table below that is installed; the zero-code hook logs one line per
uncovered library at start and ``otel-audit doctor`` prints the same.
Where otel-audit traces a library itself (SQLAlchemy through its events,
sqlite3 connection shortcuts), the line says so. Thread-safe (no state).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
from dataclasses import dataclass

__all__ = ["LIBRARIES", "Finding", "Library", "survey"]


@dataclass(frozen=True)
class Library:
    module: str  # the import name
    distribution: str | None  # its pip name; None for the standard library
    kind: str  # "database" or "http"
    instrumentation: str  # pip name of the standard instrumentation
    entry_point: str  # its name in the opentelemetry_instrumentor group
    fallback: str | None = None  # what otel-audit does itself when that is missing


LIBRARIES: tuple[Library, ...] = (
    Library("sqlite3", None, "database", "opentelemetry-instrumentation-sqlite3", "sqlite3"),
    Library(
        "sqlalchemy",
        "sqlalchemy",
        "database",
        "opentelemetry-instrumentation-sqlalchemy",
        "sqlalchemy",
        "otel-audit traces its statements through SQLAlchemy events",
    ),  # fmt: skip
    Library("psycopg", "psycopg", "database", "opentelemetry-instrumentation-psycopg", "psycopg"),
    Library(
        "psycopg2", "psycopg2", "database", "opentelemetry-instrumentation-psycopg2", "psycopg2"
    ),
    Library("pymysql", "pymysql", "database", "opentelemetry-instrumentation-pymysql", "pymysql"),
    Library(
        "mysql.connector",
        "mysql-connector-python",
        "database",
        "opentelemetry-instrumentation-mysql",
        "mysql",
    ),  # fmt: skip
    Library(
        "MySQLdb",
        "mysqlclient",
        "database",
        "opentelemetry-instrumentation-mysqlclient",
        "mysqlclient",
    ),  # fmt: skip
    Library("asyncpg", "asyncpg", "database", "opentelemetry-instrumentation-asyncpg", "asyncpg"),
    Library("pymongo", "pymongo", "database", "opentelemetry-instrumentation-pymongo", "pymongo"),
    Library("redis", "redis", "database", "opentelemetry-instrumentation-redis", "redis"),
    Library("requests", "requests", "http", "opentelemetry-instrumentation-requests", "requests"),
    Library("urllib3", "urllib3", "http", "opentelemetry-instrumentation-urllib3", "urllib3"),
    Library("httpx", "httpx", "http", "opentelemetry-instrumentation-httpx", "httpx"),
    Library(
        "aiohttp",
        "aiohttp",
        "http",
        "opentelemetry-instrumentation-aiohttp-client",
        "aiohttp-client",
    ),  # fmt: skip
)

COVERED = "instrumented"
FALLBACK = "traced by otel-audit"
MISSING = "not instrumented"


@dataclass(frozen=True)
class Finding:
    library: Library
    version: str | None
    status: str  # COVERED, FALLBACK or MISSING
    detail: str

    def line(self) -> str:
        """One line for an operator: the library, whether it is traced, why not and the fix."""
        lib = self.library
        name = f"{lib.module} {self.version}" if self.version else lib.module
        return f"{lib.kind} library {name}: {self.status}: {self.detail}"


def _disabled() -> set[str]:
    names = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return {n.strip() for n in names.split(",") if n.strip()}


def _installed(lib: Library) -> tuple[bool, str | None]:
    try:
        found = importlib.util.find_spec(lib.module.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, None
    if lib.distribution is None:
        return True, None
    try:
        return True, md.version(lib.distribution)
    except md.PackageNotFoundError:
        return True, None


def _entry_point(lib: Library) -> md.EntryPoint | None:
    for ep in md.entry_points(group="opentelemetry_instrumentor"):
        if ep.name == lib.entry_point:
            return ep
    return None


def _problem(lib: Library, in_process: bool) -> str | None:
    """Why ``lib`` is not traced by its standard instrumentation, or None when it is."""
    ep = _entry_point(lib)
    if ep is None:
        return f"{lib.instrumentation} is not installed (pip install {lib.instrumentation})"
    disabled = _disabled()
    if lib.entry_point in disabled or "*" in disabled:
        return f"{lib.entry_point} is listed in OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"
    from opentelemetry.instrumentation.dependencies import get_dist_dependency_conflicts

    dist = getattr(ep, "dist", None)
    conflict = get_dist_dependency_conflicts(dist) if dist is not None else None
    if conflict is not None:
        version = dist.version if dist is not None else "?"
        required = str(conflict.required or ", ".join(map(str, conflict.required_any or ())))
        required = required.split(";")[0].strip()
        return f"{lib.instrumentation} {version} refuses it (instruments only {required})"
    if in_process:
        try:
            instrumentor = ep.load()()
        except Exception as exc:
            return f"{lib.instrumentation} failed to load: {type(exc).__name__}"
        if not getattr(instrumentor, "_is_instrumented_by_opentelemetry", False):
            return f"{lib.instrumentation} is installed but did not instrument this process"
    return None


def survey(*, in_process: bool = False, fallbacks: frozenset[str] = frozenset()) -> list[Finding]:
    """A finding for each installed library of the table.

    ``in_process``: also check that the instrumentor really instrumented this
    process (the zero-code hook, after every instrumentor ran); ``fallbacks``:
    modules otel-audit traces itself in this process when their instrumentation does not.
    """
    out = []
    for lib in LIBRARIES:
        installed, version = _installed(lib)
        if not installed:
            continue
        problem = _problem(lib, in_process)
        if problem is None:
            out.append(Finding(lib, version, COVERED, f"by {lib.instrumentation}"))
        elif lib.fallback is not None and (not in_process or lib.module in fallbacks):
            out.append(Finding(lib, version, FALLBACK, f"{problem}; {lib.fallback}"))
        else:
            out.append(Finding(lib, version, MISSING, f"{problem}; its effects are not audited"))
    return out
