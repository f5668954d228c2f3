"""AuditFlask added in code (``AuditFlask(app)``): route table, custom resolver, app-set actor.

A real Flask app instrumented by FlaskInstrumentor, served over real HTTP on
loopback by werkzeug in a thread, recorded by a real audit pipeline.
"""

from __future__ import annotations

from typing import Any

import flask
import pytest
import requests
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.integrations.flask import AuditFlask


def make_app(provider, **options: Any) -> flask.Flask:
    app = flask.Flask("incode")
    FlaskInstrumentor.instrument_app(app, tracer_provider=provider)

    @app.post("/carts/<cart_id>/checkout")
    def checkout(cart_id: str) -> Any:
        return {"ok": True}

    @app.post("/search")
    def search() -> Any:
        return {"hits": []}

    @app.post("/login")
    def login() -> Any:
        # The app names the actor itself after checking the password.
        otel_audit.set_actor(flask.request.form["user"], auth="password")
        return {"ok": True}

    @app.patch("/profile")
    def profile() -> Any:
        return {"ok": True}

    @app.get("/outbound-baggage")
    def outbound_baggage() -> Any:
        # What this service would propagate to the next one.
        from opentelemetry import baggage

        return dict(baggage.get_all())

    AuditFlask(app, **options)
    return app


def records(pipeline) -> list[Any]:
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        # The outcome records (each audited request also committed an intent before its view).
        return [
            r.record
            for r in ledger.query(Query())
            if r.record.attr(v.EVENT) and not r.record.attr(v.INTENT)
        ]


def test_route_table_resolver_and_app_set_actor(make_pipeline, serve):
    pipeline, provider, _ = make_pipeline(sampler=ALWAYS_OFF)
    app = make_app(
        provider,
        routes={"POST /carts/<cart_id>/checkout": "cart.checkout", "search": False},
        actor_resolver=lambda: flask.request.headers.get("X-Api-Key-Owner"),
        resources={"cart_id": "cart"},
    )
    url = serve(app)
    assert requests.post(url + "/carts/c9/checkout", headers={"X-Api-Key-Owner": "svc-a"}).ok
    assert requests.post(url + "/search").ok
    assert requests.post(url + "/login", data={"user": "erin"}).ok
    assert requests.patch(url + "/profile").ok
    got = {r.attr(v.ACTION): r for r in records(pipeline)}
    assert set(got) == {"cart.checkout", "user.login", "profile.update"}
    cart = got["cart.checkout"]
    assert (cart.attr(v.ACTOR_ID), cart.attr(v.RESOURCE_TYPE), cart.attr(v.RESOURCE_ID)) == (
        "svc-a", "cart", "c9",
    )  # fmt: skip
    assert (got["user.login"].attr(v.ACTOR_ID), got["user.login"].attr(v.ACTOR_AUTH)) == (
        "erin", "password",
    )  # fmt: skip
    assert got["profile.update"].attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS


def test_methods_option_and_inbound_trail_is_continued_from_trusted_peers(make_pipeline, serve):
    pipeline, provider, _ = make_pipeline()
    app = make_app(provider, methods=["PATCH"], trusted_peers=["127.0.0.1/32"])
    url = serve(app)
    assert requests.post(url + "/carts/c1/checkout").ok  # POST not audited here
    reply = requests.patch(url + "/profile", headers={"baggage": "audit.trail.id=feedfacecafe0001"})
    assert reply.ok
    (rec,) = records(pipeline)
    assert (rec.attr(v.ACTION), rec.attr(v.TRAIL_ID)) == ("profile.update", "feedfacecafe0001")


def test_untrusted_client_cannot_graft_onto_a_trail(make_pipeline, serve):
    pipeline, provider, _ = make_pipeline()
    app = make_app(provider, methods=["PATCH"])  # no trusted peers
    url = serve(app)
    reply = requests.patch(url + "/profile", headers={"baggage": "audit.trail.id=feedfacecafe0001"})
    assert reply.ok
    (rec,) = records(pipeline)
    # A new trail, named by this request's own span.
    assert rec.attr(v.TRAIL_ID) == rec.span_id != "feedfacecafe0001"


def test_an_unwritable_ledger_refuses_the_action(make_pipeline, serve):
    pipeline, provider, _ = make_pipeline()
    app = make_app(provider)
    url = serve(app)
    pipeline.writer.shutdown()  # the writer no longer accepts records: fail closed
    reply = requests.patch(url + "/profile")
    assert reply.status_code == 503 and reply.text == "audit ledger unavailable\n"


@pytest.mark.parametrize("sampled", [True, False])
def test_forged_baggage_is_not_forwarded_sampled_or_not(make_pipeline, serve, sampled):
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    pipeline, provider, _ = make_pipeline(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    url = serve(make_app(provider))
    forged = "audit.actor.id=admin,audit.actor.type=user,audit.trail.id=feedfacecafe0001,x=1"
    reply = requests.get(url + "/outbound-baggage", headers={"baggage": forged})
    assert reply.json() == {"x": "1"}


def test_flask_login_view_is_the_login_whatever_its_name(make_pipeline, serve):
    """The login view is known from the login manager; success means a user is logged in after it."""
    from flask_login import LoginManager, UserMixin, login_user, logout_user

    pipeline, provider, _ = make_pipeline()
    app = flask.Flask("logins")
    app.secret_key = "test"
    FlaskInstrumentor.instrument_app(app, tracer_provider=provider)
    manager = LoginManager(app)
    manager.login_view = "open_session"

    class User(UserMixin):
        def __init__(self, ident: str) -> None:
            self.id = ident

    manager.user_loader(User)

    @app.post("/session/open")
    def open_session() -> Any:
        if flask.request.form.get("password") == "right":
            login_user(User(flask.request.form["name"]))
        return flask.redirect("/")  # success or not: a redirect, as most apps do

    @app.get("/bye")
    def bye() -> Any:  # a logout by GET, under a name the route rule does not know
        logout_user()
        return flask.redirect("/")

    AuditFlask(app, routes={"bye": "user.logout"})
    url = serve(app)
    s = requests.Session()
    assert s.post(url + "/session/open", data={"name": "gus", "password": "wrong"},
                  allow_redirects=False).status_code == 302  # fmt: skip
    assert s.post(url + "/session/open", data={"name": "gus", "password": "right"},
                  allow_redirects=False).status_code == 302  # fmt: skip
    assert s.get(url + "/bye", allow_redirects=False).status_code == 302
    got = [(r.attr(v.ACTION), r.attr(v.ACTOR_ID), r.attr(v.OUTCOME)) for r in records(pipeline)]
    assert got == [
        ("user.login", None, v.FAILURE), ("user.login", "gus", v.SUCCESS),
        ("user.logout", "gus", v.SUCCESS),
    ]  # fmt: skip


def test_route_names_from_the_policy_file(make_pipeline, serve, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[actions]\n"POST /carts/<cart_id>/checkout" = "cart.checkout"\nsearch = false\n'
    )
    pipeline, provider, _ = make_pipeline(policy=str(policy))
    url = serve(make_app(provider))
    assert requests.post(url + "/carts/c9/checkout").ok
    assert requests.post(url + "/search").ok
    actions = {r.attr(v.ACTION) for r in records(pipeline) if not r.attr(v.INTENT)}
    assert actions == {"cart.checkout"}


def test_a_bad_action_name_in_the_policy_file_names_its_line(tmp_path):
    from otel_audit.errors import ConfigError
    from otel_audit.policy.rules import AuditPolicy

    policy = tmp_path / "policy.toml"
    policy.write_text('[actions]\n"POST /a" = "ok.name"\n"POST /b" = "not a name"\n')
    with pytest.raises(ConfigError, match=r"policy.toml:3: actions.*must be an action name"):
        AuditPolicy.load(str(policy))
