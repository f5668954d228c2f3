"""Settings: an argument, then an ``OTEL_AUDIT_*`` variable, then a default.

All settings live here so that every entry point (``configure``, the
``opentelemetry-instrument`` hook, the CLI) reads them the same way. Bad
values raise ``ConfigError`` naming the setting: an audit pipeline that
silently fell back to a default would not be the one the operator asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otel_audit.errors import ConfigError

OTEL_AUDIT_LEDGER = "OTEL_AUDIT_LEDGER"
OTEL_AUDIT_DURABILITY = "OTEL_AUDIT_DURABILITY"
OTEL_AUDIT_SIGNING_KEY = "OTEL_AUDIT_SIGNING_KEY"
OTEL_AUDIT_CHAIN = "OTEL_AUDIT_CHAIN"
OTEL_AUDIT_CHECKPOINT_EVERY = "OTEL_AUDIT_CHECKPOINT_EVERY"
OTEL_AUDIT_CHECKPOINT_INTERVAL = "OTEL_AUDIT_CHECKPOINT_INTERVAL"
OTEL_AUDIT_MAX_QUEUE_SIZE = "OTEL_AUDIT_MAX_QUEUE_SIZE"
OTEL_AUDIT_EFFECTS = "OTEL_AUDIT_EFFECTS"
OTEL_AUDIT_WRITER = "OTEL_AUDIT_WRITER"
# Settings of the parts (read and validated where they are used; named here
# so every OTEL_AUDIT_* variable of the package is listed in one place).
OTEL_AUDIT_POLICY = "OTEL_AUDIT_POLICY"  # policy.py
OTEL_AUDIT_HMAC_KEY = "OTEL_AUDIT_HMAC_KEY"  # redact.py
OTEL_AUDIT_TRUSTED_PEERS = "OTEL_AUDIT_TRUSTED_PEERS"  # flask.py
OTEL_AUDIT_TRUSTED_PROXIES = "OTEL_AUDIT_TRUSTED_PROXIES"  # flask.py
OTEL_AUDIT_FLASK_METHODS = "OTEL_AUDIT_FLASK_METHODS"  # flask.py
OTEL_AUDIT_FLASK_ROUTES = "OTEL_AUDIT_FLASK_ROUTES"  # flask.py: route=action pairs
OTEL_AUDIT_ACTOR_RESOLVER = "OTEL_AUDIT_ACTOR_RESOLVER"  # flask.py: module:function
OTEL_AUDIT_TRUST_BASIC_AUTH = "OTEL_AUDIT_TRUST_BASIC_AUTH"  # flask.py: believe basic usernames
OTEL_AUDIT_FAIL_OPEN = "OTEL_AUDIT_FAIL_OPEN"  # auto.py: run unaudited when setup fails
OTEL_AUDIT_FORWARD_ENDPOINT = "OTEL_AUDIT_FORWARD_ENDPOINT"  # forward.py
OTEL_AUDIT_FORWARD_HEADERS = "OTEL_AUDIT_FORWARD_HEADERS"
OTEL_AUDIT_FORWARD_TOKEN = "OTEL_AUDIT_FORWARD_TOKEN"
OTEL_AUDIT_FORWARD_CERTIFICATE = "OTEL_AUDIT_FORWARD_CERTIFICATE"
OTEL_AUDIT_FORWARD_COMPRESSION = "OTEL_AUDIT_FORWARD_COMPRESSION"
OTEL_AUDIT_FORWARD_TIMEOUT = "OTEL_AUDIT_FORWARD_TIMEOUT"
OTEL_AUDIT_FORWARD_STATE = "OTEL_AUDIT_FORWARD_STATE"
OTEL_AUDIT_SERVE_TOKEN = "OTEL_AUDIT_SERVE_TOKEN"  # _commands/serve.py

_DEFAULT_LEDGER = "sqlite:///audit.db"
_DEFAULT_DURABILITY = "sync"
_DEFAULT_CHECKPOINT_EVERY = 1000
_DEFAULT_CHECKPOINT_INTERVAL = 10.0
_DEFAULT_MAX_QUEUE_SIZE = 8192

DURABILITIES = ("sync", "async")
#: Where records are built and committed: a thread of the application, or a process of their own.
WRITERS = ("thread", "process")


@dataclass(frozen=True)
class Settings:
    ledger: str
    durability: str
    signing_key: str | None
    chain: str | None
    checkpoint_every: int
    checkpoint_interval: float
    max_queue_size: int
    effects: frozenset[str] | None
    writer: str = "thread"


def _pick(arg: Any, env: Mapping[str, str], name: str) -> tuple[Any, str]:
    if arg is not None:
        return arg, name.lower().replace("otel_audit_", "")
    value = env.get(name)
    if value is not None and value.strip() != "":
        return value.strip(), name
    return None, name


def _positive_int(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a positive integer, got {value!r}") from None
    if number <= 0 or isinstance(value, bool):
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return number


def _positive_float(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a positive number, got {value!r}") from None
    if not number > 0 or isinstance(value, bool):
        raise ConfigError(f"{where} must be a positive number, got {value!r}")
    return number


def load(
    *,
    ledger: str | None = None,
    durability: str | None = None,
    signing_key: str | None = None,
    chain: str | None = None,
    checkpoint_every: int | None = None,
    checkpoint_interval: float | None = None,
    max_queue_size: int | None = None,
    effects: Any = None,
    writer: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting; raises ConfigError naming the first bad one."""
    env = os.environ if env is None else env
    value, _ = _pick(ledger, env, OTEL_AUDIT_LEDGER)
    ledger_url = str(value) if value is not None else _DEFAULT_LEDGER

    value, where = _pick(durability, env, OTEL_AUDIT_DURABILITY)
    mode = str(value).lower() if value is not None else _DEFAULT_DURABILITY
    if mode not in DURABILITIES:
        raise ConfigError(f"{where} must be one of sync, async; got {value!r}")

    value, _ = _pick(signing_key, env, OTEL_AUDIT_SIGNING_KEY)
    key = str(value) if value is not None else None

    value, _ = _pick(chain, env, OTEL_AUDIT_CHAIN)
    chain_id = str(value) if value is not None else None

    value, where = _pick(checkpoint_every, env, OTEL_AUDIT_CHECKPOINT_EVERY)
    every = _positive_int(value, where) if value is not None else _DEFAULT_CHECKPOINT_EVERY

    value, where = _pick(checkpoint_interval, env, OTEL_AUDIT_CHECKPOINT_INTERVAL)
    interval = _positive_float(value, where) if value is not None else _DEFAULT_CHECKPOINT_INTERVAL

    value, where = _pick(max_queue_size, env, OTEL_AUDIT_MAX_QUEUE_SIZE)
    queue = _positive_int(value, where) if value is not None else _DEFAULT_MAX_QUEUE_SIZE

    value, where = _pick(effects, env, OTEL_AUDIT_EFFECTS)
    kept: frozenset[str] | None = None
    if value is not None:
        from otel_audit.vocabulary import EFFECTS

        names = value.split(",") if isinstance(value, str) else list(value)
        kept = frozenset(n.strip() for n in names if n.strip())
        unknown = sorted(kept - set(EFFECTS))
        if unknown:
            raise ConfigError(f"{where} names unknown effects: {', '.join(unknown)}")

    value, where = _pick(writer, env, OTEL_AUDIT_WRITER)
    where_to = str(value).strip().lower() if value is not None else "thread"
    if where_to not in WRITERS:
        raise ConfigError(f"{where} must be one of thread, process; got {value!r}")

    return Settings(ledger_url, mode, key, chain_id, every, interval, queue, kept, where_to)
