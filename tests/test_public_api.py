"""The public surface is exactly what __init__ lists, and every name resolves."""

from __future__ import annotations

import otel_audit
from otel_audit import vocabulary


def test_public_names():
    import __future__

    import types

    # Every public name (not a submodule, not the __future__ feature) is listed.
    public = {
        name
        for name in dir(otel_audit)
        if not name.startswith("_")
        and not isinstance(getattr(otel_audit, name), (types.ModuleType, __future__._Feature))
    }
    assert public == set(otel_audit.__all__) - {"vocabulary"}
    assert isinstance(otel_audit.vocabulary, types.ModuleType)


def test_vocabulary_matches_design():
    assert vocabulary.ALL == (
        "audit.event", "audit.action", "audit.actor.id", "audit.actor.type", "audit.actor.roles",
        "audit.actor.auth", "audit.actor.ip", "audit.resource.type", "audit.resource.id",
        "audit.outcome", "audit.reason", "audit.trail.id", "audit.effect",
        "audit.data.classification",
    )  # fmt: skip
    assert vocabulary.OUTCOMES == ("success", "failure", "denied", "unknown")
    assert set(vocabulary.EFFECTS) == {
        "data.write",
        "data.read",
        "http.call",
        "message.publish",
        "notification",
    }
