"""Canonical, versioned encoding of an audit record.

A record is a finished span reduced to the fields an audit needs to rebuild
it. ``encode`` gives deterministic bytes (same span, same bytes, on every
backend and in every export): UTF-8 JSON with sorted keys, no whitespace,
integers as integers, floats by their shortest repr, non-finite floats and
bytes tagged, strings with unencodable code points escaped. The hash chain is
computed over exactly these bytes, so they are stored as written and never
re-encoded. Thread-safe: pure functions.

Two encoders produce format 1. ``encode_reference`` is the definition: the
standard library's JSON encoder, as every record so far was written.
``encode`` is the fast path: orjson (C) with sorted keys, checked to give the
same bytes. orjson writes some floats differently from Python's ``repr``
(``0.00001`` for ``1e-05``), non-finite floats as ``null`` (the reference
refuses them), and refuses integers beyond 64 bits, lone surrogates and
non-string keys; a record whose fast output holds a number below 0.0001 or
an unexpected ``null``, or that orjson refuses, is encoded by the reference
path instead, so the bytes never differ. At import the fast path
checks itself against the reference over floats of every magnitude and every
escaped character, and is switched off if an orjson release ever formats
differently. The shared vectors in ``tests/vectors/record_v1.json`` pin both.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

FORMAT_VERSION = 1

#: Longest string value kept whole; longer values are cut and named in ``truncated``.
DEFAULT_MAX_VALUE_LENGTH = 65536

_KINDS = ("INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUSES = ("UNSET", "OK", "ERROR")

_dumps = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
).encode

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - a dependency; the reference path still works
    _orjson = None  # type: ignore[assignment]

# Where orjson and repr() write a float differently: below 0.0001 orjson
# writes 0.00001 for 1e-05 and 1e-7 for 1e-07 (larger exponents agree, which
# the self-check at import confirms). ``_suspect`` finds such a number: the
# text "0.0000" or "e-" at the end of a number that starts the output or
# follows ":", "," or "[". The same text inside a string only costs a
# reference encode, never a wrong byte. Plain substring searches, because a
# regular expression over a whole record costs more than orjson itself.
_NUMBER_CHARS = frozenset(b"0123456789.")
_NUMBER_STARTS = frozenset(b":,[")
_MINUS = ord("-")


def _starts_number(out: bytes, i: int) -> bool:
    """True when a JSON number can start at ``out[i]`` (it is first or follows a separator)."""
    if i > 0 and out[i - 1] == _MINUS:
        i -= 1
    return i == 0 or out[i - 1] in _NUMBER_STARTS


def _suspect(out: bytes) -> bool:
    """True when ``out`` may hold a number orjson wrote differently from the reference."""
    i = out.find(b"0.0000")
    while i >= 0:
        if _starts_number(out, i):
            return True
        i = out.find(b"0.0000", i + 6)
    i = out.find(b"e-")
    while i >= 0:
        j = i
        while j > 0 and out[j - 1] in _NUMBER_CHARS:
            j -= 1
        if j < i and _starts_number(out, j):
            return True
        i = out.find(b"e-", i + 2)
    return False


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    name: str
    time: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One audit record: the fields needed to rebuild the span, already normalised."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    start: int
    end: int
    status: str = "UNSET"
    status_message: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[Link, ...] = ()
    events: tuple[Event, ...] = ()
    scope: str | None = None
    truncated: tuple[str, ...] = ()
    version: int = FORMAT_VERSION

    # Convenience views of the vocabulary; the record itself is the source.
    def attr(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-compatible data, in canonical field names."""
        out: dict[str, Any] = {
            "v": self.version,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start": self.start,
            "end": self.end,
            "status": self.status,
            "attributes": self.attributes,
        }
        if self.status_message:
            out["status_message"] = self.status_message
        if self.links:
            out["links"] = [
                {"trace_id": ln.trace_id, "span_id": ln.span_id, "attributes": ln.attributes}
                for ln in self.links
            ]
        if self.events:
            out["events"] = [
                {"name": ev.name, "time": ev.time, "attributes": ev.attributes}
                for ev in self.events
            ]
        if self.scope:
            out["scope"] = self.scope
        if self.truncated:
            out["truncated"] = list(self.truncated)
        return out


_new_object = object.__new__
# Attribute value types that hold no float (a None is written as null on both paths).
_NO_FLOAT_TYPES = frozenset({str, int, bool, type(None)})


def new_record(
    trace_id: str,
    span_id: str,
    parent_span_id: str | None,
    name: str,
    kind: str,
    service: str,
    start: int,
    end: int,
    status: str,
    status_message: str | None,
    attributes: dict[str, Any],
    links: tuple[Link, ...],
    events: tuple[Event, ...],
    scope: str | None,
    truncated: tuple[str, ...],
    version: int = FORMAT_VERSION,
) -> Record:
    """``Record(...)`` with every field given, without the frozen dataclass's ``__init__``.

    That ``__init__`` sets each of the 16 fields through ``object.__setattr__``,
    which costs more than building a small record; this fills the instance's
    ``__dict__`` at once. The result is an ordinary Record, equal to the one
    ``Record(...)`` makes from the same fields (and as frozen).
    """
    record: Record = _new_object(Record)
    record.__dict__.update(
        trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id, name=name, kind=kind,
        service=service, start=start, end=end, status=status, status_message=status_message,
        attributes=attributes, links=links, events=events, scope=scope, truncated=truncated,
        version=version,
    )  # fmt: skip
    return record


def _fast_dumps(data: Any, nulls: int = 0) -> bytes | None:
    """orjson's canonical bytes of ``data``, or None when only the reference path is exact.

    ``nulls`` is how many ``null`` the caller's own fields put there: orjson
    writes a non-finite float as ``null`` where the reference refuses it, so
    any other ``null`` sends the value to the reference path.
    """
    if _orjson is None:
        return None
    try:
        out = _orjson.dumps(data, option=_FAST_OPTIONS)
    except TypeError:  # JSONEncodeError: a >64-bit int, a surrogate, a non-str key, ...
        return None
    if _suspect(out) or out.count(b"null") > nulls:
        return None
    return out


def canonical_json(data: Any) -> str:
    """The one canonical JSON form of otel-audit: sorted keys, no whitespace, UTF-8 text."""
    out = _fast_dumps(data) if _fast else None
    return _dumps(data) if out is None else out.decode("utf-8")


def canonical_json_reference(data: Any) -> str:
    """``canonical_json`` by the standard library only: the definition the fast path matches."""
    return _dumps(data)


def encode(record: Record) -> bytes:
    """The canonical bytes of ``record``; the input to the hash chain."""
    data = record.to_dict()
    out = None
    if _fast:
        if (
            not record.events
            and not record.links
            and type(record.start) is int
            and type(record.end) is int
            and type(record.version) is int
            and set(map(type, record.attributes.values())) <= _NO_FLOAT_TYPES
        ):
            # No float anywhere: nothing orjson writes differently (see _fast_dumps).
            try:
                out = _orjson.dumps(data, option=_FAST_OPTIONS)
            except TypeError:
                pass
        else:
            out = _fast_dumps(data, record.parent_span_id is None)
    return _dumps(data).encode("utf-8") if out is None else out


def fast_encode_dict(data: dict[str, Any], floats: bool = True) -> bytes | None:
    """``encode(r)`` given ``data = r.to_dict()``, or None when only the reference path is exact.

    For callers that build that dict directly (``Redactor.span_body``) and
    have a slower exact path of their own: None also for data that holds
    values ``record_from_span`` would have normalised first (a non-finite
    float, a lone surrogate), since orjson refuses or nulls those.
    ``floats=False``: the caller knows ``data`` holds no float, so the checks
    for floats orjson writes differently (and for NaN written as null) are
    skipped; orjson still refuses what it cannot write (a lone surrogate, an
    integer beyond 64 bits).
    """
    if not _fast:
        return None
    if floats:
        return _fast_dumps(data, data["parent_span_id"] is None)
    try:
        return _orjson.dumps(data, option=_FAST_OPTIONS)
    except TypeError:
        return None


def encode_reference(record: Record) -> bytes:
    """``encode`` by the standard library only (format 1's definition; slower)."""
    return _dumps(record.to_dict()).encode("utf-8")


def fast_encoder() -> str | None:
    """The C encoder in use (``orjson x.y``), or None when every record takes the reference path."""
    return f"orjson {_orjson.__version__}" if _fast and _orjson is not None else None


def decode(body: bytes) -> Record:
    """Rebuild a Record from canonical bytes; raises ValueError when they are not one."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"record body is not canonical JSON: {exc}") from exc
    except RecursionError:
        raise ValueError("record body is nested too deeply to be a record") from None
    if not isinstance(data, dict) or "v" not in data:
        raise ValueError("record body has no format version")
    if data["v"] != FORMAT_VERSION:
        raise ValueError(f"record format version {data['v']!r} is not supported")
    try:
        return Record(
            version=data["v"],
            trace_id=data["trace_id"],
            span_id=data["span_id"],
            parent_span_id=data.get("parent_span_id"),
            name=data["name"],
            kind=data["kind"],
            service=data["service"],
            start=data["start"],
            end=data["end"],
            status=data.get("status", "UNSET"),
            status_message=data.get("status_message"),
            attributes=data.get("attributes", {}),
            links=tuple(
                Link(ln["trace_id"], ln["span_id"], ln.get("attributes", {}))
                for ln in data.get("links", ())
            ),
            events=tuple(
                Event(ev["name"], ev["time"], ev.get("attributes", {}))
                for ev in data.get("events", ())
            ),
            scope=data.get("scope"),
            truncated=tuple(data.get("truncated", ())),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"record body lacks field {exc}") from exc


def clean_str(value: str, max_len: int) -> tuple[str, bool]:
    """A string normalised for encoding (cut to ``max_len``, lone surrogates escaped); cut?"""
    cut = False
    if len(value) > max_len:
        value, cut = value[:max_len], True
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (from undecodable bytes) cannot be stored as UTF-8;
            # escape them visibly rather than lose the value.
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value, cut


_clean_str = clean_str


def _clean_scalar(value: Any, max_len: int) -> tuple[Any, bool]:
    if isinstance(value, bool) or value is None:
        return value, False
    if isinstance(value, int):
        return value, False
    if isinstance(value, float):
        if math.isfinite(value):
            return value, False
        return {"double": repr(value)}, False
    if isinstance(value, str):
        return _clean_str(value, max_len)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        cut = len(raw) > max_len
        return {"bytes": base64.b64encode(raw[:max_len]).decode("ascii")}, cut
    # Anything else (a hostile object smuggled past the API) becomes its type name:
    # calling its __repr__ could run arbitrary code or leak a secret.
    return {"unsupported": type(value).__name__}, False


def clean_attributes(
    attributes: Mapping[str, Any] | None, max_len: int = DEFAULT_MAX_VALUE_LENGTH
) -> tuple[dict[str, Any], list[str]]:
    """Normalise OpenTelemetry attribute values for encoding; returns (values, cut names)."""
    out: dict[str, Any] = {}
    cut: list[str] = []
    if attributes:
        _clean_into(out, cut, attributes, max_len)
    return out, cut


def clean_value(value: Any, max_len: int) -> tuple[Any, bool]:
    """One attribute value normalised for encoding, and whether it was cut."""
    kind = type(value)
    if kind is str:
        if len(value) <= max_len and value.isascii():
            return value, False
    elif kind is int or kind is bool:
        return value, False
    if isinstance(value, (list, tuple)):
        items = []
        was_cut = False
        for item in value:
            clean, c = _clean_scalar(item, max_len)
            items.append(clean)
            was_cut = was_cut or c
        return items, was_cut
    return _clean_scalar(value, max_len)


def clean_key(key: Any, max_len: int) -> str | None:
    """``key`` when it needs no normalising (the common case), else None."""
    if type(key) is str and key.isascii() and len(key) <= max_len:
        return key
    return None


def _clean_into(
    out: dict[str, Any], cut: list[str], attributes: Mapping[str, Any], max_len: int
) -> None:
    """Add the normalised ``attributes`` to ``out`` (later keys win), cut names to ``cut``."""
    for key, value in attributes.items():
        if type(key) is not str or not key.isascii() or len(key) > max_len:
            key, _ = _clean_str(str(key), max_len)
        kind = type(value)
        # Fast path for the common case: short ASCII text, ints and bools.
        if kind is str:
            if len(value) <= max_len and value.isascii():
                out[key] = value
                continue
        elif kind is int or kind is bool:
            out[key] = value
            continue
        out[key], was_cut = clean_value(value, max_len)
        if was_cut:
            cut.append(key)


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _enum_name(value: Any, known: tuple[str, ...], default: str) -> str:
    name = getattr(value, "name", None)
    return name if name in known else default


# The SDK's enum members by identity: ``.name`` on an enum is a slow
# descriptor, and so is an enum's ``__hash__``. Members live as long as their
# class, so no other object can take one's id.
_KIND_NAMES: dict[int, str] = {}
_STATUS_NAMES: dict[int, str] = {}
try:
    from opentelemetry.trace import SpanKind as _SpanKind
    from opentelemetry.trace import StatusCode as _StatusCode

    _KIND_NAMES = {id(k): k.name for k in _SpanKind if k.name in _KINDS}
    _STATUS_NAMES = {id(c): c.name for c in _StatusCode if c.name in _STATUSES}
except ImportError:  # pragma: no cover - the API is a dependency
    pass


# -- reading SDK spans without their copying properties -----------------------
#
# ``ReadableSpan.attributes`` wraps the span's BoundedAttributes in a
# MappingProxyType on every read, and every lookup or iteration through it
# then runs the Python-level Mapping methods of BoundedAttributes;
# ``.events`` and ``.links`` copy into a tuple. Once a span has ended nothing
# changes them (the SDK makes its attributes immutable and refuses new events
# and links), so for the SDK's own span classes, whose properties these are,
# the fields are read directly. Any other span object, a subclass that
# overrides one of these properties, or an SDK release that renamed the
# fields, takes the properties.

try:
    from opentelemetry.attributes import BoundedAttributes as _BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan as _ReadableSpan
    from opentelemetry.sdk.util import BoundedList as _BoundedList
    from opentelemetry.trace import SpanContext as _SpanContext
    from opentelemetry.trace.status import Status as _Status
except ImportError:  # pragma: no cover - the SDK is a dependency
    _ReadableSpan = _BoundedAttributes = _BoundedList = None  # type: ignore[assignment,misc]
    _SpanContext = _Status = None  # type: ignore[assignment,misc]

_SPAN_PROPERTIES = (
    "name", "context", "kind", "parent", "start_time", "end_time", "status", "attributes",
    "events", "links", "instrumentation_scope",
)  # fmt: skip
_NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})
_DIRECT: dict[type, bool] = {}


def _fields_are_direct() -> bool:
    """True when this SDK keeps a span's fields where the direct reads look for them."""
    if _ReadableSpan is None:
        return False
    try:
        probe = _ReadableSpan(
            "probe",
            attributes=_BoundedAttributes(attributes={"a": 1}),
            events=_BoundedList(1),
            links=_BoundedList(1),
            end_time=2,
        )
        probe._attributes._immutable = True  # type: ignore[union-attr]
        status = _Status(_StatusCode.ERROR, "why")
        ctx = _SpanContext(3, 4, is_remote=False)
        return (
            (ctx[0], ctx[1]) == (ctx.trace_id, ctx.span_id)
            and status._status_code is status.status_code
            and status._description == status.description
            and probe._name == "probe"
            and probe._end_time == 2
            and dict(probe._attributes._dict) == dict(probe.attributes or {})  # type: ignore[union-attr]
            and tuple(probe._events._dq) == probe.events  # type: ignore[attr-defined]
            and tuple(probe._links._dq) == probe.links  # type: ignore[attr-defined]
            and all(
                hasattr(probe, f"_{name}")
                for name in _SPAN_PROPERTIES
                if name not in ("attributes", "events", "links")
            )
        )
    except Exception:  # pragma: no cover - a future SDK: the properties still work
        return False


_DIRECT_FIELDS = _fields_are_direct()
# The SpanContext (a tuple: trace id, span id, ...) and Status read directly.
_TUPLE_CONTEXT: Any = _SpanContext if _DIRECT_FIELDS else None
_DIRECT_STATUS: Any = _Status if _DIRECT_FIELDS else None


def direct_fields(cls: type) -> bool:
    """True when a span of class ``cls`` may be read through its fields (see above).

    Then ``span._attributes`` etc. are read instead of the properties;
    ``span_attributes`` and ``ended_sequence`` do it for attributes, events and links.
    """
    try:
        return _DIRECT[cls]
    except KeyError:
        pass
    ok = (
        _DIRECT_FIELDS
        and issubclass(cls, _ReadableSpan)
        and all(getattr(cls, n, None) is getattr(_ReadableSpan, n) for n in _SPAN_PROPERTIES)
    )
    if len(_DIRECT) < 256:
        _DIRECT[cls] = ok
    return ok


def span_attributes(span: Any) -> Mapping[str, Any]:
    """The attributes of ``span`` (never None), read-only: callers must not change them.

    For an ended SDK span, the span's own dict, without the copy or the
    Mapping wrappers ``span.attributes`` goes through; otherwise
    ``span.attributes``.
    """
    cls = type(span)
    direct = _DIRECT.get(cls)
    if direct is None:
        direct = direct_fields(cls)
    if direct:
        raw = span._attributes
        if type(raw) is _BoundedAttributes:
            if raw._immutable:  # ended: nothing writes to it any more
                return raw._dict
        elif type(raw) is dict:
            return raw
        elif raw is None:
            return _NO_ATTRIBUTES
    return span.attributes or _NO_ATTRIBUTES


def ended_sequence(raw: Any, span: Any, name: str) -> Any:
    """A span's events or links (``raw``: its ``_events`` or ``_links``), read-only.

    Without the SDK's copy when the span has ended; else ``span.<name>``.
    Only for spans whose class passes ``direct_fields``.
    """
    if type(raw) is _BoundedList:
        if span._end_time is not None:
            return raw._dq  # type: ignore[attr-defined]
    elif type(raw) is tuple or type(raw) is list:
        return raw
    return getattr(span, name)


def span_fields(span: Any) -> tuple[Any, ...]:
    """What a record takes from ``span``, each field read once, as a record spells it.

    ``(name, kind, status, status message, attributes, links, events, scope
    name, trace id, span id, parent span id, start, end)``: the name and the
    message as the span holds them (not yet normalised), attributes, links
    and events read-only (see ``span_attributes``), ids in hex. An ended SDK
    span is read through its fields, anything else through its properties.
    """
    cls = type(span)
    direct = _DIRECT.get(cls)
    if direct is None:
        direct = direct_fields(cls)
    if direct:
        ctx = span._context
        parent = span._parent
        status = span._status
        kind = span._kind
        name = span._name
        start = span._start_time
        end = span._end_time
        scope = span._instrumentation_scope
        attributes = span_attributes(span)
        links = span._links
        events = span._events
        if end is not None and type(links) is _BoundedList and type(events) is _BoundedList:
            # Ended: no more are added (ended_sequence for both, in one test).
            links, events = links._dq, events._dq  # type: ignore[attr-defined]
        else:
            links = ended_sequence(links, span, "links")
            events = ended_sequence(events, span, "events")
    else:
        ctx = span.context
        parent = span.parent
        status = span.status
        kind = span.kind
        name = span.name
        start = span.start_time
        end = span.end_time
        scope = span.instrumentation_scope
        attributes = span.attributes or _NO_ATTRIBUTES
        links = span.links
        events = span.events
    if type(ctx) is _TUPLE_CONTEXT:
        trace_id, span_id = ctx[0], ctx[1]
    else:
        trace_id, span_id = ctx.trace_id, ctx.span_id
    parent_id = None if parent is None else parent.span_id
    try:  # as format(id, "032x") writes an id that fits, and faster
        trace_hex = trace_id.to_bytes(16, "big").hex()
        span_hex = span_id.to_bytes(8, "big").hex()
        parent_hex = None if parent_id is None else parent_id.to_bytes(8, "big").hex()
    except (OverflowError, AttributeError):
        trace_hex, span_hex = format(trace_id, "032x"), format(span_id, "016x")
        parent_hex = None if parent_id is None else format(parent_id, "016x")
    if status is None:
        status_name, message = "UNSET", None
    else:
        if type(status) is _DIRECT_STATUS:
            code, message = status._status_code, status._description
        else:
            code, message = status.status_code, status.description
        status_name = _STATUS_NAMES.get(id(code)) or code.name
    return (
        name,
        _KIND_NAMES.get(id(kind)) or _enum_name(kind, _KINDS, "INTERNAL"),
        status_name,
        message,
        attributes,
        links,
        events,
        scope.name if scope else None,
        trace_hex,
        span_hex,
        parent_hex,
        int(start or 0),
        int(end or 0),
    )


def record_from_span(
    span: Any,
    service: str,
    extra_attributes: Mapping[str, Any] | None = None,
    max_len: int = DEFAULT_MAX_VALUE_LENGTH,
) -> Record:
    """Build a Record from an SDK ReadableSpan (``extra_attributes`` override the span's)."""
    (name, kind, status, message, span_attrs, span_links, span_events, scope,
     trace_id, span_id, parent_id, start, end) = span_fields(span)  # fmt: skip
    # One pass over the span's attributes, then the extra ones over them.
    attributes: dict[str, Any] = {}
    cut: list[str] = []
    if span_attrs:
        _clean_into(attributes, cut, span_attrs, max_len)
    if extra_attributes:
        _clean_into(attributes, cut, extra_attributes, max_len)
    links = (
        tuple(
            Link(
                format(ln.context.trace_id, "032x"),
                format(ln.context.span_id, "016x"),
                clean_attributes(ln.attributes, max_len)[0],
            )
            for ln in span_links
        )
        if span_links
        else ()
    )
    events = (
        tuple(
            Event(ev.name, int(ev.timestamp or 0), clean_attributes(ev.attributes, max_len)[0])
            for ev in span_events
        )
        if span_events
        else ()
    )
    if type(name) is not str or not name.isascii() or len(name) > max_len:
        name = _clean_str(str(name), max_len)[0]
    return new_record(
        trace_id,
        span_id,
        parent_id,
        name,
        kind,
        service,
        start,
        end,
        status,
        _clean_str(message, max_len)[0] if message else None,
        attributes,
        links,
        events,
        scope,
        tuple(cut),
    )


# -- the fast path checks itself once, at import ------------------------------

_FAST_OPTIONS = (
    (_orjson.OPT_SORT_KEYS | _orjson.OPT_PASSTHROUGH_SUBCLASS | _orjson.OPT_PASSTHROUGH_DATETIME
     | _orjson.OPT_PASSTHROUGH_DATACLASS)
    if _orjson is not None else 0
)  # fmt: skip


def _self_check() -> bool:
    """True when orjson gives the reference bytes (or defers) for every probe value."""
    if _orjson is None:
        return False
    probes: list[Any] = [
        "".join(chr(c) for c in range(0x80)),
        "\u2028\u2029\ufeff\ud7ff\ue000\uffff\U0001f600\U0010ffff é ü 中",
        {"b": 1, "a": [True, False, None, 0, -1, 2**63 - 1, 2**64 - 1, -(2**63)],
         "\U0001f600": 1, "\uffff": 2, "\ue000": 3, "": 4, "A": 5},
        [0.0, -0.0, 0.1, 0.5, 1.0, 1.5, 100.0, 2.0**53, 2.0**53 + 2, 1 / 3, 2 / 3],
    ]  # fmt: skip
    floats: list[float] = []
    for exp in range(-330, 308):  # every decimal exponent: where the notation switches
        for mantissa in ("1", "1.2345678901234567", "4.9"):
            floats.append(float(f"{mantissa}e{exp}"))
    floats += [-f for f in floats[::7]]
    floats += [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
    probes += [floats[i : i + 64] for i in range(0, len(floats), 64)]
    for probe in probes:
        try:
            out = _orjson.dumps(probe, option=_FAST_OPTIONS)
        except TypeError:
            return False
        if _suspect(out):
            # Deferred to the reference path, so it cannot differ; check the
            # values one by one so one suspect float does not hide the rest.
            if isinstance(probe, list):
                for item in probe:
                    one = _orjson.dumps([item], option=_FAST_OPTIONS)
                    # The reference writes a finite float as float.__repr__.
                    if not _suspect(one) and one != f"[{item!r}]".encode():
                        return False
            continue
        if out != _dumps(probe).encode("utf-8"):
            return False
    return True


_fast = _self_check()
