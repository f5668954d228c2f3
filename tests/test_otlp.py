"""OTLP <-> Record: the real exporter's encoding gives the in-process record, byte for byte."""

from __future__ import annotations

import base64
import json

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode, encode
from otel_audit.transport.otlp import (
    MalformedRequest,
    parse_request,
    records_from_request,
    request_from_records,
    response_bytes,
)


def _emit(tracer) -> None:
    with tracer.start_as_current_span(
        "order.update",
        kind=SpanKind.SERVER,
        attributes={
            v.EVENT: True,
            v.ACTION: "order.update",
            v.ACTOR_ID: "alice",
            v.TRAIL_ID: "trail-1",
            "count": 3,
            "ratio": 0.25,
            "flags": [True, False],
            "names": ["a", "b"],
            "ints": [1, 2, 3],
            "unicode": "d\u00e9j\u00e0 \u2713",
        },
    ) as parent:
        parent.add_event("checked", {"rule": "r1", "n": 2})
        with tracer.start_as_current_span(
            "INSERT orders",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "sqlite", "db.statement": "INSERT INTO orders VALUES (?)"},
            links=[Link(parent.get_span_context(), {"why": "caused"})],
        ) as child:
            child.set_attribute(v.TRAIL_ID, "trail-1")
            child.set_status(Status(StatusCode.ERROR, "constraint failed"))
    # An ordinary span: never audited.
    with tracer.start_as_current_span("healthcheck"):
        pass


@pytest.fixture
def in_process(make_pipeline):
    """(in-process ledger bodies by span id, the finished SDK spans)."""
    pipeline, provider, exporter = make_pipeline(service_name="shop")
    _emit(provider.get_tracer("shop.orders", "1.0"))
    pipeline.flush()
    with open_ledger(pipeline.ledger_url) as ledger:
        bodies = {decode(r.body).span_id: r.body for r in ledger.scan(pipeline.chain)}
    return bodies, exporter.get_finished_spans()


def _with_service(spans, name="shop"):
    # make_pipeline's provider has the default resource; the receiving side names
    # the service from the resource, the in-process side from configure().
    resource = Resource.create({"service.name": name})
    for span in spans:
        span._resource = resource
    return spans


def test_exporter_encoding_gives_the_in_process_record(in_process):
    bodies, spans = in_process
    assert len(bodies) == 2
    request = encode_spans(_with_service(spans))
    records, rejected, ignored = records_from_request(request)
    assert rejected == [] and ignored == 1
    assert {r.span_id: encode(r) for r in records} == bodies


def test_otlp_json_with_hex_ids_gives_the_same_records(in_process):
    bodies, spans = in_process
    request = encode_spans(_with_service(spans))
    data = json_format.MessageToDict(request)
    for rs in data["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
                for link in span.get("links", []):
                    link["traceId"] = base64.b64decode(link["traceId"]).hex()
                    link["spanId"] = base64.b64decode(link["spanId"]).hex()
    text = json.dumps(data).encode()
    assert (
        b'"traceId": "' in text
        and len(data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]) == 32
    )
    records, rejected, _ = records_from_request(parse_request(text, json_body=True))
    assert rejected == []
    assert {r.span_id: encode(r) for r in records} == bodies


def test_otlp_json_accepts_base64_ids_and_string_ints(in_process):
    bodies, spans = in_process
    text = json_format.MessageToJson(encode_spans(_with_service(spans))).encode()
    assert b'"intValue": "3"' in text  # int64 travel as strings in proto3 JSON
    records, _, _ = records_from_request(parse_request(text, json_body=True))
    assert {r.span_id: encode(r) for r in records} == bodies


def test_records_round_trip_through_otlp(in_process):
    bodies, _ = in_process
    records = [decode(b) for b in bodies.values()]
    again, rejected, _ = records_from_request(
        parse_request(request_from_records(records).SerializeToString())
    )
    assert rejected == []
    assert sorted(encode(r) for r in again) == sorted(bodies.values())


def test_keep_all_keeps_ordinary_spans(in_process):
    _, spans = in_process
    records, _, ignored = records_from_request(encode_spans(_with_service(spans)), keep_all=True)
    assert ignored == 0
    assert sorted(r.name for r in records) == ["INSERT orders", "healthcheck", "order.update"]


def test_invalid_ids_are_rejected_with_a_reason():
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracer_provider.get_tracer("t")
    for _ in range(2):
        with tracer.start_as_current_span("x", attributes={v.EVENT: True}):
            pass
    request = encode_spans(exporter.get_finished_spans())
    bad = request.resource_spans[0].scope_spans[0].spans[0]
    bad.trace_id = bytes(16)
    records, rejected, _ = records_from_request(request)
    assert len(records) == 1
    assert [r.reason for r in rejected] == ["invalid trace id"]
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    response = ExportTraceServiceResponse.FromString(response_bytes(rejected))
    assert response.partial_success.rejected_spans == 1
    assert "invalid trace id" in response.partial_success.error_message
    as_json = json.loads(response_bytes(rejected, json_body=True))
    assert as_json["partialSuccess"]["rejectedSpans"] == "1"


@pytest.mark.parametrize(
    "body, json_body, message",
    [
        (b"\xff\xff\xff\xff not protobuf", False, "not an OTLP protobuf trace request"),
        (b"{not json", True, "body is not JSON"),
        (b"[1, 2]", True, "expected an object"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            True,
            "traceId 'zz' is not 32 hex",
        ),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "'
            + b"g" * 32
            + b'"}]}]}]}',
            True,
            "is not hex",
        ),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5}]}]}]}',
            True,
            "not an OTLP/JSON trace request",
        ),
        (b'{"resourceSpans": "nope"}', True, "not an OTLP/JSON trace request"),
    ],
)
def test_malformed_bodies_raise_one_clear_error(body, json_body, message):
    with pytest.raises(MalformedRequest, match=message):
        parse_request(body, json_body)


def test_exported_names_are_the_public_ones():
    from otel_audit.transport import otlp

    assert set(otlp.__all__) <= set(dir(otlp))
    assert otel_audit  # the package imports with otlp present


def test_every_attribute_type_is_cleaned_as_in_process():
    """The one-pass OTLP decoding keeps the general normalisation's values and cut names."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from otel_audit.engine.record import clean_attributes

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "s"
    raw = {}

    def put(key, setter, value):
        kv = span.attributes.add()
        kv.key = key
        if setter:
            setter(kv.value)
        raw[key] = value

    put(v.EVENT, lambda a: setattr(a, "bool_value", True), True)
    put("short", lambda a: setattr(a, "string_value", "abc"), "abc")
    put("long", lambda a: setattr(a, "string_value", "x" * 30), "x" * 30)
    put("utf8", lambda a: setattr(a, "string_value", "élan-€"), "élan-€")
    put("utf8-long", lambda a: setattr(a, "string_value", "é" * 30), "é" * 30)
    put("int", lambda a: setattr(a, "int_value", -(2**63)), -(2**63))
    put("nan", lambda a: setattr(a, "double_value", float("nan")), float("nan"))
    put("inf", lambda a: setattr(a, "double_value", float("-inf")), float("-inf"))
    put("bytes", lambda a: setattr(a, "bytes_value", b"\0" * 30), b"\0" * 30)
    put("empty", None, None)
    put("k" * 30, lambda a: setattr(a, "int_value", 1), 1)

    def array(a):
        a.array_value.values.add().string_value = "y" * 30
        a.array_value.values.add().double_value = 1.5

    put("array", array, ["y" * 30, 1.5])

    def kvlist(a):
        item = a.kvlist_value.values.add()
        item.key, item.value.int_value = "n", 7

    put("kvlist", kvlist, json.dumps({"n": 7}))
    # The same key twice: the last one wins, and its cut state with it.
    put("twice", lambda a: setattr(a, "string_value", "z" * 30), "z" * 30)
    put("twice", lambda a: setattr(a, "string_value", "ok"), "ok")

    (record,), rejected, _ = records_from_request(request, max_len=16)
    expected, cut = clean_attributes(raw, 16)
    assert not rejected
    assert encode(record) == encode(
        type(record)(**{**record.__dict__, "attributes": expected, "truncated": tuple(cut)})
    )
    assert set(record.truncated) == {"long", "utf8-long", "bytes", "array"}
    assert "k" * 16 in record.attributes
