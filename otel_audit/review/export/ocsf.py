"""OCSF 1.5.0 events, one JSON object per line, with the ``trace`` profile.

* a user action (``audit.event``) -> API Activity (class 6003): ``api.operation``
  is the action, ``actor.user`` the actor, ``resources`` the resource;
* a data effect (``data.write``/``data.read``) -> Datastore Activity (6005),
  the table or database as its target;
* an outbound call (``http.call``) -> HTTP Activity (4002);
* a login or logout (an action whose last word is ``login``/``signin``/``logon``
  or ``logout``/``signout``/``logoff``, e.g. ``user.login``) -> Authentication
  (3002), activity Logon or Logoff, ``user`` the user who logged in or out
  (``Unknown`` for a failed login: who tried is not known);
* other effects (message publish, notification) -> API Activity, activity Other.

Every event carries ``trace`` (trace id, span id, parent, service; under
``unmapped.trace`` for Datastore Activity, which OCSF does not let take the
trace profile), the record's
place in the ledger as ``metadata.uid`` (``chain:seq``) and ``metadata.sequence``,
the trail id as ``metadata.correlation_uid``, and the audit attributes under
``unmapped`` (Datastore Activity and Authentication do not take the trace
profile either: their ids ride in ``unmapped.trace``). Times are Unix milliseconds (OCSF ``timestamp_t``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import StoredRecord
from otel_audit.engine.record import Record
from otel_audit.review.export.jsonl import write_lines
from otel_audit.semantics.effects import sql_operation

NAME = "ocsf"
OCSF_VERSION = "1.5.0"

API_ACTIVITY = 6003
DATASTORE_ACTIVITY = 6005
HTTP_ACTIVITY = 4002
AUTHENTICATION = 3002
_CATEGORY = {API_ACTIVITY: 6, DATASTORE_ACTIVITY: 6, HTTP_ACTIVITY: 4, AUTHENTICATION: 3}
_CLASS_NAME = {
    API_ACTIVITY: "API Activity",
    DATASTORE_ACTIVITY: "Datastore Activity",
    HTTP_ACTIVITY: "HTTP Activity",
    AUTHENTICATION: "Authentication",
}
_CATEGORY_NAME = {
    6: "Application Activity",
    4: "Network Activity",
    3: "Identity & Access Management",
}
# Authentication: 1 Logon, 2 Logoff; by the last word of the action.
_AUTH_WORDS = {
    "login": 1, "signin": 1, "logon": 1, "log_in": 1, "sign_in": 1,
    "logout": 2, "signout": 2, "logoff": 2, "log_out": 2, "sign_out": 2,
}  # fmt: skip
_AUTH_NAMES = {1: "Logon", 2: "Logoff"}

# API Activity: 1 Create, 2 Read, 3 Update, 4 Delete, 99 Other.
_API_VERBS = {
    "create": 1, "add": 1, "insert": 1, "new": 1, "register": 1,
    "read": 2, "get": 2, "view": 2, "show": 2, "list": 2, "search": 2, "export": 2, "download": 2,
    "update": 3, "edit": 3, "set": 3, "change": 3, "modify": 3, "patch": 3, "cancel": 3,
    "delete": 4, "remove": 4, "destroy": 4, "purge": 4,
}  # fmt: skip
_API_NAMES = {0: "Unknown", 1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
# Datastore Activity: 1 Read, 2 Update, 4 Query, 5 Write, 6 Create, 7 Delete.
_DS_SQL = {"SELECT": 4, "UPDATE": 2, "INSERT": 6, "DELETE": 7, "DROP": 7, "TRUNCATE": 7}
_DS_NAMES = {1: "Read", 2: "Update", 4: "Query", 5: "Write", 6: "Create", 7: "Delete"}
# HTTP Activity: 1 Connect, 2 Delete, 3 Get, 4 Head, 5 Options, 6 Post, 7 Put, 8 Trace, 99 Other.
_HTTP = {
    "CONNECT": 1,
    "DELETE": 2,
    "GET": 3,
    "HEAD": 4,
    "OPTIONS": 5,
    "POST": 6,
    "PUT": 7,
    "TRACE": 8,
}
# OCSF user.type_id: 1 User, 3 System, 99 Other.
_USER_TYPE = {
    v.ACTOR_USER: (1, "User"),
    v.ACTOR_SYSTEM: (3, "System"),
    v.ACTOR_SERVICE: (99, "Service"),
}
# status_id: 1 Success, 2 Failure, 0 Unknown.
_STATUS = {v.SUCCESS: (1, "Success"), v.FAILURE: (2, "Failure"), v.DENIED: (2, "Failure")}


def _ms(ns: int) -> int:
    return ns // 1_000_000


def _api_activity(action: str) -> int:
    for word in action.lower().replace("_", ".").replace("-", ".").replace("/", ".").split("."):
        if word in _API_VERBS:
            return _API_VERBS[word]
    return 99


def _auth_activity(action: Any) -> int | None:
    """Logon (1) / Logoff (2) for a login or logout action, else None."""
    if not isinstance(action, str) or not action:
        return None
    return _AUTH_WORDS.get(action.lower().replace("-", "_").rsplit(".", 1)[-1])


def _user(rec: Record) -> dict[str, Any]:
    actor = _actor(rec).get("user")
    return actor if actor is not None else {"name": "unknown", "type_id": 0, "type": "Unknown"}


def _actor(rec: Record) -> dict[str, Any]:
    a = rec.attributes
    actor_id = a.get(v.ACTOR_ID)
    if actor_id:
        type_id, type_name = _USER_TYPE.get(str(a.get(v.ACTOR_TYPE)), (0, "Unknown"))
        user: dict[str, Any] = {
            "uid": str(actor_id),
            "name": str(actor_id),
            "type_id": type_id,
            "type": type_name,
        }
        if a.get(v.ACTOR_ROLES):
            user["groups"] = [{"name": str(r)} for r in a[v.ACTOR_ROLES]]
        return {"user": user, "app_name": rec.service}
    return {"app_name": rec.service}


def _src_endpoint(rec: Record) -> dict[str, Any]:
    ip = rec.attributes.get(v.ACTOR_IP) or rec.attributes.get("client.address")
    if ip:
        return {"ip": str(ip), "svc_name": rec.service}
    return {"svc_name": rec.service}


def event(stored: StoredRecord) -> dict[str, Any]:
    """The OCSF event of one record."""
    rec = stored.record
    a = rec.attributes
    effect = a.get(v.EFFECT)
    outcome = stored.outcome  # the one derivation ('unknown' for an unconcluded intent)
    body: dict[str, Any] = {}
    if effect in (v.DATA_WRITE, v.DATA_READ) and not a.get(v.EVENT):
        class_uid = DATASTORE_ACTIVITY
        op = sql_operation(a, rec.name) or ""
        activity = _DS_SQL.get(op, 5 if effect == v.DATA_WRITE else 1)
        activity_name = _DS_NAMES[activity]
        table = a.get("db.collection.name") or a.get("db.sql.table")
        database = a.get("db.namespace") or a.get("db.name") or a.get("db.system")
        if table:
            body["table"] = {"name": str(table)}
            body["type_id"], body["type"] = 3, "Table"
        else:
            body["database"] = {
                "name": str(database or rec.name),
                "type_id": 99,
                "type": str(a.get("db.system") or "Other"),
            }
            body["type_id"], body["type"] = 1, "Database"
        statement = a.get("db.query.text") or a.get("db.statement")
        if statement:
            body["query_info"] = {"query_string": str(statement), "name": rec.name}
        body["actor"] = _actor(rec)
        body["src_endpoint"] = _src_endpoint(rec)
    elif effect == v.HTTP_CALL and not a.get(v.EVENT):
        class_uid = HTTP_ACTIVITY
        method = str(a.get("http.request.method") or a.get("http.method") or "").upper()
        activity = _HTTP.get(method, 99)
        activity_name = method.title() if activity != 99 else "Other"
        host = a.get("server.address") or a.get("net.peer.name")
        request: dict[str, Any] = {"http_method": method or "UNKNOWN"}
        # OCSF's url object needs a url_string or a path; without either it is left out.
        full, path = (
            a.get("url.full") or a.get("http.url"),
            a.get("url.path") or a.get("http.target"),
        )
        if full or path:
            url: dict[str, Any] = {"url_string": str(full)} if full else {"path": str(path)}
            if host:
                url["hostname"] = str(host)
            request["url"] = url
        body["http_request"] = request
        code = a.get("http.response.status_code") or a.get("http.status_code")
        if isinstance(code, int):
            body["http_response"] = {"code": code}
        if host:
            body["dst_endpoint"] = {"hostname": str(host), "svc_name": str(host)}
        body["src_endpoint"] = _src_endpoint(rec)
        body["app_name"] = rec.service  # HTTP Activity has no actor: who acted is in unmapped
    elif a.get(v.EVENT) and _auth_activity(a.get(v.ACTION)) is not None:
        class_uid = AUTHENTICATION
        activity = _auth_activity(a.get(v.ACTION)) or 1
        activity_name = _AUTH_NAMES[activity]
        body["user"] = _user(rec)
        body["service"] = {"name": rec.service}
        body["src_endpoint"] = _src_endpoint(rec)
        body["is_remote"] = True
        if a.get(v.ACTOR_AUTH):
            body["auth_protocol"] = str(a[v.ACTOR_AUTH])
            body["auth_protocol_id"] = 99
    else:
        class_uid = API_ACTIVITY
        action = str(a.get(v.ACTION) or effect or rec.name)
        activity = _api_activity(action) if a.get(v.ACTION) else 99
        activity_name = _API_NAMES[activity]
        body["api"] = {"operation": action, "service": {"name": rec.service}}
        body["actor"] = _actor(rec)
        body["src_endpoint"] = _src_endpoint(rec)
        rtype, rid = a.get(v.RESOURCE_TYPE), a.get(v.RESOURCE_ID)
        if rtype or rid:
            res: dict[str, Any] = {}
            if rtype:
                res["type"] = str(rtype)
            res["uid" if rid else "name"] = str(rid or rtype)
            if a.get(v.DATA_CLASSIFICATION):
                res["labels"] = [f"classification:{a[v.DATA_CLASSIFICATION]}"]
            body["resources"] = [res]
    category = _CATEGORY[class_uid]
    status_id, status = _STATUS.get(str(outcome), (0, "Unknown"))
    span: dict[str, Any] = {
        "uid": rec.span_id,
        "start_time": _ms(rec.start),
        "end_time": _ms(rec.end),
        "duration": max(_ms(rec.end - rec.start), 0),
        "operation": rec.name,
        "service": {"name": rec.service},
    }
    if rec.parent_span_id:
        span["parent_uid"] = rec.parent_span_id
    if rec.status != "UNSET":
        span["status_code"] = rec.status
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": "otel-audit", "vendor_name": "otel-audit"},
        "profiles": ["trace"],
        "uid": f"{stored.chain}:{stored.seq}",
        "sequence": stored.seq,
        "log_name": stored.chain,
        "original_time": str(rec.start),
    }
    if a.get(v.TRAIL_ID):
        metadata["correlation_uid"] = str(a[v.TRAIL_ID])
    out: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": _CLASS_NAME[class_uid],
        "category_uid": category,
        "category_name": _CATEGORY_NAME[category],
        "activity_id": activity,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity,
        "type_name": f"{_CLASS_NAME[class_uid]}: {activity_name}",
        "time": _ms(rec.start),
        "start_time": _ms(rec.start),
        "end_time": _ms(rec.end),
        "duration": max(_ms(rec.end - rec.start), 0),
        "severity_id": 1,
        "severity": "Informational",
        "status_id": status_id,
        "status": status,
        "metadata": metadata,
        "trace": {"uid": rec.trace_id, "span": span, "service": {"name": rec.service}},
        "unmapped": {
            "otel_audit": {"chain": stored.chain, "seq": stored.seq, "hash": stored.hash.hex()},
            "attributes": a,
        },
    }
    if class_uid in (DATASTORE_ACTIVITY, AUTHENTICATION):
        # Datastore Activity and Authentication do not take the trace profile (OCSF 1.5-1.8):
        # the ids ride in ``unmapped`` instead, under the same names.
        out["unmapped"]["trace"] = out.pop("trace")
        metadata["profiles"] = []
    if outcome:
        out["status_code"] = str(outcome)
    if a.get(v.REASON):
        out["status_detail"] = str(a[v.REASON])
    out.update(body)
    return out


def write(records: Iterable[StoredRecord], out: TextIO) -> int:
    return write_lines(records, out, event)
