"""Classify spans of the standard instrumentations as downstream effects.

A span inside a trail that was not marked by the application is classified
from the semantic-convention attributes the OpenTelemetry instrumentations
set, old and stable names alike: database statements (``db.statement`` /
``db.query.text``, ``db.operation`` / ``db.operation.name``), outbound HTTP
(``http.method`` / ``http.request.method`` on a CLIENT span) and messaging
(``messaging.system`` on a PRODUCER span). Pure functions; thread-safe.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from opentelemetry.trace import SpanKind

from . import vocabulary as v

_WRITE_OPS = frozenset(
    {
        "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "CREATE", "ALTER",
        "DROP", "TRUNCATE", "RENAME", "GRANT", "REVOKE", "COPY",
    }
)  # fmt: skip
_READ_OPS = frozenset({"SELECT", "SHOW", "DESCRIBE", "EXPLAIN", "PRAGMA", "WITH"})
_FIRST_WORD = re.compile(r"^\s*(?:/\*.*?\*/\s*)*([A-Za-z]+)", re.S)


def sql_operation(attributes: Mapping[str, Any], name: str = "") -> str | None:
    """The SQL verb of a database span, upper-case, from either semconv generation."""
    for key in ("db.operation.name", "db.operation"):
        op = attributes.get(key)
        if isinstance(op, str) and op:
            return op.split()[0].upper()
    for key in ("db.query.text", "db.statement"):
        text = attributes.get(key)
        if isinstance(text, str):
            match = _FIRST_WORD.match(text)
            if match:
                return match.group(1).upper()
    match = _FIRST_WORD.match(name or "")
    return match.group(1).upper() if match else None


def classify(attributes: Mapping[str, Any], kind: SpanKind | None, name: str = "") -> str | None:
    """The ``audit.effect`` of a span, or None when it is not an effect."""
    effect = attributes.get(v.EFFECT)
    if isinstance(effect, str):
        return effect
    if "db.system" in attributes or "db.system.name" in attributes:
        op = sql_operation(attributes, name)
        if op in _WRITE_OPS:
            return v.DATA_WRITE
        if op in _READ_OPS:
            return v.DATA_READ
        return None
    if kind is SpanKind.PRODUCER and (
        "messaging.system" in attributes or "messaging.destination.name" in attributes
    ):
        return v.MESSAGE_PUBLISH
    if kind is SpanKind.CLIENT and (
        "http.request.method" in attributes or "http.method" in attributes
    ):
        return v.HTTP_CALL
    return None
