"""Canonical encoding: same span, same bytes; a version in every record."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from otel_audit.engine.record import FORMAT_VERSION, Record, clean_attributes, decode, encode

scalars = st.one_of(
    st.text(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
)  # fmt: skip
values = st.one_of(scalars, st.lists(st.text()), st.lists(st.integers(-(2**63), 2**63 - 1)))


def make(attrs) -> Record:
    cleaned, cut = clean_attributes(attrs)
    return Record("ab" * 16, "cd" * 8, None, "op", "SERVER", "svc", 1, 2,
                  attributes=cleaned, truncated=tuple(cut))  # fmt: skip


@given(st.dictionaries(st.text(), values, max_size=20))
def test_encoding_is_deterministic_and_round_trips(attrs):
    a = encode(make(attrs))
    b = encode(make(dict(reversed(list(attrs.items())))))
    assert a == b
    again = decode(a)
    assert encode(again) == a
    data = json.loads(a)
    assert data["v"] == FORMAT_VERSION
    a.decode("utf-8")  # always valid UTF-8


def test_known_bytes_are_stable():
    # A golden value: if this changes, every stored hash changes. Bump FORMAT_VERSION instead.
    rec = make({"audit.action": "order.create", "n": 1, "f": 0.5})
    assert encode(rec) == (
        b'{"attributes":{"audit.action":"order.create","f":0.5,"n":1},"end":2,"kind":"SERVER",'
        b'"name":"op","parent_span_id":null,"service":"svc","span_id":"cdcdcdcdcdcdcdcd",'
        b'"start":1,"status":"UNSET","trace_id":"abababababababababababababababab","v":1}'
    )


def test_decode_rejects_what_is_not_a_record():
    import pytest

    for bad, msg in [(b"\xff", "not canonical JSON"), (b"[]", "no format version"),
                     (b'{"v": 9}', "version 9 is not supported"), (b'{"v": 1}', "lacks field")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            decode(bad)
