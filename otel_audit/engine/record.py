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
    out = _fast_dumps(data, record.parent_span_id is None) if _fast else None
    return _dumps(data).encode("utf-8") if out is None else out


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


def _clean_str(value: str, max_len: int) -> tuple[str, bool]:
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
        if isinstance(value, (list, tuple)):
            items = []
            was_cut = False
            for item in value:
                clean, c = _clean_scalar(item, max_len)
                items.append(clean)
                was_cut = was_cut or c
            out[key] = items
        else:
            out[key], was_cut = _clean_scalar(value, max_len)
        if was_cut:
            cut.append(key)


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _enum_name(value: Any, known: tuple[str, ...], default: str) -> str:
    name = getattr(value, "name", None)
    return name if name in known else default


# The SDK's enum members by identity: ``.name`` on an enum is a slow descriptor.
_KIND_NAMES: dict[Any, str] = {}
_STATUS_NAMES: dict[Any, str] = {}
try:
    from opentelemetry.trace import SpanKind as _SpanKind
    from opentelemetry.trace import StatusCode as _StatusCode

    _KIND_NAMES = {k: k.name for k in _SpanKind if k.name in _KINDS}
    _STATUS_NAMES = {c: c.name for c in _StatusCode if c.name in _STATUSES}
except ImportError:  # pragma: no cover - the API is a dependency
    pass


def record_from_span(
    span: Any,
    service: str,
    extra_attributes: Mapping[str, Any] | None = None,
    max_len: int = DEFAULT_MAX_VALUE_LENGTH,
) -> Record:
    """Build a Record from an SDK ReadableSpan (``extra_attributes`` override the span's)."""
    ctx = span.context
    # One pass over the span's attributes, then the extra ones over them.
    attributes: dict[str, Any] = {}
    cut: list[str] = []
    span_attributes = span.attributes
    if span_attributes:
        _clean_into(attributes, cut, span_attributes, max_len)
    if extra_attributes:
        _clean_into(attributes, cut, extra_attributes, max_len)
    # Span properties copy (links, events) or compute (enum names): read each once.
    span_links = span.links
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
    span_events = span.events
    events = (
        tuple(
            Event(ev.name, int(ev.timestamp or 0), clean_attributes(ev.attributes, max_len)[0])
            for ev in span_events
        )
        if span_events
        else ()
    )
    parent = span.parent
    status = span.status
    span_kind = span.kind
    kind = _KIND_NAMES.get(span_kind) or _enum_name(span_kind, _KINDS, "INTERNAL")
    if status is not None:
        code = status.status_code
        status_name = _STATUS_NAMES.get(code) or code.name
        message = status.description
    else:
        status_name, message = "UNSET", None
    instrumentation = span.instrumentation_scope
    name = span.name
    if type(name) is not str or not name.isascii() or len(name) > max_len:
        name = _clean_str(str(name), max_len)[0]
    return Record(
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent is not None else None,
        name=name,
        kind=kind,
        service=service,
        start=int(span.start_time or 0),
        end=int(span.end_time or 0),
        status=status_name,
        status_message=_clean_str(message, max_len)[0] if message else None,
        attributes=attributes,
        links=links,
        events=events,
        scope=instrumentation.name if instrumentation else None,
        truncated=tuple(cut),
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
