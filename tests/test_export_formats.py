"""``otel-audit export`` in every format, validated by the formats' own libraries:
OCSF by its published schema (ocsf-json-schema) with jsonschema, CADF by pycadf,
OTLP/JSON by the OTLP protobuf definitions, Jaeger by its UI import shape."""

from __future__ import annotations

import base64
import csv
import io
import json
import warnings
from functools import cache

import jsonschema
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.review.export.ocsf import OCSF_VERSION

from .test_trail import run_shop

# The shop: 1 order -> orders chain: INSERT (seq 1), http.call (2), order.create (3),
# order.delete denied (4); inventory chain: UPDATE (1), notification (2), inventory.reserve (3).
N = 7


@pytest.fixture
def shop(make_pipeline, tmp_path):
    return run_shop(make_pipeline, tmp_path)


def export(capsys, url: str, fmt: str, *args: str) -> str:
    assert main(["export", "--ledger", url, "--format", fmt, *args]) == 0
    return capsys.readouterr().out


@cache
def ocsf_validator(class_uid: int) -> jsonschema.Draft202012Validator:
    from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))
    name = schema.lookup_class_name_from_uid(class_uid)
    return jsonschema.Draft202012Validator(schema.get_class_schema(name, profiles=["trace"]))


def test_ocsf_events_validate_against_the_published_schema(shop, capsys) -> None:
    events = [json.loads(line) for line in export(capsys, shop.url, "ocsf").splitlines()]
    assert len(events) == N
    for ev in events:
        errors = sorted(ocsf_validator(ev["class_uid"]).iter_errors(ev), key=str)
        assert not errors, f"{ev['class_name']}: {errors[0].message} at {list(errors[0].path)}"
    by_uid = {ev["metadata"]["uid"]: ev for ev in events}
    create = by_uid["orders:3"]
    assert (create["class_uid"], create["activity_id"], create["type_uid"]) == (6003, 1, 600301)
    assert create["api"]["operation"] == "order.create"
    assert create["actor"]["user"]["uid"] == "alice" and create["status_id"] == 1
    assert create["resources"] == [{"type": "order", "uid": "0"}]
    assert len(create["trace"]["uid"]) == 32 and len(create["trace"]["span"]["uid"]) == 16
    assert create["metadata"]["correlation_uid"] == shop.trails[0]
    insert = by_uid["orders:1"]
    assert (insert["class_uid"], insert["activity_id"], insert["table"]) == (
        6005,
        6,
        {"name": "orders"},
    )
    assert insert["unmapped"]["trace"]["span"]["parent_uid"] == create["trace"]["span"]["uid"]
    assert insert["metadata"]["profiles"] == [] and create["metadata"]["profiles"] == ["trace"]
    update = by_uid["inventory:1"]
    assert (update["class_uid"], update["activity_id"]) == (6005, 2)
    call = by_uid["orders:2"]
    assert (call["class_uid"], call["activity_id"], call["http_request"]["http_method"]) == (
        4002,
        6,
        "POST",
    )
    denied = by_uid["orders:4"]
    assert (denied["activity_id"], denied["status_id"], denied["status_code"]) == (4, 2, "denied")
    assert denied["status_detail"] == "not the owner"
    notify = by_uid["inventory:2"]
    assert (notify["class_uid"], notify["activity_id"]) == (6003, 99)
    # Times are milliseconds.
    assert create["time"] == create["trace"]["span"]["start_time"] and create["time"] < 10**13


def _cadf_event(d: dict):
    from pycadf import attachment, event, host, reason, resource

    def res(r: dict) -> resource.Resource:
        extra = {"host": host.Host(**r["host"])} if "host" in r else {}
        return resource.Resource(typeURI=r["typeURI"], id=r["id"], name=r["name"], **extra)

    ev = event.Event(
        eventType=d["eventType"], id=d["id"], eventTime=d["eventTime"], action=d["action"],
        outcome=d["outcome"], initiator=res(d["initiator"]), target=res(d["target"]),
        observer=res(d["observer"]), severity=d["severity"], name=d["name"],
        reason=reason.Reason(**d["reason"]) if "reason" in d else None,
    )  # fmt: skip
    for t in d["tags"]:
        ev.add_tag(t)
    for a in d["attachments"]:
        ev.add_attachment(
            attachment.Attachment(typeURI=a["typeURI"], content=a["content"], name=a["name"])
        )
    return ev


def test_cadf_events_are_valid_for_pycadf(shop, capsys) -> None:
    events = [json.loads(line) for line in export(capsys, shop.url, "cadf").splitlines()]
    assert len(events) == N
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pycadf warns on ids that are not UUIDs
        for d in events:
            ev = _cadf_event(d)
            assert ev.is_valid(), d
            # pycadf serialises what we wrote, field for field: nothing unknown, nothing lost.
            assert json.loads(json.dumps(ev.as_dict())) == d
    by = {next(t for t in d["tags"] if t.startswith("ledger?")): d for d in events}
    create = by["ledger?value=orders:3"]
    assert (create["action"], create["outcome"], create["name"]) == (
        "create",
        "success",
        "order.create",
    )
    assert create["initiator"]["name"] == "alice"
    assert create["initiator"]["typeURI"] == "data/security/account/user"
    assert (create["target"]["typeURI"], create["target"]["name"]) == ("data/order", "order 0")
    assert create["observer"]["name"] == "orders"
    assert create["eventTime"].endswith("+0000")
    denied = by["ledger?value=orders:4"]
    assert (denied["action"], denied["outcome"]) == ("delete", "failure")
    assert denied["reason"] == {"reasonType": "otel-audit/outcome", "reasonCode": "not the owner",
                                "policyType": "otel-audit/denied"}  # fmt: skip
    assert by["ledger?value=orders:1"]["action"] == "create"  # INSERT
    assert by["ledger?value=inventory:1"]["target"]["typeURI"] == "data/database/table"
    assert by["ledger?value=inventory:2"]["action"] == "notify"
    # Stable ids: the same record exports to the same event.
    again = [json.loads(line) for line in export(capsys, shop.url, "cadf").splitlines()]
    assert [e["id"] for e in again] == [e["id"] for e in events]


def test_otlp_json_parses_as_an_export_request(shop, capsys) -> None:
    doc = json.loads(export(capsys, shop.url, "otlp-json"))

    # proto3 JSON has bytes as base64; OTLP/JSON has ids as hex. Convert, then let
    # the OTLP protobuf definitions reject any unknown field or wrong type.
    def to_proto_json(node):
        if isinstance(node, dict):
            return {
                k: base64.b64encode(bytes.fromhex(x)).decode()
                if k in ("traceId", "spanId", "parentSpanId")
                else to_proto_json(x)
                for k, x in node.items()
            }
        if isinstance(node, list):
            return [to_proto_json(x) for x in node]
        return node

    req = json_format.Parse(json.dumps(to_proto_json(doc)), ExportTraceServiceRequest())
    spans = {
        (rs.resource.attributes[0].value.string_value, s.name): s
        for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
    }  # fmt: skip
    assert len(spans) == N
    create = spans[("orders", "order.create")]
    assert create.kind == 1 and create.status.code == 0
    attrs = {a.key: a.value for a in create.attributes}
    assert attrs[v.EVENT].bool_value is True and attrs[v.ACTOR_ID].string_value == "alice"
    assert attrs["otel_audit.seq"].int_value == 3
    call = spans[("orders", "POST")]
    assert call.kind == 3 and call.parent_span_id == create.span_id
    denied = spans[("orders", "order.delete")]
    assert (
        denied.status.code == 0
        and {a.key: a.value for a in denied.attributes}[v.OUTCOME].string_value == "denied"
    )
    assert int(create.end_time_unix_nano) > int(create.start_time_unix_nano) > 10**18


def test_jaeger_json_has_the_ui_import_shape(shop, capsys) -> None:
    doc = json.loads(export(capsys, shop.url, "jaeger"))
    assert set(doc) >= {"data"}
    traces = doc["data"]
    assert len(traces) == 2  # the order's trace and the denied delete's
    order = next(t for t in traces if len(t["spans"]) == 6)
    assert {p["serviceName"] for p in order["processes"].values()} == {"orders", "inventory"}
    ids = {s["spanID"] for s in order["spans"]}
    for s in order["spans"]:
        assert set(s) >= {
            "traceID",
            "spanID",
            "operationName",
            "references",
            "startTime",
            "duration",
            "tags",
            "logs",
            "processID",
        }
        assert s["traceID"] == order["traceID"] and s["processID"] in order["processes"]
        assert isinstance(s["startTime"], int) and s["startTime"] < 10**17  # microseconds
        for t in s["tags"]:
            assert t["type"] in ("string", "bool", "int64", "float64", "binary")
        for ref in s["references"]:
            assert ref["refType"] in ("CHILD_OF", "FOLLOWS_FROM")
    root = next(s for s in order["spans"] if s["operationName"] == "order.create")
    tags = {t["key"]: t["value"] for t in root["tags"]}
    assert (
        tags[v.ACTOR_ID] == "alice"
        and tags["otel_audit.proof.chain"] == "orders"
        and tags["otel_audit.seq"] == 3
    )
    # Every recorded parent is in the trace (the server span in between was not audited).
    parents = [r["spanID"] for s in order["spans"] for r in s["references"]]
    assert sum(p in ids for p in parents) == 4


def test_jaeger_tags_keep_large_integers_exact_and_arrays_compact(make_pipeline, capsys) -> None:
    """Beyond 2^53 a JavaScript number rounds: Jaeger's own API writes such int64 tags as strings."""
    from otel_audit import audit_action

    pipeline, provider, _ = make_pipeline(service_name="web")
    attributes = {"big": 2**53, "edge": 2**53 - 1, "low": -(2**60), "list": [1, "a"]}
    with audit_action("thing.do", resource=("thing", "1"), actor="alice", attributes=attributes,
                      tracer=provider.get_tracer("web.scope")):  # fmt: skip
        pass
    (trace,) = json.loads(export(capsys, pipeline.ledger_url, "jaeger"))["data"]
    (span,) = trace["spans"]
    tags = {t["key"]: (t["type"], t["value"]) for t in span["tags"]}
    assert tags["big"] == ("int64", "9007199254740992")
    assert tags["edge"] == ("int64", 2**53 - 1)
    assert tags["low"] == ("int64", str(-(2**60)))
    assert tags["list"] == ("string", '[1,"a"]')
    assert tags["otel.scope.name"] == ("string", "web.scope")


def test_csv_columns_and_formula_guard(make_pipeline, tmp_path, capsys) -> None:
    from otel_audit import audit_action

    pipeline, provider, _ = make_pipeline(service_name="web")
    with audit_action("order.create", resource=("order", "=HYPERLINK(\"http://x\")"), actor="alice",
                      tracer=provider.get_tracer("t")):  # fmt: skip
        pass
    out = export(capsys, pipeline.ledger_url, "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1
    r = rows[0]
    assert (r["chain"], r["seq"], r["actor_id"], r["action"], r["outcome"]) == (
        "web",
        "1",
        "alice",
        "order.create",
        "success",
    )
    assert r["resource_id"] == '\'=HYPERLINK("http://x")'
    assert json.loads(r["attributes"])[v.RESOURCE_ID] == '=HYPERLINK("http://x")'
    assert r["time"].endswith("Z") and len(r["hash"]) == 64


def test_filters_apply_and_output_file_is_written_whole(shop, tmp_path, capsys) -> None:
    out = tmp_path / "alice.ocsf.jsonl"
    assert (
        main(
            ["export", "--ledger", shop.url, "--format", "ocsf", "--actor", "alice", "-o", str(out)]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    # alice's order.create and the two effects in her service carry her id.
    assert len(lines) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".otel-audit-")] == []
