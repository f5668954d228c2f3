"""The processor's fast path gives the bytes of the composed path, whatever the span holds.

``AuditPolicy.encode_span`` (``Redactor.span_body``) builds, redacts and
encodes a record in one pass; the composed path (``record_from_span``, then
``AuditPolicy.apply``, then ``encode``) is the definition. Every span here,
from the shared record vectors, the secrets the attack tests leak, and
generated ones (hostile values, secrets in every place a record keeps text,
names redacted themselves, floats, surrogates, long values), must give the
same bytes on both. The direct reads of SDK spans (``span_attributes``) must
give what the span's properties give.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from otel_audit import vocabulary as v
from otel_audit.capture.decision import Decision
from otel_audit.engine.record import (
    Record,
    encode,
    encode_reference,
    new_record,
    record_from_span,
    span_attributes,
)
from otel_audit.policy.redact import AttributeRule, HmacKey, Redactor, ValueRule
from otel_audit.policy.rules import AuditPolicy
from tests import test_secrets as attacks
from tests.test_record_vectors import VECTORS, span_of, typed

FULL = Decision("full")
METADATA = Decision("metadata")


def composed(policy: AuditPolicy, span: Any, service: str, extra: dict[str, Any], d: Decision):
    return encode(policy.apply(record_from_span(span, service, dict(extra)), d))


def both(policy: AuditPolicy, span: Any, service: str = "shop", extra=None, d=FULL) -> bytes:
    """The bytes of the composed path, checked equal to the fast path's."""
    extra = extra or {}
    expected = composed(policy, span, service, extra, d)
    for _ in ("cold", "warm"):  # the second time with the redactor's caches filled
        assert policy.encode_span(span, service, dict(extra), d) == expected
    return expected


def configured() -> AuditPolicy:
    import re

    rules = [AttributeRule("user.email", "hmac"), AttributeRule("app.drop*", "drop"),
             AttributeRule("app.mask", "mask")]  # fmt: skip
    redactor = Redactor(rules, [ValueRule(re.compile(r"\b\d{3}-\d{2}-\d{4}\b"))],
                        HmacKey(b"0123456789abcdef0123456789abcdef"))  # fmt: skip
    return AuditPolicy(redactor=redactor)


POLICIES = {"default": AuditPolicy, "configured": configured}


def sdk_span(
    name: str = "order.update",
    attributes: dict[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    status: Status | None = None,
    events: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
    links: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> ReadableSpan:
    """A finished span made by the real SDK, as on_end receives it."""
    provider = TracerProvider(shutdown_on_exit=False)
    tracer = provider.get_tracer("test.scope")
    other = tracer.start_span("other")
    other.end()
    span_links = [Link(other.get_span_context(), attrs) for attrs in links]
    span = tracer.start_span(name, kind=kind, attributes=attributes, links=span_links)
    for event_name, event_attrs in events:
        span.add_event(event_name, event_attrs)
    if status is not None:
        span.set_status(status)
    span.end()
    return span._readable_span()  # what the SDK hands every processor's on_end


# -- the fast path is taken, and gives the composed bytes ------------------------------


AUDIT_ATTRS = {
    v.EVENT: True, v.ACTION: "order.update", v.ACTOR_ID: "alice", v.ACTOR_TYPE: "user",
    v.RESOURCE_TYPE: "order", v.RESOURCE_ID: "42", v.OUTCOME: "success",
    v.TRAIL_ID: "0123456789abcdef",
}  # fmt: skip


@pytest.mark.parametrize("policy", list(POLICIES))
def test_typical_spans_take_the_fast_path_and_give_the_same_bytes(policy: str) -> None:
    p = POLICIES[policy]()
    spans = [
        sdk_span("order.update", AUDIT_ATTRS),
        sdk_span("POST /orders/<id>", {**AUDIT_ATTRS, "http.request.method": "POST",
                 "http.route": "/orders/<id>", "url.path": "/orders/42", "server.port": 8080,
                 "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64)"}, kind=SpanKind.SERVER),
        sdk_span("INSERT shop.orders", {"db.system": "sqlite", "db.statement":
                 "INSERT INTO orders (id, total) VALUES (?, ?)", v.TRAIL_ID: "ab" * 8},
                 kind=SpanKind.CLIENT),
        sdk_span("invoice.approve", {**AUDIT_ATTRS, "invoice.amount": 1250.5,
                 "invoice.currency": "EUR"}),
    ]  # fmt: skip
    for span in spans:
        for extra in ({}, {v.EFFECT: "data.write"}):
            for d in (FULL, METADATA):
                assert p.redactor.span_body(span, "shop", extra, None) is not None
                both(p, span, "shop", extra, d)


# The vectors with their own max_len are left out: the processor (and so
# encode_span) always builds records with the default one.
@pytest.mark.parametrize(
    "case", [c for c in VECTORS["records"] if c.get("max_len") is None], ids=lambda c: c["name"]
)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("level", ["full", "metadata"])
def test_record_vectors_give_the_same_bytes_on_both_paths(case, policy, level) -> None:
    extra = typed(case["extra"]) if case.get("extra") else {}
    both(POLICIES[policy](), span_of(case), case["service"], extra, Decision(level))


@pytest.mark.parametrize("where", ["attribute", "event", "status", "span name", "link", "list",
                                   "resource", "service", "scope", "named", "extra"])  # fmt: skip
@pytest.mark.parametrize("kind", list(attacks.TOKENS))
def test_leaked_secrets_give_the_same_bytes_on_both_paths(kind: str, where: str) -> None:
    secret = attacks.TOKENS[kind]
    attrs = dict(AUDIT_ATTRS)
    extra: dict[str, Any] = {}
    events: list[tuple[str, dict[str, Any]]] = []
    links: list[dict[str, Any]] = []
    status = None
    name = "order.update"
    service = "shop"
    if where == "attribute":
        attrs["note"] = f"see {secret} here"
    elif where == "event":
        events = [("exception", {"exception.message": secret, "detail": secret})]
    elif where == "status":
        status = Status(StatusCode.ERROR, f"failed: {secret}")
    elif where == "span name":
        name = f"export {secret}"
    elif where == "link":
        links = [{"note": secret}]
    elif where == "list":
        attrs["notes"] = ["fine", secret]
    elif where == "resource":
        attrs[v.RESOURCE_ID] = secret
    elif where == "service":
        service = f"svc {secret}"
    elif where == "named":
        attrs["db.password"] = secret
        attrs["url.full"] = f"https://x.example/?q={secret}"
    elif where == "extra":
        extra = {"app.secret": secret, "note": f"again {secret}"}
    span = sdk_span(name, attrs, status=status, events=events, links=links)
    for policy in POLICIES.values():
        for d in (FULL, METADATA):
            body = both(policy(), span, service, extra, d)
            if not (kind == "card" and where == "resource"):  # ids keep card-like numbers
                assert secret.encode() not in body


def test_a_value_found_secret_is_masked_where_else_it_appears_on_both_paths() -> None:
    span = sdk_span("login", {**AUDIT_ATTRS, "db.password": "hunter2hunter2",
                              "db.connection_string": "postgres://u:hunter2hunter2@db/x",
                              "http.route": "/x/hunter2hunter2"})  # fmt: skip
    body = both(AuditPolicy(), span)
    assert b"hunter2hunter2" not in body


def test_what_the_fast_path_leaves_to_the_composed_path() -> None:
    p = AuditPolicy()
    cases = [
        sdk_span("n", {"long": "x" * 70000}),  # cut for length
        sdk_span("n", {"nan": math.nan, "inf": -math.inf}),  # written as {"double": ...}
        sdk_span("n", {"tiny": 1e-7}),  # a float only the reference writes exactly
        sdk_span("n", {"password=hunter22": "x"}),  # a name redacted itself
        sdk_span("n", {"k": "\ud800 lone surrogate"}),
        sdk_span("n", {"big": 2**70}),
        # Values kept as they are (copied in bulk) that normalising changes.
        sdk_span("n", {"http.route": "x" * 70000}),
        sdk_span("n", {v.TRAIL_ID: "\ud800", v.ACTION: math.nan}),
        sdk_span("n", {v.ACTION: math.nan}),
        sdk_span("n", {"server.port": 1e-7, v.OUTCOME: math.inf}),
        sdk_span("n", {"http.route": [1e-7, math.nan], v.ACTOR_ID: (1.5, "a")}),
        sdk_span("n", {"http.route": ["hunter2hunter2", 1e-7], "db.password": "hunter2hunter2"}),
        # Echoes of a secret shrink a value kept in bulk below the length limit.
        sdk_span("n", {"http.route": "hunter2hunter2 " * 5000, "db.password": "hunter2hunter2"}),
        # A value redacted after its cut: masking leaves it short.
        sdk_span("n", {"note": "password=" + "y" * 70000}),
    ]
    for span in cases:
        both(p, span)

    # Not a span at all: the composed path, which refuses it.
    class Other:
        pass

    assert p.redactor.span_body(Other(), "shop") is None
    with pytest.raises(AttributeError):
        p.encode_span(Other(), "shop", {}, FULL)  # type: ignore[arg-type]


def test_an_ended_span_and_a_live_one_read_the_same() -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    span = provider.get_tracer("t").start_span("live", attributes={"a": 1, "b": "x"})
    assert dict(span_attributes(span)) == {"a": 1, "b": "x"}  # copied: it may still change
    live = record_from_span(span, "shop")
    span.end()
    assert dict(span_attributes(span)) == dict(span.attributes or {})
    assert record_from_span(span, "shop").attributes == live.attributes


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_live_span_gives_the_same_bytes_on_both_paths(policy: str) -> None:
    # A blocking action's intent record is made from its span before the span
    # ends (AuditSpanProcessor.queue_intent): no end time, attributes that may
    # still change, secrets in them.
    provider = TracerProvider(shutdown_on_exit=False)
    attrs = {v.ACTION: "order.pay", v.ACTOR_ID: "alice", "user.email": "a@example.com",
             "card": "4111 1111 1111 1111", "n": 1.5}  # fmt: skip
    span = provider.get_tracer("t").start_span("POST /pay", kind=SpanKind.SERVER, attributes=attrs)
    body = both(POLICIES[policy](), span, extra={v.INTENT: True})
    assert b'"end":0,' in body and b"4111 1111" not in body
    span.end()


def test_a_subclass_that_overrides_a_property_is_read_through_it() -> None:
    class Masked(ReadableSpan):
        @property
        def attributes(self):  # type: ignore[override]
            return {"from": "property"}

    ctx = SpanContext(1, 2, is_remote=False)
    span = Masked("n", context=ctx, attributes={"from": "field"}, start_time=1, end_time=2)
    assert span_attributes(span) == {"from": "property"}
    assert record_from_span(span, "s").attributes == {"from": "property"}
    assert b'"from":"property"' in both(AuditPolicy(), span, "s")


def test_new_record_is_the_record_the_constructor_makes() -> None:
    args = ("ab" * 16, "cd" * 8, None, "op", "SERVER", "svc", 1, 2, "ERROR", "why",
            {"a": 1}, (), (), "scope", ("a",))  # fmt: skip
    made = new_record(*args)
    assert made == Record(*args)
    assert repr(made) == repr(Record(*args))
    with pytest.raises(AttributeError):
        made.name = "x"  # type: ignore[misc]


# -- generated spans ---------------------------------------------------------------


_NAMES = st.sampled_from(
    [v.EVENT, v.ACTION, v.ACTOR_ID, v.RESOURCE_ID, v.REASON, v.TRAIL_ID, v.EFFECT,
     v.DATA_CLASSIFICATION, "http.route", "http.request.method", "server.address", "url.full",
     "url.query", "db.statement", "db.query.text", "db.password", "user.email", "app.drop.me",
     "app.mask", "note", "exception.message", "exception.stacktrace",
     "http.request.header.authorization", "http.request.header.x-trace", "clientSecret",
     "messaging.message.key", "password=hunter22", "k\u00e9y", "x" * 70]
) | st.text(max_size=12)  # fmt: skip
_SECRETISH = st.sampled_from(
    [attacks.JWT, attacks.AWS_KEY_ID, f"aws_secret {attacks.AWS_SECRET}", attacks.PEM,
     attacks.GITHUB, attacks.SLACK, attacks.STRIPE, attacks.GOOGLE, f"Bearer {attacks.RANDOM_TOKEN}",
     "4111 1111 1111 1111", "https://u:p4ssw0rd!@host/x", "/reset/Q2xhc3NpY0tleUFiY2Rl9x",
     "token=abcdef123456&x=1", "123-45-6789", "hunter2hunter2", "SELECT * FROM t WHERE a = 'x'"]
)  # fmt: skip
_TEXT = st.one_of(
    st.text(max_size=40),
    _SECRETISH,
    st.builds(lambda a, b: f"{a} {b}", _SECRETISH, _SECRETISH),
    st.sampled_from(["\ud800", "caf\u00e9", "x" * 70000, "", "hunter2hunter2"]),
)
_SCALAR = st.one_of(
    _TEXT,
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.binary(max_size=20),
)
_VALUE = st.one_of(_SCALAR, st.lists(_SCALAR, max_size=4), st.tuples(_TEXT, st.integers()))
# What services usually send: the fast path's own ground.
_ORDINARY = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30), _SECRETISH,
    st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(min_value=1e-3, max_value=1e15) | st.floats(min_value=-1e15, max_value=-1e-3),
)  # fmt: skip


@st.composite
def spans(draw: st.DrawFn) -> tuple[ReadableSpan, str, dict[str, Any]]:
    values = _VALUE if draw(st.booleans()) else _ORDINARY
    attrs = draw(st.dictionaries(_NAMES, values, max_size=10))
    extra = draw(st.dictionaries(_NAMES, values, max_size=3))
    events = [
        Event(draw(_TEXT), draw(st.dictionaries(_NAMES, _VALUE, max_size=3)), timestamp=5)
        for _ in range(draw(st.integers(0, 2)))
    ]
    links = [
        Link(SpanContext(7, 8, is_remote=True), draw(st.dictionaries(_NAMES, _VALUE, max_size=3)))
        for _ in range(draw(st.integers(0, 2)))
    ]
    message = draw(st.none() | _TEXT)
    bounded = draw(st.booleans())
    if bounded:
        # As the SDK holds them: BoundedAttributes, made immutable at end().
        stored: Any = BoundedAttributes(attributes=attrs, immutable=True)
    else:
        stored = attrs
    span = ReadableSpan(
        name=draw(_TEXT),
        context=SpanContext(draw(st.integers(1, 2**128 - 1)), draw(st.integers(1, 2**64 - 1)),
                            is_remote=False),
        parent=draw(st.none() | st.just(SpanContext(1, 3, is_remote=False))),
        attributes=stored,
        events=events,
        links=links,
        kind=draw(st.sampled_from(list(SpanKind))),
        status=Status(draw(st.sampled_from(list(StatusCode))), message)
        if message is None or draw(st.booleans()) else Status(StatusCode.ERROR, message),
        start_time=draw(st.integers(0, 2**63 - 1)),
        end_time=draw(st.integers(0, 2**63 - 1)),
        instrumentation_scope=draw(
            st.none() | st.builds(InstrumentationScope, _TEXT.filter(bool))
        ),
    )  # fmt: skip
    return span, draw(_TEXT.filter(lambda s: "\ud800" not in s)), extra


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans(), st.sampled_from(list(POLICIES)), st.sampled_from(["full", "metadata"]))
def test_generated_spans_give_the_same_bytes_on_both_paths(case, policy, level) -> None:
    span, service, extra = case
    p = POLICIES[policy]()
    d = Decision(level)
    try:
        expected = composed(p, span, service, extra, d)
    except (ValueError, TypeError) as exc:  # the composed path refuses it: so must the fast one
        with pytest.raises(type(exc)):
            p.encode_span(span, service, dict(extra), d)
        return
    for _ in ("cold", "warm"):  # the second time with the redactor's caches filled
        assert p.encode_span(span, service, dict(extra), d) == expected
    assert encode_reference(p.apply(record_from_span(span, service, dict(extra)), d)) == expected


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_NAMES, _VALUE, max_size=10))
def test_a_warm_redactor_gives_the_same_bytes_as_a_fresh_one(attrs) -> None:
    # The fast path's caches (plans, names kept in bulk, clean values) are
    # filled by earlier spans; they must never change a later span's bytes.
    warm = AuditPolicy()
    for _ in range(2):
        span = ReadableSpan("n", context=SpanContext(1, 2, is_remote=False),
                            attributes=BoundedAttributes(attributes=attrs, immutable=True),
                            start_time=1, end_time=2)  # fmt: skip
        try:
            fresh = composed(AuditPolicy(), span, "svc", {}, FULL)
        except (ValueError, TypeError):
            return
        assert warm.encode_span(span, "svc", {}, FULL) == fresh


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_NAMES, _VALUE, max_size=10), st.sampled_from(list(POLICIES)))
def test_attributes_in_bulk_are_the_one_by_one_redaction(attrs, policy) -> None:
    # Redactor.attributes copies the names that keep their value and redacts
    # the rest in place; the one-by-one loop is the definition: same dict (in
    # the same order), same names redacted, same secrets found.
    from otel_audit.engine.record import clean_attributes

    cleaned = clean_attributes(attrs)[0]
    bulk, each = POLICIES[policy]().redactor, POLICIES[policy]().redactor
    for _ in ("cold", "warm"):
        redacted_a: list[str] = []
        found_a: list[str] = []
        redacted_b: list[str] = []
        found_b: list[str] = []
        a = bulk.attributes(cleaned, redacted_a, found_a)
        b = each._each(cleaned, redacted_b, found_b)
        if any(isinstance(x, str) and x.startswith("commit:") for x in b.values()):
            continue  # commitments are salted afresh each time
        assert list(a.items()) == list(b.items())
        assert (redacted_a, found_a) == (redacted_b, found_b)


def test_the_remembered_shapes_are_bounded() -> None:
    from otel_audit.policy import redact

    policy = AuditPolicy()
    for i in range(redact._MAX_CACHED_SHAPES + 10):
        span = ReadableSpan(
            "n", context=SpanContext(1, 2, is_remote=False),
            attributes={f"app.attr{i}": "x", v.ACTION: "a"}, start_time=1, end_time=2,
        )  # fmt: skip
        body = policy.encode_span(span, "svc", {}, FULL)
        assert body == composed(AuditPolicy(), span, "svc", {}, FULL)
        policy.redactor.attributes({f"app.other{i}": "y", v.ACTION: "a"})
    assert len(policy.redactor._span_shapes) <= redact._MAX_CACHED_SHAPES
    assert len(policy.redactor._shapes) <= redact._MAX_CACHED_SHAPES
