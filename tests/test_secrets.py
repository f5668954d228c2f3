"""Attacks on the default redaction (no policy file): issue 11, "Secrets".

Each test is an application that leaks one shape of secret into its
telemetry through the real SDK and ``otel_audit.configure`` (a real SQLite
ledger file), or through a real Flask app on loopback, or into a real
``otel-audit serve``; the defence holds when the secret is in none of: the
ledger file's bytes, its ``-wal`` file, and every export format. The
false-positive lists at the end are what must stay readable.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flask
import pytest
import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from werkzeug.serving import make_server

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.integrations.flask import AuditFlask
from otel_audit.policy.redact import scrub_id, scrub_text, secret_name
from otel_audit.review.export import formats

FORMATS = ("jsonl", "csv", "cadf", "ocsf", "jaeger", "otlp-json")

# Secrets as an attacker's victim would hold them (all fake, all well-formed).
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImFkbWluIjp0cnVlfQ"
    ".c2lnbmF0dXJlLW9mLXRoZS10b2tlbi14eXo"
)
AWS_KEY_ID = "AKIAZ7QW3ERT5YU8IOP2"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLE91"
PEM_BODY = "MIIEowIBAAKCAQEA7Vv3Q2xhc3NpY1NlY3JldEJvZHlPZlRoZUtleQ"
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
GITHUB = "ghp_R2l0SHViVG9rZW5Gb3JUZXN0aW5nT25seTEyMzQ"
GITHUB_OAUTH = "gho_R2l0SHViT0F1dGhUb2tlbkZvclRlc3RpbmcxMjM"
GITHUB_PAT = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCD"
SLACK = "xoxb-2024061512-7788990011-Zk9SbGFja1Rva2VuVGVzdA"
STRIPE = "sk_live_51HqLyjWDarjtT1zdp7dcXYZ0123"
STRIPE_RESTRICTED = "rk_live_51HqLyjWDarjtT1zdp7dcABC4567"
GOOGLE = "AIzaSyD3x4mPl3K3yF0rT3st1ngOnly-abcdefg"
RANDOM_TOKEN = "Q2xhc3NpY0tleUFiY2RlZmdoaWprbG1ub3A9x"  # secrets.token_urlsafe() shape
HEX_TOKEN = "3f9a8b7c6d5e4f30112233445566778899aabb"  # secrets.token_hex() shape
PASSWORD = "Tr0ub4dor&3x"


def _export(url: str) -> str:
    assert set(FORMATS) <= set(formats())
    out = []
    for name in FORMATS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["export", "--ledger", url, "--format", name]) == 0, name
        out.append(buf.getvalue())
    return "\n".join(out)


def _raw(db: pathlib.Path) -> bytes:
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def assert_nowhere(url: str, db: pathlib.Path, secrets: list[str], expect: str) -> str:
    """The secrets are in neither the ledger file, its WAL, nor any export; ``expect`` is."""
    raw = _raw(db)
    exported = _export(url)
    for secret in secrets:
        assert secret.encode() not in raw, f"{secret!r} in the ledger file or its WAL"
        assert secret not in exported, f"{secret!r} in an export"
    assert expect in exported  # the records themselves are there
    return exported


@pytest.fixture
def app(
    make_pipeline, tmp_path
) -> Iterator[Callable[[Callable[[Any, Any], None]], tuple[str, Any]]]:
    """Runs ``body(span, tracer)`` in an audit action (``span``) of an app with the defaults."""
    pipeline, provider, _ = make_pipeline()
    tracer = provider.get_tracer("app")

    def run(body: Callable[[Any, Any], None]) -> tuple[str, Any]:
        with otel_audit.audit_action("account.update", resource=("account", "a-7")) as act:
            body(act.span, tracer)
        assert pipeline.flush(30)
        return pipeline.ledger_url, tmp_path / "audit.db"

    yield run


# -- secret names: run together, abbreviated -------------------------------------

SECRET_NAMES = [
    "PGPASSWORD", "oauth.accesstoken", "oauth.clientsecret", "user.pass", "pwd", "passwd",
    "MYSQL_PWD", "db.pw", "AWS_SECRET_ACCESS_KEY", "refreshToken", "app.signingkey",
    "stripe.apikey", "smtp.passphrase", "DATABASE_PASSWORD2", "ldap.bindpass",
    "http.request.header.x-csrf-token", "PGkey", "APIkey",
]  # fmt: skip


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_named_attribute_never_stored(app, name) -> None:
    def body(span: Any, tracer: Any) -> None:
        span.set_attribute(name, PASSWORD)

    url, db = app(body)
    assert_nowhere(url, db, [PASSWORD, "Tr0ub4dor"], name)


# -- URL user-info and query parameters --------------------------------------------


@pytest.mark.parametrize(
    ("url_value", "secret"),
    [
        ("postgresql://app:p4ss/w0rd@db:5432/shop", "p4ss/w0rd"),
        ("postgresql://app:p4ss@w0rd@db:5432/shop", "p4ss@w0rd"),
        ("redis://:s3cr3t/with@both@cache:6379/0", "s3cr3t/with@both"),
        ("https://deploy:gh0st/p@ss@git.example/repo.git", "gh0st/p@ss"),
    ],
)
def test_url_password_holding_slash_or_at_never_stored(app, url_value, secret) -> None:
    def body(span: Any, tracer: Any) -> None:
        span.set_attributes({"db.connection_string": url_value, "url.full": url_value})

    url, db = app(body)
    assert_nowhere(url, db, [secret], "db.connection_string")


QUERY_PARAMETERS = [
    "pass", "pw", "pwd", "passwd", "token", "secret", "sig", "signature", "X-Amz-Signature",
    "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature", "access_token", "api_key",
    "apikey", "client_secret", "refresh_token", "id_token", "auth", "session_token",
]  # fmt: skip


@pytest.mark.parametrize("parameter", QUERY_PARAMETERS)
def test_credential_query_parameter_never_stored(app, parameter) -> None:
    secret = "c9VhJq2Lr8ZkT1wX"
    full = f"https://files.example/report.pdf?page=2&{parameter}={secret}&lang=en"

    def body(span: Any, tracer: Any) -> None:
        # On the action, and on an outbound call (an effect the default policy keeps).
        span.add_event("redirect", {"location": full})
        with tracer.start_as_current_span(
            "GET", kind=SpanKind.CLIENT, attributes={"url.full": full, "http.request.method": "GET"}
        ):
            pass

    url, db = app(body)
    exported = assert_nowhere(url, db, [secret], f"{parameter}=[REDACTED]")
    assert "page=2" in exported and "lang=en" in exported


# -- well-known token formats, in any value --------------------------------------

TOKENS = {
    "jwt": JWT,
    "aws access key id": AWS_KEY_ID,
    "aws secret key (with context)": f"aws_secret {AWS_SECRET}",
    "pem private key": PEM,
    "github ghp_": GITHUB,
    "github gho_": GITHUB_OAUTH,
    "github_pat_": GITHUB_PAT,
    "slack xoxb-": SLACK,
    "stripe sk_live_": STRIPE,
    "stripe rk_live_": STRIPE_RESTRICTED,
    "google api key": GOOGLE,
    "bearer": f"Bearer {RANDOM_TOKEN}",
    "card": "4111 1111 1111 1111",
}


@pytest.mark.parametrize("where", ["attribute", "event", "status", "span name", "link", "list"])
@pytest.mark.parametrize("kind", list(TOKENS))
def test_token_format_never_stored(app, kind, where) -> None:
    value = TOKENS[kind]
    text = f"upstream said: {value} (retrying)"

    def body(span: Any, tracer: Any) -> None:
        with tracer.start_as_current_span("linked") as linked:
            ctx = linked.get_span_context()
        # An outbound call (an effect the default policy keeps) carries the link.
        with tracer.start_as_current_span(
            "POST",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": "POST", "url.full": "https://api.example/v1"},
            links=[Link(ctx, {"note": text})] if where == "link" else [],
        ):
            pass
        if where == "link":
            span.set_attribute("app.step", "retrying")
        if where == "span name":
            span.update_name(f"call {text}")
        elif where == "attribute":
            span.set_attribute("app.note", text)
        elif where == "list":
            span.set_attribute("app.notes", ["first", text])
        elif where == "event":
            span.add_event(f"retry {text}", {"detail": text})
        elif where == "status":
            span.set_status(Status(StatusCode.ERROR, text))

    url, db = app(body)
    secret = value.split()[-1] if kind in ("bearer", "aws secret key (with context)") else value
    parts = [secret, PEM_BODY] if kind == "pem private key" else [secret]
    if kind == "card":
        parts = ["4111 1111 1111 1111", "4111111111111111"]
    assert_nowhere(url, db, parts, "retrying")


# -- tokens in a URL path, a span name and a route parameter (a real Flask app) ----


@pytest.fixture
def flask_app(make_pipeline) -> Iterator[tuple[str, Any]]:
    pipeline, provider, _ = make_pipeline()
    web = flask.Flask("secrets")
    FlaskInstrumentor.instrument_app(web, tracer_provider=provider)
    tracer = provider.get_tracer("app")

    @web.post("/reset/<token>")
    def reset(token: str) -> Any:
        # An outbound call to the identity service, named by its raw path.
        with tracer.start_as_current_span(
            f"POST /reset/{token}",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "url.full": f"https://auth.internal/reset/{token}",
            },
        ):
            pass
        return {"ok": True}

    @web.post("/files/<path:name>")
    def files(name: str) -> Any:
        return {"ok": True}

    AuditFlask(web, resources={"token": "reset-token"})
    server = make_server("127.0.0.1", 0, web, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", pipeline
    finally:
        server.shutdown()
        FlaskInstrumentor.uninstrument_app(web)


@pytest.mark.parametrize("token", [RANDOM_TOKEN, HEX_TOKEN, JWT, GITHUB])
def test_token_in_url_path_span_name_and_resource_id_never_stored(
    flask_app, tmp_path, token
) -> None:
    base, pipeline = flask_app
    assert requests.post(f"{base}/reset/{token}?next=/home", timeout=10).ok
    assert pipeline.flush(30)
    exported = assert_nowhere(pipeline.ledger_url, tmp_path / "audit.db", [token], "/reset/")
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        recs = [s.record for s in ledger.query(Query())]
    actions = [r for r in recs if r.attr(v.EVENT)]  # the request record and its outcome
    assert actions and {r.attr(v.RESOURCE_TYPE) for r in actions} == {"reset-token"}
    assert all(r.attr(v.RESOURCE_ID).startswith("[REDACTED") for r in actions)
    assert "POST /reset/[REDACTED" in exported  # the outbound call's span name


def test_random_token_in_any_url_path_segment_never_stored(flask_app, tmp_path) -> None:
    base, pipeline = flask_app
    assert requests.post(f"{base}/files/shared/{RANDOM_TOKEN}/report.pdf", timeout=10).ok
    assert pipeline.flush(30)
    assert_nowhere(pipeline.ledger_url, tmp_path / "audit.db", [RANDOM_TOKEN], "report.pdf")


# -- a value found once is masked everywhere in its record --------------------------


def test_secret_named_value_is_masked_where_else_it_appears(app) -> None:
    def body(span: Any, tracer: Any) -> None:
        span.update_name(f"login as admin with {PASSWORD}")
        span.set_attributes({"ldap.bindpass": PASSWORD, "app.log": f"bind failed for {PASSWORD}"})
        span.add_event("retry", {"detail": f"bad credentials {PASSWORD}"})

    url, db = app(body)
    assert_nowhere(url, db, [PASSWORD, "Tr0ub4dor"], "bind failed for [REDACTED]")


# -- the central ledger: a real `otel-audit serve` -----------------------------------


def test_serve_redacts_every_shape_before_the_central_ledger(make_server, tmp_path) -> None:
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    provider = TracerProvider(
        resource=Resource.create({"service.name": "shop"}), shutdown_on_exit=False
    )
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://{host}:{port}/v1/traces"))
    )
    tracer = provider.get_tracer("app")
    secrets = [PASSWORD, JWT, AWS_KEY_ID, GITHUB, STRIPE, SLACK, GOOGLE, RANDOM_TOKEN, "p4ss/w0rd"]
    with tracer.start_as_current_span(
        f"POST /reset/{RANDOM_TOKEN}",
        kind=SpanKind.SERVER,
        attributes={
            v.EVENT: True,
            v.ACTION: "password.reset",
            v.RESOURCE_TYPE: "reset-token",
            v.RESOURCE_ID: RANDOM_TOKEN,
            "PGPASSWORD": PASSWORD,
            "url.full": f"https://shop.example/reset/{RANDOM_TOKEN}?pw={PASSWORD}",
            "db.connection_string": "postgresql://app:p4ss/w0rd@db/shop",
            "app.note": f"{JWT} {AWS_KEY_ID} {GITHUB} {STRIPE} {SLACK} {GOOGLE}",
        },
    ) as span:
        span.add_event("error", {"detail": f"Bearer {RANDOM_TOKEN}"})
    provider.shutdown()
    assert server.stats().committed >= 1
    assert_nowhere(server.ledger_url, tmp_path / "central.db", secrets, "password.reset")


# -- what must stay readable (false positives) ---------------------------------------

ORDINARY_NAMES = [
    "passenger.count", "keyboard.layout", "tokenizer.name", "http.request.header.x-forwarded-for",
    "monkey", "secretary.name", "compass.heading", "bypass.cache", "passport.country",
    "gen_ai.usage.input_tokens", "messaging.kafka.message.key", "db.cassandra.keyspace",
    "http.request.header.accept", "user_agent.original", "session.id", "turkey.weight",
    "hotkey.binding", "keys", "pwa.enabled",
]  # fmt: skip

ORDINARY_VALUES = [
    "GET /orders/42",
    "https://shop.example/orders/42?page=2&sort=desc",
    "https://shop.example:8443/users/@alice?email=alice@example.com",
    "/users/550e8400-e29b-41d4-a716-446655440000/avatar",
    "commit 3f9a8b7c6d5e4f30112233445566aabbccddeeff",  # a hex digest
    "cus_NffrFeUfNV2HibXyz123456789",  # a typed id
    "/blog/how-to-reset-your-password-in-three-steps",
    "/verify/my-email-address-here",
    "the bearer of this note",
    "basic plan upgraded",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0",
    "order 4111111111111112 is not a card (Luhn)",
    "SELECT id FROM keys WHERE owner = ?",
    "monkey=banana; page=2",
    "ask for a token at the desk",
]


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_ordinary_name_is_not_redacted(name) -> None:
    assert secret_name(name) is False


@pytest.mark.parametrize("value", ORDINARY_VALUES)
def test_ordinary_value_is_not_rewritten(value) -> None:
    assert scrub_text(value) == value


@pytest.mark.parametrize("value", ["42", "order-2024-0001", "4111111111111111", "c9"])
def test_ordinary_resource_id_is_kept(value) -> None:
    assert scrub_id(value) == value


def test_ordinary_names_and_values_reach_the_ledger_unchanged(app) -> None:
    attributes = {name: f"value-{i}" for i, name in enumerate(ORDINARY_NAMES)}
    attributes.update({f"app.text.{i}": value for i, value in enumerate(ORDINARY_VALUES)})

    def body(span: Any, tracer: Any) -> None:
        span.update_name("GET /orders/42")
        span.set_attributes(attributes)

    url, _ = app(body)
    with open_ledger(url, readonly=True) as ledger:
        (rec,) = [s.record for s in ledger.query(Query()) if s.record.name == "GET /orders/42"]
    assert {k: rec.attributes[k] for k in attributes} == attributes


def test_redaction_is_idempotent() -> None:
    """A record redacted twice (forwarded, then received by serve) is redacted once."""
    texts = [f"upstream said: {value} (retrying)" for value in TOKENS.values()]
    texts += [
        f"https://files.example/a?page=2&{p}=c9VhJq2Lr8ZkT1wX&lang=en" for p in QUERY_PARAMETERS
    ]
    texts += [f"POST /reset/{RANDOM_TOKEN}", "postgresql://app:p4ss/w0rd@db:5432/shop"]
    for text in texts:
        once = scrub_text(text)
        assert once != text
        assert scrub_text(once) == once


def test_hostile_long_values_are_redacted_whole() -> None:
    """Values built to make the scanner quadratic (each is linear now) still come out redacted."""
    digits = "4 " * 30000 + "4111 1111 1111 1111"
    assert scrub_text(digits) == "[REDACTED:digits]"
    assert scrub_text("Authorization: " * 4000) == "Authorization: [REDACTED]"
    assert scrub_text("a:" * 30000 + " pw=hunter2hunter2") == "a:" * 30000 + " pw=[REDACTED]"
