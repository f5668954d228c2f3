"""Redaction of audit records before encoding (docs/design.md, rule 4).

Four methods, applied to one attribute value at a time:

* ``drop``: the attribute is removed;
* ``mask``: the value becomes ``[REDACTED]``;
* ``hmac``: ``hmac:sha256:<key id>:<hex>``, HMAC-SHA256 under the operator's
  key: equal values give equal tokens, so records can be matched on a value
  (an e-mail, a card) that the ledger never holds;
* ``commit``: ``commit:sha256:<salt hex>:<hex>``, SHA-256(salt || value) with a
  fresh 16-byte salt stored beside the digest, so the value can later be
  proven to a reviewer who is shown it (``otel-audit prove``).

``Redactor`` also applies the defaults that need no configuration (see
docs/policy.md, "Redaction"):

* by name: attributes whose name says password, secret, token, key or
  credential, also run together or abbreviated (``PGPASSWORD``,
  ``oauth.accesstoken``, ``user.pass``, ``pwd``), and credential headers;
* by shape, inside every string the record keeps (attribute values, the span
  name, the status message, event names and attributes, link attributes, the
  scope and service names, ``audit.resource.id``, and attribute names):
  ``name=value`` pairs whose name is secret (query strings, JSON, config
  text, signatures such as ``X-Amz-Signature``), bearer and basic
  credentials, URL user-info, well-known token formats (JWTs, cloud and SaaS
  keys, PEM private keys), random tokens in URL paths, card numbers;
* then once per record: a value found secret in one place is masked wherever
  else it appears in the same record.

Thread-safe: a Redactor is immutable after construction (its caches may be
filled by racing threads, never with different answers).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from otel_audit import vocabulary as v
from otel_audit.engine.record import (
    DEFAULT_MAX_VALUE_LENGTH,
    FORMAT_VERSION,
    Event,
    Link,
    Record,
    clean_attributes,
    clean_key,
    clean_str,
    clean_value,
    fast_encode_dict,
    new_record,
    span_fields,
)
from otel_audit.errors import ConfigError
from otel_audit.settings import OTEL_AUDIT_HMAC_KEY

METHODS = ("drop", "mask", "hmac", "commit")
MASK = "[REDACTED]"
COMMIT_PREFIX = "commit:sha256:"
HMAC_PREFIX = "hmac:sha256:"

# -- secret names --------------------------------------------------------------
#
# A name is cut into segments at anything but letters and digits
# ("oauth.accesstoken" -> oauth, accesstoken) and camelCase segments into
# words ("clientSecret" -> client, Secret). A name is secret when a word or a
# segment (trailing digits ignored) is one of _NAME_WORDS, or a segment runs a
# secret word together with others: it ends with one of _NAME_SUFFIXES
# ("pgpassword", "clientsecret"), contains one of _NAME_INFIXES
# ("passwordhash"), or ends with "key" after a qualifier that makes it a
# secret key ("apikey", "accesskey", "signingkey" but not "monkey").
# Ordinary words that merely start with one stay readable: "passenger",
# "keyboard", "tokenizer", "secretary"; plural counters ("input_tokens",
# "keys") are counts, not secrets.
_NAME_WORDS = frozenset(
    {
        "password", "passwd", "pwd", "pw", "pass", "pswd", "passphrase", "passcode",
        "secret", "token", "key", "apikey", "privatekey", "credential", "credentials",
        "creds", "cookie", "authorization", "jwt", "otp", "bearer",
    }
)  # fmt: skip
_NAME_SUFFIXES = (
    "password", "passwd", "passphrase", "passcode", "pwd", "secret", "token",
    "credential", "credentials", "creds",
)  # fmt: skip
_NAME_INFIXES = ("password", "passwd", "passphrase", "apikey", "privatekey", "clientsecret")
# "...pass" ends many ordinary words; these are the ones that are not secrets.
_PASS_WORDS = frozenset(
    {"bypass", "compass", "encompass", "overpass", "underpass", "surpass", "trespass",
     "firstpass", "multipass", "onepass", "subpass", "renderpass"}
)  # fmt: skip
_KEY_QUALIFIERS = (
    "api", "private", "priv", "secret", "access", "signing", "sign", "master", "encryption",
    "enc", "decryption", "session", "auth", "client", "app", "hmac", "aes", "ssh", "gpg",
    "pgp", "shared", "account", "storage", "webhook", "jwt", "root", "consumer", "pass",
    "license", "subscription", "service", "admin",
)  # fmt: skip
# Words that make a name=value pair (query string, config text) secret beyond
# the attribute-name rule: signatures authorise a request as a password does.
_PARAMETER_WORDS = frozenset({"sig", "signature", "auth", "sas", "xsrf", "csrf"})
# Semantic-convention names that contain a secret word but hold no secret.
_NOT_SECRET_NAMES = frozenset(
    {
        "messaging.kafka.message.key", "messaging.rabbitmq.destination.routing_key",
        "messaging.message.key", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
    }
)  # fmt: skip

_SEGMENTS = re.compile(r"[A-Za-z0-9]+")
_CAMEL_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
# The other reading of an upper-case run before lower case: "PGkey" is PG, key
# (where camelCase reads P, Gkey).
_CASE_RUNS = re.compile(r"[A-Z]+|[a-z]+")
_DIGITS_AT_END = "0123456789"

# Header attributes (http.request.header.<name>, http.response.header.<name>)
# that carry credentials whatever their value looks like and whatever the
# name rule says of their words.
_SECRET_HEADERS = frozenset(
    {
        "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
        "api-key", "apikey", "x-auth-token", "x-access-token", "x-csrf-token",
        "x-xsrf-token", "x-amz-security-token",
    }
)  # fmt: skip
_HEADER_PREFIXES = ("http.request.header.", "http.response.header.")

# The vocabulary is never redacted by name, and its identifiers are not
# scanned as free text: rewriting an id that happens to look like a card
# number would break every query on it. ``audit.reason`` is free text, so it
# is scanned; ``audit.resource.id`` often comes from a route parameter (a
# reset token in /reset/<token>), so it is checked for token shapes.
_NEVER_REDACTED = frozenset(v.ALL)
_NEVER_SCANNED = _NEVER_REDACTED - {v.REASON, v.RESOURCE_ID}
# What trails, queries and the boundary report are built on: not even a
# configured rule may rewrite these. (Ids may be pseudonymised, e.g. an HMAC
# of audit.actor.id, by an explicit rule.)
_STRUCTURAL = frozenset(
    {v.EVENT, v.ACTION, v.TRAIL_ID, v.OUTCOME, v.ACTOR_TYPE, v.EFFECT, v.DATA_CLASSIFICATION}
)
# Attributes whose values instrumentations fill from code or configuration,
# never from request data: not worth scanning on every span.
_KEY_SAFE = frozenset(
    {
        "http.request.method", "http.method", "http.route", "http.scheme", "url.scheme",
        "http.flavor", "network.protocol.name", "network.protocol.version",
        "network.transport", "network.type", "server.address", "server.port",
        "client.port", "network.peer.port", "network.local.port", "db.system",
        "db.system.name", "db.operation", "db.operation.name", "db.collection.name",
        "messaging.system", "messaging.operation", "messaging.operation.type", "rpc.system",
        "rpc.service", "rpc.method", "code.function", "code.namespace", "code.filepath",
        "code.function.name", "code.file.path", "thread.name", "otel.status_code",
        "otel.scope.name", "exception.type", "error.type", "client.address",
        "network.peer.address", "network.local.address", "net.peer.ip", "net.peer.name",
        "net.peer.port", "net.host.name", "net.host.port", "net.host.ip", "http.host",
        "http.server_name", "http.status_code", "http.response.status_code",
        "server.socket.address", "server.socket.port", "db.name", "db.namespace",
    }
)  # fmt: skip


def _segment_is_secret(low: str) -> bool:
    """``low``: one lower-case name segment without trailing digits."""
    if low in _NAME_WORDS:
        return True
    if low.endswith(_NAME_SUFFIXES):
        return True
    if low.endswith("pass") and low not in _PASS_WORDS:
        return True
    if low.endswith("key") and low[:-3].endswith(_KEY_QUALIFIERS):
        return True
    return any(word in low for word in _NAME_INFIXES)


def _name_is_secret(name: str, extra: frozenset[str] = frozenset()) -> bool:
    for segment in _SEGMENTS.findall(name):
        low = segment.lower().rstrip(_DIGITS_AT_END)
        if _segment_is_secret(low) or low in extra:
            return True
        if not segment.islower() and not segment.isupper():
            for word in (*_CAMEL_WORDS.findall(segment), *_CASE_RUNS.findall(segment)):
                word = word.lower()
                if word in _NAME_WORDS or word in extra:
                    return True
    return False


def secret_name(name: str) -> bool:
    """True when the attribute ``name`` says it holds a secret (see the section comment)."""
    if name in _NEVER_REDACTED or name in _NOT_SECRET_NAMES:
        return False
    for prefix in _HEADER_PREFIXES:
        if name.startswith(prefix):
            header = name[len(prefix) :].lower()
            if header in _SECRET_HEADERS:
                return True
            return _name_is_secret(header)
    return _name_is_secret(name)


@functools.lru_cache(maxsize=4096)
def secret_parameter(name: str) -> bool:
    """True when a ``name=value`` pair (query parameter, config line, JSON member) is a secret."""
    return _name_is_secret(name, _PARAMETER_WORDS)


# -- secrets inside values -------------------------------------------------------
#
# Every family of secret has a cheap gate (a substring test on the text, or a
# regex that starts with literals, which the regex engine scans for quickly);
# the full pattern runs only when its gate opens. Most strings open none.

# Well-known token formats, anywhere in any string. The label names the kind
# in the mask: "[REDACTED:jwt]".
_SHAPES = re.compile(
    r"(?P<private_key>-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,10}-----"
    r"(?s:.*?-----END[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,10}-----|.*))"
    r"|(?<![A-Za-z0-9_-])(?:"
    r"(?P<jwt>eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){1,3})"
    r"|(?P<aws_key_id>(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Za-z0-9]))"
    r"|(?P<github_token>(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}))"
    r"|(?P<gitlab_token>glpat-[A-Za-z0-9_-]{20,})"
    r"|(?P<slack_token>(?:xox[abposer]-[A-Za-z0-9-]{10,}|xapp-[0-9]-[A-Za-z0-9-]{10,}))"
    r"|(?P<stripe_key>(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}|whsec_[A-Za-z0-9]{20,})"
    r"|(?P<google_key>AIza[0-9A-Za-z_-]{35}|ya29\.[0-9A-Za-z_-]{20,})"
    r"|(?P<api_key>sk-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}"
    r"|SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}|pypi-AgE[A-Za-z0-9_-]{50,}"
    r"|dop_v1_[a-f0-9]{64})"
    r"|(?P<slack_webhook>hooks\.slack\.com/services/[A-Za-z0-9/_-]+))"
)
_SHAPE_GATE = re.compile(
    r"eyJ|AKIA|ASIA|ABIA|ACCA|A3T|gh[pousr]_|github_pat_|glpat-|xox|xapp-|sk_|rk_|whsec_"
    r"|AIza|ya29\.|sk-|npm_|hf_|SG\.|pypi-|dop_v1_|-----BEGIN|hooks\.slack"
)

# name=value / name: value pairs (query strings, JSON, config text, SQL);
# whether the name is secret is decided by secret_parameter. Credential
# header lines are masked to the end of the line; bearer and basic
# credentials wherever they appear. Only the name (or scheme) is consumed by
# a match and the value is a lookahead, so a pair that is not secret
# ("https://...") never hides a secret one inside its value ("?token=...").
_KEYED = re.compile(
    r"(?<![A-Za-z0-9_.-])(?P<header>(?i:(?:proxy-)?authorization|(?:set-)?cookie|x-api-key"
    r"|x-auth-token)[ \t]*:[ \t]*)"
    r"|(?P<scheme>(?i:\b(?:bearer|basic))\s+)"
    r"|(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z][A-Za-z0-9_.-]{0,63})[\"']?[ \t]*[:=][ \t]*"
)
# What follows a match of _KEYED, matched only when the name is secret: a
# value read for every pair would make a long run of "a:a:a:..." quadratic.
_LINE = re.compile(r"[^\r\n]+")
_CREDENTIAL = re.compile(r"[A-Za-z0-9\-._~+/]{8,}=*")
_VALUE = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s&,;\"'#)]+")

# URL user-info: the password runs to the last "@" before the next blank, so
# a password holding "/" or "@" is masked whole.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://[^/\s:@?#]*):(\S*)@")
_PORT_THEN_PATH = re.compile(r"[0-9]{1,5}(?:[/?#]|\Z)")

# Random tokens in URL paths and in values of unnamed parameters: a path
# segment after a secret word ("/reset/<token>"), or any segment that looks
# random (long, mixed case and digits; UUIDs, hex digests and slugs do not).
_PATH_TOKEN = re.compile(
    r"(?i)(/(?:tokens?|secrets?|keys?|api-?keys?|passwords?|reset|reset-password"
    r"|password-reset|invite|invites|invitations?|verify|verification|confirm"
    r"|confirmation|activate|activation|magic|magic-link|otp|sessions?)/)"
    r"([A-Za-z0-9._~-]{16,})"
)
_RANDOM_SEGMENT = re.compile(r"[/=]([A-Za-z0-9_-]{24,})(?=[/?#&;,\s\"']|\Z)")
_TYPED_ID = re.compile(r"[a-z]{2,10}_")  # "cus_...", "pi_...": typed ids, not secrets

# An AWS secret access key has no prefix: 40 base64 characters, masked when
# the text also speaks of AWS or a secret.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")

_CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,}(?![0-9])")
_DIGIT_GROUP = re.compile(r"[0-9]+")
_MAX_DIGIT_RUN = 256
_DIGITS = re.compile(r"[0-9](?:[ -]?[0-9]){12}")


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
    Cards are not hunted for elsewhere in the record: an operator may use
    one as ``audit.resource.id``, which is kept (see scrub_id).
    """
    text = match.group(0)
    if len(text) > _MAX_DIGIT_RUN:
        # No card is written like this; checking every window of a run this
        # long would let a request burn the service's CPU.
        return "[REDACTED:digits]"
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(text)]
    out, done, first = [], 0, 0
    while first < len(groups):
        # Only runs of at most 19 digits can be a card: linear in the run's
        # length, however long a run of digits an attacker sends.
        longest, digits = -1, ""
        for last in range(first, len(groups)):
            a, b = groups[last]
            digits += text[a:b]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_valid(digits):
                longest = last
        if longest < 0:
            first += 1
            continue
        out.append(text[done : groups[first][0]])
        out.append("[REDACTED:card]")
        done = groups[longest][1]
        first = longest + 1
    out.append(text[done:])
    return "".join(out)


def looks_random(token: str) -> bool:
    """True when ``token`` looks like a generated secret rather than an id or a word.

    Long enough (24+), upper and lower case letters and digits together, and
    not a typed id ("cus_...", "pi_..."). UUIDs and hex digests have no upper
    case; slugs have no digits.
    """
    return (
        len(token) >= 24
        and not token.islower()
        and not token.isupper()
        and any(c.isdigit() for c in token)
        and _TYPED_ID.match(token) is None
    )


def _basic_credential(token: str) -> bool:
    """True when ``token`` decodes as base64 to ``user:password`` (so "basic plan" stays)."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return b":" in raw


def _hinted(low: str) -> bool:
    # Spelled out rather than any(... for word in ...): this runs on every
    # string of every record, and the generator costs several times more.
    return (
        "pass" in low or "pw" in low or "secret" in low or "token" in low or "key" in low
        or "cred" in low or "auth" in low or "sig" in low or "cookie" in low
        or "bearer" in low or "basic" in low or "otp" in low or "jwt" in low
        or "sas" in low or "srf" in low
    )  # fmt: skip


def _scrub(text: str, found: list[str] | None, cards: bool = True) -> str:
    """``text`` with every secret shape masked; what was masked is appended to ``found``."""
    n = len(text)
    if n < 15 and "=" not in text and ":" not in text and " " not in text and "/" not in text:
        # Too short for every shape below but a 13- or 14-digit card.
        if cards and n >= 13 and _DIGITS.search(text) is not None:
            return _CARD.sub(_card, text)
        return text
    out = text
    if _SHAPE_GATE.search(out) is not None:
        out = _SHAPES.sub(lambda m: _masked_shape(m, found), out)
    low = out.lower()
    if _hinted(low):
        out = _mask_pairs(out, found)
    if "://" in out and "@" in out:
        out = _USERINFO.sub(lambda m: _masked_userinfo(m, found), out)
    if n >= 17 and "/" in out and _PATH_TOKEN.search(out) is not None:
        out = _PATH_TOKEN.sub(lambda m: _masked_path(m, found), out)
    if n >= 25 and ("/" in out or "=" in out):
        out = _RANDOM_SEGMENT.sub(lambda m: _masked_segment(m, found), out)
    if n >= 40 and ("aws" in low or "secret" in low):
        out = _AWS_SECRET.sub(lambda m: _masked_aws_secret(m, found), out)
    if cards and n >= 13 and _DIGITS.search(out) is not None:
        out = _CARD.sub(_card, out)
    return out


def _note(found: list[str] | None, secret: str) -> None:
    if found is not None:
        found.append(secret)


def _masked_shape(m: re.Match[str], found: list[str] | None) -> str:
    _note(found, m.group(0))
    kind = (m.lastgroup or "secret").replace("_", "-")
    return f"[REDACTED:{kind}]"


def _mask_pairs(text: str, found: list[str] | None) -> str:
    out: list[str] = []
    done = pos = 0
    search = _KEYED.search
    while (m := search(text, pos)) is not None:
        pos = m.end()
        if m.group("header") is not None:
            value = _LINE.match(text, pos)
        elif m.group("scheme") is not None:
            value = _CREDENTIAL.match(text, pos)
            if (
                value is not None
                and m.group("scheme")[:5].lower() == "basic"
                and not _basic_credential(value.group(0))
            ):
                continue
        elif secret_parameter(m.group("name")):
            value = _VALUE.match(text, pos)
        else:
            continue
        if value is None:
            continue
        secret = value.group(0)
        if not secret.startswith(MASK[:-1]):  # not what a shape already masked
            _note(found, secret.strip("\"'"))
        out.append(text[done : value.start()])
        out.append(MASK)
        done = pos = value.end()
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def _masked_userinfo(m: re.Match[str], found: list[str] | None) -> str:
    password = m.group(2)
    if _PORT_THEN_PATH.match(password) or password.startswith(MASK):
        return m.group(0)  # host:port/path@...: no user-info at all
    _note(found, password)
    return f"{m.group(1)}:{MASK}@"


def _masked_path(m: re.Match[str], found: list[str] | None) -> str:
    token = m.group(2)
    if not any(c.isdigit() for c in token):
        return m.group(0)  # a slug ("/verify/my-email-address"), not a token
    _note(found, token)
    return m.group(1) + MASK


def _masked_segment(m: re.Match[str], found: list[str] | None) -> str:
    token = m.group(1)
    if not looks_random(token):
        return m.group(0)
    _note(found, token)
    return m.group(0)[0] + MASK


def _masked_aws_secret(m: re.Match[str], found: list[str] | None) -> str:
    token = m.group(0)
    if token.islower() or token.isupper() or not any(c.isdigit() for c in token):
        return token
    _note(found, token)
    return "[REDACTED:aws-secret-key]"


def scrub_text(text: str) -> str:
    """``text`` with credentials, token formats and card numbers found inside it masked."""
    return _scrub(text, None) if text else text


def scrub_id(text: str, found: list[str] | None = None) -> str:
    """``audit.resource.id`` checked for secrets: token shapes and random tokens, not cards.

    Ids are what reviewers query on, so only what looks like a credential is
    rewritten: a 16-digit order number that happens to pass Luhn stays.
    """
    if (
        len(text) < 15
        and "=" not in text
        and ":" not in text
        and " " not in text
        and "/" not in text
    ):
        return text  # what _scrub returns as it is, and too short for a random token
    if looks_random(text) and _RANDOM_TOKEN.fullmatch(text) is not None:
        _note(found, text)
        return MASK
    return _scrub(text, found, cards=False)


_RANDOM_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


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
_MAX_CACHED_NAMES = 4096
# Values repeat (user agents, statements, routes, scope and service names):
# short values found clean are remembered, so each is scanned once. Only
# clean values are kept, so the cache never holds a secret; it is emptied
# when full, so it follows what the service currently sends.
_MAX_CACHED_VALUES = 8192
_MAX_CACHED_VALUE_LENGTH = 512
# Values shorter than this are not hunted for elsewhere in the record: a
# two-letter password would otherwise mask every "ab" in it.
_MIN_ECHO = 6


def sanitize_sql(statement: str) -> str:
    """``statement`` with its string and numeric literals replaced by ``?``."""
    return _SQL_LITERAL.sub("?", statement)


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
    """Applies configured rules, then the defaults, to a whole Record.

    Thread-safe: its settings never change; its caches (plans per attribute
    name, clean values) may be filled by racing threads, never differently.
    """

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
        self._plans: dict[str, tuple[str, str]] = {}
        # The same plans, for names as spans hold them (span_body).
        self._span_plans: dict[str, tuple[str, str]] = {}
        # Attribute shapes (names, then value types, as a tuple) -> what
        # span_body does with them; attribute names -> what attributes() does.
        self._span_shapes: dict[tuple[Any, ...], tuple[tuple[tuple[str, str], ...], bool] | None]
        self._span_shapes = {}
        self._shapes: dict[tuple[str, ...], tuple[tuple[str, str], ...] | None] = {}
        # Names whose plan keeps name and value as they are: copied in bulk.
        self._clean: set[str] = set()
        self._clean_statements: set[str] = set()
        # Names whose plan keeps both name and value as they are: copied in
        # bulk (attributes, span_body). Only the vocabulary and key-safe names
        # are ever kept so, so the set is known once the rules are.
        self._kept_names = frozenset(
            name for name in _NEVER_SCANNED | _KEY_SAFE if self._plan(name) == (name, _KEEP)
        )
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

    def _plan(self, name: str) -> tuple[str, str]:
        """(name as stored, what to do with the value); decided once per attribute name."""
        try:
            return self._plans[name]
        except KeyError:
            pass
        method = self.method_for(name)
        if method is not None:
            action = method
        elif name in _NEVER_SCANNED or name in _KEY_SAFE:
            action = _KEEP
        elif name == v.RESOURCE_ID:
            action = _ID
        elif name in _SQL_ATTRIBUTES:
            action = _SQL
        else:
            action = _SCAN
        # A name can hold a secret too (an instrumentation that makes one
        # attribute per query parameter or header value).
        stored = name if name in _NEVER_REDACTED else self._text(name, None)
        plan = (stored, action)
        if len(self._plans) < _MAX_CACHED_NAMES:
            self._plans[name] = plan
        return plan

    def _text(self, text: str, found: list[str] | None) -> str:
        clean = self._clean
        if text in clean:
            return text
        out = _scrub(text, found)
        for rule in self.value_rules:
            out = rule.regex.sub(MASK, out)
        if out == text and len(text) <= _MAX_CACHED_VALUE_LENGTH:
            if len(clean) >= _MAX_CACHED_VALUES:
                clean.clear()
            clean.add(text)
        return out

    def _statement(self, statement: str, found: list[str] | None) -> str:
        # Parametrized statements repeat and have no literals: remembered
        # apart from other values, since only these also passed sanitize_sql.
        clean = self._clean_statements
        if statement in clean:
            return statement
        out = self._text(sanitize_sql(statement), found)
        if out == statement and len(statement) <= _MAX_CACHED_VALUE_LENGTH:
            if len(clean) >= _MAX_CACHED_VALUES:
                clean.clear()
            clean.add(statement)
        return out

    def _value(self, value: Any, found: list[str] | None) -> Any:
        if isinstance(value, str):
            return self._text(value, found)
        if isinstance(value, list):
            return [self._text(x, found) if isinstance(x, str) else x for x in value]
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
        self,
        attributes: Mapping[str, Any],
        redacted: list[str] | None = None,
        found: list[str] | None = None,
    ) -> dict[str, Any]:
        """Redacted copy of ``attributes``.

        Names of redacted ones are appended to ``redacted``; the secret values
        removed (whole or found inside a value) to ``found``.
        """
        names = tuple(attributes)
        steps = self._shapes.get(names, _UNKNOWN)
        if steps is _UNKNOWN:
            steps = self._shape(names)
        if steps is not None:
            # Copy all, then redact in place the names whose value is redacted.
            out = dict(attributes)
            for name, action in steps:
                if not self._redact_into(out, name, action, name, out[name], found, redacted):
                    del out[name]
            return out
        return self._each(attributes, redacted, found)

    def _shape(self, names: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
        """The names of ``names`` to redact, in order, with their plans; remembered.

        None when a name is renamed by redaction (its place and who wins a
        clash then need the loop of ``_each``) or no name keeps its value.
        """
        kept = self._kept_names
        steps: list[tuple[str, str]] | None = []
        for name in names:
            if name in kept:
                continue
            plan = self._plans.get(name) or self._plan(name)
            if plan[0] != name:
                steps = None
                break
            steps.append(plan)  # type: ignore[union-attr]
        found = None if steps is None or len(steps) == len(names) else tuple(steps)
        return _remember(self._shapes, names, found)

    def _each(
        self,
        attributes: Mapping[str, Any],
        redacted: list[str] | None = None,
        found: list[str] | None = None,
    ) -> dict[str, Any]:
        """``attributes`` redacted one by one (see ``attributes``)."""
        out: dict[str, Any] = {}
        plans = self._plans
        for name, value in attributes.items():
            stored, action = plans.get(name) or self._plan(name)
            self._redact_into(out, stored, action, name, value, found, redacted)
        return out

    def span_body(
        self,
        span: Any,
        service: str,
        extra: Mapping[str, Any] | None = None,
        keep: Container[str] | None = None,
    ) -> bytes | None:
        """The canonical bytes of ``span``'s redacted record, in one pass; None when it cannot.

        The same bytes as ``encode(self.record(record_from_span(span, service,
        extra)))``; ``keep`` (the attribute names the ``metadata`` level keeps)
        also applies that level's reduction first, as AuditPolicy.apply does.
        No Record is built: attributes are normalised and redacted in one
        step and the dict orjson encodes is built directly. Attributes whose
        plan is to keep the value as it is (the audit.* vocabulary and
        key-safe names: most of a record) are copied in bulk and their
        normalisation is checked on the result (orjson refuses a lone
        surrogate; no value is longer than the whole record). None, and the
        caller takes the composed path, for what this path does not cover: a
        span the composed path refuses, a value cut for length, a value only
        the reference encoder writes exactly, an attribute name that needs
        normalising or is itself redacted. ``tests/test_hotpath.py`` checks
        both paths give the same bytes.
        """
        try:
            (name, kind, status, message, attributes, span_links, span_events, scope,
             trace_id, span_id, parent_id, start, end) = span_fields(span)  # fmt: skip
        except (AttributeError, TypeError, ValueError):
            return None  # the composed path raises what it raises
        max_len = DEFAULT_MAX_VALUE_LENGTH
        found: list[str] = []
        text = self._text
        clean = self._clean
        # The record's own strings first, in the order Redactor.record visits
        # them (what is found is then masked wherever else it appears).
        if type(name) is not str or not name.isascii() or len(name) > max_len:
            name = clean_str(str(name), max_len)[0]
        if name not in clean:
            name = text(name, found)
        if service not in clean:
            service = text(service, found)
        if message and keep is None:
            message = text(clean_str(message, max_len)[0], found)
        else:
            message = None
        if extra:
            attributes = {**attributes, **extra}
        out = None
        floats = True
        if keep is None:
            # In bulk (see _span_shape): a copy, then the few names whose value
            # is redacted, each normalised first; values copied as they are
            # are checked on the result (a non-finite float by the encoder's
            # null count, a lone surrogate by its refusal, a value too long by
            # the length of the whole record).
            shape = (*attributes, *map(type, attributes.values()))
            found_shape = self._span_shapes.get(shape, _UNKNOWN)
            if found_shape is _UNKNOWN:
                found_shape = self._span_shape(shape, attributes)
            if found_shape is not None:
                rest, floats = found_shape
                out = dict(attributes)
                for key, action in rest:
                    value = out[key]
                    if type(value) is not str or len(value) > max_len or not value.isascii():
                        value, cut = clean_value(value, max_len)
                        if cut:
                            return None
                    if not self._redact_into(out, key, action, key, value, found):
                        del out[key]
        bulk = out is not None
        if out is None:
            out = self._each_attribute(attributes, found, keep)
            if out is None:
                return None
        links: list[dict[str, Any]] | None = None
        if span_links:
            links = []
            for ln in span_links:
                ctx = ln.context
                attrs = {} if keep is not None else clean_attributes(ln.attributes, max_len)[0]
                links.append({
                    "trace_id": format(ctx.trace_id, "032x"),
                    "span_id": format(ctx.span_id, "016x"),
                    "attributes": self.attributes(attrs, None, found),
                })  # fmt: skip
        events: list[dict[str, Any]] | None = None
        if span_events:
            events = []
            for ev in span_events:
                attrs = {} if keep is not None else clean_attributes(ev.attributes, max_len)[0]
                events.append({
                    "name": text(ev.name, found),
                    "time": int(ev.timestamp or 0),
                    "attributes": self.attributes(attrs, None, found),
                })  # fmt: skip
        if scope:
            scope = text(scope, found)
        data: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_span_id": parent_id,
            "name": name,
            "kind": kind,
            "service": service,
            "start": start,
            "end": end,
            "status": status,
            "attributes": out,
        }
        if message:
            data["status_message"] = message
        if links:
            data["links"] = links
        if events:
            data["events"] = events
        if scope:
            data["scope"] = scope
        if found:
            echoes = {s for s in found if len(s) >= _MIN_ECHO and not s.startswith(MASK[:-1])}
            if echoes:
                # The echo pass rewrites values: those copied in bulk must be
                # checked first, as the encoder's checks would no longer see them.
                if bulk:
                    kept = self._kept_names
                    for key, value in out.items():
                        if key in kept and clean_value(value, max_len)[0] is not value:
                            return None
                record = _record_of(data)
                data = _mask_echoes(record, sorted(echoes, key=len, reverse=True)).to_dict()
        # No float anywhere (only ints, bools and text; no events or links):
        # the encoder need not look for floats it writes differently.
        body = fast_encode_dict(data, floats or links is not None or events is not None)
        if body is None or (bulk and len(body) > max_len):
            return None
        return body

    def _span_shape(
        self, shape: tuple[Any, ...], attributes: Mapping[str, Any]
    ) -> tuple[tuple[tuple[str, str], ...], bool] | None:
        """How span_body redacts attributes of this shape (names, then value types), remembered.

        ``(names to redact, in order, with their plans; whether a value is a
        float)``, or None for the one-by-one path: a value kept as it is of
        a type normalising changes (lists, bytes, None, ...), or a name that
        needs normalising or is renamed by redaction (its place and who wins
        a clash then follow the composed path's order).
        """
        count = len(attributes)
        kept = self._kept_names
        rest = []
        floats = False
        for name, kind in zip(shape[:count], shape[count:]):
            if name in kept:
                # Copied as it is: only a type normalising leaves alone.
                if kind not in _BULK_TYPES:
                    return _remember(self._span_shapes, shape, None)
                floats = floats or kind is float
                continue
            plan = self._span_plans.get(name) or self._span_plan(name)
            if plan is None or plan[0] != name:
                return _remember(self._span_shapes, shape, None)
            rest.append(plan)
            # Normalised before it is redacted: a float, or a list that may hold one.
            floats = floats or (kind is not str and kind is not int and kind is not bool)
        return _remember(self._span_shapes, shape, (tuple(rest), floats))

    def _each_attribute(
        self, attributes: Mapping[str, Any], found: list[str], keep: Container[str] | None
    ) -> dict[str, Any] | None:
        """``attributes`` normalised and redacted one by one; None when one is cut for length."""
        out: dict[str, Any] = {}
        plans = self._span_plans
        max_len = DEFAULT_MAX_VALUE_LENGTH
        for key, value in attributes.items():
            plan = plans.get(key) or self._span_plan(key)
            if plan is None:
                return None  # a name that needs normalising
            value, cut = clean_value(value, max_len)
            if cut:
                return None
            if keep is not None and key not in keep:
                continue
            stored, action = plan
            if action is _KEEP:
                out[stored] = value
            else:
                self._redact_into(out, stored, action, key, value, found)
        return out

    def _redact_into(
        self,
        out: dict[str, Any],
        stored: str,
        action: str,
        name: str,
        value: Any,
        found: list[str] | None,
        redacted: list[str] | None = None,
    ) -> bool:
        """``out[stored]`` = ``value`` redacted by ``action``, as ``attributes`` does; False: dropped."""
        if action is _KEEP:
            out[stored] = value
        elif action is _SCAN:
            out[stored] = (
                value if type(value) is str and value in self._clean else self._value(value, found)
            )
        elif action is _ID:
            out[stored] = scrub_id(value, found) if isinstance(value, str) else value
        elif action is _SQL:
            out[stored] = (
                self._statement(value, found)
                if isinstance(value, str)
                else self._value(value, found)
            )
        else:
            if redacted is not None:
                redacted.append(name)
            if found is not None and name not in _EXCEPTION_NAMES:
                if isinstance(value, str):
                    found.append(value)
                elif isinstance(value, list):
                    found.extend(x for x in value if isinstance(x, str))
            if action == "drop":
                return False
            out[stored] = self._apply(action, value)
        return True

    def _span_plan(self, name: Any) -> tuple[str, str] | None:
        """``_plan`` for an attribute name as the span holds it; None when it needs normalising."""
        if clean_key(name, DEFAULT_MAX_VALUE_LENGTH) is None:
            return None
        plan = self._plan(name)
        if len(self._span_plans) < _MAX_CACHED_NAMES:
            self._span_plans[name] = plan
        return plan

    def record(self, record: Record) -> Record:
        """``record`` with every string it keeps redacted (see the module docstring)."""
        found: list[str] = []
        text = self._text
        attributes = self.attributes
        truncated = record.truncated
        if truncated:  # names of cut values, as stored
            truncated = tuple(self._plan(n)[0] for n in truncated)
        # Built directly: dataclasses.replace costs more than the redaction
        # of a small record.
        out = new_record(
            record.trace_id, record.span_id, record.parent_span_id, text(record.name, found),
            record.kind, text(record.service, found), record.start, record.end, record.status,
            text(record.status_message, found) if record.status_message else None,
            attributes(record.attributes, None, found),
            tuple(
                Link(ln.trace_id, ln.span_id, attributes(ln.attributes, None, found))
                for ln in record.links
            ) if record.links else (),
            tuple(
                Event(text(ev.name, found), ev.time, attributes(ev.attributes, None, found))
                for ev in record.events
            ) if record.events else (),
            text(record.scope, found) if record.scope else record.scope,
            truncated, record.version,
        )  # fmt: skip
        if found:
            echoes = {s for s in found if len(s) >= _MIN_ECHO and not s.startswith(MASK[:-1])}
            if echoes:
                out = _mask_echoes(out, sorted(echoes, key=len, reverse=True))
        return out


# Plans for an attribute's value (besides the redaction METHODS).
_SCAN, _KEEP, _SQL, _ID = "scan", "keep", "sql", "id"
_EXCEPTION_NAMES = _EXCEPTION_MASKED | _EXCEPTION_DROPPED
# Values normalising leaves as they are (but for what span_body checks after).
_BULK_TYPES = frozenset({str, int, bool, float})
_UNKNOWN: Any = object()  # not in a cache
_K = TypeVar("_K")
_V = TypeVar("_V")
# Attribute shapes remembered (emptied when full, like the clean values).
_MAX_CACHED_SHAPES = 1024


def _remember(cache: dict[_K, _V], key: _K, found: _V) -> _V:
    """``cache[key] = found`` in a shape cache (emptied when full); returns ``found``."""
    if len(cache) >= _MAX_CACHED_SHAPES:
        cache.clear()
    cache[key] = found
    return found


def _record_of(data: dict[str, Any]) -> Record:
    """The Record whose ``to_dict()`` is ``data`` (as span_body builds it)."""
    return new_record(
        data["trace_id"], data["span_id"], data["parent_span_id"], data["name"], data["kind"],
        data["service"], data["start"], data["end"], data["status"], data.get("status_message"),
        data["attributes"],
        tuple(Link(ln["trace_id"], ln["span_id"], ln["attributes"]) for ln in data.get("links", ())),
        tuple(Event(ev["name"], ev["time"], ev["attributes"]) for ev in data.get("events", ())),
        data.get("scope"), (), data["v"],
    )  # fmt: skip


def _echo(value: Any, secrets_: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets_:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, list):
        return [_echo(x, secrets_) for x in value]
    return value


def _echo_attributes(attributes: dict[str, Any], secrets_: list[str]) -> dict[str, Any]:
    return {
        name: value if name in _NEVER_SCANNED else _echo(value, secrets_)
        for name, value in attributes.items()
    }


def _appears(record: Record, secrets_: list[str]) -> bool:
    """True when a secret is in a string of ``record`` that the echo pass would rewrite."""
    parts = [record.name, record.status_message or ""]
    for attributes in (
        record.attributes,
        *(ev.attributes for ev in record.events),
        *(ln.attributes for ln in record.links),
    ):
        for name, value in attributes.items():
            if name in _NEVER_SCANNED:
                continue
            if type(value) is str:
                parts.append(value)
            elif type(value) is list:
                parts.extend(x for x in value if type(x) is str)
    parts.extend(ev.name for ev in record.events)
    blob = "\x00".join(parts)
    return any(secret in blob for secret in secrets_)


def _mask_echoes(record: Record, secrets_: list[str]) -> Record:
    """``record`` with every other occurrence of the secrets found in it masked too.

    The password of ``db.password`` in the connection string beside it, the
    reset token of a URL path in ``audit.resource.id`` and the span name.
    Usually a secret appears only where it was found: then nothing is rebuilt.
    """
    if not _appears(record, secrets_):
        return record
    return replace(
        record,
        name=_echo(record.name, secrets_),
        status_message=_echo(record.status_message, secrets_),
        attributes=_echo_attributes(record.attributes, secrets_),
        events=tuple(
            Event(_echo(ev.name, secrets_), ev.time, _echo_attributes(ev.attributes, secrets_))
            for ev in record.events
        ),
        links=tuple(
            Link(ln.trace_id, ln.span_id, _echo_attributes(ln.attributes, secrets_))
            for ln in record.links
        ),
    )


def load_hmac_key(path: str | None = None, env: Mapping[str, str] | None = None) -> HmacKey | None:
    """The HMAC key from ``path``, else the file named by ``OTEL_AUDIT_HMAC_KEY``, else None."""
    if path:
        return HmacKey.from_file(path, "redact.hmac_key_file")
    env = os.environ if env is None else env
    named = (env.get(OTEL_AUDIT_HMAC_KEY) or "").strip()
    return HmacKey.from_file(named) if named else None
