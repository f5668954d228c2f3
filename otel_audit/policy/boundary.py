"""Data boundary: classified data, where it may go, and violations.

The policy marks data stores, tables, routes, resource types or services as
holding classified data (``production``, ``pii``, ...). A span in a trail that
touches them makes the whole trail classified:

* in this process, through a per-pipeline registry keyed by trail id (so a
  background job that carries the trail's context inherits it), and
* across services, through the ``otel-audit-classification`` header that
  ``ClassificationPropagator`` injects beside ``traceparent``/``baggage``; the
  receiving side puts it into W3C baggage (``audit.data.classification``), so it
  keeps travelling downstream. An inbound header can only *add* restrictions.

Every span of a classified trail carries ``audit.data.classification``
(comma-separated, sorted). A span of a classified trail that reaches a
destination outside the classification's allow-list (an outbound host, a data
store, or a service that receives the trail) is a boundary violation: an audit
event of its own (``audit.action = boundary.violation``, committed
synchronously), an OpenTelemetry log record and the counter
``otel_audit.policy.boundary.violations``. In ``enforce`` mode the ``on_start`` of the
outbound CLIENT span (or database span) raises ``BoundaryViolation``, so the
instrumented call (requests, urllib3, DB-API, ...) raises before any byte
leaves; a service that *receives* a classified trail cannot be blocked from
the receiving side and is only reported. Thread-safe.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry._logs import LogRecord, SeverityNumber, get_logger_provider
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v
from otel_audit.capture.context import current_trail
from otel_audit.errors import AuditError

_log = logging.getLogger("otel_audit")

VIOLATION_ACTION = "boundary.violation"
#: Attributes of a violation event (and of the span that violated, in detect mode).
DESTINATION = v.BOUNDARY_DESTINATION
DESTINATION_KIND = v.BOUNDARY_KIND
BLOCKED = v.BOUNDARY_BLOCKED
VIOLATION = v.BOUNDARY_VIOLATION
VIOLATING_SPAN = v.BOUNDARY_SPAN_ID

HEADER = "otel-audit-classification"
MODES = ("detect", "enforce")
KINDS = ("hosts", "data_stores", "services")

_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MAX_LABELS = 8
_MAX_TRAILS = 65536
_TABLES = re.compile(
    r"(?is)\b(?:from|join|into|update|table)\s+(?:if\s+(?:not\s+)?exists\s+)?"
    r"([`\"\[]?[A-Za-z_][\w$]*[`\"\]]?(?:\.[`\"\[]?[A-Za-z_][\w$]*[`\"\]]?)?)"
)


class BoundaryViolation(AuditError, PermissionError):
    """Classified data was about to leave its allow-list in enforce mode."""

    exit_code = 1


def parse_labels(value: object) -> frozenset[str]:
    """Classification labels from an attribute or header value; invalid ones are ignored."""
    if isinstance(value, (list, tuple)):
        items: Iterable[Any] = value
    elif isinstance(value, str):
        items = value.split(",")
    else:
        return frozenset()
    labels = [s.strip() for s in items if isinstance(s, str) and _LABEL.match(s.strip())]
    return frozenset(labels[:_MAX_LABELS])


def join_labels(labels: Iterable[str]) -> str:
    return ",".join(sorted(labels))


def _globs(patterns: Iterable[str], *values: str | None) -> bool:
    return any(
        fnmatch.fnmatchcase(val, pat) for pat in patterns for val in values if val is not None
    )


# -- facts about one span ----------------------------------------------------


def tables(statement: str) -> set[str]:
    """Table names a SQL statement names (lower-case, without schema or quotes)."""
    found = set()
    for match in _TABLES.finditer(statement):
        name = match.group(1).split(".")[-1].strip('`"[]')
        found.add(name.lower())
    return found


def data_store(attrs: Mapping[str, Any]) -> str | None:
    """``system:name`` of a database span (``db.namespace``/``db.name``), or None."""
    system = attrs.get("db.system.name") or attrs.get("db.system")
    if not system:
        return None
    name = attrs.get("db.namespace") or attrs.get("db.name")
    return f"{system}:{name}" if name else str(system)


def host(attrs: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """(host, host:port) of an outbound call, from semconv attributes or the URL."""
    name = attrs.get("server.address") or attrs.get("net.peer.name")
    port = attrs.get("server.port") or attrs.get("net.peer.port")
    if not name:
        url = attrs.get("url.full") or attrs.get("http.url")
        if isinstance(url, str):
            try:
                parts = urlsplit(url)
                name, port = parts.hostname, parts.port
            except ValueError:
                return None
    if not name:
        return None
    name = str(name).lower()
    return name, (f"{name}:{port}" if port else None)


@dataclass(frozen=True)
class Classifier:
    """Marks spans as touching ``classification``; every given selector must match."""

    classification: str
    db_system: tuple[str, ...] = ()
    db_name: tuple[str, ...] = ()
    server_address: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    resource_types: tuple[str, ...] = ()
    services: tuple[str, ...] = ()

    def matches(self, attrs: Mapping[str, Any], service: str | None) -> bool:
        checks: list[bool] = []
        if self.db_system:
            system = attrs.get("db.system.name") or attrs.get("db.system")
            checks.append(isinstance(system, str) and _globs(self.db_system, system))
        if self.db_name:
            name = attrs.get("db.namespace") or attrs.get("db.name")
            checks.append(isinstance(name, str) and _globs(self.db_name, name))
        if self.server_address:
            addr = attrs.get("server.address") or attrs.get("net.peer.name")
            checks.append(isinstance(addr, str) and _globs(self.server_address, addr))
        if self.tables:
            named: set[str] = set()
            for key in ("db.collection.name", "db.sql.table"):
                if isinstance(attrs.get(key), str):
                    named.add(attrs[key].lower())
            for key in ("db.query.text", "db.statement"):
                if isinstance(attrs.get(key), str):
                    named |= tables(attrs[key])
            checks.append(any(_globs(self.tables, t) for t in named))
        if self.routes:
            route = attrs.get("http.route") or attrs.get("url.path")
            checks.append(isinstance(route, str) and _globs(self.routes, route))
        if self.resource_types:
            rtype = attrs.get(v.RESOURCE_TYPE)
            checks.append(isinstance(rtype, str) and _globs(self.resource_types, rtype))
        if self.services:
            checks.append(_globs(self.services, service))
        return bool(checks) and all(checks)


@dataclass(frozen=True)
class AllowList:
    """Where data of one classification may go; a kind left as None is unrestricted."""

    hosts: tuple[str, ...] | None = None
    data_stores: tuple[str, ...] | None = None
    services: tuple[str, ...] | None = None

    def allows(self, kind: str, destination: str, alternative: str | None = None) -> bool:
        patterns = getattr(self, kind)
        if patterns is None:
            return True
        return _globs(patterns, destination, alternative)


@dataclass(frozen=True)
class BoundaryConfig:
    """The boundary part of a policy."""

    mode: str = "detect"
    classifiers: tuple[Classifier, ...] = ()
    allow: Mapping[str, AllowList] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.classifiers)

    def classify(self, attrs: Mapping[str, Any], service: str | None) -> frozenset[str]:
        """Classifications a span touches by its own attributes."""
        return frozenset(c.classification for c in self.classifiers if c.matches(attrs, service))

    def destination(
        self, attrs: Mapping[str, Any], kind: SpanKind | None
    ) -> tuple[str, str, str | None] | None:
        """(kind, destination, alternative spelling) that a span reaches, or None."""
        store = data_store(attrs)
        if store is not None:
            return "data_stores", store, None
        if kind in (SpanKind.CLIENT, SpanKind.PRODUCER):
            found = host(attrs)
            if found is not None:
                name, with_port = found
                return ("hosts", with_port, name) if with_port else ("hosts", name, None)
        return None

    def store_classified(self, labels: frozenset[str], store: str) -> bool:
        """A data store that a classifier names is an approved home of its data."""
        system, _, name = store.partition(":")
        attrs = {"db.system": system, "db.name": name}
        for c in self.classifiers:
            home = c.classification in labels and (c.db_system or c.db_name) and not c.tables
            if home and c.matches(attrs, None):
                return True
        return False

    def violations(
        self, labels: frozenset[str], kind: str, destination: str, alternative: str | None
    ) -> list[str]:
        """The classifications in ``labels`` whose allow-list excludes the destination."""
        out = []
        for label in sorted(labels):
            allow = self.allow.get(label)
            if allow is None or allow.allows(kind, destination, alternative):
                continue
            if kind == "data_stores" and self.store_classified(frozenset({label}), destination):
                continue
            out.append(label)
        return out


# -- the trail registry and propagation ---------------------------------------


_NO_LABELS: frozenset[str] = frozenset()


class _Registry:
    """trail id -> classification labels, bounded (oldest trails forgotten). Thread-safe."""

    def __init__(self, size: int = _MAX_TRAILS) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._trails: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._checked_service: set[str] = set()

    def __bool__(self) -> bool:
        """False while no trail has labels (the common case: nothing classified anywhere)."""
        return bool(self._trails)

    def get(self, trail: str | None) -> frozenset[str]:
        if trail is None:
            return _NO_LABELS
        # No lock for a read: OrderedDict.get is one atomic step under the
        # interpreter lock, and this runs for every span of every trail; a
        # lock here convoys the application's threads.
        return self._trails.get(trail, _NO_LABELS)

    def add(self, trail: str, labels: frozenset[str]) -> None:
        if not labels:
            return
        with self._lock:
            self._trails[trail] = self._trails.get(trail, frozenset()) | labels
            self._trails.move_to_end(trail)
            while len(self._trails) > self._size:
                old, _ = self._trails.popitem(last=False)
                self._checked_service.discard(old)

    def first_service_check(self, trail: str) -> bool:
        with self._lock:
            if trail in self._checked_service:
                return False
            self._checked_service.add(trail)
            return True


_processors: weakref.WeakSet[BoundaryProcessor] = weakref.WeakSet()


def trail_labels(ctx: Context | None = None) -> frozenset[str]:
    """Classification labels of the trail of ``ctx``: from baggage and this process's registries."""
    labels = parse_labels(baggage.get_baggage(v.DATA_CLASSIFICATION, ctx))
    trail = current_trail(ctx)
    if trail is not None:
        for processor in list(_processors):
            labels |= processor.registry.get(trail)
    return labels


class ClassificationPropagator(TextMapPropagator):
    """Carries a trail's classification to other services (header ``otel-audit-classification``)."""

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        labels = trail_labels(context)
        if labels:
            setter.set(carrier, HEADER, join_labels(labels))

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        ctx = context if context is not None else otel_context.get_current()
        values = getter.get(carrier, HEADER)
        if not values:
            return ctx
        # Network input: only valid labels, at most a few; they can only add
        # restrictions, never lift one.
        labels = parse_labels(",".join(values)) | parse_labels(
            baggage.get_baggage(v.DATA_CLASSIFICATION, ctx)
        )
        if not labels:
            return ctx
        return baggage.set_baggage(v.DATA_CLASSIFICATION, join_labels(labels), ctx)

    @property
    def fields(self) -> set[str]:
        return {HEADER}


def install_propagator() -> None:
    """Add ClassificationPropagator to the global propagator (once)."""
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator

    current = propagate.get_global_textmap()
    found = [current]
    if isinstance(current, CompositePropagator):
        found = list(getattr(current, "_propagators", [current]))
    if any(isinstance(p, ClassificationPropagator) for p in found):
        return
    propagate.set_global_textmap(CompositePropagator([current, ClassificationPropagator()]))


# -- the processor -----------------------------------------------------------


class BoundaryProcessor(SpanProcessor):
    """Stamps classifications, follows them along trails, reports and blocks violations.

    Install it before the AuditSpanProcessor on the same provider. Thread-safe.
    """

    def __init__(
        self,
        config: BoundaryConfig,
        service: str,
        tracer_provider: trace.TracerProvider,
        *,
        logger_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self.config = config
        self.service = service
        self.registry = _Registry()
        self._tracer = tracer_provider.get_tracer("otel_audit.policy.boundary")
        self._logger_provider = logger_provider
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("otel_audit")
        self._counter = meter.create_counter(
            "otel_audit.policy.boundary.violations",
            unit="{violation}",
            description="Spans of classified trails that reached a destination outside the allow-list",
        )
        self._local = threading.local()
        self.violations = 0
        _processors.add(self)

    def labels(self, attrs: Mapping[str, Any], trail: str | None) -> frozenset[str]:
        """Labels of a span: its own classification, the trail's, and any it already carries."""
        labels = self.config.classify(attrs, self.service) | self.registry.get(trail)
        return labels | parse_labels(attrs.get(v.DATA_CLASSIFICATION))

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if getattr(self._local, "busy", False):
            return  # the violation event's own span
        if not self.config.active and not self.registry:
            # Nothing classified here and no trail labelled yet: only labels
            # arriving in baggage can matter (one context lookup per span).
            try:
                if not baggage.get_baggage(v.DATA_CLASSIFICATION, parent_context):
                    return
            except Exception:
                _log.exception("otel-audit: boundary check failed")
                return
        blocked: BoundaryViolation | None = None
        try:
            attrs = span.attributes or {}
            trail = current_trail(parent_context)
            if trail is None and attrs.get(v.EVENT) is True:
                # The first audit action of a context starts its trail, named
                # after its own span id (see actions.py), right after this.
                trail = format(span.get_span_context().span_id, "016x")
            if trail is None:
                return
            inherited = parse_labels(baggage.get_baggage(v.DATA_CLASSIFICATION, parent_context))
            if not inherited and not self.config.active and not self.registry.get(trail):
                return  # nothing classified here nor upstream: the common, cheap case
            own = self.config.classify(attrs, self.service)
            self.registry.add(trail, inherited | own)
            labels = self.registry.get(trail) | inherited | own
            if not labels:
                return
            span.set_attribute(v.DATA_CLASSIFICATION, join_labels(labels))
            if inherited and self.registry.first_service_check(trail):
                bad = self.config.violations(labels, "services", self.service, None)
                if bad:
                    self._violate(span, parent_context, trail, bad, "services", self.service, False)
            dest = self.config.destination(attrs, span.kind)
            if dest is None:
                return
            kind, destination, alternative = dest
            # Also for the span that touches the data: an INSERT ... SELECT from a
            # classified table into another database is exactly a copy to catch.
            bad = self.config.violations(labels, kind, destination, alternative)
            if not bad:
                return
            enforce = self.config.mode == "enforce"
            self._violate(span, parent_context, trail, bad, kind, destination, enforce)
            if enforce:
                blocked = BoundaryViolation(
                    f"{join_labels(bad)} data may not reach {destination} "
                    f"(trail {trail}): blocked by the audit policy"
                )
        except Exception:  # detection must never break the host application
            _log.exception("otel-audit: boundary check failed")
        if blocked is not None:
            raise blocked

    def on_end(self, span: ReadableSpan) -> None:
        if not self.config.active:
            return  # nothing here classifies a span
        try:
            attrs = span.attributes or {}
            trail = attrs.get(v.TRAIL_ID)
            if isinstance(trail, str):
                # Attributes set after start (http.route) can classify a trail too.
                self.registry.add(trail, self.config.classify(attrs, self.service))
        except Exception:
            _log.exception("otel-audit: boundary check failed")

    def _violate(
        self,
        span: Span,
        parent_context: Context | None,
        trail: str,
        labels: list[str],
        kind: str,
        destination: str,
        blocked: bool,
    ) -> None:
        self.violations += 1
        joined = join_labels(labels)
        what = {"hosts": "host", "data_stores": "data store", "services": "service"}[kind]
        reason = f"{joined} data reached {what} {destination}, outside its allow-list"
        if blocked:
            reason = f"{joined} data was about to reach {what} {destination}, outside its allow-list; blocked"
        span_id = format(span.get_span_context().span_id, "016x")
        if not blocked:
            span.set_attribute(VIOLATION, True)
        attributes: dict[str, Any] = {
            v.EVENT: True,
            v.ACTION: VIOLATION_ACTION,
            v.TRAIL_ID: trail,
            v.DATA_CLASSIFICATION: joined,
            v.OUTCOME: v.DENIED if blocked else v.FAILURE,
            v.REASON: reason,
            DESTINATION: destination,
            DESTINATION_KIND: kind,
            BLOCKED: blocked,
            VIOLATING_SPAN: span_id,
        }
        self._counter.add(
            1, {v.DATA_CLASSIFICATION: joined, DESTINATION_KIND: kind, BLOCKED: blocked}
        )
        try:
            provider = self._logger_provider or get_logger_provider()
            logger = provider.get_logger("otel_audit.policy.boundary")
            logger.emit(
                LogRecord(
                    severity_number=SeverityNumber.WARN,
                    severity_text="WARN",
                    body=f"boundary violation: {reason} (trail {trail})",
                    attributes={
                        v.TRAIL_ID: trail,
                        v.DATA_CLASSIFICATION: joined,
                        DESTINATION: destination,
                        DESTINATION_KIND: kind,
                        BLOCKED: blocked,
                        "service.name": self.service,
                    },
                )
            )
        except Exception:
            _log.exception("otel-audit: could not emit the boundary violation log record")
        # The event is a span of its own beside the violating one, so the
        # audit processor records (and commits) it like any audit action.
        self._local.busy = True
        try:
            event = self._tracer.start_span(
                VIOLATION_ACTION,
                context=parent_context,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
            )
            event.end()
        finally:
            self._local.busy = False

    def shutdown(self) -> None:
        _processors.discard(self)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
