"""Audit actions: a span that is an audit record by itself.

``audit_action("order.create", resource=("order", "42"))`` is both a context
manager and a decorator. It starts a span with ``audit.event=true``, the
action, the actor of the context (or one given), the resource; the first
action in a context starts a trail. On exit the outcome is ``success``, or
``failure`` when an exception escapes, or what the code said (``deny``,
``fail``). Fail-closed: when the audit ledger cannot be written the action
refuses to start (``LedgerUnavailable``), and when its record was not
committed the exit raises ``LedgerWriteError``. Each use is independent, so
one decorated function may run on many threads at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_audit import _state
from otel_audit import vocabulary as v
from otel_audit.capture.context import (
    Actor,
    _make_actor,
    current_actor,
    current_trail,
    with_actor,
    with_trail,
)
from otel_audit.capture.processor import take_failure
from otel_audit.policy.rules import write_intent

F = TypeVar("F", bound=Callable[..., Any])


class AuditAction:
    """One audited user action; see the module docstring."""

    def __init__(
        self,
        action: str,
        *,
        resource: tuple[str, str] | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
        actor: str | Actor | None = None,
        actor_type: str = v.ACTOR_USER,
        roles: Sequence[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        name: str | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if not isinstance(action, str) or not action:
            raise ValueError("action must be a non-empty string such as 'order.create'")
        if resource is not None:
            resource_type, resource_id = resource
        self.action = action
        self.resource_type = resource_type
        self.resource_id = None if resource_id is None else str(resource_id)
        self.actor = (
            _make_actor(actor, actor_type, roles, None, None) if actor is not None else None
        )
        self.attributes = dict(attributes or {})
        self.name = name or action
        self.kind = kind
        self._tracer = tracer
        self._outcome: str | None = None
        self._reason: str | None = None
        self._span: trace.Span | None = None
        self._trail: str | None = None
        self._token: object | None = None

    # -- what the code says ----------------------------------------------

    def deny(self, reason: str | None = None) -> None:
        """Record the action as denied (e.g. the actor lacks a role)."""
        self.set_outcome(v.DENIED, reason)

    def fail(self, reason: str | None = None) -> None:
        """Record the action as failed without raising."""
        self.set_outcome(v.FAILURE, reason)

    def set_outcome(self, outcome: str, reason: str | None = None) -> None:
        if outcome not in v.OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(v.OUTCOMES)}")
        self._outcome = outcome
        if reason is not None:
            self._reason = reason

    def set_resource(self, resource_type: str, resource_id: str | int) -> None:
        self.resource_type, self.resource_id = resource_type, str(resource_id)
        if self._span is not None:
            self._span.set_attribute(v.RESOURCE_TYPE, resource_type)
            self._span.set_attribute(v.RESOURCE_ID, str(resource_id))

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value
        if self._span is not None:
            self._span.set_attribute(key, value)

    @property
    def span(self) -> trace.Span | None:
        return self._span

    @property
    def trail_id(self) -> str | None:
        return current_trail() if self._span is not None else None

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> AuditAction:
        if self._span is not None:
            raise RuntimeError("an AuditAction instance cannot be entered twice; use a new one")
        _state.check_healthy()
        ctx = otel_context.get_current()
        trail = current_trail(ctx)
        actor = self.actor or current_actor(ctx)
        attrs: dict[str, Any] = dict(self.attributes)
        attrs[v.EVENT] = True
        attrs[v.ACTION] = self.action
        if actor is not None:
            attrs.update(actor.attributes())
        else:
            attrs.setdefault(v.ACTOR_TYPE, v.ACTOR_ANONYMOUS)
        if self.resource_type is not None:
            attrs[v.RESOURCE_TYPE] = self.resource_type
        if self.resource_id is not None:
            attrs[v.RESOURCE_ID] = self.resource_id
        if trail is not None:
            attrs[v.TRAIL_ID] = trail
        tracer = self._tracer or _state.tracer()
        span = tracer.start_span(self.name, context=ctx, kind=self.kind, attributes=attrs)
        if trail is None:
            # The first action of a context starts the trail; its id is the
            # span id of that action, so the trail names its origin.
            span_id = span.get_span_context().span_id
            trail = format(span_id, "016x") if span_id else _state.random_trail_id()
            span.set_attribute(v.TRAIL_ID, trail)
        self._trail = trail
        try:
            # ``blocking`` durability: the intent is committed before the body runs.
            write_intent(span)
        except BaseException as exc:
            span.set_attribute(v.OUTCOME, v.FAILURE)
            span.set_attribute(v.REASON, type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            take_failure(span.get_span_context().span_id)
            raise
        ctx = trace.set_span_in_context(span, ctx)
        ctx = with_trail(trail, ctx)
        if self.actor is not None:
            ctx = with_actor(self.actor, ctx)
        self._span = span
        self._token = otel_context.attach(ctx)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span = self._span
        assert span is not None
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        outcome, reason = self._outcome, self._reason
        if exc is not None:
            if outcome is None:
                outcome = v.FAILURE if isinstance(exc, Exception) else v.UNKNOWN
            if reason is None:
                # The type, not the message: messages often carry values that
                # must not reach the ledger unredacted.
                reason = type(exc).__name__
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        elif outcome is None:
            outcome = v.SUCCESS
        elif outcome == v.FAILURE:
            span.set_status(Status(StatusCode.ERROR, reason or "failure"))
        span.set_attribute(v.OUTCOME, outcome)
        if reason:
            span.set_attribute(v.REASON, reason)
        span.end()
        failure = take_failure(span.get_span_context().span_id, self._trail)
        if failure is not None:
            raise failure

    # -- decorator -----------------------------------------------------------

    def _fresh(self) -> AuditAction:
        return AuditAction(
            self.action,
            resource_type=self.resource_type,
            resource_id=self.resource_id,
            actor=self.actor,
            attributes=self.attributes,
            name=self.name,
            kind=self.kind,
            tracer=self._tracer,
        )

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


audit_action = AuditAction
