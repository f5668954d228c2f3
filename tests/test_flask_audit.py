"""Flask services audited with no code change: real processes under opentelemetry-instrument.

One small app (written to the test's directory) exercises each default way
of resolving the actor, every outcome, the route marks, forwarded addresses
and sampling, driven over real HTTP on loopback.
"""

from __future__ import annotations

import functools
import http.client
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import requests

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.integrations.flask import _networks, client_ip, default_action, outcome_for_status
from tests.plugins.flask_service import base_env

APP = textwrap.dedent(
    """
    import argparse, sqlite3, os
    import flask
    from flask import g, request
    from flask_login import LoginManager, UserMixin
    from otel_audit.integrations.flask import audited, not_audited

    app = flask.Flask("testapp")
    login = LoginManager(app)
    TOKENS = {"tok-carol": "carol"}
    PASSWORDS = {"dave": "dave-pw"}

    class User(UserMixin):
        def __init__(self, ident):
            self.id = ident
            self.roles = ["staff"]

    @login.request_loader
    def from_token(req):
        name = TOKENS.get(req.headers.get("X-Token", ""))
        return User(name) if name else None

    class GUser:
        def __init__(self, ident):
            self.id, self.username, self.roles = ident, "name-" + ident, ["admin"]

    @app.before_request
    def app_auth():
        if request.path.startswith("/g/") and request.headers.get("X-App-User"):
            g.user = GUser(request.headers["X-App-User"])
        if request.path.startswith("/gmap/") and request.headers.get("X-App-User"):
            g.user = {"username": request.headers["X-App-User"]}

    def write():
        con = sqlite3.connect(os.path.join(os.environ["SHOP_DATA_DIR"], "t.db"))
        cur = con.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS items (name TEXT)")
        cur.execute("INSERT INTO items VALUES ('x')")
        con.commit()
        con.close()

    @app.get("/healthz")
    def healthz():
        return "ok"

    @app.post("/g/items")
    def g_items():
        write()
        return {"ok": True}, 201

    @app.post("/gmap/items")
    def gmap_items():
        return {"ok": True}, 201

    @app.post("/login/items")
    def login_items():
        return {"ok": True}, 201

    @app.put("/basic/items/<int:item_id>")
    def basic_items(item_id):
        auth = request.authorization
        if auth is None or PASSWORDS.get(auth.username) != auth.password:
            return "no", 401, {"WWW-Authenticate": "Basic"}
        return {"ok": True}

    @app.delete("/anon/items/<item_id>")
    def anon_delete(item_id):
        return "", 204

    @app.post("/status/<int:code>")
    def status(code):
        app.logger.warning("status %s requested", code)
        return "x", code

    @app.post("/boom")
    def boom():
        raise RuntimeError("secret detail")

    @app.post("/redirect")
    def redirect():
        return flask.redirect("/healthz")

    @app.get("/reports/<int:report_id>")
    @audited("report.export", resource=("report", "report_id"))
    def report(report_id):
        return {"ok": True}

    @app.get("/plain")
    def plain():
        return {"ok": True}

    def operator_actor():
        # What an operator names with OTEL_AUDIT_ACTOR_RESOLVER=testapp:operator_actor.
        return request.headers.get("X-Operator-User")

    @app.post("/ping")
    @not_audited
    def ping():
        return {"ok": True}

    if __name__ == "__main__":
        p = argparse.ArgumentParser(); p.add_argument("--port", type=int)
        app.run(host="127.0.0.1", port=p.parse_args().port, threaded=True)
    """
)


@pytest.fixture
def app_service(run_service, tmp_path: pathlib.Path):
    (tmp_path / "testapp.py").write_text(APP)

    def start(**env: str):
        ledger = f"sqlite:///{tmp_path / 'audit.db'}"
        full = base_env(ledger, tmp_path, **env)
        full["PYTHONPATH"] = f"{tmp_path}:{full['PYTHONPATH']}"
        return run_service("testapp", env=full, name="testapp"), ledger

    return start


def audit_records(ledger_url: str) -> list[Any]:
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        return [r.record for r in ledger.query(Query())]


def actions(ledger_url: str) -> dict[str, Any]:
    return {r.attr(v.ACTION): r for r in audit_records(ledger_url) if r.attr(v.EVENT)}


def test_actor_outcome_and_action_for_each_request(app_service):
    service, ledger = app_service()
    url = service.url
    s = requests.Session()
    assert s.post(url + "/g/items", headers={"X-App-User": "u1"}).status_code == 201
    assert s.post(url + "/gmap/items", headers={"X-App-User": "mapuser"}).status_code == 201
    assert s.post(url + "/login/items", headers={"X-Token": "tok-carol"}).status_code == 201
    assert s.put(url + "/basic/items/7", auth=("dave", "dave-pw")).status_code == 200
    assert s.delete(url + "/anon/items/abc").status_code == 204
    assert s.post(url + "/boom").status_code == 500
    assert s.post(url + "/redirect", allow_redirects=False).status_code == 302
    assert s.get(url + "/reports/5").status_code == 200
    assert s.get(url + "/plain").status_code == 200
    assert s.post(url + "/ping").status_code == 200
    got = actions(ledger)
    assert set(got) == {
        "item.create", "item.update", "item.delete", "boom.create", "redirect.create",
        "report.export",
    }  # fmt: skip
    recs = [r for r in audit_records(ledger) if r.attr(v.EVENT)]
    by_route = {r.attr("http.route"): r for r in recs}

    g_user = by_route["/g/items"]
    assert (g_user.attr(v.ACTOR_ID), g_user.attr(v.ACTOR_TYPE)) == ("u1", "user")
    assert g_user.attr(v.ACTOR_ROLES) == ["admin"] and g_user.attr(v.ACTOR_IP) == "127.0.0.1"
    assert g_user.attr(v.ACTION) == "item.create" and g_user.attr(v.OUTCOME) == v.SUCCESS
    assert g_user.attr(v.TRAIL_ID) == g_user.span_id and g_user.kind == "SERVER"
    # The view's write is an effect of the action, with the actor resolved after app auth.
    write = [r for r in audit_records(ledger) if r.attr(v.EFFECT) == v.DATA_WRITE]
    assert [(w.name, w.attr(v.TRAIL_ID), w.attr(v.ACTOR_ID), w.parent_span_id) for w in write] == [
        ("CREATE", g_user.span_id, "u1", g_user.span_id),
        ("INSERT", g_user.span_id, "u1", g_user.span_id),
    ]
    assert by_route["/gmap/items"].attr(v.ACTOR_ID) == "mapuser"
    carol = by_route["/login/items"]
    assert (carol.attr(v.ACTOR_ID), carol.attr(v.ACTOR_AUTH)) == ("carol", "flask_login")
    dave = by_route["/basic/items/<int:item_id>"]
    # The app checks basic credentials by hand, not through an auth extension:
    # otel-audit cannot know it did, so the name is not believed (opt-in below).
    assert (dave.attr(v.ACTOR_ID), dave.attr(v.ACTOR_TYPE)) == (None, v.ACTOR_ANONYMOUS)
    assert (dave.attr(v.ACTION), dave.attr(v.RESOURCE_TYPE), dave.attr(v.RESOURCE_ID)) == (
        "item.update", "item", "7",
    )  # fmt: skip
    anon = by_route["/anon/items/<item_id>"]
    assert anon.attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS and anon.attr(v.ACTOR_ID) is None
    assert (anon.attr(v.ACTION), anon.attr(v.RESOURCE_ID)) == ("item.delete", "abc")
    boom = by_route["/boom"]
    assert (boom.attr(v.OUTCOME), boom.attr(v.REASON)) == (v.FAILURE, "RuntimeError")
    assert "secret detail" not in str(boom.attributes)
    assert by_route["/redirect"].attr(v.OUTCOME) == v.SUCCESS
    report = by_route["/reports/<int:report_id>"]
    assert (report.attr(v.ACTION), report.attr(v.RESOURCE_TYPE), report.attr(v.RESOURCE_ID)) == (
        "report.export", "report", "5",
    )  # fmt: skip
    assert "/plain" not in by_route and "/ping" not in by_route


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(201, v.SUCCESS), (204, v.SUCCESS), (401, v.DENIED), (403, v.DENIED), (409, v.FAILURE),
     (422, v.FAILURE), (503, v.FAILURE)],
)  # fmt: skip
def test_outcome_for_status(code, outcome):
    assert outcome_for_status(code) == outcome


def test_outcomes_by_status_over_http_and_bad_credentials_are_anonymous(app_service):
    # The operator says this app verifies basic credentials itself.
    service, ledger = app_service(OTEL_AUDIT_TRUST_BASIC_AUTH="true")
    for code in (201, 401, 403, 409, 503):
        assert requests.post(f"{service.url}/status/{code}").status_code == code
    assert requests.put(service.url + "/basic/items/2", auth=("dave", "dave-pw")).status_code == 200
    # Wrong password: the app answers 401, so the claimed name is not believed.
    assert requests.put(service.url + "/basic/items/1", auth=("dave", "nope")).status_code == 401
    recs = [r for r in audit_records(ledger) if r.attr(v.EVENT) and not r.attr(v.INTENT)]
    (dave,) = [r for r in recs if r.attr(v.RESOURCE_ID) == "2"]
    assert (dave.attr(v.ACTOR_ID), dave.attr(v.ACTOR_AUTH)) == ("dave", "basic")
    outcomes = sorted(
        (r.attr("http.status_code") or r.attr("http.response.status_code"), r.attr(v.OUTCOME))
        for r in recs
        if r.attr("http.route") == "/status/<int:code>"
    )
    assert outcomes == [
        (201, v.SUCCESS), (401, v.DENIED), (403, v.DENIED), (409, v.FAILURE), (503, v.FAILURE)
    ]  # fmt: skip
    refused = [r for r in recs if r.attr(v.RESOURCE_ID) == "1"]
    assert len(refused) == 1
    assert refused[0].attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS
    assert refused[0].attr(v.ACTOR_ID) is None and refused[0].attr(v.OUTCOME) == v.DENIED


def test_unsampled_traces_still_audit_state_changes(app_service):
    service, ledger = app_service(OTEL_TRACES_SAMPLER="always_off")
    assert requests.post(service.url + "/g/items", headers={"X-App-User": "u2"}).status_code == 201
    assert requests.get(service.url + "/plain").status_code == 200
    # A GET view marked @audited is kept too (routes are noted at the first request).
    assert requests.get(service.url + "/reports/9").status_code == 200
    recs = audit_records(ledger)
    # Each audited request: its intent (committed before the view), then its outcome.
    assert sorted((r.name, r.attr(v.ACTOR_ID), bool(r.attr(v.INTENT))) for r in recs) == [
        ("CREATE", "u2", False), ("GET /reports/<int:report_id>", None, False),
        ("GET /reports/<int:report_id>", None, True), ("INSERT", "u2", False),
        ("POST /g/items", "u2", False), ("POST /g/items", "u2", True),
    ]  # fmt: skip


def test_forwarded_for_only_through_trusted_proxies(app_service):
    service, ledger = app_service(OTEL_AUDIT_TRUSTED_PROXIES="127.0.0.1/32")
    forged = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}
    assert requests.delete(service.url + "/anon/items/1", headers=forged).status_code == 204
    (rec,) = [r for r in audit_records(ledger) if r.attr(v.EVENT) and not r.attr(v.INTENT)]
    # 127.0.0.1 (trusted proxy) says the client is 203.0.113.9; that one is not a
    # proxy we trust, so what it claims (6.6.6.6) is not believed.
    assert rec.attr(v.ACTOR_IP) == "203.0.113.9"


def test_client_ip_walks_back_only_through_trusted_proxies():
    proxies = _networks("10.0.0.0/8, ::1", "TEST")
    assert client_ip("192.0.2.1", "1.2.3.4", proxies) == "192.0.2.1"
    assert client_ip("10.0.0.2", "1.2.3.4, 10.0.0.9", proxies) == "1.2.3.4"
    assert client_ip("10.0.0.2", "evil, 198.51.100.4", proxies) == "198.51.100.4"
    # A hop naming no address leaves the client unknown, never the proxy.
    assert client_ip("10.0.0.2", "garbage", proxies) is None
    assert client_ip("::1", "2001:db8::5", proxies) == "2001:db8::5"


def test_default_action_names():
    assert default_action("/orders", "POST") == "order.create"
    assert default_action("/orders/<int:order_id>", "DELETE") == "order.delete"
    assert default_action("/orders/<int:order_id>", "PATCH") == "order.update"
    assert default_action("/orders/<int:id>/cancel", "POST") == "order.cancel"
    assert default_action("/categories", "POST") == "category.create"
    assert default_action("/<path:p>", "POST", "catch_all") == "catch_all.submit"
    # Readable names: a page is no resource, a verb segment is the verb, auth routes are events.
    assert default_action("/index", "POST", "index") == "index.submit"
    assert default_action("/", "POST", "blog.index") == "blog.submit"
    assert default_action("/create", "POST", "blog.create") == "blog.create"
    assert default_action("/<int:id>/update", "POST", "blog.update") == "blog.update"
    assert default_action("/api/v1/posts/<int:id>/edit", "POST") == "post.update"
    assert default_action("/api/tasks", "POST") == "task.create"
    assert default_action("/auth/login", "POST", "auth.login") == "user.login"
    assert default_action("/logout", "GET", "logout") == "user.logout"
    assert default_action("/auth/register", "POST", "auth.register") == "user.register"
    assert default_action("/addresses", "POST") == "address.create"


def test_a_bad_trusted_peers_setting_is_one_clear_error():
    from otel_audit.errors import ConfigError
    from otel_audit.integrations.flask import AuditFlask

    with pytest.raises(ConfigError, match="OTEL_AUDIT_TRUSTED_PEERS has an invalid address"):
        AuditFlask(trusted_peers="10.0.0.0/99")


def outcome_records(ledger_url: str) -> list[Any]:
    return [r for r in audit_records(ledger_url) if r.attr(v.EVENT) and not r.attr(v.INTENT)]


def test_parse_hop_forms():
    from otel_audit.integrations.flask import parse_hop

    assert parse_hop("6.6.6.6:4242") == "6.6.6.6"
    assert parse_hop(" [2001:db8::1]:443 ") == "2001:db8::1"
    assert parse_hop('"[2001:db8::1]"') == "2001:db8::1"
    assert parse_hop("2001:db8::1") == "2001:db8::1"
    assert parse_hop("for=192.0.2.60") == "192.0.2.60"
    for bad in ("unknown", "_hidden", "6.6.6.6:http", "[2001:db8::1", "", "evil.example"):
        assert parse_hop(bad) is None


def _delete_with_headers(url: str, path: str, headers: list[tuple[str, str]]) -> int:
    """A request whose header lines are sent exactly as given (repeated lines too)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("DELETE", path)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_forged_forwarded_hops_never_make_a_trusted_peer(app_service):
    """Attack: proxy and peer ranges overlap; the attacker hides behind hop forms.

    Each request arrives from 127.0.0.1 (a trusted proxy, also a trusted peer)
    with forged actor baggage; only a hop that really is a trusted peer may
    pass an actor, and an unreadable hop is an unknown client, not the proxy.
    """
    service, ledger = app_service(
        OTEL_AUDIT_TRUSTED_PROXIES="127.0.0.0/8", OTEL_AUDIT_TRUSTED_PEERS="127.0.0.0/8"
    )
    forged = ("baggage", "audit.actor.id=admin,audit.actor.type=user")
    cases = {
        "ipport": [("X-Forwarded-For", "6.6.6.6:4242")],
        "v6port": [("X-Forwarded-For", "[2001:db8::66]:443")],
        "unknown": [("X-Forwarded-For", "unknown")],
        "hidden": [("X-Forwarded-For", "_hidden")],
        # The attacker's own line first, the proxy's line after it.
        "twolines": [("X-Forwarded-For", "127.0.0.9"), ("X-Forwarded-For", "6.6.6.6")],
        "garbage": [("X-Forwarded-For", "127.0.0.9, not-an-address")],
        "peer": [("X-Forwarded-For", "127.0.0.7:5000")],  # a real peer behind the proxy
    }
    for name, headers in cases.items():
        assert _delete_with_headers(service.url, f"/anon/items/{name}", [*headers, forged]) == 204
    got = {r.attr(v.RESOURCE_ID): r for r in outcome_records(ledger)}
    seen = {name: (got[name].attr(v.ACTOR_ID), got[name].attr(v.ACTOR_IP)) for name in cases}
    assert seen == {
        "ipport": (None, "6.6.6.6"),
        "v6port": (None, "2001:db8::66"),
        "unknown": (None, None),
        "hidden": (None, None),
        "twolines": (None, "6.6.6.6"),
        "garbage": (None, None),
        "peer": ("admin", "127.0.0.7"),
    }


def test_forged_basic_header_names_nobody(app_service):
    """Attack: ``Authorization: Basic admin:x`` to routes that authenticate otherwise or not at all."""
    service, ledger = app_service()
    assert requests.delete(service.url + "/anon/items/9", auth=("admin", "x")).status_code == 204
    assert requests.post(service.url + "/status/401", auth=("admin", "x")).status_code == 401
    recs = outcome_records(ledger)
    assert len(recs) == 2 and all(r.attr(v.ACTOR_ID) is None for r in recs)
    assert all(r.attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS for r in recs)


def test_operator_resolver_and_route_names_from_settings(app_service):
    service, ledger = app_service(
        OTEL_AUDIT_ACTOR_RESOLVER="testapp:operator_actor",
        OTEL_AUDIT_FLASK_ROUTES="DELETE /anon/items/<item_id>=item.purge, plain=true",
    )
    who = {"X-Operator-User": "olga"}
    assert requests.delete(service.url + "/anon/items/3", headers=who).status_code == 204
    assert requests.get(service.url + "/plain", headers=who).ok
    got = [
        (r.attr(v.ACTION), r.attr(v.ACTOR_ID), r.attr(v.ACTOR_AUTH))
        for r in outcome_records(ledger)
    ]
    assert got == [("item.purge", "olga", "app"), ("plain.get", "olga", "app")]


def test_an_operator_resolver_that_cannot_load_refuses_audited_requests(app_service):
    service, ledger = app_service(OTEL_AUDIT_ACTOR_RESOLVER="no_such_module:who")
    reply = requests.delete(service.url + "/anon/items/3")
    assert reply.status_code == 503 and reply.text == "audit not configured\n"
    assert requests.get(service.url + "/plain").ok  # not audited: served
    service.stop()
    assert "OTEL_AUDIT_ACTOR_RESOLVER: cannot load 'no_such_module:who'" in service.output()


def test_doctor_names_untraced_libraries_and_bad_settings(tmp_path):
    env = {k: val for k, val in os.environ.items() if not k.startswith("OTEL_")}
    run = functools.partial(
        subprocess.run, [sys.executable, "-m", "otel_audit", "doctor"], capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    ok = run(env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (
        "database library sqlite3: instrumented: by opentelemetry-instrumentation-sqlite3"
        in ok.stdout
    )
    assert "database library sqlalchemy " in ok.stdout and "traced by otel-audit" in ok.stdout
    bad = run(
        env=dict(
            env,
            OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="sqlite3",
            OTEL_AUDIT_LEDGER=f"sqlite:///{tmp_path}/a.db",
            OTEL_AUDIT_DURABILITY="maybe",
        )
    )
    assert bad.returncode == 1 and not bad.stderr
    assert (
        "database library sqlite3: not instrumented: sqlite3 is listed in"
        " OTEL_PYTHON_DISABLED_INSTRUMENTATIONS; its effects are not audited"
    ) in bad.stdout
    assert "settings: OTEL_AUDIT_DURABILITY must be one of" in bad.stdout
