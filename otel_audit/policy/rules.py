"""The audit policy: which spans are kept, at what level and durability, redacted how.

One file (``OTEL_AUDIT_POLICY=path``), TOML or YAML (YAML needs PyYAML),
validated when loaded: an error names the file, the line and the setting.
Without a file the default policy applies: every selected span is kept in
full at the pipeline's durability, and the default secret redaction runs
(see ``otel_audit.policy.redact``); it cannot be turned off.

Rules are tried in file order and the **first match wins**; a span no rule
matches gets ``[defaults]``. A rule's selectors (``action``, ``route``,
``service``, ``effect``, ``resource_type``, ``classification``,
``attributes``) must all match; each takes a glob or a list of globs.
Levels: ``none`` (not recorded), ``metadata`` (who/what/where/outcome only:
the audit.* vocabulary and a fixed set of semantic-convention metadata; no
payloads, statements, URLs, events or messages), ``full`` (everything, after
redaction). Durabilities: ``async``, ``sync`` (``on_end`` returns after the
commit) and ``blocking`` (for audit actions: the intent is committed *before*
the action's body runs, and the action raises when it cannot be).
Boundary violations are always recorded, at least ``sync``. Thread-safe:
immutable after loading.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan

from otel_audit import vocabulary as v
from otel_audit.capture.decision import Decision
from otel_audit.engine.record import Record, encode, record_from_span, span_attributes
from otel_audit.errors import ConfigError
from otel_audit.policy.boundary import (
    BLOCKED,
    DESTINATION,
    DESTINATION_KIND,
    KINDS,
    MODES,
    VIOLATING_SPAN,
    VIOLATION,
    VIOLATION_ACTION,
    AllowList,
    BoundaryConfig,
    BoundaryProcessor,
    Classifier,
    join_labels,
    parse_labels,
)
from otel_audit.policy.redact import (
    METHODS,
    AttributeRule,
    HmacKey,
    Redactor,
    ValueRule,
    load_hmac_key,
)
from otel_audit.semantics.effects import classify as classify_effect
from otel_audit.settings import OTEL_AUDIT_POLICY

if TYPE_CHECKING:
    from opentelemetry import trace


LEVELS = ("none", "metadata", "full")
DURABILITIES = ("blocking", "sync", "async")
#: Set on the record a ``blocking`` action commits before its body runs.
INTENT = v.INTENT

# What ``metadata`` keeps besides the audit.* vocabulary: names of things,
# never payloads (no statements, URLs, headers or bodies).
METADATA_ATTRIBUTES = frozenset(
    {
        "http.request.method", "http.method", "http.route", "http.response.status_code",
        "http.status_code", "server.address", "server.port", "net.peer.name",
        "net.peer.port", "db.system", "db.system.name", "db.name", "db.namespace",
        "db.operation", "db.operation.name", "db.collection.name", "db.sql.table",
        "messaging.system", "messaging.destination.name", "messaging.operation",
        "rpc.system", "rpc.service", "rpc.method", "peer.service", "error.type",
        "user.id", "service.name", INTENT, DESTINATION, DESTINATION_KIND, BLOCKED,
        VIOLATION, VIOLATING_SPAN,
    }
)  # fmt: skip

# Every attribute name ``metadata`` keeps (what apply() filters on).
_METADATA_KEPT = METADATA_ATTRIBUTES | frozenset(v.ALL)

_SELECTORS = ("action", "route", "service", "effect", "resource_type", "classification")
_RULE_KEYS = frozenset({"name", *_SELECTORS, "attributes", "level", "durability"})
_TOP_KEYS = frozenset({"version", "defaults", "rules", "redact", "boundary", "actions"})
_ACTION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_CLASSIFY_KEYS = {
    "db_system": "db_system",
    "db_name": "db_name",
    "server_address": "server_address",
    "tables": "tables",
    "routes": "routes",
    "resource_types": "resource_types",
    "services": "services",
}


# -- reading the file, with line numbers ------------------------------------


class _Lines:
    """Maps a setting's path, e.g. ("rules", 2, "level"), to its line in the file."""

    def __init__(self, lines: dict[tuple[Any, ...], int]) -> None:
        self._lines = lines

    def of(self, path: tuple[Any, ...]) -> int | None:
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


def _toml_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', text)
    return tuple(p.strip("\"'") for p in parts)


def _toml_lines(text: str) -> _Lines:
    """Line numbers of TOML tables and keys; good enough to point a person at a line."""
    lines: dict[tuple[Any, ...], int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: tuple[Any, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            name = _toml_key(header.group(2))
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*name, index)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = (*table, *_toml_key(key.group(1)))
            lines.setdefault(path, number)
    return _Lines(lines)


def _yaml_lines(node: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    tag = type(node).__name__
    if tag == "MappingNode":
        for key, value in node.value:
            sub = (*path, key.value)
            out.setdefault(sub, key.start_mark.line + 1)
            _yaml_lines(value, sub, out)
    elif tag == "SequenceNode":
        for i, item in enumerate(node.value):
            _yaml_lines(item, (*path, i), out)


def _read(path: str) -> tuple[dict[str, Any], _Lines]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path!r}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: policy file is not UTF-8 text") from None
    if path.endswith((".yaml", ".yml")):
        return _read_yaml(path, text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            raise ConfigError(
                f"{path}: reading TOML on Python 3.10 needs tomli (pip install tomli)"
            ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message names the line: "... (at line 3, column 9)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return data, _toml_lines(text)


def _read_yaml(path: str, text: str) -> tuple[dict[str, Any], _Lines]:
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise ConfigError(
            f"{path}: YAML policy files need PyYAML (pip install pyyaml), or use TOML"
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML at {where}{problem}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _yaml_lines(node, (), lines)
    if data is None:
        data = {}
    return data, _Lines(lines)


class _Checker:
    """Validation helpers that raise ConfigError naming file, line and setting."""

    def __init__(self, source: str, lines: _Lines) -> None:
        self.source = source
        self.lines = lines

    def fail(self, path: tuple[Any, ...], message: str) -> ConfigError:
        line = self.lines.of(path)
        where = f"{self.source}:{line}" if line else self.source
        name = "".join(
            f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path)
        )
        return ConfigError(f"{where}: {name or 'policy'}: {message}")

    def table(self, value: Any, path: tuple[Any, ...], keys: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {type(value).__name__}")
        allowed = set(keys)
        for key in value:
            if key not in allowed:
                raise self.fail(
                    (*path, key), f"unknown setting (expected one of {', '.join(sorted(allowed))})"
                )
        return value

    def list_of_tables(self, value: Any, path: tuple[Any, ...]) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of tables")
        return value

    def choice(self, value: Any, path: tuple[Any, ...], choices: Iterable[str]) -> str:
        options = tuple(choices)
        if not isinstance(value, str) or value not in options:
            raise self.fail(path, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def string(self, value: Any, path: tuple[Any, ...]) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"must be a non-empty string, got {value!r}")
        return value

    def globs(self, value: Any, path: tuple[Any, ...]) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise self.fail(path, "must be a string or a list of strings")
        return tuple(items)


# -- rules -------------------------------------------------------------------


@dataclass(frozen=True)
class SpanFacts:
    """What rules look at: a span's attributes (with derived ones), service and effect."""

    attributes: Mapping[str, Any]
    service: str | None = None
    effect: str | None = None


def _match_value(pattern: Any, value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_match_value(pattern, item) for item in value)
    if isinstance(pattern, str):
        if isinstance(value, bool):
            value = "true" if value else "false"
        return value is not None and fnmatch.fnmatchcase(str(value), pattern)
    return bool(pattern == value and type(pattern) is type(value))


@dataclass(frozen=True)
class Rule:
    """One rule of the policy: selectors (all must match) and what the span gets."""

    index: int
    name: str
    level: str = "full"
    durability: str | None = None
    selectors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, facts: SpanFacts) -> bool:
        attrs = facts.attributes
        for selector, patterns in self.selectors.items():
            if selector == "action":
                value: Any = attrs.get(v.ACTION)
            elif selector == "route":
                value = attrs.get("http.route") or attrs.get("url.path")
            elif selector == "service":
                value = facts.service
            elif selector == "effect":
                value = facts.effect or attrs.get(v.EFFECT)
            elif selector == "resource_type":
                value = attrs.get(v.RESOURCE_TYPE)
            else:  # classification: any of the span's labels
                value = sorted(parse_labels(attrs.get(v.DATA_CLASSIFICATION)))
            if not any(_match_value(p, value) for p in patterns):
                return False
        return all(_match_value(p, attrs.get(name)) for name, p in self.attributes.items())


@dataclass(frozen=True)
class Explanation:
    """What the policy gives one span (``otel-audit policy check``)."""

    rule: Rule | None
    level: str
    durability: str | None
    classification: str | None
    redactions: dict[str, str]
    scrubbed: list[str]
    destination: tuple[str, str] | None
    violations: list[str]


class AuditPolicy:
    """The loaded policy; implements the processor's Policy hook. Immutable, thread-safe."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        level: str = "full",
        durability: str | None = None,
        redactor: Redactor | None = None,
        boundary: BoundaryConfig | None = None,
        source: str | None = None,
        logger_provider: Any = None,
        meter_provider: Any = None,
        actions: Mapping[str, str | bool] | None = None,
    ) -> None:
        if level not in LEVELS:
            raise ConfigError(f"level must be one of {', '.join(LEVELS)}")
        if durability is not None and durability not in DURABILITIES:
            raise ConfigError(f"durability must be one of {', '.join(DURABILITIES)}")
        self.rules = tuple(rules)
        self.level = level
        self.durability = durability
        self.redactor = redactor or Redactor()
        self.boundary = boundary or BoundaryConfig()
        self.source = source
        self.logger_provider = logger_provider
        self.meter_provider = meter_provider
        #: ``[actions]``: route (``"POST /rule"``, endpoint or rule) -> action name,
        #: or true/false to audit a route or never; read by the Flask integration.
        self.actions: dict[str, str | bool] = dict(actions or {})
        self.base_effects: frozenset[str] = v.DEFAULT_KEPT_EFFECTS
        # Shared by every span the default policy keeps; read-only by contract.
        self._default_decision: Decision | None = None
        self._processor: BoundaryProcessor | None = None
        self._provider: Any = None

    # -- loading ---------------------------------------------------------

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> AuditPolicy:
        """Read and validate a policy file; ConfigError names the line of the first problem."""
        data, lines = _read(path)
        return cls.from_dict(data, source=path, lines=lines, **kwargs)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        source: str = "policy",
        lines: _Lines | None = None,
        hmac_key: HmacKey | None = None,
        **kwargs: Any,
    ) -> AuditPolicy:
        c = _Checker(source, lines or _Lines({}))
        data = c.table(data, (), _TOP_KEYS)
        if "version" in data and data["version"] != 1:
            raise c.fail(("version",), f"must be 1, got {data['version']!r}")
        defaults = c.table(data.get("defaults", {}), ("defaults",), {"level", "durability"})
        level = c.choice(defaults.get("level", "full"), ("defaults", "level"), LEVELS)
        durability = None
        if "durability" in defaults:
            durability = c.choice(defaults["durability"], ("defaults", "durability"), DURABILITIES)

        rules = []
        for i, raw in enumerate(c.list_of_tables(data.get("rules", []), ("rules",))):
            path = ("rules", i)
            raw = c.table(raw, path, _RULE_KEYS)
            selectors = {s: c.globs(raw[s], (*path, s)) for s in _SELECTORS if s in raw}
            if "effect" in selectors:
                for effect in selectors["effect"]:
                    if not any(fnmatch.fnmatchcase(e, effect) for e in v.EFFECTS):
                        raise c.fail(
                            (*path, "effect"), f"matches no effect ({', '.join(v.EFFECTS)})"
                        )
            attributes = raw.get("attributes", {})
            if not isinstance(attributes, dict):
                raise c.fail((*path, "attributes"), "must be a table of attribute name = value")
            for name, value in attributes.items():
                if not isinstance(value, (str, int, float, bool)):
                    raise c.fail((*path, "attributes", name), "must be a string, number or boolean")
            if "level" not in raw and "durability" not in raw:
                raise c.fail(path, "needs a level or a durability")
            rules.append(
                Rule(
                    index=i,
                    name=c.string(raw.get("name", f"rules[{i}]"), (*path, "name")),
                    level=c.choice(raw.get("level", "full"), (*path, "level"), LEVELS),
                    durability=(
                        c.choice(raw["durability"], (*path, "durability"), DURABILITIES)
                        if "durability" in raw
                        else None
                    ),
                    selectors=selectors,
                    attributes=dict(attributes),
                )
            )

        redactor = cls._redactor(c, data.get("redact", {}), hmac_key)
        boundary = cls._boundary(c, data.get("boundary", {}))
        actions: dict[str, str | bool] = {}
        raw_actions = data.get("actions", {})
        if not isinstance(raw_actions, dict):
            raise c.fail(("actions",), "must be a table of route = action name")
        for route, action in raw_actions.items():
            where = ("actions", route)
            if isinstance(action, bool) or (isinstance(action, str) and _ACTION_NAME.match(action)):
                actions[str(route)] = action
            else:
                raise c.fail(where, "must be an action name such as 'user.login', or true/false")
        return cls(
            rules,
            actions=actions,
            level=level,
            durability=durability,
            redactor=redactor,
            boundary=boundary,
            source=source,
            **kwargs,
        )

    @staticmethod
    def _redactor(c: _Checker, raw: Any, hmac_key: HmacKey | None) -> Redactor:
        raw = c.table(raw, ("redact",), {"hmac_key_file", "attributes", "values"})
        if "hmac_key_file" in raw:
            key_path = c.string(raw["hmac_key_file"], ("redact", "hmac_key_file"))
            try:
                hmac_key = load_hmac_key(key_path)
            except ConfigError as exc:
                raise c.fail(("redact", "hmac_key_file"), str(exc)) from None
        elif hmac_key is None:
            hmac_key = load_hmac_key()
        rules = []
        for i, item in enumerate(
            c.list_of_tables(raw.get("attributes", []), ("redact", "attributes"))
        ):
            path = ("redact", "attributes", i)
            item = c.table(item, path, {"name", "method"})
            if "name" not in item or "method" not in item:
                raise c.fail(path, "needs a name (glob) and a method")
            method = c.choice(item["method"], (*path, "method"), METHODS)
            if method == "hmac" and hmac_key is None:
                raise c.fail(
                    (*path, "method"),
                    "hmac needs a key: set redact.hmac_key_file or OTEL_AUDIT_HMAC_KEY",
                )
            for name in c.globs(item["name"], (*path, "name")):
                rules.append(AttributeRule(name, method))
        values = []
        for i, item in enumerate(c.list_of_tables(raw.get("values", []), ("redact", "values"))):
            path = ("redact", "values", i)
            item = c.table(item, path, {"pattern"})
            pattern = c.string(item.get("pattern"), (*path, "pattern"))
            try:
                values.append(ValueRule(re.compile(pattern)))
            except re.error as exc:
                raise c.fail(
                    (*path, "pattern"), f"is not a valid regular expression: {exc}"
                ) from None
        return Redactor(rules, values, hmac_key)

    @staticmethod
    def _boundary(c: _Checker, raw: Any) -> BoundaryConfig:
        raw = c.table(raw, ("boundary",), {"mode", "classify", "allow"})
        mode = c.choice(raw.get("mode", "detect"), ("boundary", "mode"), MODES)
        classifiers = []
        for i, item in enumerate(
            c.list_of_tables(raw.get("classify", []), ("boundary", "classify"))
        ):
            path = ("boundary", "classify", i)
            item = c.table(item, path, {"classification", *_CLASSIFY_KEYS})
            label = c.string(item.get("classification"), (*path, "classification"))
            if not parse_labels(label) == {label}:
                raise c.fail(
                    (*path, "classification"), "must be a short label (letters, digits, _.-)"
                )
            selectors = {
                attr: c.globs(item[key], (*path, key))
                for key, attr in _CLASSIFY_KEYS.items()
                if key in item
            }
            if not selectors:
                raise c.fail(path, f"needs at least one of {', '.join(_CLASSIFY_KEYS)}")
            if "tables" in selectors:
                selectors["tables"] = tuple(t.lower() for t in selectors["tables"])
            classifiers.append(Classifier(label, **selectors))
        allow: dict[str, AllowList] = {}
        allow_raw = raw.get("allow", {})
        if not isinstance(allow_raw, dict):
            raise c.fail(("boundary", "allow"), "must be a table of classification = allow-list")
        known = {cl.classification for cl in classifiers}
        for label, item in allow_raw.items():
            path = ("boundary", "allow", label)
            if label not in known:
                raise c.fail(path, f"no boundary.classify entry gives classification {label!r}")
            item = c.table(item, path, KINDS)
            allow[label] = AllowList(
                **{
                    kind: c.globs(item[kind], (*path, kind)) if item[kind] != [] else ()
                    for kind in KINDS
                    if kind in item
                }
            )
        return BoundaryConfig(mode, tuple(classifiers), allow)

    # -- wiring ------------------------------------------------------------

    def effects(self, kept: Iterable[str]) -> frozenset[str]:
        """The effects the processor must select: ``kept`` plus those rules keep explicitly."""
        self.base_effects = frozenset(kept)
        extra: set[str] = set()
        for rule in self.rules:
            if rule.level != "none":
                for pattern in rule.selectors.get("effect", ()):
                    extra.update(e for e in v.EFFECTS if fnmatch.fnmatchcase(e, pattern))
        return self.base_effects | extra

    def boundary_processor(
        self, service: str, tracer_provider: trace.TracerProvider, meter_provider: Any = None
    ) -> BoundaryProcessor | None:
        """The span processor of the boundary part.

        Installed even when this policy classifies nothing, so that a
        classification arriving from upstream still marks this service's
        spans and travels on downstream.
        """
        if self._processor is not None and self._provider is not tracer_provider:
            raise ConfigError("an AuditPolicy serves one pipeline: load one per configure() call")
        if self._processor is None:
            self._provider = tracer_provider
            self._processor = BoundaryProcessor(
                self.boundary,
                service,
                tracer_provider,
                logger_provider=self.logger_provider,
                meter_provider=self.meter_provider or meter_provider,
            )
        return self._processor

    # -- the Policy hook -----------------------------------------------------

    def rule_for(self, facts: SpanFacts) -> Rule | None:
        """The first rule, in file order, that matches."""
        for rule in self.rules:
            if rule.matches(facts):
                return rule
        return None

    def _facts(self, span: ReadableSpan, derived: Mapping[str, Any]) -> SpanFacts:
        # A plain copy: cheaper than a ChainMap view for the many lookups rules make.
        attrs: Any = dict(span_attributes(span))
        attrs.update(derived)
        resource = span.resource
        service = resource.attributes.get("service.name") if resource is not None else None
        if self._processor is not None:
            service = self._processor.service
            if self._processor.config.active or v.DATA_CLASSIFICATION in attrs:
                trail = attrs.get(v.TRAIL_ID)
                labels = self._processor.labels(attrs, trail if isinstance(trail, str) else None)
                if labels:
                    attrs[v.DATA_CLASSIFICATION] = join_labels(labels)
            elif isinstance(attrs.get(v.TRAIL_ID), str) and self._processor.registry.get(
                attrs[v.TRAIL_ID]
            ):
                labels = self._processor.labels(attrs, attrs[v.TRAIL_ID])
                attrs[v.DATA_CLASSIFICATION] = join_labels(labels)
        effect = attrs.get(v.EFFECT)
        return SpanFacts(
            attrs, str(service) if service else None, effect if isinstance(effect, str) else None
        )

    def decide(self, span: ReadableSpan, derived: dict[str, Any]) -> Decision | None:
        attrs = span_attributes(span)
        processor = self._processor
        if (
            not self.rules
            and attrs.get(v.ACTION) != VIOLATION_ACTION
            and (
                processor is None
                or not (
                    processor.config.active
                    or v.DATA_CLASSIFICATION in attrs
                    or (
                        isinstance(trail := attrs.get(v.TRAIL_ID), str)
                        and processor.registry.get(trail)
                    )
                )
            )
        ):
            # No rules, not a violation, and the boundary adds nothing (no
            # classifier, no label on the span or its trail): the default
            # policy. Nothing to match, so skip building the span's facts.
            effect = derived.get(v.EFFECT) or attrs.get(v.EFFECT)
            if isinstance(effect, str) and effect not in self.base_effects:
                return None
            if self.level == "none":
                return None
            found = self._default_decision
            if found is None or found.level != self.level or found.durability != self.durability:
                found = self._default_decision = Decision(self.level, self.durability, {})
            return found
        facts = self._facts(span, derived)
        extra: dict[str, Any] = {}
        label = facts.attributes.get(v.DATA_CLASSIFICATION)
        if label and label != attrs.get(v.DATA_CLASSIFICATION):
            extra[v.DATA_CLASSIFICATION] = label
        if (
            facts.attributes.get(v.ACTION) == VIOLATION_ACTION
            and facts.attributes.get(v.EVENT) is True
        ):
            # A violation is evidence: never dropped, never left in a queue.
            rule = self.rule_for(facts)
            level = rule.level if rule is not None and rule.level != "none" else "full"
            durability = (
                rule.durability if rule is not None and rule.durability != "async" else "sync"
            )
            return Decision(level, durability or "sync", extra)
        rule = self.rule_for(facts)
        if rule is not None:
            level, durability = rule.level, rule.durability or self.durability
        else:
            if facts.effect is not None and facts.effect not in self.base_effects:
                return None  # selected only for a rule that did not match
            level, durability = self.level, self.durability
        if level == "none":
            return None
        return Decision(level, durability, extra)

    def apply(self, record: Record, decision: Decision) -> Record:
        if decision.level == "metadata":
            record = replace(
                record,
                attributes={
                    k: val
                    for k, val in record.attributes.items()
                    if k in METADATA_ATTRIBUTES or k in v.ALL
                },
                status_message=None,
                events=tuple(replace(ev, attributes={}) for ev in record.events),
                links=tuple(replace(ln, attributes={}) for ln in record.links),
            )
        return self.redactor.record(record)

    def encode_span(
        self, span: ReadableSpan, service: str, extra: dict[str, Any], decision: Decision
    ) -> bytes:
        """``encode(self.apply(record_from_span(span, service, extra), decision))``, faster.

        The same bytes (``tests/test_hotpath.py``): the processor's path from a
        finished span to what it stores, with the record built, redacted and
        encoded in one pass (``Redactor.span_body``) where it can be.
        """
        body = self.redactor.span_body(
            span, service, extra, _METADATA_KEPT if decision.level == "metadata" else None
        )
        if body is None:
            body = encode(self.apply(record_from_span(span, service, extra), decision))
        return body

    # -- explaining ----------------------------------------------------------

    def explain(
        self, attributes: Mapping[str, Any], *, service: str | None = None, kind: str | None = None
    ) -> Explanation:
        """What a span with ``attributes`` would get; for ``otel-audit policy check``."""
        from opentelemetry.trace import SpanKind

        attrs = dict(attributes)
        span_kind = SpanKind[kind.upper()] if kind else None
        service = service or (str(attrs["service.name"]) if "service.name" in attrs else None)
        effect = classify_effect(attrs, span_kind, "")
        own = self.boundary.classify(attrs, service) | parse_labels(
            attrs.get(v.DATA_CLASSIFICATION)
        )
        if own:
            attrs[v.DATA_CLASSIFICATION] = join_labels(own)
        if effect is not None:
            attrs.setdefault(v.EFFECT, effect)
        facts = SpanFacts(attrs, service, effect)
        rule = self.rule_for(facts)
        if rule is not None:
            level, durability = rule.level, rule.durability or self.durability
        else:
            level, durability = self.level, self.durability
        redactions = {}
        scrubbed = []
        for name, value in attrs.items():
            method = self.redactor.method_for(name)
            if method is not None:
                redactions[name] = method
            elif self.redactor.attributes({name: value}) != {name: value}:
                scrubbed.append(name)
        dest = self.boundary.destination(attrs, span_kind or SpanKind.CLIENT)
        violations: list[str] = []
        if dest is not None and own:
            kind_, destination, alternative = dest
            violations = self.boundary.violations(own, kind_, destination, alternative)
        return Explanation(
            rule,
            level,
            durability,
            join_labels(own) if own else None,
            redactions,
            scrubbed,
            (dest[0], dest[1]) if dest else None,
            violations,
        )


def load_policy(spec: Any = None, env: Mapping[str, str] | None = None) -> AuditPolicy:
    """The policy from ``spec`` (an AuditPolicy or a path), else ``OTEL_AUDIT_POLICY``, else defaults.

    Always returns a policy, so the default redaction runs with no configuration.
    """
    if isinstance(spec, AuditPolicy):
        return spec
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise ConfigError("policy must be a path or an otel_audit.policy.rules.AuditPolicy")
    env = os.environ if env is None else env
    path = os.fspath(spec) if spec is not None else (env.get(OTEL_AUDIT_POLICY) or "").strip()
    if not path:
        return AuditPolicy(redactor=Redactor(hmac_key=load_hmac_key(env=env)))
    return AuditPolicy.load(path)
