"""Classify spans of the standard instrumentations as downstream effects, and mark others.

A span inside a trail that was not marked by the application is classified
from the semantic-convention attributes the OpenTelemetry instrumentations
set, old and stable names alike:

- database (sqlite3, DB-API, SQLAlchemy, psycopg): ``db.system`` /
  ``db.system.name``; the verb from ``db.operation`` / ``db.operation.name``,
  ``db.query.summary``, ``db.statement`` / ``db.query.text`` or the span name.
  Writes and DDL are ``data.write``, SELECT and friends ``data.read``.
- outbound HTTP (requests, urllib3, httpx): a CLIENT span with
  ``http.method`` / ``http.request.method`` is ``http.call``; its peer host is
  ``server.address`` / ``net.peer.name`` or the host of ``url.full`` / ``http.url``.
- messaging: a PRODUCER span (or a CLIENT span whose operation is publish or
  send) with ``messaging.system`` or a destination is ``message.publish``.

What no instrumentation can know (a notification sent, a message put on an
in-process queue) the application marks with ``mark_effect`` or
``capture.effects.effect_span``. Pure functions; thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v

_WRITE_OPS = frozenset(
    {
        "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "CREATE", "ALTER",
        "DROP", "TRUNCATE", "RENAME", "GRANT", "REVOKE", "COPY",
    }
)  # fmt: skip
_READ_OPS = frozenset({"SELECT", "SHOW", "DESCRIBE", "EXPLAIN", "PRAGMA", "WITH"})
_FIRST_WORD = re.compile(r"^\s*(?:/\*.*?\*/\s*)*([A-Za-z]+)", re.S)

# Old and stable names of the same thing, stable first.
_DB_SYSTEM = ("db.system.name", "db.system")
_DB_OPERATION = ("db.operation.name", "db.operation")
_DB_TEXT = ("db.query.summary", "db.query.text", "db.statement")
_HTTP_METHOD = ("http.request.method", "http.method")
_PEER_HOST = ("server.address", "net.peer.name", "peer.service")
_URL = ("url.full", "http.url")
_MESSAGING_OP = ("messaging.operation.type", "messaging.operation")
_MESSAGING_DESTINATION = ("messaging.destination.name", "messaging.destination")
_PUBLISH_OPS = frozenset({"publish", "send", "create"})


def _first(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return value
    return None


def sql_operation(attributes: Mapping[str, Any], name: str = "") -> str | None:
    """The SQL verb of a database span, upper-case, from either semconv generation."""
    op = _first(attributes, _DB_OPERATION)
    if isinstance(op, str) and op.split():
        return op.split()[0].upper()
    for key in _DB_TEXT:
        text = attributes.get(key)
        if isinstance(text, str):
            match = _FIRST_WORD.match(text)
            if match:
                return match.group(1).upper()
    match = _FIRST_WORD.match(name or "")
    return match.group(1).upper() if match else None


def http_peer(attributes: Mapping[str, Any]) -> str | None:
    """The host an outbound HTTP span called, from either semconv generation."""
    host = _first(attributes, _PEER_HOST)
    if isinstance(host, str):
        return host
    url = _first(attributes, _URL)
    if isinstance(url, str):
        try:
            return urlsplit(url).hostname
        except ValueError:
            return None
    return None


def _is_publish(attributes: Mapping[str, Any], kind: SpanKind | None) -> bool:
    if "messaging.system" not in attributes and _first(attributes, _MESSAGING_DESTINATION) is None:
        return False
    if kind is SpanKind.PRODUCER:
        return True
    op = _first(attributes, _MESSAGING_OP)
    return kind is SpanKind.CLIENT and isinstance(op, str) and op.lower() in _PUBLISH_OPS


def classify(attributes: Mapping[str, Any], kind: SpanKind | None, name: str = "") -> str | None:
    """The ``audit.effect`` of a span, or None when it is not an effect."""
    effect = attributes.get(v.EFFECT)
    if isinstance(effect, str):
        return effect
    if _first(attributes, _DB_SYSTEM) is not None:
        op = sql_operation(attributes, name)
        if op in _WRITE_OPS:
            return v.DATA_WRITE
        if op in _READ_OPS:
            return v.DATA_READ
        return None
    if _is_publish(attributes, kind):
        return v.MESSAGE_PUBLISH
    if kind is SpanKind.CLIENT and _first(attributes, _HTTP_METHOD) is not None:
        return v.HTTP_CALL
    return None


def mark_effect(
    effect: str,
    span: trace.Span | None = None,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Mark ``span`` (default: the current span) as the downstream effect ``effect``.

    For work no instrumentation names, e.g. a notification sent through a
    vendor SDK: inside a trail the span then becomes an audit record when the
    policy keeps ``effect``. Raises ValueError for an effect not in the vocabulary.
    """
    if effect not in v.EFFECTS:
        raise ValueError(f"effect must be one of {', '.join(v.EFFECTS)}")
    target = span if span is not None else trace.get_current_span()
    target.set_attribute(v.EFFECT, effect)
    if attributes:
        target.set_attributes(dict(attributes))
