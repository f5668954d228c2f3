"""Trail and actor in the OpenTelemetry context.

The trail id rides in the context under a private key and in W3C baggage
(``audit.trail.id``) so propagators carry it to other services; a receiving
process continues it only from peers it trusts (``continue_trail``). The actor
rides in the context for this process; it is also put in baggage for
downstream services, which accept it only from peers their operator trusts
(docs/design.md, rule 3): nothing here ever *reads* an actor from baggage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from otel_audit import vocabulary as v

_TRAIL_KEY = otel_context.create_key("otel_audit.review.trail")
_ACTOR_KEY = otel_context.create_key("otel_audit.actor")
# For the processor, which reads all three keys from one context lookup.
TRAIL_KEY, ACTOR_KEY = _TRAIL_KEY, _ACTOR_KEY

# A trail id that arrived in baggage is input from the network: accept only a
# short token, so a hostile header cannot stuff arbitrary text into every span.
_TRAIL_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class Actor:
    """Who acts: an authenticated id and how we know it. Immutable."""

    id: str
    type: str = v.ACTOR_USER
    roles: tuple[str, ...] = ()
    auth: str | None = None
    ip: str | None = None

    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {v.ACTOR_ID: self.id, v.ACTOR_TYPE: self.type}
        if self.roles:
            out[v.ACTOR_ROLES] = list(self.roles)
        if self.auth:
            out[v.ACTOR_AUTH] = self.auth
        if self.ip:
            out[v.ACTOR_IP] = self.ip
        return out


def valid_trail_id(value: object) -> bool:
    return isinstance(value, str) and bool(_TRAIL_ID.match(value))


def current_trail(ctx: Context | None = None) -> str | None:
    """The trail id of ``ctx`` (default: the current context), or None.

    Only a trail this process started or chose to continue (``continue_trail``):
    an ``audit.trail.id`` that merely arrived in inbound baggage is not one, or
    any client could graft its actions onto another user's trail.
    """
    trail = otel_context.get_value(_TRAIL_KEY, ctx)
    return None if trail is None else str(trail)


def continue_trail(ctx: Context | None = None) -> Context:
    """``ctx`` (default: current) continuing the trail its inbound baggage names.

    Call it only for a context that came from a peer the application trusts
    (the Flask integration does, for ``OTEL_AUDIT_TRUSTED_PEERS``); an absent
    or malformed trail id leaves ``ctx`` as it is.
    """
    carried = baggage.get_baggage(v.TRAIL_ID, ctx)
    if isinstance(carried, str) and valid_trail_id(carried):
        return with_trail(carried, ctx)
    return ctx if ctx is not None else otel_context.get_current()


def current_actor(ctx: Context | None = None) -> Actor | None:
    """The actor set in ``ctx`` by this process (never from inbound baggage)."""
    actor = otel_context.get_value(_ACTOR_KEY, ctx)
    return actor if isinstance(actor, Actor) else None


def with_trail(trail_id: str, ctx: Context | None = None) -> Context:
    """A context carrying ``trail_id`` locally and in baggage."""
    ctx = otel_context.set_value(_TRAIL_KEY, trail_id, ctx)
    return baggage.set_baggage(v.TRAIL_ID, trail_id, ctx)


def with_actor(actor: Actor, ctx: Context | None = None) -> Context:
    """A context carrying ``actor`` locally and its id/type in baggage for trusted peers."""
    ctx = otel_context.set_value(_ACTOR_KEY, actor, ctx)
    ctx = baggage.set_baggage(v.ACTOR_ID, actor.id, ctx)
    return baggage.set_baggage(v.ACTOR_TYPE, actor.type, ctx)


def _make_actor(
    actor_id: str | Actor,
    actor_type: str,
    roles: Sequence[str] | None,
    auth: str | None,
    ip: str | None,
) -> Actor:
    if isinstance(actor_id, Actor):
        return actor_id
    if not isinstance(actor_id, str) or not actor_id:
        raise ValueError("actor id must be a non-empty string")
    if actor_type not in v.ACTOR_TYPES:
        raise ValueError(f"actor type must be one of {', '.join(v.ACTOR_TYPES)}")
    return Actor(actor_id, actor_type, tuple(roles or ()), auth, ip)


def set_actor(
    actor_id: str | Actor,
    actor_type: str = v.ACTOR_USER,
    *,
    roles: Sequence[str] | None = None,
    auth: str | None = None,
    ip: str | None = None,
) -> object:
    """Make ``actor_id`` the actor of the current context; returns a token for ``reset_actor``.

    Call it once per request or job, after authentication: every audit action
    and span started below it inherits the actor.
    """
    actor = _make_actor(actor_id, actor_type, roles, auth, ip)
    return otel_context.attach(with_actor(actor))


def reset_actor(token: object) -> None:
    """Undo a ``set_actor`` (pass the token it returned)."""
    otel_context.detach(token)  # type: ignore[arg-type]


@contextmanager
def actor(
    actor_id: str | Actor,
    actor_type: str = v.ACTOR_USER,
    *,
    roles: Sequence[str] | None = None,
    auth: str | None = None,
    ip: str | None = None,
) -> Iterator[Actor]:
    """``with actor("alice"):`` sets the actor for the block."""
    value = _make_actor(actor_id, actor_type, roles, auth, ip)
    token = otel_context.attach(with_actor(value))
    try:
        yield value
    finally:
        otel_context.detach(token)
