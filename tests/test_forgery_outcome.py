"""Outcome unknown: a request whose record was written before the view, and no outcome after.

A real audited Flask service (a subprocess serving HTTP on loopback) commits
the request record (``audit.intent``) before each state-changing view runs;
the view of one request kills the process, so that request's outcome record
is never written. search, trail and every export must show that action's
outcome as ``unknown``, never as a success, and the completed request once,
with its real outcome.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.review.export import formats

_SERVICE = """
import os, sys
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from werkzeug.serving import make_server
import flask
import otel_audit
from otel_audit.integrations.flask import AuditFlask

provider = TracerProvider(shutdown_on_exit=False)
otel_audit.configure(ledger=sys.argv[1], service_name="shop", tracer_provider=provider,
                     handle_sigterm=False)
app = flask.Flask("shop")
FlaskInstrumentor.instrument_app(app, tracer_provider=provider)
AuditFlask(app)

@app.post("/orders/<order_id>")
def update(order_id):
    if order_id == "crash":
        os._exit(3)  # the process dies inside the action: no outcome record, ever
    return {"ok": True}

server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("outcome") / "audit.db"
    service = subprocess.Popen(
        [sys.executable, "-c", _SERVICE, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert service.stdout is not None
        port = int(service.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        assert requests.post(f"{base}/orders/7", timeout=30).status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{base}/orders/crash", timeout=30)
        assert service.wait(30) == 3
    finally:
        service.kill()
        service.wait()
    return db


def search(db: Path, capsys, *args: str) -> list[dict]:
    assert main(["search", "--ledger", str(db), "--format", "jsonl", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_request_record_was_written_before_the_view(crashed: Path, capsys) -> None:
    records = search(crashed, capsys)
    intents = [r for r in records if r["attributes"].get(v.INTENT) is True]
    # One intent per request; the completed request also has its outcome record.
    assert len(intents) == 2
    assert sum(1 for r in records if r["attributes"].get(v.INTENT) is not True) == 1


def test_search_shows_the_crashed_action_as_unknown(crashed: Path, capsys) -> None:
    assert main(["search", "--ledger", str(crashed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:]]
    crash = [r for r in rows if "crash" in r]
    assert crash and all("unknown" in r and "success" not in r for r in crash)
    # --outcome unknown finds it (its query column holds no outcome at all)
    found = search(crashed, capsys, "--outcome", "unknown")
    assert [r["attributes"].get(v.RESOURCE_ID) for r in found] == ["crash"]
    assert [r["outcome"] for r in found] == ["unknown"]
    # the completed request: its outcome is success, its intent concluded
    done = search(crashed, capsys, "--resource-id", "7")
    assert sorted(str(r["outcome"]) for r in done) == ["None", "success"]


def test_trail_shows_unknown(crashed: Path, capsys) -> None:
    found = search(crashed, capsys, "--outcome", "unknown")
    trail = found[0]["attributes"][v.TRAIL_ID]
    assert main(["trail", "--ledger", str(crashed), trail]) == 0
    text = capsys.readouterr().out
    assert "(unknown)" in text and "(success)" not in text
    assert main(["trail", "--ledger", str(crashed), trail, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [root["outcome"] for root in data["roots"]] == ["unknown"]
    # the completed request's trail shows it once, with its outcome
    done = search(crashed, capsys, "--resource-id", "7", "--outcome", "success")
    assert main(["trail", "--ledger", str(crashed), done[0]["attributes"][v.TRAIL_ID]]) == 0
    text = capsys.readouterr().out
    assert "(success)" in text and len(text.splitlines()) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "cadf", "otlp-json"])
def test_exports_show_unknown(crashed: Path, capsys, fmt: str) -> None:
    assert fmt in formats()
    assert main(["export", "--ledger", str(crashed), "--format", fmt, "--outcome", "unknown"]) == 0
    out = capsys.readouterr().out
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(r["resource_id"], r["outcome"]) for r in rows] == [("crash", "unknown")]
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.splitlines()]
        assert [(r["attributes"][v.RESOURCE_ID], r["outcome"]) for r in rows] == [
            ("crash", "unknown")
        ]
    else:
        assert "unknown" in out and "success" not in out
