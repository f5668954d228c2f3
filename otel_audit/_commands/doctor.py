"""``otel-audit doctor``: what a zero-code process would audit, and what it would silently miss.

Prints one line per installed database or HTTP library (traced by its
instrumentation, traced by otel-audit itself, or not traced: why, and the
fix), then checks the ``OTEL_AUDIT_*`` settings of this environment the way
the zero-code hook reads them. Exit 0 when everything is covered and the
settings load, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os

from otel_audit.errors import AuditError
from otel_audit.integrations.coverage import MISSING, survey
from otel_audit.settings import OTEL_AUDIT_LEDGER


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "doctor",
        help="list database/HTTP libraries whose effects would not be audited; check settings",
    )
    p.set_defaults(func=run)


def _settings_problem() -> str | None:
    from otel_audit.integrations.flask import settings_from_env
    from otel_audit.policy.rules import load_policy
    from otel_audit.proof.keys import Signer
    from otel_audit.settings import load

    try:
        conf = load()
        load_policy()
        if conf.signing_key:
            Signer.from_file(conf.signing_key)
        settings_from_env()
    except AuditError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    bad = 0
    findings = survey()
    for finding in findings:
        print(finding.line())
        bad += finding.status == MISSING
    if not findings:
        print("no known database or HTTP library is installed")
    if not os.environ.get(OTEL_AUDIT_LEDGER, "").strip():
        print(f"settings: {OTEL_AUDIT_LEDGER} is not set: zero-code auditing is off")
    else:
        problem = _settings_problem()
        if problem is not None:
            print(f"settings: {problem}: audited requests would be refused (503)")
            bad += 1
        else:
            print("settings: OTEL_AUDIT_* settings load")
    return 1 if bad else 0
