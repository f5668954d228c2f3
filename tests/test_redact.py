"""Redaction: defaults with no configuration, configured methods, and a property test.

The property test generates secrets of every default kind, puts them where
applications and instrumentations put them (attributes, headers, statements,
URLs, events, status messages, links, span names), and checks that none of
them reaches the ledger file, any export format, or the log pipeline of the
audit path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import re
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # SDK < 1.36
    from opentelemetry.sdk._logs.export import InMemoryLogExporter as InMemoryLogRecordExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.policy.redact import (
    HmacKey,
    Redactor,
    check_commitment,
    commit,
    luhn_valid,
    scrub_text,
    secret_name,
)
from otel_audit.policy.rules import AuditPolicy
from otel_audit.review.export import formats


def records(url: str) -> list[otel_audit.Record]:
    with open_ledger(url, create=False, readonly=True) as ledger:
        return [s.record for s in ledger.query(Query())]


# -- defaults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("db.password", True),
        ("user.passwd", True),
        ("app.client_secret", True),
        ("apiKey", True),
        ("x-api-key", True),
        ("auth_token", True),
        ("session.key", True),
        ("aws.credentials", True),
        ("http.request.header.authorization", True),
        ("http.request.header.proxy-authorization", True),
        ("http.request.header.cookie", True),
        ("http.response.header.set-cookie", True),
        ("http.request.header.x-api-key", True),
        # word boundaries: no false positives on words that merely contain one
        ("monkey", False),
        ("keyboard.layout", False),
        ("tokenizer.name", False),
        ("gen_ai.usage.input_tokens", False),
        ("http.request.header.accept", False),
        # the vocabulary is never redacted by name
        (v.ACTOR_AUTH, False),
        (v.RESOURCE_ID, False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert secret_name(name) is secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer eyJhbGciOi.J9-x_y", "Authorization: [REDACTED]"),
        ("sent Bearer eyJhbGciOi.J9-x_y", "sent Bearer [REDACTED]"),
        ("basic dXNlcjpwYXNz", "basic [REDACTED]"),
        ("https://shop/x?access_token=abc&page=2", "https://shop/x?access_token=[REDACTED]&page=2"),
        ("UPDATE users SET password = 'hunter2' WHERE id = 7",
         "UPDATE users SET password = [REDACTED] WHERE id = 7"),
        ('{"api_key": "k-123"}', '{"api_key": [REDACTED]}'),
        ("postgresql://app:s3cret@db:5432/shop", "postgresql://app:[REDACTED]@db:5432/shop"),
        ("paid with 4111 1111 1111 1111.", "paid with [REDACTED:card]."),
        ("card=5500-0000-0000-0004", "card=[REDACTED:card]"),
        ("order 4111111111111112 is not a card (Luhn)", "order 4111111111111112 is not a card (Luhn)"),
        ("phone 0123456789", "phone 0123456789"),
        ("4111 1111 1111 1111 12 27 cvc", "[REDACTED:card] 12 27 cvc"),
        ("ref 7 4111111111111111", "ref 7 [REDACTED:card]"),
        ("a 12345678901234567890123 long id", "a 12345678901234567890123 long id"),
        ("monkey=banana", "monkey=banana"),
    ],
)  # fmt: skip
def test_scrub_text(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


def test_defaults_cover_every_part_of_a_record(make_pipeline) -> None:
    pipeline, provider, _ = make_pipeline()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("other") as other:
        link_ctx = other.get_span_context()
    with otel_audit.audit_action(
        "card.charge",
        attributes={
            "http.request.header.authorization": ["Bearer abcdefghijkl"],
            "payment.card": "4242424242424242",
            "user.password": "hunter2hunter2",
        },
    ) as act:
        span = act.span
        assert span is not None
        span.add_event("exception", {"exception.message": "token=abcdefghijkl rejected"})
        span.set_status(Status(StatusCode.ERROR, "card 4242 4242 4242 4242 declined"))
        with tracer.start_as_current_span(
            "POST",
            kind=SpanKind.CLIENT,
            links=[Link(link_ctx, {"note": "Bearer abcdefghijkl"})],
            attributes={
                "http.request.method": "POST",
                "url.full": "https://psp.example/charge?api_key=abcdefghijkl",
            },
        ):
            pass
    by_name = {r.name: r for r in records(pipeline.ledger_url)}
    charge, post = by_name["card.charge"], by_name["POST"]
    assert charge.attr("http.request.header.authorization") == ["[REDACTED]"]
    assert charge.attr("payment.card") == "[REDACTED:card]"
    assert charge.attr("user.password") == "[REDACTED]"
    # The message of an exception event often quotes values: masked whole.
    assert charge.events[0].attributes == {"exception.message": "[REDACTED]"}
    assert charge.status_message == "card [REDACTED:card] declined"
    assert post.attr("url.full") == "https://psp.example/charge?api_key=[REDACTED]"
    assert post.links[0].attributes == {"note": "Bearer [REDACTED]"}


def test_vocabulary_ids_are_kept_but_the_reason_is_scanned(make_pipeline) -> None:
    pipeline, _, _ = make_pipeline()
    with otel_audit.audit_action("card.block", resource=("card-ref", "4111111111111111")) as act:
        act.deny("card 4111111111111111 reported stolen")
    (rec,) = records(pipeline.ledger_url)
    assert rec.attr(v.RESOURCE_ID) == "4111111111111111"  # an id the operator chose to use
    assert rec.attr(v.REASON) == "card [REDACTED:card] reported stolen"


def test_ids_can_be_pseudonymised_by_a_rule_but_structure_cannot(hmac_key) -> None:
    policy = AuditPolicy.from_dict(
        {"redact": {"hmac_key_file": str(hmac_key),
                    "attributes": [{"name": "audit.*", "method": "hmac"}]}}
    )  # fmt: skip
    out = policy.redactor.attributes(
        {v.ACTOR_ID: "alice", v.ACTION: "order.create", v.TRAIL_ID: "abc", v.OUTCOME: "success"}
    )
    assert out[v.ACTOR_ID].startswith("hmac:sha256:")
    assert (out[v.ACTION], out[v.TRAIL_ID], out[v.OUTCOME]) == ("order.create", "abc", "success")


# -- configured methods -----------------------------------------------------------


@pytest.fixture
def hmac_key(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "hmac.key"
    path.write_bytes(b"0123456789abcdef-a-test-key-only")
    return path


def test_drop_mask_hmac_commit(tmp_path, make_pipeline, hmac_key) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            [redact]
            hmac_key_file = "{hmac_key}"

            [[redact.attributes]]
            name = "user.email"
            method = "hmac"

            [[redact.attributes]]
            name = ["customer.ssn", "customer.tax_id"]
            method = "commit"

            [[redact.attributes]]
            name = "debug.*"
            method = "drop"

            [[redact.attributes]]
            name = "customer.phone"
            method = "mask"

            [[redact.values]]
            pattern = "\\\\b\\\\d{{3}}-\\\\d{{2}}-\\\\d{{4}}\\\\b"
            """
        )
    )
    pipeline, _, _ = make_pipeline(policy=str(policy))
    for email in ("alice@example.com", "alice@example.com", "bob@example.com"):
        with otel_audit.audit_action(
            "customer.update",
            attributes={
                "user.email": email,
                "customer.ssn": "078-05-1120",
                "debug.payload": "anything",
                "customer.phone": "+1 555 0100",
                "note": "ssn 078-05-1120 on file",
            },
        ):
            pass
    got = records(pipeline.ledger_url)
    emails = [r.attr("user.email") for r in got]
    key_id = HmacKey(hmac_key.read_bytes()).key_id
    assert all(e.startswith(f"hmac:sha256:{key_id}:") for e in emails)
    # Equal values match across records, different ones do not.
    assert emails[0] == emails[1] != emails[2]
    ssn = [r.attr("customer.ssn") for r in got]
    assert all(s.startswith("commit:sha256:") for s in ssn)
    assert len(set(ssn)) == 3  # fresh salt every time: equal values are not linkable
    assert check_commitment(ssn[0], "078-05-1120") and not check_commitment(ssn[0], "078-05-1121")
    assert all("debug.payload" not in r.attributes for r in got)
    assert {r.attr("customer.phone") for r in got} == {"[REDACTED]"}
    assert {r.attr("note") for r in got} == {"ssn [REDACTED] on file"}
    raw = (tmp_path / "audit.db").read_bytes() + _wal(tmp_path / "audit.db")
    for secret in (b"alice@example.com", b"078-05-1120", b"anything", b"555 0100"):
        assert secret not in raw


def test_hmac_key_from_environment(tmp_path, make_pipeline, hmac_key, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_AUDIT_HMAC_KEY", str(hmac_key))
    policy = AuditPolicy.from_dict({"redact": {"attributes": [{"name": "e", "method": "hmac"}]}})
    assert policy.redactor.hmac_key is not None
    monkeypatch.setenv("OTEL_AUDIT_HMAC_KEY", str(tmp_path / "missing.key"))
    with pytest.raises(otel_audit.ConfigError, match=r"OTEL_AUDIT_HMAC_KEY: cannot read HMAC key"):
        AuditPolicy.from_dict({})
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    monkeypatch.setenv("OTEL_AUDIT_HMAC_KEY", str(short))
    with pytest.raises(otel_audit.ConfigError, match=r"at least 16 bytes"):
        AuditPolicy.from_dict({})


def test_commitments_of_numbers_and_lists() -> None:
    assert check_commitment(commit(42), "42")
    assert check_commitment(commit(True), "true")
    assert not check_commitment(commit("42 "), "42")
    with pytest.raises(ValueError, match="not a commitment"):
        check_commitment("hmac:sha256:x:y", "v")


# -- the property test ----------------------------------------------------------------

_TOKEN = st.from_regex(r"[g-zG-Z]{4}[A-Za-z0-9]{10,30}", fullmatch=True)
_FILLER = st.text(alphabet="abcdefghij XYZ.,:;()", max_size=12)
_DIGIT_GROUPS = st.from_regex(r"([0-9]{1,4} ){0,2}", fullmatch=True)
_DIGIT_TAIL = st.from_regex(r"( [0-9]{1,4}){0,2}", fullmatch=True)
_SECRET_WORDS = ["password", "passwd", "secret", "token", "key", "credential", "api_key", "apiKey",
                 "client_secret", "access_token", "privateKey", "auth-token", "PASSWORD",
                 "accesstoken", "clientsecret", "pass", "pwd", "pw", "refreshToken"]  # fmt: skip
_HEADERS = [
    ("http.request.header.authorization", "Bearer {}"),
    ("http.request.header.cookie", "session={}"),
    ("http.response.header.set-cookie", "sid={}; HttpOnly"),
    ("http.request.header.x-api-key", "{}"),
    ("http.request.header.api-key", "{}"),
]


@st.composite
def card_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """(digits, as written): a Luhn-valid number of 13-19 digits, maybe grouped."""
    length = draw(st.integers(13, 19))
    body = str(draw(st.sampled_from("3456"))) + "".join(
        str(d) for d in draw(st.lists(st.integers(0, 9), min_size=length - 2, max_size=length - 2))
    )
    check = next(str(c) for c in range(10) if luhn_valid(body + str(c)))
    digits = body + check
    sep = draw(st.sampled_from(["", " ", "-"]))
    written = sep.join(digits[i : i + 4] for i in range(0, len(digits), 4)) if sep else digits
    return digits, written


@st.composite
def secret_cases(draw: st.DrawFn) -> tuple[list[str], dict]:
    """Secrets (to look for) and where to put them."""
    token, token2, token3 = draw(_TOKEN), draw(_TOKEN), draw(_TOKEN)
    digits, card = draw(card_numbers())
    word = draw(st.sampled_from(_SECRET_WORDS))
    prefix = draw(st.sampled_from(["", "app.", "db.", "user.", "AWS_", "PG", "oauth."]))
    header, shape = draw(st.sampled_from(_HEADERS))
    left, right = draw(_FILLER), draw(_FILLER)
    where = draw(
        st.sampled_from(["attribute", "statement", "url", "event", "status", "link", "name"])
    )
    case = {
        "named": (prefix + word, draw(st.sampled_from([token, f"x {token} y"]))),
        "header": (header, [shape.format(token2)]),
        "bearer": f"{left} Bearer {token3} {right}",
        # Digits next to the card, as in "4111 1111 1111 1111 12 27".
        "card": f"{left} {draw(_DIGIT_GROUPS)}{card}{draw(_DIGIT_TAIL)} {right}",
        "where": where,
    }
    # Both the bare digits and the card as written must be absent.
    return [token, token2, token3, digits, card], case


_POLICY = """\
[[boundary.classify]]
classification = "production"
resource_types = ["order"]

[boundary.allow.production]
hosts = ["billing.internal"]
"""


@pytest.fixture
def leak_rig(tmp_path, make_pipeline):
    log_exporter = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    policy_path = tmp_path / "p.toml"
    policy_path.write_text(_POLICY)
    policy = AuditPolicy.load(str(policy_path), logger_provider=logger_provider)
    # The audit path's own Python logging goes to the same OTel log pipeline.
    handler = LoggingHandler(level=logging.DEBUG, logger_provider=logger_provider)
    logging.getLogger("otel_audit").addHandler(handler)
    pipeline, provider, _ = make_pipeline(policy=policy)
    yield pipeline, provider, log_exporter, tmp_path / "audit.db"
    logging.getLogger("otel_audit").removeHandler(handler)


def _wal(db: pathlib.Path) -> bytes:
    wal = db.with_name(db.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def _exports(url: str) -> str:
    out = []
    for name in sorted(formats()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["export", "--ledger", url, "--format", name]) == 0
        out.append(buf.getvalue())
    return "\n".join(out)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=secret_cases())
def test_no_generated_secret_reaches_ledger_exports_or_logs(leak_rig, case) -> None:
    pipeline, provider, log_exporter, db = leak_rig
    secrets, spec = case
    tracer = provider.get_tracer("test")
    named, named_value = spec["named"]
    header, header_value = spec["header"]
    with tracer.start_as_current_span("linked") as linked:
        link_ctx = linked.get_span_context()
    attributes = {named: named_value, header: header_value, "note": spec["bearer"]}
    with otel_audit.audit_action(
        "order.export", resource=("order", "42"), attributes=attributes
    ) as act:
        span = act.span
        assert span is not None
        where = spec["where"]
        text = spec["card"] + " " + spec["bearer"]
        if where == "attribute":
            span.set_attribute("payment.reference", text)
        elif where == "event":
            span.add_event("exception", {"exception.message": text, "exception.stacktrace": text})
        elif where == "status":
            span.set_status(Status(StatusCode.ERROR, text))
        elif where == "name":
            span.update_name(f"export {text}")
        # A call in the classified trail to a host outside the allow-list: a
        # violation, so the boundary log record and event are produced too.
        with tracer.start_as_current_span(
            "SELECT" if where == "statement" else "POST",
            kind=SpanKind.CLIENT,
            links=[Link(link_ctx, {"note": text})] if where == "link" else [],
            attributes=(
                {"db.system": "sqlite", "db.statement": f"SELECT * FROM t WHERE c = '{text}'",
                 "db.name": "shop.db"}
                if where == "statement"
                else {
                    "http.request.method": "POST",
                    "url.full": f"https://outside.example/up?token={secrets[0]}&q=1",
                    header: header_value,
                    named: named_value,
                }
            ),
        ):  # fmt: skip
            pass
    assert pipeline.flush(30)
    raw = db.read_bytes() + _wal(db)
    exported = _exports(pipeline.ledger_url)
    logs = "\n".join(r.to_json() for r in log_exporter.get_finished_logs())
    assert "boundary violation" in logs or where == "statement"
    for secret in secrets:
        assert secret.encode() not in raw, secret
        assert secret not in exported, secret
        assert secret not in logs, secret
    # The redaction did not just destroy the records: they are all there.
    assert re.search(r'"audit\.action":\s*"order\.export"', exported)


def test_remembered_clean_values_never_skip_a_rule() -> None:
    """A value seen clean once is remembered; the same text as a statement is still sanitised."""
    redactor = Redactor()
    statement = "UPDATE users SET role = 'admin' WHERE id = 7"
    for _ in range(2):
        assert redactor.attributes({"app.note": statement}) == {"app.note": statement}
        assert redactor.attributes({"db.statement": statement}) == {
            "db.statement": "UPDATE users SET role = ? WHERE id = ?"
        }
        assert redactor.attributes({"app.note": f"{statement} pw=hunter22"}) == {
            "app.note": f"{statement} pw=[REDACTED]"
        }
