"""The audit.* attribute vocabulary: a public contract (see docs/design.md).

Every part of otel_audit (processor, policies, exports, Collector routing in
collector-config/) refers to these names through this module, so a rename is
one change here and breaks the tests that pin the contract.
"""

from __future__ import annotations

EVENT = "audit.event"
ACTION = "audit.action"
ACTOR_ID = "audit.actor.id"
ACTOR_TYPE = "audit.actor.type"
ACTOR_ROLES = "audit.actor.roles"
ACTOR_AUTH = "audit.actor.auth"
ACTOR_IP = "audit.actor.ip"
RESOURCE_TYPE = "audit.resource.type"
RESOURCE_ID = "audit.resource.id"
OUTCOME = "audit.outcome"
REASON = "audit.reason"
TRAIL_ID = "audit.trail.id"
EFFECT = "audit.effect"
DATA_CLASSIFICATION = "audit.data.classification"

#: Every attribute name of the vocabulary, in the order of docs/design.md.
ALL = (
    EVENT,
    ACTION,
    ACTOR_ID,
    ACTOR_TYPE,
    ACTOR_ROLES,
    ACTOR_AUTH,
    ACTOR_IP,
    RESOURCE_TYPE,
    RESOURCE_ID,
    OUTCOME,
    REASON,
    TRAIL_ID,
    EFFECT,
    DATA_CLASSIFICATION,
)

# otel-audit's own extensions: not part of the vocabulary of docs/design.md above, but
# names that records, policies and reports rely on all the same.
#: ``true`` on the intent record a ``blocking`` action writes before its body runs.
INTENT = "audit.intent"
#: On a ``boundary.violation`` event: where classified data went, and how.
BOUNDARY_DESTINATION = "audit.boundary.destination"
BOUNDARY_KIND = "audit.boundary.kind"
BOUNDARY_BLOCKED = "audit.boundary.blocked"
BOUNDARY_VIOLATION = "audit.boundary.violation"
BOUNDARY_SPAN_ID = "audit.boundary.span_id"
EXTENSIONS = (
    INTENT,
    BOUNDARY_DESTINATION,
    BOUNDARY_KIND,
    BOUNDARY_BLOCKED,
    BOUNDARY_VIOLATION,
    BOUNDARY_SPAN_ID,
)

#: Attributes that say who acted; only the authenticated server side sets them.
ACTOR_ATTRIBUTES = (ACTOR_ID, ACTOR_TYPE, ACTOR_ROLES, ACTOR_AUTH, ACTOR_IP)

# audit.outcome values
SUCCESS = "success"
FAILURE = "failure"
DENIED = "denied"
UNKNOWN = "unknown"
OUTCOMES = (SUCCESS, FAILURE, DENIED, UNKNOWN)

# audit.actor.type values
ACTOR_USER = "user"
ACTOR_SERVICE = "service"
ACTOR_SYSTEM = "system"
ACTOR_ANONYMOUS = "anonymous"
ACTOR_TYPES = (ACTOR_USER, ACTOR_SERVICE, ACTOR_SYSTEM, ACTOR_ANONYMOUS)

# audit.effect values
DATA_WRITE = "data.write"
DATA_READ = "data.read"
HTTP_CALL = "http.call"
MESSAGE_PUBLISH = "message.publish"
NOTIFICATION = "notification"
EFFECTS = (DATA_WRITE, DATA_READ, HTTP_CALL, MESSAGE_PUBLISH, NOTIFICATION)

#: Effects the default policy keeps in the ledger (reads are traced, not audited).
DEFAULT_KEPT_EFFECTS = frozenset({DATA_WRITE, HTTP_CALL, MESSAGE_PUBLISH, NOTIFICATION})
