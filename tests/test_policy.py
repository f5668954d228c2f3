"""The audit policy file: parsing errors, rule order, levels and durabilities, `policy check`."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from opentelemetry.trace import SpanKind, Status, StatusCode

import otel_audit
from otel_audit import ConfigError
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.policy.rules import AuditPolicy, load_policy


def write(tmp_path: pathlib.Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def records(url: str, **query: object) -> list[otel_audit.Record]:
    with open_ledger(url, create=False, readonly=True) as ledger:
        return [s.record for s in ledger.query(Query(**query))]  # type: ignore[arg-type]


# -- parsing errors name the line -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "typo.toml",
            """\
            [defaults]
            level = "full"

            [[rules]]
            action = "order.*"
            level = "metadata"

            [[rules]]
            name = "second"
            levle = "full"
            """,
            r"typo.toml:10: rules\[1\].levle: unknown setting",
        ),
        (
            "level.toml",
            """\
            [[rules]]
            action = "a"
            level = "everything"
            """,
            r"level.toml:3: rules\[0\].level: must be one of none, metadata, full; got 'everything'",
        ),
        (
            "durability.toml",
            """\
            [defaults]
            durability = "eventually"
            """,
            r"durability.toml:2: defaults.durability: must be one of blocking, sync, async",
        ),
        (
            "syntax.toml",
            """\
            [defaults]
            level = "full
            """,
            r"syntax.toml: invalid TOML: .*line 2",
        ),
        (
            "effect.toml",
            """\
            [[rules]]
            effect = "data.delete"
            level = "full"
            """,
            r"effect.toml:2: rules\[0\].effect: matches no effect",
        ),
        (
            "empty_rule.toml",
            """\
            [[rules]]
            action = "a"
            """,
            r"empty_rule.toml:1: rules\[0\]: needs a level or a durability",
        ),
        (
            "allow.toml",
            """\
            [[boundary.classify]]
            classification = "production"
            tables = ["orders"]

            [boundary.allow.prod]
            hosts = ["x"]
            """,
            r"allow.toml:5: boundary.allow.prod: no boundary.classify entry gives classification 'prod'",
        ),
        (
            "hmac.toml",
            """\
            [[redact.attributes]]
            name = "user.email"
            method = "hmac"
            """,
            r"hmac.toml:3: redact.attributes\[0\].method: hmac needs a key",
        ),
        (
            "regex.yaml",
            """\
            redact:
              values:
                - pattern: "(unclosed"
            """,
            r"regex.yaml:3: redact.values\[0\].pattern: is not a valid regular expression",
        ),
        (
            "bad.yaml",
            """\
            rules:
              - action: a
                level: full
               durability: sync
            """,
            r"bad.yaml: invalid YAML at line 4",
        ),
        (
            "mode.yml",
            """\
            boundary:
              mode: block
            """,
            r"mode.yml:2: boundary.mode: must be one of detect, enforce; got 'block'",
        ),
    ],
)
def test_errors_name_file_line_and_setting(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, message: str
) -> None:
    monkeypatch.delenv("OTEL_AUDIT_HMAC_KEY", raising=False)
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=message):
        AuditPolicy.load(path)


def test_missing_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read policy file .*nope.toml"):
        load_policy(str(tmp_path / "nope.toml"))


def test_configure_refuses_a_bad_policy_before_opening_the_ledger(
    tmp_path: pathlib.Path, make_pipeline
) -> None:
    path = write(tmp_path, "p.toml", "[defaults]\nlevel = 'most'\n")
    with pytest.raises(ConfigError, match=r"p.toml:2: defaults.level"):
        make_pipeline(ledger=f"sqlite:///{tmp_path / 'never.db'}", policy=path)
    assert not (tmp_path / "never.db").exists()


def test_policy_from_environment(tmp_path, make_pipeline, monkeypatch) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """\
        [[rules]]
        action = "noise.*"
        level = "none"
        """,
    )
    monkeypatch.setenv("OTEL_AUDIT_POLICY", path)
    pipeline, _, _ = make_pipeline()
    with otel_audit.audit_action("noise.ping"):
        pass
    with otel_audit.audit_action("order.create"):
        pass
    assert [r.attr(v.ACTION) for r in records(pipeline.ledger_url)] == ["order.create"]


# -- rule order: first match wins, in file order -----------------------------------


RULES_AB = """\
[[rules]]
name = "refunds"
action = "payment.refund"
level = "metadata"

[[rules]]
name = "payments"
action = "payment.*"
level = "none"
"""


def test_first_matching_rule_wins_in_file_order(tmp_path, make_pipeline) -> None:
    path = write(tmp_path, "p.toml", RULES_AB)
    pipeline, _, _ = make_pipeline(policy=path)
    with otel_audit.audit_action("payment.refund", attributes={"note": "x"}):
        pass
    with otel_audit.audit_action("payment.capture"):
        pass
    got = records(pipeline.ledger_url)
    assert [r.attr(v.ACTION) for r in got] == ["payment.refund"]
    assert "note" not in got[0].attributes  # metadata level

    # The same rules in the other order: the catch-all comes first and wins.
    swapped = RULES_AB.split("[[rules]]")
    path2 = write(tmp_path, "p2.toml", "[[rules]]" + swapped[2] + "[[rules]]" + swapped[1])
    policy = AuditPolicy.load(path2)
    e = policy.explain({v.ACTION: "payment.refund"})
    assert (e.rule.name, e.level) == ("payments", "none")  # type: ignore[union-attr]


def test_selectors_all_must_match(tmp_path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """\
        rules:
          - name: admin deletes
            route: /admin/*
            service: [shop, billing]
            effect: data.write
            resource_type: user
            attributes: {http.request.method: DELETE, db.system: "sqlite*"}
            durability: blocking
        """,
    )
    policy = AuditPolicy.load(path)
    base = {
        "http.route": "/admin/users",
        v.RESOURCE_TYPE: "user",
        "http.request.method": "DELETE",
        "db.system": "sqlite",
        "db.statement": "DELETE FROM users WHERE id=1",
    }
    e = policy.explain(base, service="shop")
    assert e.rule is not None and e.rule.name == "admin deletes"
    assert (e.level, e.durability) == ("full", "blocking")
    for key, other in [
        ("http.route", "/orders"),
        (v.RESOURCE_TYPE, "order"),
        ("http.request.method", "GET"),
        ("db.statement", "SELECT 1 FROM users"),
    ]:
        assert policy.explain({**base, key: other}, service="shop").rule is None, key
    assert policy.explain(base, service="catalog").rule is None


# -- levels ---------------------------------------------------------------------------


LEVELS = """\
[[rules]]
action = "a.none"
level = "none"

[[rules]]
action = "a.meta"
level = "metadata"

[[rules]]
action = "a.full"
level = "full"
"""


@pytest.mark.parametrize("level", ["none", "metadata", "full"])
def test_levels(tmp_path, make_pipeline, level: str) -> None:
    pipeline, provider, _ = make_pipeline(policy=write(tmp_path, "p.toml", LEVELS))
    tracer = provider.get_tracer("test")
    action = {"none": "a.none", "metadata": "a.meta", "full": "a.full"}[level]
    with otel_audit.audit_action(action, resource=("order", "42")) as act:
        act.span.add_event("step", {"detail": "payload"})  # type: ignore[union-attr]
        act.span.set_status(Status(StatusCode.ERROR, "the message"))  # type: ignore[union-attr]
        with tracer.start_as_current_span(
            "INSERT",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "sqlite", "db.statement": "INSERT INTO orders VALUES (42)"},
        ):
            pass
        act.set_attribute("http.route", "/orders/<id>")
        act.set_attribute("order.total", 99)
    got = {r.attr(v.ACTION, r.name): r for r in records(pipeline.ledger_url)}
    if level == "none":
        # The action is not recorded; its data write is still kept (default).
        assert list(got) == ["INSERT"]
        return
    rec = got[action]
    assert rec.attr(v.RESOURCE_ID) == "42" and rec.attr("http.route") == "/orders/<id>"
    if level == "metadata":
        assert "order.total" not in rec.attributes
        assert rec.events[0].name == "step" and rec.events[0].attributes == {}
        assert rec.status_message is None
    else:
        assert rec.attr("order.total") == 99
        assert rec.events[0].attributes == {"detail": "payload"}
        assert rec.status_message == "the message"
    # Literals are replaced by default: statements carry the values they write.
    assert got["INSERT"].attr("db.statement") == "INSERT INTO orders VALUES (?)"


def test_rule_can_keep_reads_that_the_default_leaves_out(tmp_path, make_pipeline) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """\
        [[rules]]
        effect = "data.read"
        attributes = { "db.statement" = "*FROM customers*" }
        level = "metadata"
        """,
    )
    pipeline, provider, _ = make_pipeline(policy=path)
    tracer = provider.get_tracer("test")
    with otel_audit.audit_action("customer.view"):
        for table in ("customers", "products"):
            with tracer.start_as_current_span(
                "SELECT",
                kind=SpanKind.CLIENT,
                attributes={"db.system": "sqlite", "db.statement": f"SELECT * FROM {table}"},
            ):
                pass
    got = records(pipeline.ledger_url)
    reads = [r for r in got if r.attr(v.EFFECT) == v.DATA_READ]
    assert len(reads) == 1 and "db.statement" not in reads[0].attributes
    assert reads[0].attr("db.system") == "sqlite"


# -- durabilities ------------------------------------------------------------------------


DURABILITY = """\
[[rules]]
action = "d.async"
durability = "async"

[[rules]]
action = "d.sync"
durability = "sync"

[[rules]]
action = "d.blocking"
durability = "blocking"
"""


def _lock(path: pathlib.Path) -> sqlite3.Connection:
    """Hold the ledger's write lock from another connection, as another writer would."""
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    con.execute("BEGIN IMMEDIATE")
    return con


def test_async_returns_while_the_ledger_is_busy_and_sync_waits(tmp_path, make_pipeline) -> None:
    pipeline, _, _ = make_pipeline(policy=write(tmp_path, "p.toml", DURABILITY))
    db = tmp_path / "audit.db"
    con = _lock(db)
    try:
        # async: returns at once although nothing can be committed yet.
        with otel_audit.audit_action("d.async"):
            pass
        done = threading.Event()

        def sync_action() -> None:
            with otel_audit.audit_action("d.sync"):
                pass
            done.set()

        worker = threading.Thread(target=sync_action)
        worker.start()
        # sync: end() is still waiting for its commit while the lock is held.
        assert not done.wait(0.5)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert done.wait(30)
    worker.join()
    # Committed before end() returned: readable without any flush.
    assert "d.sync" in [r.attr(v.ACTION) for r in records(pipeline.ledger_url)]
    assert pipeline.flush(30)
    assert {r.attr(v.ACTION) for r in records(pipeline.ledger_url)} == {"d.async", "d.sync"}


def test_blocking_commits_the_intent_before_the_body_runs(tmp_path, make_pipeline) -> None:
    pipeline, _, _ = make_pipeline(policy=write(tmp_path, "p.toml", DURABILITY), durability="async")
    seen: list[list[tuple[str, object]]] = []
    with otel_audit.audit_action("d.blocking", resource=("account", "7")) as act:
        # Inside the body, before it does anything: the intent is already durable.
        seen.append(
            [(r.attr(v.ACTION), r.attr("audit.intent")) for r in records(pipeline.ledger_url)]
        )
        span_id = format(act.span.get_span_context().span_id, "016x")  # type: ignore[union-attr]
    assert seen == [[("d.blocking", True)]]
    got = records(pipeline.ledger_url)
    assert [(r.span_id, r.attr("audit.intent"), r.attr(v.OUTCOME)) for r in got] == [
        (span_id, True, None),
        (span_id, None, v.SUCCESS),
    ]


_REFUSE = textwrap.dedent(
    """\
    import json, os, resource, signal, sys
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    ledger, policy = sys.argv[1], sys.argv[2]
    pipeline = otel_audit.configure(
        ledger="sqlite:///" + ledger, service_name="bank", policy=policy,
        tracer_provider=TracerProvider(), handle_sigterm=False,
    )
    ran = []
    with otel_audit.audit_action("d.blocking"):
        ran.append("first")
    # From here on every write of this process fails with EFBIG, as on a full
    # disk: the kernel enforces RLIMIT_FSIZE for root too.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    errors = []
    for name in ("second", "third"):
        try:
            with otel_audit.audit_action("d.blocking"):
                ran.append(name)
        except otel_audit.LedgerError as exc:
            errors.append(type(exc).__name__)
    print(json.dumps({"ran": ran, "errors": errors}))
    os._exit(0)
    """
)


def test_blocking_action_refused_when_the_ledger_cannot_be_written(tmp_path) -> None:
    """The ledger becomes unwritable for real: the file-size limit makes every write fail."""
    policy = write(tmp_path, "p.toml", DURABILITY)
    db = tmp_path / "bank.db"
    out = subprocess.run(
        [sys.executable, "-c", _REFUSE, str(db), policy],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The bodies never ran: first the intent write fails, then the writer is
    # known to be unhealthy and the action is refused before starting.
    assert result == {"ran": ["first"], "errors": ["LedgerWriteError", "LedgerUnavailable"]}
    got = records(f"sqlite:///{db}")
    assert [(r.attr(v.ACTION), r.attr("audit.intent"), r.attr(v.OUTCOME)) for r in got] == [
        ("d.blocking", True, None),
        ("d.blocking", None, v.SUCCESS),
    ]


def test_defaults_without_a_file(make_pipeline) -> None:
    pipeline, _, _ = make_pipeline()
    policy = pipeline.processor.policy
    assert policy is not None
    with otel_audit.audit_action("user.login", attributes={"user.password": "hunter2"}):
        pass
    (rec,) = records(pipeline.ledger_url)
    assert rec.attr("user.password") == "[REDACTED]"


# -- otel-audit policy check ------------------------------------------------------------


CHECK = """\
[[rules]]
name = "deletes are blocking"
action = "*.delete"
durability = "blocking"

[[rules]]
name = "health checks"
route = "/health"
level = "none"

[[boundary.classify]]
classification = "production"
tables = ["orders"]

[boundary.allow.production]
hosts = ["billing.internal:443"]
"""


def test_policy_check_explains_spans(tmp_path, capsys) -> None:
    path = write(tmp_path, "p.toml", CHECK)
    code = main(
        [
            "policy", "check", path,
            "--span", json.dumps({v.ACTION: "order.delete", "http.request.header.cookie": ["s=1"]}),
            "--span", json.dumps({"http.route": "/health"}),
            "--span", json.dumps({
                "attributes": {"url.full": "https://evil.example/up?token=abc", "http.request.method": "POST",
                               v.DATA_CLASSIFICATION: "production"},
                "kind": "CLIENT",
            }),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"ok: {path}: 2 rules, defaults level=full durability=pipeline")
    blocks = out.split("\n\n")
    assert "rule:        #1 'deletes are blocking'" in blocks[1]
    assert "durability:  blocking" in blocks[1]
    assert "redact:      http.request.header.cookie -> mask" in blocks[1]
    assert "rule:        #2 'health checks'" in blocks[2] and "level:       none" in blocks[2]
    assert "rule:        none matched; [defaults] apply" in blocks[3]
    assert "redact:      secrets inside the value of url.full -> mask" in blocks[3]
    assert (
        "destination: host evil.example: VIOLATION (production not allowed; reported)" in blocks[3]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--span", "{not json"], "otel-audit: --span is not valid JSON"),
        (["--span", "[1]"], "otel-audit: --span must be a JSON object"),
    ],
)
def test_policy_check_usage_errors(tmp_path, capsys, args: list[str], message: str) -> None:
    path = write(tmp_path, "p.toml", CHECK)
    assert main(["policy", "check", path, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_policy_check_bad_file_exit_2(tmp_path) -> None:
    path = write(tmp_path, "p.toml", "[[rules]]\naction = 3\nlevel = 'full'\n")
    out = subprocess.run(
        [sys.executable, "-m", "otel_audit", "policy", "check", path],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        out.stderr
        == f"otel-audit: {path}:2: rules[0].action: must be a string or a list of strings\n"
    )


def test_the_documented_example_is_valid(tmp_path, monkeypatch) -> None:
    """docs/policy.md's full example loads, and behaves as the document says."""
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "policy.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    key = tmp_path / "hmac.key"
    key.write_bytes(b"0123456789abcdef0123")
    path = write(tmp_path, "p.toml", example.replace("/etc/otel-audit/hmac.key", str(key)))
    policy = AuditPolicy.load(path)
    assert policy.rules[0].name == "refunds are blocking"
    assert policy.explain({v.ACTION: "payment.refund"}).durability == "blocking"
    assert policy.explain({"http.route": "/healthz"}).level == "none"
    copy = policy.explain(
        {"db.system": "postgresql", "db.name": "analytics",
         "db.statement": "INSERT INTO copy SELECT * FROM customers"}
    )  # fmt: skip
    assert (copy.classification, copy.violations) == ("production", ["production"])


def test_default_policy_explains_the_default_redaction() -> None:
    """With no policy file, explain names what the defaults mask and scan."""
    policy = load_policy(env={})
    e = policy.explain(
        {
            "PGPASSWORD": "hunter22",
            "oauth.accesstoken": "t",
            "user.pass": "p",
            "passenger.count": 3,
            "keyboard.layout": "de",
            v.RESOURCE_ID: "Q2xhc3NpY0tleUFiY2RlZmdoaWprbG1ub3A9x",
            "url.full": "https://x.example/cb?pw=abc&page=2",
        }
    )
    assert e.redactions == {"PGPASSWORD": "mask", "oauth.accesstoken": "mask", "user.pass": "mask"}
    assert sorted(e.scrubbed) == [v.RESOURCE_ID, "url.full"]
