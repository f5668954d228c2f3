"""``otel-audit policy check FILE [--span JSON ...]``: validate a policy, explain decisions."""

from __future__ import annotations

import argparse
import json
from typing import Any

from otel_audit.errors import ConfigError
from otel_audit.policy.rules import AuditPolicy


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="validate an audit policy and explain what spans get")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=type(p))
    psub.required = True
    check = psub.add_parser("check", help="validate FILE; with --span, explain what that span gets")
    check.add_argument("file", metavar="FILE", help="policy file (.toml, .yaml or .yml)")
    check.add_argument(
        "--span",
        action="append",
        default=[],
        metavar="JSON",
        help='span attributes as a JSON object, e.g. \'{"audit.action": "order.delete"}\'; '
        'or {"attributes": {...}, "service": "shop", "kind": "CLIENT"}; repeatable',
    )
    check.set_defaults(func=run)


def _span(text: str) -> tuple[dict[str, Any], str | None, str | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--span is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--span must be a JSON object of span attributes")
    if isinstance(data.get("attributes"), dict):
        service, kind = data.get("service"), data.get("kind")
        if kind is not None and str(kind).upper() not in (
            "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"
        ):  # fmt: skip
            raise ConfigError(f"--span kind {kind!r} is not a span kind")
        return data["attributes"], service and str(service), kind and str(kind)
    return data, None, None


def run(args: argparse.Namespace) -> int:
    spans = [_span(text) for text in args.span]  # bad input fails before any output
    policy = AuditPolicy.load(args.file)
    b = policy.boundary
    print(
        f"ok: {args.file}: {len(policy.rules)} rules, defaults level={policy.level}"
        f" durability={policy.durability or 'pipeline'};"
        f" {len(b.classifiers)} classification rules, boundary mode {b.mode}"
    )
    for attributes, service, kind in spans:
        e = policy.explain(attributes, service=service, kind=kind)
        print()
        print(f"span {json.dumps(attributes, sort_keys=True)}")
        if e.rule is not None:
            print(
                f"  rule:        #{e.rule.index + 1} {e.rule.name!r} (first match, in file order)"
            )
        else:
            print("  rule:        none matched; [defaults] apply")
        print(f"  level:       {e.level}" + ("  (not recorded)" if e.level == "none" else ""))
        print(f"  durability:  {e.durability or 'pipeline default'}")
        if e.classification:
            print(f"  classified:  {e.classification}")
        for name, method in sorted(e.redactions.items()):
            print(f"  redact:      {name} -> {method}")
        for name in e.scrubbed:
            print(f"  redact:      secrets inside the value of {name} -> mask")
        if e.destination is not None and e.classification:
            kind_, dest = e.destination
            verdict = (
                f"VIOLATION ({', '.join(e.violations)} not allowed; "
                + ("blocked" if b.mode == "enforce" else "reported")
                + ")"
                if e.violations
                else "allowed"
            )
            print(f"  destination: {kind_[:-1].replace('_', ' ')} {dest}: {verdict}")
    return 0
