"""Redaction of audit records before encoding (DESIGN rule 4).

Four methods, applied to one attribute value at a time:

* ``drop``: the attribute is removed;
* ``mask``: the value becomes ``[REDACTED]``;
* ``hmac``: ``hmac:sha256:<key id>:<hex>``, HMAC-SHA256 under the operator's
  key: equal values give equal tokens, so records can be matched on a value
  (an e-mail, a card) that the ledger never holds;
* ``commit``: ``commit:sha256:<salt hex>:<hex>``, SHA-256(salt || value) with a
  fresh 16-byte salt stored beside the digest, so the value can later be
  proven to a reviewer who is shown it (``otel-audit prove``).

``Redactor`` also applies the defaults that need no configuration: header
attributes that carry credentials, attributes whose *name* says password,
secret, token, key or credential, and secrets found *inside* any string value
(bearer/basic credentials, ``password=...`` pairs in query strings and SQL,
URL user-info, Luhn-valid card numbers). Value scanning covers attribute
values, span names, status messages, and event and link attributes.
Thread-safe: a Redactor is immutable after construction.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from otel_audit import vocabulary as v
from otel_audit.engine.record import Event, Link, Record
from otel_audit.errors import ConfigError
from otel_audit.settings import OTEL_AUDIT_HMAC_KEY

METHODS = ("drop", "mask", "hmac", "commit")
MASK = "[REDACTED]"
COMMIT_PREFIX = "commit:sha256:"
HMAC_PREFIX = "hmac:sha256:"

# Name tokens that mark an attribute as a secret. Whole tokens only, so
# "monkey", "keyboard" or "tokenizer" do not match but "api_key", "apiKey",
# "x-auth-token" and "db.password" do. Plural counters ("input_tokens",
# "keys") are left alone on purpose: they are counts, not secrets.
_SECRET_TOKENS = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "passwords",
        "secret", "secrets", "token", "key", "apikey", "credential", "credentials",
        "cookie", "authorization", "privatekey",
    }
)  # fmt: skip
_NAME_SPLIT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")

# Header attributes (http.request.header.<name>, http.response.header.<name>)
# that carry credentials whatever their value looks like.
_SECRET_HEADERS = frozenset(
    {
        "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
        "api-key", "apikey", "x-auth-token", "x-access-token", "x-csrf-token",
        "x-xsrf-token", "x-amz-security-token",
    }
)  # fmt: skip
_HEADER_PREFIXES = ("http.request.header.", "http.response.header.")

# The vocabulary is never redacted by name, and its identifiers are never
# scanned: rewriting an id that happens to look like a card number would break
# every query on it. ``audit.reason`` is free text, so it is scanned.
_NEVER_REDACTED = frozenset(v.ALL)
_NEVER_SCANNED = _NEVER_REDACTED - {v.REASON}
# What trails, queries and the boundary report are built on: not even a
# configured rule may rewrite these. (Ids may be pseudonymised, e.g. an HMAC
# of audit.actor.id, by an explicit rule.)
_STRUCTURAL = frozenset(
    {v.EVENT, v.ACTION, v.TRAIL_ID, v.OUTCOME, v.ACTOR_TYPE, v.EFFECT, v.DATA_CLASSIFICATION}
)

_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/]+=*")
_PAIR = re.compile(
    r"(?i)(?<![a-z0-9])"
    r"((?:[a-z0-9]+[_-])?(?:password|passwd|pwd|passphrase|secret|token|api[_-]?key|"
    r"access[_-]?key|private[_-]?key|credentials?|auth))"
    r"(\"?'?\s*[:=]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s&,;\"'#)]+)"
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^@/\s]+@")
_MAX_CACHED_NAMES = 4096
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,}(?![0-9])")


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    """Mask the card numbers inside one run of digit groups (split by single spaces or dashes).

    The run may be longer than the card ("4111 1111 1111 1111 12 27"): every
    sequence of whole groups holding 13-19 digits is tried, longest first.
    """
    text = match.group(0)
    groups = [(m.start(), m.end()) for m in re.finditer(r"[0-9]+", text)]
    out, done, first = [], 0, 0
    while first < len(groups):
        for last in range(len(groups) - 1, first - 1, -1):
            span = groups[first : last + 1]
            digits = "".join(text[a:b] for a, b in span)
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                out.append(text[done : span[0][0]])
                out.append("[REDACTED:card]")
                done = span[-1][1]
                first = last + 1
                break
        else:
            first += 1
    out.append(text[done:])
    return "".join(out)


# Cheap pre-checks: most values hold none of these, and one scan for them
# costs less than running every pattern (this runs on every span's strings).
# (Substring tests on the lower-cased text are several times faster than one
# case-insensitive alternation.)
_MAYBE_WORDS = (
    "bearer",
    "basic",
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "auth",
    "://",
)
_DIGITS = re.compile(r"[0-9](?:[ -]?[0-9]){12}")


def _maybe_credential(text: str) -> bool:
    low = text.lower()
    # Spelled out rather than any(... for word in _MAYBE_WORDS): this runs on
    # every string of every record, and the generator costs five times more.
    return (
        "bearer" in low or "basic" in low or "pass" in low or "pwd" in low
        or "secret" in low or "token" in low or "key" in low or "credential" in low
        or "auth" in low or "://" in low
    )  # fmt: skip


def scrub_text(text: str) -> str:
    """``text`` with credentials and card numbers found inside it masked."""
    if not text:
        return text
    out = text
    if _maybe_credential(out):
        out = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", out)
        out = _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", out)
        if "@" in out:
            out = _USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", out)
    if _DIGITS.search(out):
        out = _CARD.sub(_card, out)
    return out


# Statements carry the values they write: a password in an INSERT is as
# secret as one in a header. Literals are replaced as the OpenTelemetry
# semantic conventions recommend for db.query.text.
_SQL_ATTRIBUTES = frozenset({"db.statement", "db.query.text"})
_SQL_LITERAL = re.compile(
    r"'(?:[^']|'')*'"  # string literals, '' escapes included
    r"|(?<![\w$.])[-+]?(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)(?![\w$])"
)
# Exception events: the type says what failed; the message and the stack
# often quote the values involved, so they are not audit data by default.
_EXCEPTION_MASKED = frozenset({"exception.message"})
_EXCEPTION_DROPPED = frozenset({"exception.stacktrace"})


def sanitize_sql(statement: str) -> str:
    """``statement`` with its string and numeric literals replaced by ``?``."""
    return _SQL_LITERAL.sub("?", statement)


def secret_name(name: str) -> bool:
    """True when the attribute ``name`` says it holds a secret (see module docstring)."""
    if name in _NEVER_REDACTED:
        return False
    for prefix in _HEADER_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :].lower() in _SECRET_HEADERS:
            return True
    tokens = {t.lower() for t in _NAME_SPLIT.findall(name)}
    return not tokens.isdisjoint(_SECRET_TOKENS)


def canonical_value(value: Any) -> bytes:
    """The bytes a commitment or HMAC covers: strings as UTF-8, other scalars as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def commit(value: Any, salt: bytes | None = None) -> str:
    """A salted SHA-256 commitment to ``value``: ``commit:sha256:<salt>:<digest>``."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.sha256(salt + canonical_value(value)).hexdigest()
    return f"{COMMIT_PREFIX}{salt.hex()}:{digest}"


def check_commitment(commitment: str, value: str) -> bool:
    """True when ``commitment`` (as made by ``commit``) commits to ``value``.

    Raises ValueError when ``commitment`` is not a commitment at all.
    """
    if not isinstance(commitment, str) or not commitment.startswith(COMMIT_PREFIX):
        raise ValueError("the value is not a commitment (commit:sha256:...)")
    try:
        salt_hex, digest_hex = commitment[len(COMMIT_PREFIX) :].split(":")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        raise ValueError("the commitment is malformed") from None
    # Values are committed as UTF-8 strings, numbers and booleans as JSON; the
    # reviewer types text, so both readings of it are tried.
    candidates = [value.encode("utf-8")]
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if parsed is not None and not isinstance(parsed, (str, dict, list)):
        candidates.append(canonical_value(parsed))
    return any(
        hmac.compare_digest(hashlib.sha256(salt + c).hexdigest(), digest_hex) for c in candidates
    )


class HmacKey:
    """An HMAC-SHA256 key; only a short id of it is ever written. Immutable."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the HMAC key must be at least 16 bytes")
        self._key = key
        self.key_id = hashlib.sha256(b"otel-audit hmac key id\x00" + key).hexdigest()[:8]

    @classmethod
    def from_file(cls, path: str, where: str = OTEL_AUDIT_HMAC_KEY) -> HmacKey:
        try:
            with open(path, "rb") as fh:
                data = fh.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read HMAC key file {path!r}: {exc.strerror}"
            ) from None
        try:
            return cls(data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc} ({path!r})") from None

    def token(self, value: Any) -> str:
        digest = hmac.new(self._key, canonical_value(value), hashlib.sha256).hexdigest()
        return f"{HMAC_PREFIX}{self.key_id}:{digest}"

    def __repr__(self) -> str:  # never show the key
        return f"HmacKey(id={self.key_id})"


@dataclass(frozen=True)
class AttributeRule:
    """Redact attributes whose name matches ``pattern`` (a glob) with ``method``."""

    pattern: str
    method: str

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class ValueRule:
    """Mask every match of ``regex`` inside string values."""

    regex: re.Pattern[str]


class Redactor:
    """Applies configured rules, then the defaults, to a whole Record. Immutable."""

    def __init__(
        self,
        rules: Iterable[AttributeRule] = (),
        value_rules: Iterable[ValueRule] = (),
        hmac_key: HmacKey | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.value_rules = tuple(value_rules)
        self.hmac_key = hmac_key
        # Attribute names repeat: remember each name's method. Racing threads
        # may compute one twice, never differently.
        self._methods: dict[str, str | None] = {}
        for rule in self.rules:
            if rule.method not in METHODS:
                raise ConfigError(f"redaction method must be one of {', '.join(METHODS)}")
            if rule.method == "hmac" and hmac_key is None:
                raise ConfigError(
                    f"redaction of {rule.pattern!r} uses hmac but no key is set "
                    f"(set {OTEL_AUDIT_HMAC_KEY} or redact.hmac_key_file)"
                )

    def method_for(self, name: str) -> str | None:
        """The method that applies to attribute ``name``: a rule's, else ``mask`` for secrets."""
        try:
            return self._methods[name]
        except KeyError:
            pass
        method = self._method_for(name)
        if len(self._methods) < _MAX_CACHED_NAMES:
            self._methods[name] = method
        return method

    def _method_for(self, name: str) -> str | None:
        if name in _STRUCTURAL:
            return None
        for rule in self.rules:
            if rule.matches(name):
                return rule.method
        if name in _EXCEPTION_MASKED:
            return "mask"
        if name in _EXCEPTION_DROPPED:
            return "drop"
        return "mask" if secret_name(name) else None

    def _text(self, text: str) -> str:
        out = scrub_text(text)
        for rule in self.value_rules:
            out = rule.regex.sub(MASK, out)
        return out

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, list):
            return [self._text(x) if isinstance(x, str) else x for x in value]
        return value

    def _apply(self, method: str, value: Any) -> Any:
        if method == "mask":
            return [MASK for _ in value] if isinstance(value, list) else MASK
        fn: Callable[[Any], str]
        if method == "hmac":
            assert self.hmac_key is not None
            fn = self.hmac_key.token
        else:
            fn = commit
        return [fn(x) for x in value] if isinstance(value, list) else fn(value)

    def attributes(
        self, attributes: Mapping[str, Any], redacted: list[str] | None = None
    ) -> dict[str, Any]:
        """Redacted copy of ``attributes``; names of redacted ones are appended to ``redacted``."""
        out: dict[str, Any] = {}
        for name, value in attributes.items():
            method = self.method_for(name)
            if method is None:
                if name in _NEVER_SCANNED:
                    out[name] = value
                elif name in _SQL_ATTRIBUTES and isinstance(value, str):
                    out[name] = self._text(sanitize_sql(value))
                else:
                    out[name] = self._value(value)
                continue
            if redacted is not None:
                redacted.append(name)
            if method == "drop":
                continue
            out[name] = self._apply(method, value)
        return out

    def record(self, record: Record) -> Record:
        """``record`` with every attribute, name, message, event and link redacted."""
        if not record.events and not record.links and not record.status_message:
            # The common case, built directly: dataclasses.replace costs more
            # than the redaction of a small record.
            return Record(
                record.trace_id, record.span_id, record.parent_span_id, self._text(record.name),
                record.kind, record.service, record.start, record.end, record.status, None,
                self.attributes(record.attributes), (), (), record.scope, record.truncated,
                record.version,
            )  # fmt: skip
        return replace(
            record,
            name=self._text(record.name),
            status_message=self._text(record.status_message) if record.status_message else None,
            attributes=self.attributes(record.attributes),
            events=tuple(
                Event(self._text(ev.name), ev.time, self.attributes(ev.attributes))
                for ev in record.events
            ),
            links=tuple(
                Link(ln.trace_id, ln.span_id, self.attributes(ln.attributes)) for ln in record.links
            ),
        )


def load_hmac_key(path: str | None = None, env: Mapping[str, str] | None = None) -> HmacKey | None:
    """The HMAC key from ``path``, else the file named by ``OTEL_AUDIT_HMAC_KEY``, else None."""
    if path:
        return HmacKey.from_file(path, "redact.hmac_key_file")
    env = os.environ if env is None else env
    named = (env.get(OTEL_AUDIT_HMAC_KEY) or "").strip()
    return HmacKey.from_file(named) if named else None
