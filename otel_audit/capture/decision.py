"""What a policy decides for one selected span: the hook the processor calls.

Capture defines the protocol and policy/rules.py implements it, so capture
never imports the policy package (the dependency points from policy to capture).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan

from otel_audit.engine.record import Record


@dataclass(frozen=True)
class Decision:
    """What a policy decided for one selected span."""

    #: ``metadata`` or ``full`` (``none`` is expressed by deciding None).
    level: str = "full"
    #: ``blocking``, ``sync`` or ``async``; None keeps the pipeline's durability.
    durability: str | None = None
    #: Attributes to add to the record (e.g. ``audit.data.classification``).
    attributes: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """The hook an audit policy plugs into the processor (see otel_audit.policy.rules)."""

    def decide(self, span: ReadableSpan, derived: dict[str, Any]) -> Decision | None:
        """None leaves the span out of the ledger."""

    def apply(self, record: Record, decision: Decision) -> Record:
        """Redact ``record`` for ``decision.level``; runs before encoding (docs/design.md, rule 4)."""
