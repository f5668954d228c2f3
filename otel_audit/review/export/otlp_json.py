"""OTLP/JSON: one ``ExportTraceServiceRequest`` (the OTLP file exporter's format).

Per the OTLP specification's JSON mapping: trace and span ids are hex strings
(not base64), enums are integers, 64-bit integers (times, ``intValue``) are
decimal strings, field names are lowerCamelCase. Records are grouped by
service (``resource`` with ``service.name``) and instrumentation scope, so
the selection is held in memory. The record's place in the ledger rides in
``otel_audit.*`` span attributes. Collector ``otlpjsonfile`` receivers and
OTLP/HTTP endpoints (``Content-Type: application/json``) accept the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from otel_audit.engine.ledger import StoredRecord

NAME = "otlp-json"

_KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}


def any_value(value: Any) -> dict[str, Any]:
    """An OTLP AnyValue in its JSON mapping."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [any_value(x) for x in value]}}
    if isinstance(value, dict):
        if set(value) == {"bytes"}:
            return {"bytesValue": value["bytes"]}  # base64, as proto3 JSON wants
        if set(value) == {"double"}:
            text = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(
                str(value["double"]), "NaN"
            )
            return {"doubleValue": text}
        return {"stringValue": json.dumps(value, ensure_ascii=False, sort_keys=True)}
    if value is None:
        return {}
    return {"stringValue": str(value)}


def attributes(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": any_value(x)} for k, x in sorted(attrs.items())]


def span(stored: StoredRecord) -> dict[str, Any]:
    rec = stored.record
    attrs = dict(rec.attributes)
    attrs.update({"otel_audit.proof.chain": stored.chain, "otel_audit.seq": stored.seq,
                  "otel_audit.hash": stored.hash.hex()})  # fmt: skip
    if stored.outcome == "unknown" and rec.attr("audit.outcome") != "unknown":
        # An intent no outcome record concluded: its span carries no outcome
        # of its own, so the outcome reviewers see rides beside its place.
        attrs["otel_audit.outcome"] = "unknown"
    out: dict[str, Any] = {
        "traceId": rec.trace_id,
        "spanId": rec.span_id,
        "name": rec.name,
        "kind": _KIND.get(rec.kind, 0),
        "startTimeUnixNano": str(rec.start),
        "endTimeUnixNano": str(rec.end),
        "attributes": attributes(attrs),
        "status": {"code": _STATUS.get(rec.status, 0)},
    }
    if rec.parent_span_id:
        out["parentSpanId"] = rec.parent_span_id
    if rec.status_message:
        out["status"]["message"] = rec.status_message
    if rec.events:
        out["events"] = [
            {"timeUnixNano": str(ev.time), "name": ev.name, "attributes": attributes(ev.attributes)}
            for ev in rec.events
        ]
    if rec.links:
        out["links"] = [
            {"traceId": ln.trace_id, "spanId": ln.span_id, "attributes": attributes(ln.attributes)}
            for ln in rec.links
        ]
    return out


def request(records: Iterable[StoredRecord]) -> tuple[dict[str, Any], int]:
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    n = 0
    for stored in records:
        rec = stored.record
        groups.setdefault(rec.service, {}).setdefault(rec.scope or "", []).append(span(stored))
        n += 1
    resource_spans = []
    for service, scopes in groups.items():
        resource_spans.append(
            {
                "resource": {"attributes": attributes({"service.name": service})},
                "scopeSpans": [
                    {"scope": {"name": scope} if scope else {}, "spans": spans}
                    for scope, spans in scopes.items()
                ],
            }
        )
    return {"resourceSpans": resource_spans}, n


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    doc, n = request(records)
    json.dump(doc, out, ensure_ascii=False)
    out.write("\n")
    return n
