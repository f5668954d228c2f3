"""Jaeger JSON, the document the Jaeger UI opens with "Upload JSON file".

``{"data": [{"traceID", "spans": [...], "processes": {...}}]}``, one entry per
trace, one process per service: the shape of Jaeger's own query API
(``/api/traces``), written as Jaeger writes it, so a trail loaded from this file
and the same spans sent to Jaeger over OTLP show the same tree and tags
(tests/test_collector_jaeger_export.py checks that against a real Jaeger v2).
Times are microseconds; attributes become typed tags (integers beyond 2^53 as
decimal strings, as Jaeger does, since JavaScript numbers would round them;
arrays as compact JSON text); the instrumentation scope under
``otel.scope.name``; the record's place in the ledger rides in ``otel_audit.*`` tags.
The records are grouped by trace, so the whole selection is held in memory:
export a trail, an actor or a time range, not a whole large ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from otel_audit.engine.ledger import StoredRecord

NAME = "jaeger"
#: The largest integer a JavaScript number (the Jaeger UI's) holds exactly.
_MAX_SAFE_INTEGER = 2**53 - 1


def tag(key: str, value: Any) -> dict[str, Any]:
    """A Jaeger tag with its type: string, bool, int64, float64 or binary."""
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        if -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
            return {"key": key, "type": "int64", "value": value}
        return {"key": key, "type": "int64", "value": str(value)}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, dict) and set(value) == {"bytes"}:
        return {"key": key, "type": "binary", "value": value["bytes"]}
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    # Arrays and tagged values: Jaeger has no such type; JSON text, compact as
    # Jaeger writes an OTLP array attribute.
    return {
        "key": key,
        "type": "string",
        "value": json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")),
    }


def span(stored: StoredRecord, process_id: str) -> dict[str, Any]:
    rec = stored.record
    tags = [tag(k, val) for k, val in sorted(rec.attributes.items())]
    tags.append(tag("span.kind", rec.kind.lower()))
    if rec.status != "UNSET":
        tags.append(tag("otel.status_code", rec.status))
    if rec.status == "ERROR":
        tags.append(tag("error", True))
    if rec.status_message:
        tags.append(tag("otel.status_description", rec.status_message))
    if rec.scope:
        tags.append(tag("otel.scope.name", rec.scope))
    tags += [
        tag("otel_audit.proof.chain", stored.chain),
        tag("otel_audit.seq", stored.seq),
        tag("otel_audit.hash", stored.hash.hex()),
    ]
    refs = []
    if rec.parent_span_id:
        refs.append({"refType": "CHILD_OF", "traceID": rec.trace_id, "spanID": rec.parent_span_id})
    refs += [
        {"refType": "FOLLOWS_FROM", "traceID": ln.trace_id, "spanID": ln.span_id}
        for ln in rec.links
    ]
    return {
        "traceID": rec.trace_id,
        "spanID": rec.span_id,
        "operationName": rec.name,
        "references": refs,
        "startTime": rec.start // 1000,
        "duration": max((rec.end - rec.start) // 1000, 0),
        "tags": tags,
        "logs": [
            {
                "timestamp": ev.time // 1000,
                "fields": [tag("event", ev.name)]
                + [tag(k, x) for k, x in sorted(ev.attributes.items())],
            }
            for ev in rec.events
        ],
        "processID": process_id,
        "warnings": None,
        "flags": 1,
    }


def document(records: Iterable[StoredRecord]) -> tuple[dict[str, Any], int]:
    traces: dict[str, dict[str, Any]] = {}
    n = 0
    for stored in records:
        rec = stored.record
        entry = traces.setdefault(
            rec.trace_id, {"traceID": rec.trace_id, "spans": [], "processes": {}, "warnings": None}
        )
        procs: dict[str, Any] = entry["processes"]
        pid = next((p for p, info in procs.items() if info["serviceName"] == rec.service), None)
        if pid is None:
            pid = f"p{len(procs) + 1}"
            procs[pid] = {"serviceName": rec.service, "tags": []}
        entry["spans"].append(span(stored, pid))
        n += 1
    for entry in traces.values():
        entry["spans"].sort(key=lambda s: (s["startTime"], s["spanID"]))
    return {"data": list(traces.values()), "total": 0, "limit": 0, "offset": 0, "errors": None}, n


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    doc, n = document(records)
    json.dump(doc, out, ensure_ascii=False)
    out.write("\n")
    return n
