"""Shared vectors of record format 1: the reference encoder and the fast one give the same bytes.

``tests/vectors/record_v1.json`` holds span inputs and the exact bytes the
encoder of every record written so far produced for them (see
tests/vectors/README.md). Both encoders must give those bytes, built from
real SDK ReadableSpans through ``record_from_span``; random records must
encode the same on both paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from otel_audit.engine.record import (
    Record,
    canonical_json,
    canonical_json_reference,
    clean_attributes,
    decode,
    encode,
    encode_reference,
    fast_encoder,
    record_from_span,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "record_v1.json").read_text("utf-8"))


def typed(value: Any) -> Any:
    """A vector's input value (see tests/vectors/README.md for the ``$`` forms)."""
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, arg),) = value.items()
            if tag == "$float":
                return float(arg)
            if tag == "$bytes":
                return base64.b64decode(arg)
            if tag == "$bytearray":
                return bytearray(base64.b64decode(arg))
            if tag == "$repeat":
                return arg[0] * arg[1]
            if tag == "$tuple":
                return tuple(typed(v) for v in arg)
            if tag == "$complex":
                return complex(arg[0], arg[1])
            if tag == "$map":
                return {k: typed(v) for k, v in arg.items()}
        return {k: typed(v) for k, v in value.items()}
    return value


def span_of(case: dict[str, Any]) -> ReadableSpan:
    s = case["span"]
    ctx = SpanContext(int(s["trace_id"], 16), int(s["span_id"], 16), is_remote=False)
    parent = (
        SpanContext(int(s["trace_id"], 16), int(s["parent"], 16), is_remote=False)
        if s.get("parent")
        else None
    )
    return ReadableSpan(
        name=typed(s["name"]),
        context=ctx,
        parent=parent,
        attributes=typed(s.get("attributes", {})),
        events=[
            Event(e["name"], typed(e.get("attributes", {})), timestamp=e["time"], limit=None)
            for e in s.get("events", [])
        ],
        links=[
            Link(
                SpanContext(int(ln["trace_id"], 16), int(ln["span_id"], 16), is_remote=True),
                typed(ln.get("attributes", {})),
            )
            for ln in s.get("links", [])
        ],
        kind=SpanKind[s.get("kind", "INTERNAL")],
        status=Status(StatusCode[s.get("status", "UNSET")], s.get("status_message")),
        start_time=s["start"],
        end_time=s["end"],
        instrumentation_scope=InstrumentationScope(s["scope"]) if s.get("scope") else None,
    )


def build(case: dict[str, Any]) -> Record:
    extra = typed(case["extra"]) if case.get("extra") else None
    if case.get("max_len") is not None:
        return record_from_span(span_of(case), case["service"], extra, case["max_len"])
    return record_from_span(span_of(case), case["service"], extra)


def test_the_vectors_cover_the_hard_cases():
    names = " ".join(c["name"] for c in VECTORS["records"])
    for needed in ("float", "non-finite", "bytes", "surrogate", "huge int", "truncat", "nested",
                   "unicode", "control", "event", "link"):  # fmt: skip
        assert needed in names, needed


@pytest.mark.parametrize("case", VECTORS["records"], ids=lambda c: c["name"])
def test_both_encoders_give_the_vector_bytes(case):
    # Long runs (truncated values) are spelled {"$repeat": [CHAR, N]} in expected_parts.
    text = case.get("expected") or "".join(typed(p) for p in case["expected_parts"])
    expected = text.encode("utf-8")
    record = build(case)
    assert encode_reference(record) == expected
    assert encode(record) == expected
    assert hashlib.sha256(bytes(32) + expected).hexdigest() == case["sha256"]
    # What a reader decodes encodes back to the same bytes, on both paths.
    again = decode(expected)
    assert encode(again) == expected
    assert encode_reference(again) == expected


@pytest.mark.parametrize("case", VECTORS["json"], ids=lambda c: c["name"])
def test_canonical_json_vectors(case):
    value = typed(case["value"])
    if case.get("error"):
        with pytest.raises(ValueError):
            canonical_json_reference(value)
        with pytest.raises(ValueError):
            canonical_json(value)
        return
    assert canonical_json_reference(value) == case["expected"]
    assert canonical_json(value) == case["expected"]


def test_the_fast_encoder_is_in_use():
    # A dependency; its import-time self-check passed for this orjson version.
    assert fast_encoder() is not None and fast_encoder().startswith("orjson")


def test_a_record_the_fast_path_cannot_write_exactly_takes_the_reference_path():
    # Written directly (not through clean_attributes): a NaN the reference refuses,
    # which orjson would silently write as null.
    rec = Record("ab" * 16, "cd" * 8, "ef" * 8, "op", "SERVER", "svc", 1, 2,
                 attributes={"x": math.nan})  # fmt: skip
    with pytest.raises(ValueError):
        encode_reference(rec)
    with pytest.raises(ValueError):
        encode(rec)
    huge = Record("ab" * 16, "cd" * 8, None, "op", "SERVER", "svc", 1, 2,
                  attributes={"n": 2**200, "f": 1e-7, "s": "null"})  # fmt: skip
    assert encode(huge) == encode_reference(huge)
    assert b'"f":1e-07' in encode(huge)


finite = st.floats(allow_nan=True, allow_infinity=True)
scalar = st.one_of(
    st.text(), st.booleans(), st.none(), st.integers(), finite, st.binary(max_size=40),
    st.floats(min_value=-1e-3, max_value=1e-3), st.floats(min_value=1e14, max_value=1e18),
)  # fmt: skip
value = st.one_of(scalar, st.lists(scalar, max_size=5), st.tuples(st.text(), st.integers()))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(), value, max_size=12), st.text(), st.sampled_from([8, 64, 65536]))
def test_random_records_encode_the_same_on_both_paths(attrs, name, max_len):
    cleaned, cut = clean_attributes(attrs, max_len)
    rec = Record("ab" * 16, "cd" * 8, None, name.encode("utf-8", "backslashreplace").decode(),
                 "SERVER", "svc", 1, 2, attributes=cleaned, truncated=tuple(cut))  # fmt: skip
    assert encode(rec) == encode_reference(rec)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        scalar,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
        max_leaves=20,
    )
)
def test_random_json_is_canonical_on_both_paths(data):
    try:
        expected = canonical_json_reference(data)
    except (ValueError, TypeError) as exc:
        with pytest.raises(type(exc)):
            canonical_json(data)
        return
    assert canonical_json(data) == expected


def test_an_orjson_that_writes_differently_is_switched_off(monkeypatch):
    # A future orjson release that wrote 1e+16 as 1e16 (as msgspec does) would
    # change stored bytes: the import-time self-check must refuse it.
    import orjson

    from otel_audit.engine import record

    class Divergent:
        OPT_SORT_KEYS = orjson.OPT_SORT_KEYS
        __version__ = "99"

        @staticmethod
        def dumps(data, option=0):
            return orjson.dumps(data, option=option).replace(b"e+", b"e")

    assert record._self_check()
    monkeypatch.setattr(record, "_orjson", Divergent)
    assert not record._self_check()
