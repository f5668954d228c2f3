"""``otel-audit demo`` shows the data boundary: the deliberate export is detected."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger


def test_demo_detects_the_export_to_the_partner(tmp_path: pathlib.Path, capsys) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-m", "otel_audit", "demo", "--dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "alice: POST /orders/export -> 200" in out
    assert "the partner received 1 export(s)" in out
    assert "1 boundary violations in 1 of 3 trails touching classified data" in out
    assert "the deliberate export was detected: otel-audit boundary exits 1" in out
    assert "alice did boundary.violation (failure)" in out

    # The evidence is in the ledger: the violation event names the partner,
    # and the classification reached the inventory service over HTTP.
    ledger_url = f"sqlite:///{tmp_path / 'audit.db'}"
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        records = [s.record for s in ledger.query(Query())]
    (violation,) = [r for r in records if r.attr("audit.action") == "boundary.violation"]
    partner = violation.attr("audit.boundary.destination")
    assert partner.startswith("127.0.0.1:") and f"partner at http://{partner}" in out
    assert violation.attr("audit.actor.id") == "alice" and violation.service == "orders"
    # Request records committed before a view (audit.intent) precede what it touched.
    inventory = [r for r in records if r.service == "inventory" and not r.attr("audit.intent")]
    assert inventory and {r.attr("audit.data.classification") for r in inventory} == {"production"}
    assert main(["boundary", "--ledger", ledger_url]) == 1
    assert f"production data to host {partner}" in capsys.readouterr().out
