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

Identity never comes from the network (docs/design.md, rule 3): inbound
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

from otel_audit import vocabulary as v
from otel_audit.capture.context import (
    Actor,
    continue_trail,
    current_actor,
    current_trail,
    valid_trail_id,
    with_actor,
    with_trail,
)
from otel_audit.capture.installed import check_refusal, global_pipeline
from otel_audit.capture.sampler import AuditSampler
from otel_audit.capture.scope import ActionScope, current_scope, with_scope
from otel_audit.errors import AuditError, ConfigError
from otel_audit.integrations.actors import (
    DEFAULT_RESOLVERS,
    ActorResolver,
    OperatorResolver,
    actor_from_user,
    basic_auth_resolver,
    jwt_issued_identity,
    session_user,
)
from otel_audit.integrations.wsgi import PENDING_KEY, CommitBeforeReply
from otel_audit.settings import (
    OTEL_AUDIT_ACTOR_RESOLVER,
    OTEL_AUDIT_FLASK_METHODS,
    OTEL_AUDIT_FLASK_ROUTES,
    OTEL_AUDIT_TRUST_BASIC_AUTH,
    OTEL_AUDIT_TRUSTED_PEERS,
    OTEL_AUDIT_TRUSTED_PROXIES,
)

__all__ = [
    "DEFAULT_RESOLVERS",
    "OTEL_AUDIT_FLASK_METHODS",
    "OTEL_AUDIT_TRUSTED_PEERS",
    "OTEL_AUDIT_TRUSTED_PROXIES",
    "AuditFlask",
    "ActorResolver",
    "FlaskSettings",
    "audited",
    "client_ip",
    "default_action",
    "not_audited",
    "outcome_for_status",
    "refuse_requests",
    "settings_from_env",
]

# Settings (names in settings.py): OTEL_AUDIT_TRUSTED_PEERS, CIDRs whose inbound
# actor and trail baggage is believed; OTEL_AUDIT_TRUSTED_PROXIES, CIDRs of
# reverse proxies whose X-Forwarded-For is believed; OTEL_AUDIT_FLASK_METHODS,
# the audited HTTP methods (default POST,PUT,PATCH,DELETE); OTEL_AUDIT_FLASK_ROUTES,
# route -> action name / true / false; OTEL_AUDIT_ACTOR_RESOLVER, module:function;
# OTEL_AUDIT_TRUST_BASIC_AUTH, believe the HTTP basic username (default false).
_DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXTENSION = "otel_audit"
_G_KEY = "_otel_audit"
_VIEW_ATTR = "_otel_audit_view"
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
# An actor id arriving in baggage is network input: a short token only.
_ACTOR_ID = re.compile(r"^[\w.@:+-]{1,128}$")
LOGIN = "user.login"
LOGOUT = "user.logout"
_LOGIN_WORDS = frozenset({"login", "log_in", "signin", "sign_in", "logon", "log_on"})
_LOGOUT_WORDS = frozenset({"logout", "log_out", "signout", "sign_out", "logoff", "log_off"})
_REGISTER_WORDS = frozenset({"register", "signup", "sign_up"})
# A last path segment that names what was done, not what it was done to.
_ACTION_WORDS = {
    "create": "create", "new": "create", "add": "create", "update": "update", "edit": "update",
    "modify": "update", "change": "update", "delete": "delete", "remove": "delete",
    "destroy": "delete", "cancel": "cancel", "approve": "approve", "reject": "reject",
    "publish": "publish", "unpublish": "unpublish", "archive": "archive", "restore": "restore",
    "reset": "reset", "upload": "upload", "import": "import", "export": "export", "send": "send",
    "submit": "submit", "confirm": "confirm", "verify": "verify", "activate": "activate",
    "deactivate": "deactivate", "enable": "enable", "disable": "disable", "lock": "lock",
    "unlock": "unlock", "like": "like", "unlike": "unlike", "follow": "follow",
    "unfollow": "unfollow", "vote": "vote", "close": "close", "open": "open", "assign": "assign",
    "invite": "invite", "share": "share", "refund": "refund", "pay": "pay",
}  # fmt: skip
# Segments that name a page, not a resource: ``POST /index`` is a form posted to a page.
_PAGE_WORDS = frozenset({"index", "home", "main", "default", "page", "form", "root", "view"})
_API_WORDS = re.compile(r"^(api|v\d+(\.\d+)?|rest|json)$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

_log = logging.getLogger("otel_audit.integrations.flask")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Methods and forced routes of every AuditFlask, for the sampler candidate: a
# span is sampled before any Flask hook runs, so the decision needs them here.
_candidate_methods: set[str] = set()
_candidate_routes: set[str] = set()
# Set when the operator asked for auditing and setup failed (zero-code): every
# request that would be audited is refused until the process restarts fixed.
_refusal: str | None = None


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


def _methods(value: Iterable[str] | None, env: Mapping[str, str] | None = None) -> frozenset[str]:
    if value is None:
        text = (os.environ if env is None else env).get(OTEL_AUDIT_FLASK_METHODS, "").strip()
        if not text:
            return _DEFAULT_METHODS
        value = text.split(",")
    methods = frozenset(m.strip().upper() for m in value if m.strip())
    bad = sorted(m for m in methods if not m.isalpha())
    if bad:
        raise ConfigError(f"{OTEL_AUDIT_FLASK_METHODS} has an invalid method: {bad[0]!r}")
    return methods


def parse_bool(value: str | None, setting: str, default: bool = False) -> bool:
    """``true/false`` (also 1/0, yes/no, on/off) of an ``OTEL_AUDIT_*`` variable."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{setting} must be true or false, got {value!r}")


def _routes_from_env(value: str | None) -> dict[str, str | bool]:
    """``OTEL_AUDIT_FLASK_ROUTES``: ``KEY=VALUE`` pairs, comma-separated.

    KEY is ``"METHOD /rule"``, an endpoint name or a rule; VALUE an action
    name (``user.login``), ``true`` (audit) or ``false`` (never audit).
    """
    out: dict[str, str | bool] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        key, sep, val = item.rpartition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not val:
            raise ConfigError(f"{OTEL_AUDIT_FLASK_ROUTES} entries are KEY=ACTION, got {item!r}")
        low = val.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", val):
            out[key] = val
        else:
            raise ConfigError(f"{OTEL_AUDIT_FLASK_ROUTES} has an invalid action name: {val!r}")
    return out


def _policy_actions() -> dict[str, str | bool]:
    """The ``[actions]`` table of the installed pipeline's policy file, if any."""
    pipeline = global_pipeline()
    policy = pipeline.processor.policy if pipeline is not None else None
    return dict(getattr(policy, "actions", None) or {})


@dataclass(frozen=True)
class FlaskSettings:
    """The integration's ``OTEL_AUDIT_*`` settings, validated (``settings_from_env``)."""

    methods: frozenset[str]
    routes: Mapping[str, str | bool]
    trusted_peers: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...]
    actor_resolver: OperatorResolver | None
    trust_basic_auth: bool


def settings_from_env(env: Mapping[str, str] | None = None) -> FlaskSettings:
    """Read and validate the Flask settings; ConfigError names the first bad one."""
    env = os.environ if env is None else env
    spec = (env.get(OTEL_AUDIT_ACTOR_RESOLVER) or "").strip()
    return FlaskSettings(
        methods=_methods(None, env),
        routes=_routes_from_env(env.get(OTEL_AUDIT_FLASK_ROUTES)),
        trusted_peers=_networks(env.get(OTEL_AUDIT_TRUSTED_PEERS, ""), OTEL_AUDIT_TRUSTED_PEERS),
        trusted_proxies=_networks(
            env.get(OTEL_AUDIT_TRUSTED_PROXIES, ""), OTEL_AUDIT_TRUSTED_PROXIES
        ),
        actor_resolver=OperatorResolver(spec, OTEL_AUDIT_ACTOR_RESOLVER) if spec else None,
        trust_basic_auth=parse_bool(
            env.get(OTEL_AUDIT_TRUST_BASIC_AUTH), OTEL_AUDIT_TRUST_BASIC_AUTH
        ),
    )


def _in(address: str | None, networks: Sequence[Network]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def parse_hop(hop: str) -> str | None:
    """The address of one X-Forwarded-For / Forwarded hop, or None when it names none.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:5678``, quoted forms and ``for=`` (RFC 7239); ``unknown``,
    obfuscated identifiers (``_hidden``) and garbage are None.
    """
    hop = hop.strip().strip('"').strip()
    if hop.lower().startswith("for="):
        hop = hop[4:].strip().strip('"')
    if hop.startswith("["):
        end = hop.find("]")
        if end < 0:
            return None
        rest = hop[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:
        host, port = hop.split(":")
        if not port.isdigit():
            return None
        hop = host
    try:
        return str(ipaddress.ip_address(hop.split("%")[0]))
    except ValueError:
        return None


def client_ip(
    remote_addr: str | None, forwarded_for: str | None, proxies: Sequence[Network]
) -> str | None:
    """The client address: ``remote_addr``, or X-Forwarded-For walked back through trusted proxies.

    Only hops appended by a proxy we trust are believed: starting at the
    direct peer, each trusted hop hands over to the address it forwarded for,
    and the first untrusted one is the client. A hop that names no address
    (``unknown``, an obfuscated name, garbage) leaves the client unknown:
    None, never the address of the proxy that forwarded the request.
    """
    address = remote_addr
    if not forwarded_for or not _in(address, proxies):
        return address
    hops = [h for h in forwarded_for.split(",") if h.strip()]
    while hops and _in(address, proxies):
        parsed = parse_hop(hops.pop())
        if parsed is None:
            return None  # the client is unknown; it is not the proxy
        address = parsed
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
    if word.endswith(("sses", "shes", "ches", "xes")) and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def _is_param(segment: str) -> bool:
    return segment.startswith("<") and segment.endswith(">")


def _param_name(segment: str) -> str:
    return segment[1:-1].split(":")[-1]


def _word(segment: str) -> str:
    return segment.lower().replace("-", "_")


# Names from routes are pure functions of (rule, method, endpoint): each is
# worked out once per route, not on every request (a cache bounded well
# above any app's number of routes; a client's odd methods only cycle it).
@functools.lru_cache(maxsize=4096)
def auth_event(rule: str | None, endpoint: str | None) -> str | None:
    """``user.login`` / ``user.logout`` when the route is a login or logout, else None.

    Known from the last static path segment or the view's name: ``/login``,
    ``/auth/signin``, endpoint ``auth.logout``, ...
    """
    words = set()
    segments = [s for s in (rule or "").strip("/").split("/") if s and not _is_param(s)]
    if segments:
        words.add(_word(segments[-1]))
    if endpoint:
        words.add(_word(endpoint.rsplit(".", 1)[-1]))
    if words & _LOGIN_WORDS:
        return LOGIN
    if words & _LOGOUT_WORDS:
        return LOGOUT
    return None


@functools.lru_cache(maxsize=4096)
def default_action(rule: str | None, method: str, endpoint: str | None = None) -> str:
    """An ``audit.action`` from a route, ``noun.verb``, documented in docs/flask.md.

    ``POST /orders`` -> ``order.create``; ``DELETE /orders/<id>`` -> ``order.delete``;
    a last segment that is a verb names the verb: ``POST /orders/<id>/cancel``
    -> ``order.cancel``, ``POST /blog/<id>/update`` -> ``blog.update``, and
    ``POST /create`` in blueprint ``blog`` -> ``blog.create``; login, logout
    and sign-up routes -> ``user.login``, ``user.logout``, ``user.register``;
    a page that is no resource (``/``, ``/index``, ``/home``) -> ``<view>.submit``.
    """
    event = auth_event(rule, endpoint)
    if event is not None:
        return event
    method = method.upper()
    verb = _VERBS.get(method, method.lower())
    segments = [s for s in (rule or "").strip("/").split("/") if s]
    static = [_word(s) for s in segments if not _is_param(s) and not _API_WORDS.match(s.lower())]
    view = _word((endpoint or "request").rsplit(".", 1)[-1])
    blueprint = _word(endpoint.rsplit(".", 1)[0]) if endpoint and "." in endpoint else None
    if static and static[-1] in _REGISTER_WORDS:
        return "user.register"
    after_param = len(segments) >= 2 and _is_param(segments[-2]) and not _is_param(segments[-1])
    if static and (static[-1] in _ACTION_WORDS or after_param) and not _is_param(segments[-1]):
        # ``.../<id>/cancel``, ``/posts/create``, ``/create``: the segment is the verb.
        verb = _ACTION_WORDS.get(static[-1], static[-1])
        nouns = [s for s in static[:-1] if s not in _PAGE_WORDS]
        noun = nouns[-1] if nouns else (blueprint or view)
        if noun == static[-1] or noun in _ACTION_WORDS:
            noun = blueprint or "record"
        return f"{_singular(noun)}.{verb}"
    nouns = [s for s in static if s not in _PAGE_WORDS]
    if not nouns:
        # A form posted to a page (``POST /``, ``POST /index``): name the page.
        if method == "POST":
            verb = "submit"
        page = view if view not in _PAGE_WORDS or not blueprint else blueprint
        return f"{page.replace('.', '_')}.{verb}"
    return f"{_singular(nouns[-1])}.{verb}"


@functools.lru_cache(maxsize=4096)
def _resource_params(rule: str) -> tuple[tuple[str, str], ...]:
    """(parameter, resource type) of the rule's parameters that name a resource, in order."""
    segments = [s for s in rule.strip("/").split("/") if s]
    params = []
    for i, seg in enumerate(segments):
        if not _is_param(seg):
            continue
        name = _param_name(seg)
        if name.endswith("_id") and len(name) > 3:
            params.append((name, name[:-3]))
        elif (
            name in ("id", "pk", "key", "name", "sku", "uuid", "slug")
            and i > 0
            and not _is_param(segments[i - 1])
        ):
            params.append((name, _singular(segments[i - 1])))
    return tuple(params)


def _default_resource(rule: str | None, view_args: Mapping[str, Any]) -> tuple[str, str] | None:
    """``<order_id>`` -> (order, value); ``/orders/<id>`` -> (order, value); else None."""
    if not view_args or not rule:
        return None
    found: tuple[str, str] | None = None
    for name, rtype in _resource_params(rule):
        if name in view_args:
            found = (rtype, str(view_args[name]))  # the last one named wins
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
    pipeline = global_pipeline()
    samplers = [getattr(pipeline.provider, "sampler", None)] if pipeline is not None else []
    samplers.append(getattr(trace.get_tracer_provider(), "sampler", None))
    for sampler in samplers:
        if isinstance(sampler, AuditSampler) and _candidate not in sampler.candidates:
            sampler.add_candidate(_candidate)


# -- the request record before the view -------------------------------------------


def refuse_requests(reason: str | None) -> None:
    """Answer 503 to every request that would be audited (``reason``), or stop (None).

    The zero-code hook calls it when the operator asked for auditing and setup
    failed: a state-changing request must not run unaudited (docs/design.md, rule 2).
    """
    global _refusal
    _refusal = reason


def install_refusal(app: flask.Flask, reason: str) -> None:
    """Refuse (503) the state-changing requests of ``app``: auditing was asked for and is broken.

    For the zero-code hook when even the integration's own settings are bad.
    """

    def refuse() -> flask.Response | None:
        if request.method.upper() in _DEFAULT_METHODS:
            _log.error("otel-audit: refusing %s %s: %s", request.method, request.path, reason)
            return _unavailable("audit not configured")
        return None

    app.before_request(refuse)


def _unavailable(message: str) -> flask.Response:
    return flask.Response(f"{message}\n", status=503, headers={"Retry-After": "5"})


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
    event: str | None = None  # LOGIN / LOGOUT
    scope: ActionScope | None = None
    login_actor: Actor | None = None
    lost: AuditError | None = None  # a record of the request that was not written


class AuditFlask:
    """Flask extension: ``AuditFlask(app)`` or ``ext = AuditFlask(); ext.init_app(app)``.

    Options (each defaults to its ``OTEL_AUDIT_*`` variable, then the default):
    ``methods`` audited HTTP methods; ``routes`` a table keyed by endpoint,
    rule or ``"METHOD rule"`` whose value is an action name, True (audit) or
    False (skip); ``resources`` view-argument name -> resource type;
    ``actor_resolver`` tried before the defaults (``resolvers`` replaces
    them); ``trusted_peers`` / ``trusted_proxies`` CIDR lists;
    ``trust_basic_auth`` believe the HTTP basic username (only for apps that
    verify it themselves). Thread-safe once ``init_app`` has returned.
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
        trust_basic_auth: bool | None = None,
    ) -> None:
        env = settings_from_env()
        self.methods = _methods(methods) if methods is not None else env.methods
        # Route names: the policy file's [actions], then OTEL_AUDIT_FLASK_ROUTES, then code.
        self.routes: dict[str, str | bool] = _policy_actions()
        self.routes.update(env.routes)
        self.routes.update(routes or {})
        self.resources = dict(resources or {})
        chain = list(resolvers) if resolvers is not None else list(DEFAULT_RESOLVERS)
        trust_basic = env.trust_basic_auth if trust_basic_auth is None else trust_basic_auth
        if trust_basic and resolvers is None:
            chain.append(basic_auth_resolver)
        if actor_resolver is not None:
            chain.insert(0, actor_resolver)
        if env.actor_resolver is not None:
            chain.insert(0, env.actor_resolver)
        self.resolvers: tuple[ActorResolver, ...] = tuple(chain)
        self.trusted_peers = (
            _networks(trusted_peers, OTEL_AUDIT_TRUSTED_PEERS)
            if trusted_peers is not None
            else env.trusted_peers
        )
        self.trusted_proxies = (
            _networks(trusted_proxies, OTEL_AUDIT_TRUSTED_PROXIES)
            if trusted_proxies is not None
            else env.trusted_proxies
        )
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
        # Outermost: the response leaves once the request's records are durable.
        app.wsgi_app = CommitBeforeReply(app.wsgi_app)  # type: ignore[method-assign]
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

    def _login_view(self, endpoint: str | None) -> bool:
        """The endpoint is Flask-Login's ``login_view`` (for the app or its blueprint)."""
        manager = getattr(flask.current_app, "login_manager", None)
        if manager is None or endpoint is None:
            return False
        views = {getattr(manager, "login_view", None)}
        views.update((getattr(manager, "blueprint_login_views", None) or {}).values())
        return endpoint in views

    def _decide(self) -> tuple[bool, str | None, tuple[str, str] | None]:
        """(audited, action, resource) of the current request."""
        method = request.method.upper()
        rule = request.url_rule.rule if request.url_rule is not None else None
        endpoint = request.endpoint
        view = flask.current_app.view_functions.get(endpoint) if endpoint else None
        mark: _ViewRule | None = getattr(view, _VIEW_ATTR, None)
        entry = self._route_entry(method, rule, endpoint)
        named = (mark.action if mark is not None else None) or (
            entry if isinstance(entry, str) else None
        )
        event = auth_event(rule, endpoint)
        if self._login_view(endpoint):
            event = LOGIN
        if named is not None:
            event = (
                LOGIN if named.endswith(".login") else LOGOUT if named.endswith(".logout") else None
            )
        if mark is not None:
            is_audited = mark.audited
        elif entry is not None:
            is_audited = entry is not False
        elif event == LOGOUT:
            is_audited = rule is not None  # a logout is an event even as a GET
        else:
            is_audited = method in self.methods and rule is not None
        if not is_audited:
            return False, None, None
        action = named or (event if event is not None else default_action(rule, method, endpoint))
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
        if resource is None:
            for arg in ("id", "pk", "uuid"):
                if arg in args and "." in action:
                    resource = (action.split(".", 1)[0], str(args[arg]))
                    break
        return True, action, resource

    def _peer_actor(self, ctx: Context, ip: str | None) -> Actor | None:
        if not _in(ip, self.trusted_peers):
            return None
        ident = baggage.get_baggage(v.ACTOR_ID, ctx)
        kind = baggage.get_baggage(v.ACTOR_TYPE, ctx) or v.ACTOR_USER
        if not isinstance(ident, str) or not _ACTOR_ID.match(ident) or kind not in v.ACTOR_TYPES:
            return None
        return Actor(ident, str(kind), (), "trusted-peer", ip)

    def resolve_actor(self) -> Actor | None:
        """The actor of the current request from the app's authentication, or None.

        Raises ConfigError when the operator's resolver cannot be loaded.
        """
        ctx_actor = current_actor()
        state: _Request | None = g.get(_G_KEY)
        if ctx_actor is not None and (state is None or ctx_actor is not state.peer_actor):
            return ctx_actor  # the app called set_actor()/actor() itself
        for resolver in self.resolvers:
            try:
                found = resolver()
            except ConfigError:
                raise
            except Exception:  # a broken resolver must not break the request
                _log.exception("otel-audit: actor resolver %r failed", resolver)
                continue
            if isinstance(found, Actor):
                return found
            if found is not None:
                actor = actor_from_user(found, "app")
                if actor is not None:
                    return actor
        return None

    def _forwarded(self) -> str | None:
        """The X-Forwarded-For header. A proxy may add its own header line: the
        server joins them into the one WSGI value (``HTTP_X_FORWARDED_FOR``),
        read directly rather than by walking every header."""
        return request.headers.get("X-Forwarded-For") or None

    # -- hooks -------------------------------------------------------------------

    def _before_request(self) -> Any:
        try:
            return self._start()
        except Exception:
            # Fail closed only for what would be audited; other requests are served.
            if request.method.upper() in self.methods:
                _log.exception("otel-audit: before_request failed; request refused")
                return _unavailable("audit unavailable")
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
            forced = (mark is not None and mark.audited) or (
                entry is not None and entry is not False
            )
            if forced or auth_event(rule.rule, rule.endpoint) == LOGOUT:
                _candidate_routes.add(rule.rule)

    def _start(self) -> Any:
        self._note_forced_routes(flask.current_app)
        span = trace.get_current_span()
        ctx = otel_context.get_current()
        ip = client_ip(request.remote_addr, self._forwarded(), self.trusted_proxies)
        peer_actor = self._peer_actor(ctx, ip)
        if peer_actor is None:
            # Forged identity must not be believed here nor forwarded downstream,
            # whether or not this request is sampled.
            for name in v.ACTOR_ATTRIBUTES:
                if baggage.get_baggage(name, ctx) is not None:
                    ctx = baggage.remove_baggage(name, ctx)
        else:
            ctx = with_actor(peer_actor, ctx)
        if _in(ip, self.trusted_peers):
            ctx = continue_trail(ctx)
        elif baggage.get_baggage(v.TRAIL_ID, ctx) is not None:
            # Only a trusted peer continues a trail: anyone else could graft
            # their requests onto another user's trail.
            ctx = baggage.remove_baggage(v.TRAIL_ID, ctx)
        is_audited, action, resource = self._decide()
        if is_audited and _refusal is not None:
            _log.error("otel-audit: refusing %s %s: %s", request.method, request.path, _refusal)
            return _unavailable("audit not configured")
        if not span.is_recording():
            state = _Request(span, False, ip, None)
            state.token = otel_context.attach(ctx)
            setattr(g, _G_KEY, state)
            return None
        state = _Request(span, is_audited, ip, peer_actor)
        if is_audited:
            pipeline = global_pipeline()
            try:
                check_refusal()
                if pipeline is not None:
                    pipeline.writer.check()
            except AuditError as exc:
                # Fail closed: an action that cannot be recorded is not performed.
                span.set_attributes({v.EVENT: True, v.ACTION: action or "", v.OUTCOME: v.FAILURE})
                span.set_attribute(v.REASON, type(exc).__name__)
                return _unavailable("audit ledger unavailable")
            trail = current_trail(ctx)
            if not valid_trail_id(trail):
                trail = format(span.get_span_context().span_id, "016x")
            attrs: dict[str, Any] = {v.EVENT: True, v.ACTION: action, v.TRAIL_ID: trail}
            if resource is not None:
                attrs[v.RESOURCE_TYPE], attrs[v.RESOURCE_ID] = resource
            if ip:
                attrs[v.ACTOR_IP] = ip
            span.set_attributes(attrs)
            state.event = LOGIN if action == LOGIN or (action or "").endswith(".login") else None
            if action == LOGOUT or (action or "").endswith(".logout"):
                state.event = LOGOUT
            ctx = with_trail(str(trail), ctx)
            if pipeline is not None:
                # Effects of the view are settled at its end (one wait, group commit).
                state.scope = ActionScope(
                    pipeline, str(trail), span.get_span_context().span_id, current_scope(ctx)
                )
                pending = request.environ.get(PENDING_KEY)
                if isinstance(pending, list) and pipeline.processor.commits_together:
                    # The request's own record is committed with its effects and
                    # waited for, before the response leaves, by CommitBeforeReply.
                    state.scope.together = True
                    pipeline.processor.adopt(span, state.scope)
                    pending.append((state.scope, span))
                ctx = with_scope(state.scope, ctx)
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
            except ConfigError as exc:
                _log.error("otel-audit: refusing %s %s: %s", request.method, request.path, exc)
                return _unavailable("audit not configured")
            except Exception:
                _log.exception("otel-audit: actor resolution failed")
        lost = None
        try:
            if state is not None and state.audited:
                refused = self._write_intent(state)
                if refused is not None:
                    return refused
            result = original()
        finally:
            if state is not None and state.scope is not None:
                if not state.scope.together:
                    # The records of the view's effects, also when the view raised.
                    lost = state.scope.settle()
                    if lost is not None and state.lost is None:
                        state.lost = lost
                state.scope.close()
            if token is not None:
                otel_context.detach(token)
        if lost is not None:
            _log.error("otel-audit: %s %s: %s", request.method, request.path, lost)
            return _unavailable("audit record of a change not written")
        return result

    def _write_intent(self, state: _Request) -> flask.Response | None:
        """Commit the request's record before the view runs; a 503 when it cannot be."""
        span = state.span
        actor = state.actor or state.peer_actor
        # Who logs in is known after the view; a basic-auth name only when the
        # app did not refuse it (401): neither is written into the intent.
        if state.event != LOGIN and not (actor is not None and actor.auth == "basic"):
            if actor is not None:
                span.set_attributes(actor.attributes())
            else:
                span.set_attribute(v.ACTOR_TYPE, v.ACTOR_ANONYMOUS)
        pipeline = global_pipeline()
        if pipeline is None:
            return None
        try:
            # State-changing requests are ``blocking`` unless the policy names
            # another durability for them: no change without a record.
            ticket = pipeline.processor.queue_intent(span, default="blocking")
            if ticket is not None:
                ticket.wait(pipeline.writer)
        except AuditError as exc:
            state.lost = exc
            _log.error("otel-audit: request record not written, %s %s refused: %s",
                       request.method, request.path, exc)  # fmt: skip
            if state.scope is not None and state.scope.together:
                # Refused before the view: this answer stands, and the outcome
                # record is the ending thread's to write (and log if it cannot).
                pending = request.environ.get(PENDING_KEY)
                if isinstance(pending, list):
                    pending[:] = [p for p in pending if p[0] is not state.scope]
                pipeline.processor.forget(span)
                state.scope.together = False
                state.scope.finish()
            return _unavailable("audit ledger unavailable")
        return None

    def _on_finished(self, sender: Any, response: flask.Response, **_: Any) -> None:
        state: _Request | None = g.get(_G_KEY)
        if state is not None:
            state.status = response.status_code
            if state.event == LOGIN and state.audited:
                try:
                    state.login_actor = self._logged_in(response)
                except Exception:
                    _log.exception("otel-audit: login outcome")

    def _on_exception(self, sender: Any, exception: BaseException, **_: Any) -> None:
        state: _Request | None = g.get(_G_KEY)
        if state is not None:
            state.exception = exception

    def _logged_in(self, response: flask.Response) -> Actor | None:
        """Who is authenticated at the end of a login request (resolvers, session, issued JWT)."""
        found = self.resolve_actor()
        if found is None:
            found = session_user() or jwt_issued_identity(response)
        return found

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
        reason = type(exc).__name__ if exc is not None else f"http {status}"
        if state.event == LOGIN:
            # Who logged in is who is authenticated after the view; nobody: it failed,
            # whatever the status (most apps answer a wrong password with a redirect).
            actor = state.login_actor
            if actor is None and state.status is None:
                actor = self.resolve_actor()
            if actor is None or outcome != v.SUCCESS:
                actor = None
                if outcome == v.SUCCESS:
                    reason = "no authenticated user"
                outcome = v.FAILURE  # a refused login (401/403 too) is a failed login
        else:
            actor = state.actor
            if actor is None:
                # A view that authenticated itself: a login_required decorator of
                # Flask-HTTPAuth or flask-jwt-extended runs inside the view.
                found = self.resolve_actor()
                if found is not None and found is not state.peer_actor:
                    actor = found
            if actor is not None and actor.auth == "basic" and status == 401:
                actor = None  # the app refused the credentials: the name is only a claim
            actor = actor or state.peer_actor
        if state.lost is None and state.scope is not None and state.scope.together:
            # An effect whose record could not be built, or whose commit has
            # already failed (one still pending refuses this record if it
            # fails: ``enqueue(after=)``).
            state.lost = state.scope.known_failure()
        if state.lost is not None:
            outcome, reason = v.FAILURE, type(state.lost).__name__
        span = state.span
        if actor is not None:
            actor = Actor(actor.id, actor.type, actor.roles, actor.auth, state.ip)
            span.set_attributes(actor.attributes())
        else:
            span.set_attribute(v.ACTOR_TYPE, v.ACTOR_ANONYMOUS)
        span.set_attribute(v.OUTCOME, outcome)
        if outcome != v.SUCCESS:
            span.set_attribute(v.REASON, reason)
        if exc is not None:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
