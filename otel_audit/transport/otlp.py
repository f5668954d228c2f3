"""OTLP <-> Record: the wire format of OTLP trace export, mapped to audit records.

``parse_request`` reads an ``ExportTraceServiceRequest`` in binary protobuf or
OTLP/JSON; ``records_from_request`` turns its spans into ``Record``s with the
same normalisation as the in-process path (``record.clean_attributes``), so a
span exported by the OTLP exporter and the same span recorded in-process give
the same canonical bytes. ``request_from_records`` goes the other way, for the
forwarder. Thread-safe: pure functions.

OTLP/JSON ids: the specification says trace and span ids are hex strings, not
the base64 of proto3 JSON; both are accepted (they differ in length: 32/16
hex characters against 24/12 base64 characters).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v
from otel_audit.engine import record as _record_module
from otel_audit.engine.record import (
    DEFAULT_MAX_VALUE_LENGTH,
    Event,
    Link,
    Record,
    _clean_str,
    clean_attributes,
)
from otel_audit.semantics.effects import classify
from otel_audit.semantics.spans import (
    KINDS,
    STATUSES,
    kind_name,
    kind_number,
    status_name,
    status_number,
)

__all__ = [
    "MalformedRequest",
    "Rejected",
    "is_audit_span",
    "parse_request",
    "records_from_request",
    "request_from_records",
    "response_bytes",
]

# Record kind names -> API kinds (for effect classification of undecided spans).
_API_KINDS = {name: SpanKind[name] for name in KINDS}
# OTLP numbers -> the record's names (``kind_name``/``status_name`` as lookups; others default).
_KIND_NAMES = {number: kind_name(number) for number in range(len(KINDS) + 1)}
_STATUS_NAMES = {number: status_name(number) for number in range(len(STATUSES))}
# Builds a Record from its fields in declaration order: the record module's
# constructor that skips the frozen dataclass's per-field __setattr__ when
# it has one, else the class itself (the same positional fields).
_new_record: Callable[..., Record] = getattr(_record_module, "new_record", Record)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class MalformedRequest(ValueError):
    """The body is not an ExportTraceServiceRequest (HTTP 400, gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Rejected:
    """A span the receiver refuses, and why (reported as OTLP partial success)."""

    trace_id: str
    span_id: str
    reason: str


# -- parsing -------------------------------------------------------------------


def parse_request(body: bytes, json_body: bool = False) -> ExportTraceServiceRequest:
    """Decode a protobuf (or OTLP/JSON) request; raises MalformedRequest."""
    request = ExportTraceServiceRequest()
    if not json_body:
        try:
            request.ParseFromString(body)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise MalformedRequest(f"body is not an OTLP protobuf trace request: {exc}") from exc
        return request
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRequest(f"body is not JSON: {exc}") from exc
    except RecursionError:
        raise MalformedRequest(
            "body is not an OTLP/JSON trace request: nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise MalformedRequest("body is not an OTLP/JSON trace request: expected an object")
    try:
        _ids_to_base64(data)
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise MalformedRequest(f"body is not an OTLP/JSON trace request: {exc}") from exc
    except RecursionError:
        # A hostile nesting (kvlist in kvlist ...): the client's error, not ours.
        raise MalformedRequest(
            "body is not an OTLP/JSON trace request: nested too deeply"
        ) from None
    return request


def _id_to_base64(value: Any, size: int, what: str) -> Any:
    """OTLP/JSON hex id -> the base64 that protobuf's JSON parser expects."""
    if not isinstance(value, str) or value == "":
        return value
    if len(value) == 2 * size:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise MalformedRequest(f"{what} {value!r} is not hex") from None
        return base64.b64encode(raw).decode("ascii")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise MalformedRequest(f"{what} {value!r} is not {size * 2} hex characters")
    return value


def _ids_to_base64(data: dict[str, Any]) -> None:
    for rs in _list(data, "resourceSpans", "resource_spans"):
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            for span in _list(ss, "spans"):
                if not isinstance(span, dict):
                    continue
                for key, size in (
                    ("traceId", 16), ("trace_id", 16), ("spanId", 8), ("span_id", 8),
                    ("parentSpanId", 8), ("parent_span_id", 8),
                ):  # fmt: skip
                    if key in span:
                        span[key] = _id_to_base64(span[key], size, key)
                for link in _list(span, "links"):
                    if isinstance(link, dict):
                        for key, size in (
                            ("traceId", 16),
                            ("trace_id", 16),
                            ("spanId", 8),
                            ("span_id", 8),
                        ):
                            if key in link:
                                link[key] = _id_to_base64(link[key], size, "link " + key)


def _list(data: Any, *keys: str) -> list[Any]:
    if not isinstance(data, dict):
        return []
    for key in keys:
        value = data.get(key)
        if isinstance(value, list):
            return value
    return []


# -- OTLP -> Record ------------------------------------------------------------


def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value
    if which == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        # Not an attribute type of the Python SDK; kept as a tagged JSON string so
        # the record stays flat like every in-process one.
        return json.dumps(
            {kv.key: _jsonable(_any_value(kv.value)) for kv in value.kvlist_value.values},
            sort_keys=True,
            ensure_ascii=False,
        )
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"double": repr(value)}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


_SCALARS = frozenset({"string_value", "bool_value", "int_value", "double_value", "bytes_value"})


def _attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        which = value.WhichOneof("value")
        # Scalars (nearly every attribute) without the general conversion's branches.
        out[kv.key] = getattr(value, which) if which in _SCALARS else _any_value(value)
    return out


def _clean_attributes(kvs: Iterable[KeyValue], max_len: int) -> tuple[dict[str, Any], list[str]]:
    """``clean_attributes(_attributes(kvs))`` in one pass: the same values and cut names.

    Nearly every attribute is short text, an int or a bool under a short
    name; those are taken as they are, with no second walk over the
    attributes: protobuf text is valid UTF-8 (the parser checks it, and cannot
    hold a lone surrogate), so only its length can need cleaning. Anything
    else (a long name or value, another type) goes through the general
    normalisation of ``record.clean_attributes``, so the bytes never differ.
    """
    out: dict[str, Any] = {}
    cut: dict[str, bool] | None = None
    for kv in kvs:
        key = kv.key
        value = kv.value
        which = value.WhichOneof("value")
        if which == "string_value":
            text = value.string_value
            if len(text) <= max_len and len(key) <= max_len:
                out[key] = text
                if cut is not None:
                    cut.pop(key, None)
                continue
        elif (which == "int_value" or which == "bool_value") and len(key) <= max_len:
            out[key] = getattr(value, which)
            if cut is not None:
                cut.pop(key, None)
            continue
        if len(key) > max_len:
            key = _clean_str(key, max_len)[0]
        raw = getattr(value, which) if which in _SCALARS else _any_value(value)
        cleaned, names = clean_attributes({key: raw}, max_len)
        for name, item in cleaned.items():
            out[name] = item
            if cut is None:
                cut = {}
            cut[name] = name in names
    if not cut:
        return out, []
    return out, [key for key in out if cut.get(key)]


def is_audit_span(attributes: dict[str, Any]) -> bool:
    """A span the audit path keeps: a user action, or a span inside a trail."""
    return attributes.get(v.EVENT) is True or v.TRAIL_ID in attributes


def records_from_request(
    request: ExportTraceServiceRequest,
    *,
    keep_all: bool = False,
    effects: frozenset[str] = v.DEFAULT_KEPT_EFFECTS,
    max_len: int = DEFAULT_MAX_VALUE_LENGTH,
) -> tuple[list[Record], list[Rejected], int]:
    """Records of the audit spans of ``request``: (records, rejected, ignored count).

    Selection never re-decides what the sender decided: ``audit.event`` true,
    or a span in a trail that already carries ``audit.effect`` (the sender's
    audit path kept it and wrote down why, e.g. a ``data.read`` its own
    ``OTEL_AUDIT_EFFECTS`` keeps; or the application marked the effect). Only
    a trail span without one is classified as in-process and kept when its
    effect is in ``effects``, with the derived ``audit.effect`` added.
    ``keep_all`` keeps every valid span.
    """
    records: list[Record] = []
    rejected: list[Rejected] = []
    ignored = 0
    event, trail, effect_name = v.EVENT, v.TRAIL_ID, v.EFFECT
    add = records.append
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        service = resource.get("service.name")
        service = str(service) if service else "unknown_service"
        for ss in rs.scope_spans:
            scope = ss.scope.name or None
            for span in ss.spans:
                raw_trace = span.trace_id
                raw_span = span.span_id
                trace_id = raw_trace.hex()
                span_id = raw_span.hex()
                if len(raw_trace) != 16 or trace_id == _ZERO_TRACE:
                    rejected.append(Rejected(trace_id, span_id, "invalid trace id"))
                    continue
                if len(raw_span) != 8 or span_id == _ZERO_SPAN:
                    rejected.append(Rejected(trace_id, span_id, "invalid span id"))
                    continue
                parent = span.parent_span_id
                if parent and len(parent) != 8:
                    rejected.append(Rejected(trace_id, span_id, "invalid parent span id"))
                    continue
                attrs, cut = _clean_attributes(span.attributes, max_len)
                kind = _KIND_NAMES.get(span.kind, "INTERNAL")
                if attrs.get(event) is True:
                    pass
                elif trail in attrs:
                    if not isinstance(attrs.get(effect_name), str):
                        effect = classify(attrs, _API_KINDS[kind], span.name)
                        if effect not in effects and not keep_all:
                            ignored += 1
                            continue
                        if effect is not None:
                            # A derived name is short text: added after cleaning, as it is.
                            attrs[effect_name] = effect
                elif not keep_all:
                    ignored += 1
                    continue
                add(
                    _record(
                        span, trace_id, span_id, parent, attrs, cut, kind, service, scope, max_len
                    )
                )
    return records, rejected, ignored


def _record(
    span: Span,
    trace_id: str,
    span_id: str,
    parent: bytes,
    attributes: dict[str, Any],
    cut: list[str],
    kind: str,
    service: str,
    scope: str | None,
    max_len: int,
) -> Record:
    # Protobuf text is valid UTF-8: only its length can need cleaning.
    span_status = span.status
    message = span_status.message
    name = span.name
    links = span.links
    events = span.events
    return _new_record(
        trace_id,
        span_id,
        parent.hex() if parent else None,
        name if len(name) <= max_len else _clean_str(name, max_len)[0],
        kind,
        service,
        span.start_time_unix_nano,
        span.end_time_unix_nano,
        _STATUS_NAMES.get(span_status.code, "UNSET"),
        _clean_str(message, max_len)[0] if message else None,
        attributes,
        ()
        if not links
        else tuple(
            Link(ln.trace_id.hex(), ln.span_id.hex(), _clean_attributes(ln.attributes, max_len)[0])
            for ln in links
        ),
        ()
        if not events
        else tuple(
            Event(ev.name, ev.time_unix_nano, _clean_attributes(ev.attributes, max_len)[0])
            for ev in events
        ),
        scope,
        tuple(cut),
    )


# -- Record -> OTLP ------------------------------------------------------------


def _to_any(value: Any, out: AnyValue) -> None:
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, list):
        array = out.array_value
        array.SetInParent()
        for item in value:
            _to_any(item, array.values.add())
    elif isinstance(value, dict) and set(value) == {"bytes"}:
        out.bytes_value = base64.b64decode(value["bytes"])
    elif isinstance(value, dict) and set(value) == {"double"}:
        out.double_value = float(value["double"])
    elif value is None:
        pass
    else:
        # {"unsupported": type} and anything unforeseen travel as their JSON text.
        out.string_value = json.dumps(value, sort_keys=True, ensure_ascii=False)


def _set_attributes(target: Any, attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        kv = target.add()
        kv.key = key
        _to_any(value, kv.value)


def request_from_records(records: Sequence[Record]) -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest carrying ``records`` (grouped by service, then scope)."""
    request = ExportTraceServiceRequest()
    resources: dict[str, tuple[ResourceSpans, dict[str | None, ScopeSpans]]] = {}
    for record in records:
        found = resources.get(record.service)
        if found is None:
            rs = request.resource_spans.add()
            kv = rs.resource.attributes.add()
            kv.key = "service.name"
            kv.value.string_value = record.service
            found = resources[record.service] = (rs, {})
        rs, scopes = found
        ss = scopes.get(record.scope)
        if ss is None:
            ss = scopes[record.scope] = rs.scope_spans.add()
            if record.scope:
                ss.scope.name = record.scope
        span = ss.spans.add()
        span.trace_id = bytes.fromhex(record.trace_id)
        span.span_id = bytes.fromhex(record.span_id)
        if record.parent_span_id:
            span.parent_span_id = bytes.fromhex(record.parent_span_id)
        span.name = record.name
        span.kind = kind_number(record.kind)
        span.start_time_unix_nano = record.start
        span.end_time_unix_nano = record.end
        span.status.code = status_number(record.status)
        if record.status_message:
            span.status.message = record.status_message
        _set_attributes(span.attributes, record.attributes)
        for ln in record.links:
            link = span.links.add()
            link.trace_id = bytes.fromhex(ln.trace_id)
            link.span_id = bytes.fromhex(ln.span_id)
            _set_attributes(link.attributes, ln.attributes)
        for ev in record.events:
            event = span.events.add()
            event.name = ev.name
            event.time_unix_nano = ev.time
            _set_attributes(event.attributes, ev.attributes)
    return request


def response_bytes(rejected: Sequence[Rejected], json_body: bool = False) -> bytes:
    """An ExportTraceServiceResponse, with partial success when spans were rejected."""
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = len(rejected)
        response.partial_success.error_message = rejection_message(rejected)
    if json_body:
        return str(json_format.MessageToJson(response, indent=None)).encode("utf-8")
    return bytes(response.SerializeToString())


def rejection_message(rejected: Sequence[Rejected]) -> str:
    """One line naming the reasons (and a few span ids) of rejected spans."""
    reasons: dict[str, list[str]] = {}
    for r in rejected:
        reasons.setdefault(r.reason, []).append(r.span_id or "(empty)")
    parts = []
    for reason, ids in reasons.items():
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        parts.append(f"{len(ids)} spans rejected: {reason} (span ids {shown})")
    return "; ".join(parts)


def iter_spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    """Every span of ``request`` (tests and tools)."""
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            yield from ss.spans
