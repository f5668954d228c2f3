"""The few private parts of the OpenTelemetry SDK and instrumentations otel-audit relies on,
pinned by behaviour: if an SDK release changes one, this file fails, not an audit."""

from __future__ import annotations

from typing import Any

import flask
from opentelemetry import propagate
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler, _get_from_env_or_default

from otel_audit import vocabulary as v
from otel_audit.setup import install_sampler


def test_tracers_made_before_the_sampler_is_wrapped_still_keep_audit_spans():
    # setup.install_sampler updates TracerProvider._tracers (tracers copy the sampler).
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    early = provider.get_tracer("made.before")
    assert early in provider._tracers.values()
    install_sampler(provider)
    span = early.start_span("order.create", attributes={v.EVENT: True})
    assert span.is_recording() and not span.get_span_context().trace_flags.sampled
    span.end()
    assert not early.start_span("ordinary").is_recording()


def test_the_default_sampler_helper_reads_the_environment(monkeypatch):
    # setup.install_sampler wraps the sampler OTEL_TRACES_SAMPLER names when none is set.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert isinstance(_get_from_env_or_default(), Sampler)
    assert _get_from_env_or_default().get_description() == ALWAYS_OFF.get_description()


def test_composite_propagators_list_their_parts():
    # policy.boundary.install_propagator looks inside a CompositePropagator once.
    current = propagate.get_global_textmap()
    composite = CompositePropagator([current])
    assert composite._propagators == [current]


def test_flask_instrumentation_marks_the_apps_it_instrumented():
    # integrations.flask tells instrumented apps from others by this flag.
    app = flask.Flask("pinned")
    FlaskInstrumentor().instrument_app(app)
    try:
        assert app._is_instrumented_by_opentelemetry is True
    finally:
        FlaskInstrumentor().uninstrument_app(app)


def test_the_sdk_configurator_the_zero_code_hook_runs_exists():
    # integrations.auto configures the SDK as opentelemetry-distro does when no distro ran.
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    assert callable(_OTelSDKConfigurator().configure)


def test_the_writer_process_snapshot_reads_what_the_public_properties_return():
    """engine/remote.snapshot reads SDK span fields directly; it must equal the public view."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    from otel_audit.engine.remote import snapshot

    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("contract", "1.0")
    parent = tracer.start_span("parent")
    spans = [parent]
    for kind in SpanKind:
        span = tracer.start_span(
            "child", kind=kind, attributes={"a": 1, "b": ("x", "y"), "c": 0.5},
            links=[Link(parent.get_span_context(), {"l": True})],
            context=__import__("opentelemetry.trace", fromlist=["x"]).set_span_in_context(parent),
        )  # fmt: skip
        span.add_event("e", {"k": "v"})
        span.set_status(Status(StatusCode.ERROR, "boom"))
        spans.append(span)
    bare = tracer.start_span("bare")
    spans.append(bare)
    for span in spans:
        span.end()
        assert snapshot(span) == public_snapshot(span)


def public_snapshot(span: Any) -> tuple[Any, ...]:
    """``snapshot`` through the SDK's public properties only (what the contract test compares)."""
    ctx = span.context
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        format(ctx.trace_id, "032x"),
        ctx.span_id,
        parent.span_id if parent is not None else 0,
        span.name if type(span.name) is str else str(span.name),
        span.kind.value,
        span.start_time or 0,
        span.end_time or 0,
        span.status.status_code.value,
        span.status.description or "",
        dict(span.attributes or {}),
        [[ev.name, ev.timestamp or 0, dict(ev.attributes or ())] for ev in span.events]
        if span.events
        else (),
        [
            [format(ln.context.trace_id, "032x"), ln.context.span_id, dict(ln.attributes or ())]
            for ln in span.links
        ]
        if span.links
        else (),
        scope.name if scope is not None and scope.name else "",
    )
