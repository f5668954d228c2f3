"""DMTF CADF (DSP0262) events, one JSON object per line.

Each record is an ``activity`` event: ``initiator`` is the actor,
``target`` the resource (or the data store / peer of an effect), ``observer``
the service that recorded it, ``action`` and ``outcome`` from the CADF
taxonomies. Identifiers are UUIDs derived from stable values (record hash,
actor id, resource), so the same record exports to the same event every time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, TextIO

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import StoredRecord
from otel_audit.engine.record import Record
from otel_audit.review.export.jsonl import write_lines
from otel_audit.semantics.effects import sql_operation

NAME = "cadf"

TYPE_URI_EVENT = "http://schemas.dmtf.org/cloud/audit/1.0/event"
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/otel-audit")

# First matching word of the action (split on . _ - /) -> CADF action taxonomy.
_VERBS = {
    "create": "create", "add": "create", "insert": "create", "new": "create", "register": "create",
    "read": "read", "get": "read", "view": "read", "show": "read", "export": "read",
    "download": "read", "list": "read/list", "search": "read/list", "query": "read/list",
    "update": "update", "edit": "update", "set": "update", "change": "update", "modify": "update",
    "patch": "update", "put": "update", "cancel": "update", "approve": "update",
    "delete": "delete", "remove": "delete", "destroy": "delete", "purge": "delete",
    "login": "authenticate/login", "signin": "authenticate/login", "logout": "authenticate",
    "authenticate": "authenticate", "grant": "allow", "allow": "allow", "revoke": "revoke",
    "deny": "deny", "send": "send", "publish": "send", "notify": "notify", "start": "start",
    "stop": "stop", "deploy": "deploy", "configure": "configure", "backup": "backup",
    "restore": "restore", "enable": "enable", "disable": "disable",
}  # fmt: skip
_EFFECT_ACTION = {
    v.DATA_READ: "read",
    v.HTTP_CALL: "send",
    v.MESSAGE_PUBLISH: "send",
    v.NOTIFICATION: "notify",
}
_SQL_ACTION = {"INSERT": "create", "DELETE": "delete", "DROP": "delete", "TRUNCATE": "delete"}
_ACTOR_TYPE = {
    v.ACTOR_USER: "data/security/account/user",
    v.ACTOR_SERVICE: "service",
    v.ACTOR_SYSTEM: "service",
}
_OUTCOME = {v.SUCCESS: "success", v.FAILURE: "failure", v.DENIED: "failure"}


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "\x1f".join(parts)))


def _time(ns: int) -> str:
    # CADF timestamps: ISO 8601 with microseconds and a numeric offset (pycadf's format).
    dt = datetime.fromtimestamp(ns // 1000 / 1e6, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def action_of(rec: Record) -> str:
    """The CADF action taxonomy term for a record."""
    a = rec.attributes
    effect = a.get(v.EFFECT)
    if effect == v.DATA_WRITE:
        return _SQL_ACTION.get(sql_operation(a, rec.name) or "", "update")
    if isinstance(effect, str) and effect in _EFFECT_ACTION:
        return _EFFECT_ACTION[effect]
    action = str(a.get(v.ACTION) or rec.name).lower()
    for word in action.replace("_", ".").replace("-", ".").replace("/", ".").split("."):
        if word in _VERBS:
            return _VERBS[word]
    return "unknown"


def _target(rec: Record) -> dict[str, Any]:
    a = rec.attributes
    rtype, rid = a.get(v.RESOURCE_TYPE), a.get(v.RESOURCE_ID)
    effect = a.get(v.EFFECT)
    if rtype or rid:
        name = " ".join(str(x) for x in (rtype, rid) if x)
        return {
            "typeURI": f"data/{rtype or 'unknown'}",
            "id": _uid("resource", str(rtype), str(rid)),
            "name": name,
        }
    if effect in (v.DATA_WRITE, v.DATA_READ):
        table = (
            a.get("db.collection.name")
            or a.get("db.sql.table")
            or a.get("db.namespace")
            or a.get("db.name")
        )
        name = str(table or a.get("db.system") or rec.name)
        return {"typeURI": "data/database/table", "id": _uid("table", name), "name": name}
    peer = a.get("server.address") or a.get("net.peer.name") or a.get("messaging.destination.name")
    if peer:
        return {"typeURI": "service", "id": _uid("peer", str(peer)), "name": str(peer)}
    return {"typeURI": "unknown", "id": _uid("operation", rec.service, rec.name), "name": rec.name}


def event(stored: StoredRecord) -> dict[str, Any]:
    """The CADF event of one record."""
    rec = stored.record
    a = rec.attributes
    actor_id = a.get(v.ACTOR_ID)
    actor_type = a.get(v.ACTOR_TYPE)
    if actor_id:
        initiator: dict[str, Any] = {
            "typeURI": _ACTOR_TYPE.get(str(actor_type), "unknown"),
            "id": _uid("actor", str(actor_id)),
            "name": str(actor_id),
        }
        ip = a.get(v.ACTOR_IP)
        if ip:
            initiator["host"] = {"address": str(ip)}
    else:
        who = str(actor_type or "anonymous")
        initiator = {"typeURI": "unknown", "id": _uid("actor-type", who), "name": who}
    outcome = stored.outcome
    out: dict[str, Any] = {
        "typeURI": TYPE_URI_EVENT,
        "eventType": "activity",
        "id": _uid("record", stored.chain, str(stored.seq), stored.hash.hex()),
        "eventTime": _time(rec.start),
        "action": action_of(rec),
        "outcome": _OUTCOME.get(str(outcome), "unknown"),
        "name": str(a.get(v.ACTION) or a.get(v.EFFECT) or rec.name),
        "initiator": initiator,
        "target": _target(rec),
        "observer": {"typeURI": "service", "id": _uid("service", rec.service), "name": rec.service},
        "severity": "normal",
        "tags": [
            f"trace_id?value={rec.trace_id}",
            f"span_id?value={rec.span_id}",
            f"ledger?value={stored.chain}:{stored.seq}",
        ],
        "attachments": [
            {
                "typeURI": "application/json",
                "name": "otel-audit-record",
                "content": {"chain": stored.chain, "seq": stored.seq, "hash": stored.hash.hex(),
                            "attributes": a},
            }
        ],
    }  # fmt: skip
    if a.get(v.TRAIL_ID):
        out["tags"].append(f"trail_id?value={a[v.TRAIL_ID]}")
    if outcome in (v.DENIED, v.FAILURE) or a.get(v.REASON):
        out["reason"] = {
            "reasonType": "otel-audit/outcome",
            "reasonCode": str(a.get(v.REASON) or outcome),
        }
        if outcome == v.DENIED:
            out["reason"]["policyType"] = "otel-audit/denied"
    return out


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    return write_lines(records, out, event)
