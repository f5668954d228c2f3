"""Who made a Flask request: actors from the authentication stacks Flask apps use.

Each resolver returns the actor the *application* authenticated, or None:
``flask.g.user`` (the Flask tutorial's pattern, any common shape),
Flask-Login's ``current_user``, the user Flask-HTTPAuth's verify callback
returned, flask-jwt-extended's verified identity. None of them reads a
credential from the request itself: a header anyone can send is a claim, not
an identity (docs/design.md, rule 3). The HTTP basic username is believed only when
the operator says the application verifies it (``basic_auth_resolver``).

User objects come in many shapes; ``actor_from_user`` understands mappings,
``sqlite3.Row``, dataclasses, ORM models and objects with ``id``,
``get_id()`` or ``username``. It never reads anything but the id and roles,
so a password or hash on the user object cannot reach the ledger.
Thread-safe: resolvers read only the current request.
"""

from __future__ import annotations

import importlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flask
from flask import g, request

from otel_audit import vocabulary as v
from otel_audit.capture.context import Actor
from otel_audit.errors import ConfigError

__all__ = [
    "ActorResolver",
    "DEFAULT_RESOLVERS",
    "OperatorResolver",
    "actor_from_user",
    "basic_auth_resolver",
    "session_user",
]

#: Returns the actor of the current request, an id, a user object, or None to let the next one try.
ActorResolver = Callable[[], Any]

_log = logging.getLogger("otel_audit.integrations.flask")

_ID_FIELDS = ("id", "user_id", "uid", "pk")
_NAME_FIELDS = ("username", "user_name", "login", "email", "name")
# Session keys a login view conventionally sets (Flask tutorial, Flask-Login).
_SESSION_KEYS = ("_user_id", "user_id", "userid", "uid", "username", "user")


def _get(user: Any, name: str) -> Any:
    """One field of a user of any common shape; None when it has none."""
    if isinstance(user, sqlite3.Row):
        return user[name] if name in user.keys() else None
    if isinstance(user, Mapping):
        return user.get(name)
    if isinstance(user, (str, bytes, int)):
        return None
    try:
        return getattr(user, name, None)
    except Exception:  # a lazy ORM attribute on a detached object, a property that raises
        return None


def _usable(value: Any) -> bool:
    return value is not None and value != "" and not isinstance(value, (bool, bytes))


def _roles(user: Any) -> tuple[str, ...]:
    value = _get(user, "roles")
    if value is None:
        one = _get(user, "role")
        value = [one] if isinstance(one, str) and one else None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return ()
    names = []
    for role in value:
        name = role if isinstance(role, str) else _get(role, "name")
        if isinstance(name, str) and name:
            names.append(name)
    return tuple(sorted(names))


def actor_from_user(user: Any, auth: str) -> Actor | None:
    """The actor of ``user`` (any common shape), or None for no user / an anonymous one.

    Id: ``id`` (also ``user_id``, ``uid``, ``pk``), else ``get_id()`` (Flask-Login),
    else ``username`` (also ``login``, ``email``, ``name``); a plain string or
    int is the id itself. ``is_authenticated`` False (Flask-Login's anonymous
    user) is no actor.
    """
    if user is None or user is False or user is True:
        return None
    if isinstance(user, Actor):
        return user
    if isinstance(user, (str, int)) and not isinstance(user, bool):
        return Actor(str(user), v.ACTOR_USER, (), auth) if str(user) else None
    if _get(user, "is_authenticated") is False:
        return None
    ident: Any = None
    for name in _ID_FIELDS:
        ident = _get(user, name)
        if _usable(ident):
            break
    if not _usable(ident):
        get_id = _get(user, "get_id")
        if callable(get_id):
            try:
                ident = get_id()
            except Exception:
                ident = None
    if not _usable(ident):
        for name in _NAME_FIELDS:
            ident = _get(user, name)
            if _usable(ident):
                break
    if not _usable(ident):
        return None
    return Actor(str(ident), v.ACTOR_USER, _roles(user), auth)


# -- the default resolvers, in the order they are tried -----------------------


def _from_g_user() -> Actor | None:
    """``flask.g.user`` set by the app's own authentication (the Flask tutorial's pattern)."""
    return actor_from_user(g.get("user"), "app")


def _from_flask_login() -> Actor | None:
    """Flask-Login's ``current_user``, when the extension is set up on the app."""
    if not hasattr(flask.current_app, "login_manager"):
        return None
    try:
        import flask_login  # type: ignore[import-untyped]
    except ImportError:
        return None
    user = flask_login.current_user
    try:
        user = user._get_current_object()  # the LocalProxy's user, not the proxy
    except Exception:
        return None
    return actor_from_user(user, "flask_login")


def _from_flask_httpauth() -> Actor | None:
    """The user Flask-HTTPAuth's verify callback returned (set only after it verified)."""
    return actor_from_user(g.get("flask_httpauth_user"), "flask_httpauth")


def _from_jwt() -> Actor | None:
    """flask-jwt-extended: the loaded user, else the identity of the *verified* token."""
    if "flask-jwt-extended" not in flask.current_app.extensions:
        return None
    decoded = g.get("_jwt_extended_jwt")  # set by verify_jwt_in_request only
    if not decoded:
        return None
    if not isinstance(decoded, Mapping):
        return None
    # The identity claim is the id (the same one a login issued); roles from the loaded user.
    claim = flask.current_app.config.get("JWT_IDENTITY_CLAIM", "sub")
    found = actor_from_user(decoded.get(claim), "jwt")
    loaded = g.get("_jwt_extended_jwt_user")
    if found is not None and isinstance(loaded, Mapping) and loaded.get("loaded_user") is not None:
        roles = _roles(loaded["loaded_user"])
        if roles:
            found = Actor(found.id, found.type, roles, found.auth)
    return found


def basic_auth_resolver() -> Actor | None:
    """The HTTP basic username, unverified by otel-audit: only for apps that verify it themselves.

    Opt-in (``OTEL_AUDIT_TRUST_BASIC_AUTH=true`` or ``resolvers=``): anyone can
    send ``Authorization: Basic admin:x``; only an application that checks
    the password (or a proxy in front of it that does) makes the name true.
    """
    auth = request.authorization
    if auth is None or (auth.type or "").lower() != "basic" or not auth.username:
        return None
    return Actor(str(auth.username), v.ACTOR_USER, (), "basic")


DEFAULT_RESOLVERS: tuple[ActorResolver, ...] = (
    _from_g_user,
    _from_flask_login,
    _from_flask_httpauth,
    _from_jwt,
)


def session_user() -> Actor | None:
    """After a login view: the user id it put in the (signed) session, e.g. ``session["user_id"]``.

    Used only at the end of a login request, when the view itself decided who
    logged in (the Flask tutorial stores the id and redirects).
    """
    try:
        session = flask.session
        for key in _SESSION_KEYS:
            value = session.get(key)
            if _usable(value) and isinstance(value, (str, int)):
                return Actor(str(value), v.ACTOR_USER, (), "session")
    except Exception:
        return None
    return None


def jwt_issued_identity(response: flask.Response) -> Actor | None:
    """After a JWT login view: the identity of an access token the app just issued in its response.

    Decoded with the app's own key (``flask_jwt_extended.decode_token``), so only
    a token this server signed names a user; the token itself is not kept.
    """
    if "flask-jwt-extended" not in flask.current_app.extensions or not response.is_json:
        return None
    try:
        from flask_jwt_extended import decode_token

        body = response.get_json(silent=True)
        if not isinstance(body, Mapping):
            return None
        claim = flask.current_app.config.get("JWT_IDENTITY_CLAIM", "sub")
        for key in ("access_token", "token", "jwt", "id_token"):
            token = body.get(key)
            if isinstance(token, str) and token.count(".") == 2:
                decoded = decode_token(token)
                return actor_from_user(decoded.get(claim), "jwt")
    except Exception:
        return None
    return None


class OperatorResolver:
    """A resolver named ``module:function`` by the operator (``OTEL_AUDIT_ACTOR_RESOLVER``).

    Imported at its first use, not at start: in zero-code mode the app's own
    module may name itself, and it is still being imported when the app is
    created. A name that cannot be imported raises ConfigError at every
    request (the request is refused: an audit without its actors is not the
    one the operator asked for). The function returns an Actor, an id, a
    user object of any common shape, or None. Thread-safe.
    """

    def __init__(self, spec: str, setting: str) -> None:
        module, sep, func = spec.strip().partition(":")
        if not sep or not module or not func or not all(p.isidentifier() for p in func.split(".")):
            raise ConfigError(f"{setting} must be 'module:function', got {spec!r}")
        self.spec = spec.strip()
        self.setting = setting
        self._module, self._func = module, func
        self._target: Callable[[], Any] | None = None
        self._lock = threading.Lock()
        self.__name__ = self.spec

    def _load(self) -> Callable[[], Any]:
        with self._lock:
            if self._target is None:
                try:
                    target: Any = importlib.import_module(self._module)
                    for part in self._func.split("."):
                        target = getattr(target, part)
                except (ImportError, AttributeError) as exc:
                    raise ConfigError(f"{self.setting}: cannot load {self.spec!r}: {exc}") from None
                if not callable(target):
                    raise ConfigError(f"{self.setting}: {self.spec!r} is not callable")
                self._target = target
            return self._target

    def load(self) -> None:
        """Import the function now (raises ConfigError when it cannot be)."""
        self._load()

    def __call__(self) -> Any:
        found = self._load()()
        return actor_from_user(found, "app") if not isinstance(found, Actor) else found
