"""Audited Flask services: state-changing requests become audit actions.

Built on opentelemetry-instrumentation-flask (the app is instrumented by it
first, by ``opentelemetry-instrument`` or ``FlaskInstrumentor``); this
extension adds Flask hooks that run after the instrumentation's own:

- ``before_request`` (registered after the instrumentation's, so the server
  span is current): decides whether the request is audited (POST, PUT,
  PATCH, DELETE by default; a route table and ``@audited``/``@not_audited``
  override), marks the server span ``audit.event`` with action, resource and
  client address, and puts the trail (inbound, or a new one named by the
  server span id) into the context so every span below is stamped.
- the view call: the actor is resolved after the application's own
  authentication has run (its ``before_request`` hooks), so the effects of
  the view carry it; and again at the end when the view itself logged in.
- ``teardown_request`` (runs before the instrumentation's, which ends the
  span): the outcome from the response status or the exception, the actor.

Identity never comes from the network (DESIGN rule 3): inbound
``audit.actor.*`` baggage is used only when the client address is in
``trusted_peers``, and is removed from the context otherwise so it is not
forwarded to the next service either. Hooks never raise into the app.
An ``AuditFlask`` instance may serve several apps and many threads at once.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flask
from flask import g, request
from flask.signals import got_request_exception, request_finished
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_audit.capture import installed
from otel_audit import vocabulary as v
from otel_audit.capture.context import (
    Actor,
    current_actor,
    current_trail,
    valid_trail_id,
    with_actor,
    with_trail,
)
from otel_audit.capture.sampler import AuditSampler
from otel_audit.errors import AuditError, ConfigError
from otel_audit.settings import (
    OTEL_AUDIT_FLASK_METHODS,
    OTEL_AUDIT_TRUSTED_PEERS,
    OTEL_AUDIT_TRUSTED_PROXIES,
)

__all__ = [
    "OTEL_AUDIT_FLASK_METHODS",
    "OTEL_AUDIT_TRUSTED_PEERS",
    "OTEL_AUDIT_TRUSTED_PROXIES",
    "AuditFlask",
    "ActorResolver",
    "audited",
    "client_ip",
    "default_action",
    "not_audited",
    "outcome_for_status",
]

# Settings (names in settings.py): OTEL_AUDIT_TRUSTED_PEERS, CIDRs whose inbound
# actor and trail baggage is believed; OTEL_AUDIT_TRUSTED_PROXIES, CIDRs of
# reverse proxies whose X-Forwarded-For is believed; OTEL_AUDIT_FLASK_METHODS,
# the audited HTTP methods (default POST,PUT,PATCH,DELETE).
_DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXTENSION = "otel_audit"
_G_KEY = "_otel_audit"
_VIEW_ATTR = "_otel_audit_view"
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
# An actor id arriving in baggage is network input: a short token only.
_ACTOR_ID = re.compile(r"^[\w.@:+-]{1,128}$")

_log = logging.getLogger("otel_audit.integrations.flask")

#: Returns the actor of the current request, or None to let the next resolver try.
ActorResolver = Callable[[], Actor | str | None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Methods and forced routes of every AuditFlask, for the sampler candidate: a
# span is sampled before any Flask hook runs, so the decision needs them here.
_candidate_methods: set[str] = set()
_candidate_routes: set[str] = set()


# -- configuration helpers ----------------------------------------------------


def _networks(value: str | Iterable[str] | None, setting: str) -> tuple[Network, ...]:
    if value is None:
        value = os.environ.get(setting, "")
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{setting} has an invalid address or CIDR: {item!r}") from None
    return tuple(out)


def _methods(value: Iterable[str] | None) -> frozenset[str]:
    if value is None:
        env = os.environ.get(OTEL_AUDIT_FLASK_METHODS, "").strip()
        if not env:
            return _DEFAULT_METHODS
        value = env.split(",")
    methods = frozenset(m.strip().upper() for m in value if m.strip())
    bad = sorted(m for m in methods if not m.isalpha())
    if bad:
        raise ConfigError(f"{OTEL_AUDIT_FLASK_METHODS} has an invalid method: {bad[0]!r}")
    return methods


def _in(address: str | None, networks: Sequence[Network]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(
    remote_addr: str | None, forwarded_for: str | None, proxies: Sequence[Network]
) -> str | None:
    """The client address: ``remote_addr``, or X-Forwarded-For walked back through trusted proxies.

    Only hops appended by a proxy we trust are believed: starting at the
    direct peer, each trusted hop hands over to the address it forwarded for,
    and the first untrusted one is the client. Anything else is forgeable.
    """
    address = remote_addr
    if not forwarded_for or not _in(address, proxies):
        return address
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    while hops and _in(address, proxies):
        hop = hops.pop()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage in the header: stop at the last proxy we trust
        address = hop
    return address


def outcome_for_status(status: int | None, exception: BaseException | None = None) -> str:
    """2xx/3xx success, 401/403 denied, other 4xx/5xx failure, an exception failure."""
    if exception is not None and (status is None or status >= 500):
        return v.FAILURE
    if status is None:
        return v.UNKNOWN
    if status in (401, 403):
        return v.DENIED
    if 200 <= status < 400:
        return v.SUCCESS
    return v.FAILURE


def _singular(word: str) -> str:
    word = word.replace("-", "_")
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _is_param(segment: str) -> bool:
    return segment.startswith("<") and segment.endswith(">")


def _param_name(segment: str) -> str:
    return segment[1:-1].split(":")[-1]


def default_action(rule: str | None, method: str, endpoint: str | None = None) -> str:
    """An ``audit.action`` from a route: ``POST /orders`` -> ``order.create``.

    ``DELETE /orders/<id>`` -> ``order.delete``; a static segment after a
    parameter is the verb: ``POST /orders/<id>/cancel`` -> ``order.cancel``.
    """
    verb = _VERBS.get(method.upper(), method.lower())
    segments = [s for s in (rule or "").strip("/").split("/") if s]
    if not segments or all(_is_param(s) for s in segments):
        return f"{(endpoint or 'request').replace('.', '_')}.{verb}"
    last = segments[-1]
    if not _is_param(last) and len(segments) >= 3 and _is_param(segments[-2]):
        noun = segments[-3] if not _is_param(segments[-3]) else last
        return f"{_singular(noun)}.{last.replace('-', '_')}"
    static = [s for s in segments if not _is_param(s)]
    return f"{_singular(static[-1])}.{verb}"


def _default_resource(rule: str | None, view_args: Mapping[str, Any]) -> tuple[str, str] | None:
    """``<order_id>`` -> (order, value); ``/orders/<id>`` -> (order, value); else None."""
    if not view_args or not rule:
        return None
    segments = [s for s in rule.strip("/").split("/") if s]
    found: tuple[str, str] | None = None
    for i, seg in enumerate(segments):
        if not _is_param(seg):
            continue
        name = _param_name(seg)
        if name not in view_args:
            continue
        if name.endswith("_id") and len(name) > 3:
            found = (name[:-3], str(view_args[name]))
        elif (
            name in ("id", "pk", "key", "name", "sku") and i > 0 and not _is_param(segments[i - 1])
        ):
            found = (_singular(segments[i - 1]), str(view_args[name]))
    return found


# -- per-view marks -------------------------------------------------------------


@dataclass(frozen=True)
class _ViewRule:
    audited: bool
    action: str | None = None
    resource: tuple[str, str] | None = None  # (type, view arg name)


def audited(
    action: str | Callable[..., Any] | None = None, *, resource: tuple[str, str] | None = None
) -> Any:
    """Decorator: always audit this view (even GET), optionally naming its action.

    ``resource=("order", "order_id")`` takes the resource id from the view
    argument ``order_id``. Usable bare (``@audited``) or called.
    """

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        name = action if isinstance(action, str) else None
        setattr(func, _VIEW_ATTR, _ViewRule(True, name, resource))
        return func

    if callable(action):
        return mark(action)
    return mark


def not_audited(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: never audit this view (e.g. a state-changing health probe)."""
    setattr(func, _VIEW_ATTR, _ViewRule(False))
    return func


# -- default actor resolvers -----------------------------------------------------


def _field(user: Any, name: str) -> Any:
    if isinstance(user, Mapping):
        return user.get(name)
    return getattr(user, name, None)


def _roles(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted(str(r) for r in value))
    return ()


def _from_g_user() -> Actor | None:
    """``flask.g.user``: a mapping or object with ``id`` (or ``username``) set by the app."""
    user = g.get("user")
    if user is None:
        return None
    ident = _field(user, "id")
    if ident is None or ident == "":
        ident = _field(user, "username")
    if ident is None or ident == "":
        return None
    return Actor(str(ident), v.ACTOR_USER, _roles(_field(user, "roles")), "app")


def _from_flask_login() -> Actor | None:
    """flask_login's ``current_user`` when the extension is installed and set up on the app."""
    app = flask.current_app
    if not hasattr(app, "login_manager"):
        return None
    try:
        import flask_login  # type: ignore[import-untyped]
    except ImportError:
        return None
    user = flask_login.current_user
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    ident = user.get_id()
    if ident is None:
        return None
    return Actor(str(ident), v.ACTOR_USER, _roles(getattr(user, "roles", None)), "flask_login")


def _from_basic_auth() -> Actor | None:
    """The HTTP basic username, believed because the app let the request through (not 401)."""
    auth = request.authorization
    if auth is None or (auth.type or "").lower() != "basic" or not auth.username:
        return None
    return Actor(str(auth.username), v.ACTOR_USER, (), "basic")


DEFAULT_RESOLVERS: tuple[ActorResolver, ...] = (_from_g_user, _from_flask_login, _from_basic_auth)


# -- sampling ---------------------------------------------------------------------


def _candidate(parent: Context | None, name: str, kind: Any, attributes: Any) -> bool:
    """Keep (RECORD_ONLY) a server span that may become an audit action at before_request."""
    if kind is not SpanKind.SERVER or not attributes:
        return False
    method = attributes.get("http.request.method") or attributes.get("http.method")
    if isinstance(method, str) and method.upper() in _candidate_methods:
        return True
    return attributes.get("http.route") in _candidate_routes


def _ensure_candidate() -> None:
    pipeline = installed.global_pipeline()
    samplers = [getattr(pipeline.provider, "sampler", None)] if pipeline is not None else []
    samplers.append(getattr(trace.get_tracer_provider(), "sampler", None))
    for sampler in samplers:
        if isinstance(sampler, AuditSampler) and _candidate not in sampler.candidates:
            sampler.add_candidate(_candidate)


# -- the extension -----------------------------------------------------------------


@dataclass
class _Request:
    """Per-request state, kept on ``flask.g`` under a private name."""

    span: trace.Span
    audited: bool
    ip: str | None
    peer_actor: Actor | None
    token: object | None = None
    actor: Actor | None = None
    status: int | None = None
    exception: BaseException | None = None


class AuditFlask:
    """Flask extension: ``AuditFlask(app)`` or ``ext = AuditFlask(); ext.init_app(app)``.

    Options (each defaults to its ``OTEL_AUDIT_*`` variable, then the default):
    ``methods`` audited HTTP methods; ``routes`` a table keyed by endpoint,
    rule or ``"METHOD rule"`` whose value is an action name, True (audit) or
    False (skip); ``resources`` view-argument name -> resource type;
    ``actor_resolver`` tried before the defaults (``resolvers`` replaces
    them); ``trusted_peers`` / ``trusted_proxies`` CIDR lists.
    Thread-safe once ``init_app`` has returned.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        methods: Iterable[str] | None = None,
        routes: Mapping[str, str | bool] | None = None,
        resources: Mapping[str, str] | None = None,
        actor_resolver: ActorResolver | None = None,
        resolvers: Sequence[ActorResolver] | None = None,
        trusted_peers: str | Iterable[str] | None = None,
        trusted_proxies: str | Iterable[str] | None = None,
    ) -> None:
        self.methods = _methods(methods)
        self.routes: dict[str, str | bool] = dict(routes or {})
        self.resources = dict(resources or {})
        chain = list(resolvers) if resolvers is not None else list(DEFAULT_RESOLVERS)
        if actor_resolver is not None:
            chain.insert(0, actor_resolver)
        self.resolvers: tuple[ActorResolver, ...] = tuple(chain)
        self.trusted_peers = _networks(trusted_peers, OTEL_AUDIT_TRUSTED_PEERS)
        self.trusted_proxies = _networks(trusted_proxies, OTEL_AUDIT_TRUSTED_PROXIES)
        _candidate_methods.update(self.methods)
        if app is not None:
            self.init_app(app)

    # -- setup ---------------------------------------------------------------

    def init_app(self, app: flask.Flask) -> None:
        """Instrument ``app`` (if not yet) and add the audit hooks after the instrumentation's."""
        if _EXTENSION in app.extensions:
            return
        if not getattr(app, "_is_instrumented_by_opentelemetry", False):
            from opentelemetry.instrumentation.flask import FlaskInstrumentor

            FlaskInstrumentor.instrument_app(app)  # type: ignore[no-untyped-call]
        app.extensions[_EXTENSION] = self
        app.before_request(self._before_request)
        app.teardown_request(self._teardown_request)
        # weak=False: the receivers are bound methods of an object the app keeps.
        request_finished.connect(self._on_finished, app, weak=False)
        got_request_exception.connect(self._on_exception, app, weak=False)
        # The view call runs after every before_request hook, i.e. after the
        # app's own authentication: the place to learn the actor for effects.
        original = app.dispatch_request
        app.dispatch_request = functools.partial(self._dispatch, original)  # type: ignore[method-assign]
        _ensure_candidate()

    # -- decisions -------------------------------------------------------------

    def _route_entry(
        self, method: str, rule: str | None, endpoint: str | None
    ) -> str | bool | None:
        for key in (f"{method} {rule}", endpoint, rule):
            if key is not None and key in self.routes:
                return self.routes[key]
        return None

    def _decide(self) -> tuple[bool, str | None, tuple[str, str] | None]:
        """(audited, action, resource) of the current request."""
        method = request.method.upper()
        rule = request.url_rule.rule if request.url_rule is not None else None
        endpoint = request.endpoint
        view = flask.current_app.view_functions.get(endpoint) if endpoint else None
        mark: _ViewRule | None = getattr(view, _VIEW_ATTR, None)
        entry = self._route_entry(method, rule, endpoint)
        if mark is not None:
            is_audited = mark.audited
        elif entry is not None:
            is_audited = entry is not False
        else:
            is_audited = method in self.methods and rule is not None
        if not is_audited:
            return False, None, None
        action = (mark.action if mark is not None else None) or (
            entry if isinstance(entry, str) else None
        )
        args = request.view_args or {}
        resource: tuple[str, str] | None = None
        if mark is not None and mark.resource is not None:
            rtype, arg = mark.resource
            resource = (rtype, str(args[arg])) if arg in args else None
        if resource is None:
            for arg, rtype in self.resources.items():
                if arg in args:
                    resource = (rtype, str(args[arg]))
        if resource is None:
            resource = _default_resource(rule, args)
        return True, action or default_action(rule, method, endpoint), resource

    def _peer_actor(self, ctx: Context, ip: str | None) -> Actor | None:
        if not _in(ip, self.trusted_peers):
            return None
        ident = baggage.get_baggage(v.ACTOR_ID, ctx)
        kind = baggage.get_baggage(v.ACTOR_TYPE, ctx) or v.ACTOR_USER
        if not isinstance(ident, str) or not _ACTOR_ID.match(ident) or kind not in v.ACTOR_TYPES:
            return None
        return Actor(ident, str(kind), (), "trusted-peer", ip)

    def resolve_actor(self) -> Actor | None:
        """The actor of the current request from the app's authentication, or None."""
        ctx_actor = current_actor()
        state: _Request | None = g.get(_G_KEY)
        if ctx_actor is not None and (state is None or ctx_actor is not state.peer_actor):
            return ctx_actor  # the app called set_actor()/actor() itself
        for resolver in self.resolvers:
            try:
                found = resolver()
            except Exception:  # a broken resolver must not break the request
                _log.exception("otel-audit: actor resolver %r failed", resolver)
                continue
            if isinstance(found, str) and found:
                return Actor(found, v.ACTOR_USER, (), "app")
            if isinstance(found, Actor):
                return found
        return None

    # -- hooks -------------------------------------------------------------------

    def _before_request(self) -> Any:
        try:
            return self._start()
        except Exception:
            _log.exception("otel-audit: before_request failed; request not audited")
            return None

    def _note_forced_routes(self, app: flask.Flask) -> None:
        """Once per app: tell the sampler candidate which routes are audited whatever the method.

        Routes are usually added after ``init_app``, so this runs at the first
        request; from then on those requests are kept even when unsampled.
        """
        if app.extensions.get(_EXTENSION + ".routes_noted"):
            return
        app.extensions[_EXTENSION + ".routes_noted"] = True
        _ensure_candidate()  # again: configure() may have run after init_app
        for rule in app.url_map.iter_rules():
            mark = getattr(app.view_functions.get(rule.endpoint), _VIEW_ATTR, None)
            entry = self.routes.get(rule.endpoint, self.routes.get(rule.rule))
            if (mark is not None and mark.audited) or (entry is not None and entry is not False):
                _candidate_routes.add(rule.rule)

    def _start(self) -> Any:
        self._note_forced_routes(flask.current_app)
        span = trace.get_current_span()
        ctx = otel_context.get_current()
        ip = client_ip(
            request.remote_addr, request.headers.get("X-Forwarded-For"), self.trusted_proxies
        )
        peer_actor = self._peer_actor(ctx, ip)
        if peer_actor is None:
            # Forged identity must not be believed here nor forwarded downstream,
            # whether or not this request is sampled.
            for name in v.ACTOR_ATTRIBUTES:
                if baggage.get_baggage(name, ctx) is not None:
                    ctx = baggage.remove_baggage(name, ctx)
        else:
            ctx = with_actor(peer_actor, ctx)
        if not _in(ip, self.trusted_peers) and baggage.get_baggage(v.TRAIL_ID, ctx) is not None:
            # Only a trusted peer continues a trail: anyone else could graft
            # their requests onto another user's trail.
            ctx = baggage.remove_baggage(v.TRAIL_ID, ctx)
        if not span.is_recording():
            state = _Request(span, False, ip, None)
            state.token = otel_context.attach(ctx)
            setattr(g, _G_KEY, state)
            return None
        is_audited, action, resource = self._decide()
        state = _Request(span, is_audited, ip, peer_actor)
        if is_audited:
            try:
                installed.check_refusal()
                pipeline = installed.global_pipeline()
                if pipeline is not None:
                    pipeline.check()
            except AuditError as exc:
                # Fail closed: an action that cannot be recorded is not performed.
                span.set_attributes({v.EVENT: True, v.ACTION: action or "", v.OUTCOME: v.FAILURE})
                span.set_attribute(v.REASON, type(exc).__name__)
                return flask.Response("audit ledger unavailable\n", status=503)
            trail = current_trail(ctx)
            if not valid_trail_id(trail):
                trail = format(span.get_span_context().span_id, "016x")
            attrs: dict[str, Any] = {v.EVENT: True, v.ACTION: action, v.TRAIL_ID: trail}
            if resource is not None:
                attrs[v.RESOURCE_TYPE], attrs[v.RESOURCE_ID] = resource
            if ip:
                attrs[v.ACTOR_IP] = ip
            span.set_attributes(attrs)
            ctx = with_trail(str(trail), ctx)
        state.token = otel_context.attach(ctx)
        setattr(g, _G_KEY, state)
        return None

    def _dispatch(self, original: Callable[[], Any]) -> Any:
        state: _Request | None = g.get(_G_KEY)
        token = None
        if state is not None and (state.audited or current_trail() is not None):
            try:
                found = self.resolve_actor()
                if found is not None and found is not state.peer_actor:
                    state.actor = Actor(found.id, found.type, found.roles, found.auth, state.ip)
                    token = otel_context.attach(with_actor(state.actor))
            except Exception:
                _log.exception("otel-audit: actor resolution failed")
        try:
            return original()
        finally:
            if token is not None:
                otel_context.detach(token)

    def _on_finished(self, sender: Any, response: flask.Response, **_: Any) -> None:
        state: _Request | None = g.get(_G_KEY)
        if state is not None:
            state.status = response.status_code

    def _on_exception(self, sender: Any, exception: BaseException, **_: Any) -> None:
        state: _Request | None = g.get(_G_KEY)
        if state is not None:
            state.exception = exception

    def _teardown_request(self, exc: BaseException | None) -> None:
        state: _Request | None = g.get(_G_KEY)
        if state is None:
            return
        try:
            if state.audited:
                self._finish(state, exc or state.exception)
        except Exception:
            _log.exception("otel-audit: teardown failed")
        finally:
            g.pop(_G_KEY, None)
            if state.token is not None:
                otel_context.detach(state.token)  # type: ignore[arg-type]

    def _finish(self, state: _Request, exc: BaseException | None) -> None:
        status = state.status if state.status is not None else (500 if exc else None)
        outcome = outcome_for_status(status, exc)
        actor = state.actor
        if actor is None:
            found = self.resolve_actor()  # e.g. a login view that authenticated in the view
            if found is not None and found is not state.peer_actor:
                actor = Actor(found.id, found.type, found.roles, found.auth, state.ip)
        if actor is not None and actor.auth == "basic" and status == 401:
            actor = None  # the app refused the credentials: the name is only a claim
        actor = actor or state.peer_actor
        span = state.span
        if actor is not None:
            span.set_attributes(actor.attributes())
            if state.ip:
                span.set_attribute(v.ACTOR_IP, state.ip)
        else:
            span.set_attribute(v.ACTOR_TYPE, v.ACTOR_ANONYMOUS)
        span.set_attribute(v.OUTCOME, outcome)
        if outcome != v.SUCCESS:
            reason = type(exc).__name__ if exc is not None else f"http {status}"
            span.set_attribute(v.REASON, reason)
        if exc is not None:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
