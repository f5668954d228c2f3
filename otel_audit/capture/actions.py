"""Audit actions: a span that is an audit record by itself.

``audit_action("order.create", resource=("order", "42"))`` is both a context
manager and a decorator. It starts a span with ``audit.event=true``, the
action, the actor of the context (or one given), the resource; the first
action in a context starts a trail. On exit the outcome is ``success``, or
``failure`` when an exception escapes, or what the code said (``deny``,
``fail``). Fail-closed: when the audit ledger cannot be written the action
refuses to start (``LedgerUnavailable``), and when its record was not
committed the exit raises ``LedgerWriteError``. In ``sync`` durability the
exit waits once for the action's own record and every record of its effects
(the action scope, capture/scope.py); ``async with`` and decorated coroutines
wait without blocking the event loop. Each use is independent, so one
decorated function may run on many threads or tasks at once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_audit import vocabulary as v
from otel_audit.capture.context import (
    Actor,
    _make_actor,
    current_actor,
    current_trail,
    with_actor,
    with_trail,
)
from otel_audit.capture.installed import check_refusal, global_pipeline
from otel_audit.capture.scope import ActionScope, current_scope, random_trail_id, with_scope
from otel_audit.errors import AuditError, CommitUncertain

_log = logging.getLogger("otel_audit")

if TYPE_CHECKING:
    from otel_audit.engine.remote import ProcessWriter
    from otel_audit.engine.writer import LedgerWriter, Ticket
    from otel_audit.setup import AuditPipeline

F = TypeVar("F", bound=Callable[..., Any])


def intent_writer(scope: ActionScope | None) -> LedgerWriter | ProcessWriter:
    assert scope is not None and scope.pipeline is not None
    return scope.pipeline.writer


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
        pipeline: AuditPipeline | None = None,
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
        self._bound_pipeline = pipeline
        self._scope: ActionScope | None = None
        self._ctx: otel_context.Context | None = None
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

    def _find_pipeline(self, ctx: otel_context.Context) -> AuditPipeline | None:
        if self._bound_pipeline is not None:
            return self._bound_pipeline
        scope = current_scope(ctx)
        if scope is not None and scope.pipeline is not None:
            return scope.pipeline
        return global_pipeline()

    def _start(self) -> Ticket | None:
        """Start the span and the scope; the ticket of a ``blocking`` intent, if any."""
        if self._span is not None:
            raise RuntimeError("an AuditAction instance cannot be entered twice; use a new one")
        check_refusal()
        ctx = otel_context.get_current()
        pipeline = self._find_pipeline(ctx)
        if pipeline is not None:
            pipeline.writer.check()  # fail closed before the body runs
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
        tracer = self._tracer or (
            pipeline.tracer if pipeline is not None else trace.get_tracer("otel_audit")
        )
        scope = ActionScope(pipeline, trail or "", 0, parent=current_scope(ctx))
        # Its own record goes in one commit with its effects (thread writer).
        scope.together = pipeline is not None and pipeline.processor.commits_together
        # The scope is in the span's parent context so the processor files the
        # action's own record under it.
        span = tracer.start_span(
            self.name, context=with_scope(scope, ctx), kind=self.kind, attributes=attrs
        )
        span_id = span.get_span_context().span_id
        scope.span_id = span_id
        if trail is None:
            # The first action of a context starts the trail; its id is the
            # span id of that action, so the trail names its origin.
            trail = format(span_id, "016x") if span_id else random_trail_id()
            span.set_attribute(v.TRAIL_ID, trail)
            scope.trail_id = trail
        self._span, self._scope = span, scope
        ctx = trace.set_span_in_context(span, ctx)
        ctx = with_scope(scope, with_trail(trail, ctx))
        if self.actor is not None:
            ctx = with_actor(self.actor, ctx)
        self._ctx = ctx
        try:
            # ``blocking`` durability: the intent is committed before the body runs.
            return pipeline.processor.queue_intent(span) if pipeline is not None else None
        except BaseException as exc:
            self._end(exc)
            raise

    def _end(self, exc: BaseException | None, failure: AuditError | None = None) -> None:
        span, scope = self._span, self._scope
        assert span is not None and scope is not None
        outcome, reason = self._outcome, self._reason
        if exc is None and failure is not None:
            # An effect lost its record: the action must not claim success.
            exc = failure
        if exc is not None:
            if outcome is None or outcome == v.SUCCESS:
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
        scope.close()
        span.end()

    def __enter__(self) -> AuditAction:
        intent = self._start()
        if intent is not None:
            try:
                intent.wait(intent_writer(self._scope))
            except BaseException as exc:
                self._end(exc)
                if self._scope is not None:
                    self._scope.settle()
                raise
        assert self._ctx is not None
        self._token = otel_context.attach(self._ctx)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        scope = self._detach()
        if scope.together:
            # The own record is queued after the effects still pending and
            # committed with them (never without them): one wait for all.
            self._end(exc, scope.known_failure())
            try:
                failure = scope.settle()
            except BaseException:  # KeyboardInterrupt in the wait: its records still commit
                record_lost_later(scope, self._span)
                raise
            if failure is not None:
                record_lost(scope, self._span, failure)
                scope.propagate(failure)
                raise failure
            return
        try:
            failure = scope.settle()  # the effects' records, all at once
        except BaseException as interrupted:  # KeyboardInterrupt in the wait: still recorded
            self._end(exc if exc is not None else interrupted)
            raise
        self._end(exc, failure)
        failure = scope.settle()  # then the action's own record
        if failure is not None:
            scope.propagate(failure)
            raise failure

    async def __aenter__(self) -> AuditAction:
        intent = self._start()
        if intent is not None:
            scope = self._scope
            assert scope is not None
            scope.add_ticket(intent_writer(scope), intent)
            failure = await scope.settle_async()
            if failure is not None:
                self._end(failure)
                await scope.settle_async()
                raise failure
        assert self._ctx is not None
        self._token = otel_context.attach(self._ctx)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        scope = self._detach()
        if isinstance(exc, GeneratorExit):
            # Closed while suspended (an abandoned coroutine): it may not await.
            # Recorded as it ends; nobody will wait for its records (queued
            # lazily, for a waiter), so the writer is woken for them now.
            self._end(exc)
            if scope.pipeline is not None:
                scope.pipeline.writer.wake()
            return
        if scope.together:
            self._end(exc, scope.known_failure())  # see __exit__
            try:
                failure = await scope.settle_async()
            except BaseException:
                # Cancelled while it waits: its records still commit (or fail).
                record_lost_later(scope, self._span)
                raise
            if failure is not None:
                if scope.own_record_lost():
                    await asyncio.to_thread(record_lost, scope, self._span, failure)
                scope.propagate(failure)
                raise failure
            return
        try:
            failure = await scope.settle_async()
        except BaseException as interrupted:  # cancelled while waiting: still recorded
            self._end(exc if exc is not None else interrupted)
            raise
        self._end(exc, failure)
        failure = await scope.settle_async()
        if failure is not None:
            scope.propagate(failure)
            raise failure

    def _detach(self) -> ActionScope:
        assert self._span is not None and self._scope is not None
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        return self._scope

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
            pipeline=self._bound_pipeline,
        )

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with self._fresh():
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


audit_action = AuditAction


def record_lost(scope: ActionScope, span: Any, failure: AuditError) -> None:
    """After a failed commit of an action's effects and own record: when its own
    record was not written (refused without its effects, or failed with them),
    write it now with outcome ``failure``, so the ledger says the action failed.
    If that fails too (the ledger is down), it is logged; the action raises anyway."""
    pipeline = scope.pipeline
    if pipeline is None or span is None or not scope.own_record_lost():
        return
    for attempt in (1, 2):
        try:
            pipeline.processor.write_lost(span, failure)
            return
        except CommitUncertain:
            return  # written, unconfirmed: never a second copy
        except AuditError as exc:
            # Once more, in a commit of its own: under group commit another
            # action's refused record may have failed the first one's batch.
            if attempt == 2:
                _log.error(
                    "otel-audit: the failure of action %r not recorded either: %s", span.name, exc
                )


def record_lost_later(scope: ActionScope, span: Any) -> None:
    """``record_lost`` once the action's own record is answered, when nobody waits
    for it any more (the waiting task was cancelled): on a thread of its own,
    since the answer comes on the writer's thread, which must not wait."""
    ticket = scope.own_ticket
    if ticket is None:
        return

    def answered(done: Any) -> None:
        if scope.own_record_lost():
            error = done.error
            threading.Thread(
                target=record_lost, args=(scope, span, error), name="otel-audit-lost", daemon=True
            ).start()

    ticket.add_callback(answered)
