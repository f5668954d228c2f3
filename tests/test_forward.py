"""Store-and-forward from a local ledger to a real ``otel-audit serve``: nothing lost, nothing twice."""

from __future__ import annotations

import json
import pathlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.errors import ConfigError
from otel_audit.forward import Forwarder, forwarder_from_env, parse_headers, traces_url
from otel_audit.ledger import open_ledger
from otel_audit.record import Record, encode

from .test_serve import _deadline_wait


def _fill(url, n, chain="shop", start=0):
    """Append ``n`` audit records to ``chain`` of the local ledger (the outbox)."""
    bodies = [
        encode(
            Record(
                trace_id=f"{i + 1:032x}",
                span_id=f"{i + 1:016x}",
                parent_span_id=None,
                name="order.update",
                kind="SERVER",
                service="shop",
                start=1_700_000_000_000_000_000 + i,
                end=1_700_000_000_000_000_100 + i,
                attributes={v.EVENT: True, v.ACTION: "order.update", v.ACTOR_ID: "alice", "n": i},
                scope="shop.orders",
            )
        )
        for i in range(start, start + n)
    ]
    with open_ledger(url) as ledger:
        ledger.append(chain, bodies)
    return bodies


def _received(server):
    with open_ledger(server.ledger.url, create=False) as ledger:
        return [r.body for c in ledger.chains() for r in ledger.scan(c)]


def _count(server):
    with open_ledger(server.ledger.url, create=False) as ledger:
        return ledger.count()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def outbox(tmp_path):
    return f"sqlite:///{tmp_path / 'outbox.db'}"


def test_forwards_every_record_byte_identical(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    sent = _fill(outbox, 700)  # more than one batch
    _fill(outbox, 5, chain="billing", start=700)
    host, port = server.http_address
    forwarder = Forwarder(outbox, f"http://{host}:{port}", poll_interval=0.1).start()
    try:
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    received = _received(server)
    assert len(received) == 705
    assert set(sent) <= set(received)
    cursor = json.loads(pathlib.Path(forwarder.state_path).read_text())
    (entry,) = cursor.values()
    assert entry == {
        "endpoint": f"http://{host}:{port}/v1/traces",
        "chains": {"shop": 700, "billing": 5},
    }


def test_survives_a_receiver_outage_without_loss_or_duplicates(make_server, outbox, tmp_path):
    port = _free_port()
    forwarder = Forwarder(
        outbox, f"http://127.0.0.1:{port}", poll_interval=0.05, max_backoff=0.2
    ).start()
    try:
        _fill(outbox, 300)
        forwarder.wake()
        _deadline_wait(lambda: forwarder.stats().failures >= 3, what="failed attempts while down")
        assert "ConnectionRefusedError" in (forwarder.stats().last_error or "")
        server = make_server(
            ledger=f"sqlite:///{tmp_path / 'central.db'}",
            http=("127.0.0.1", port),
            grpc_address=None,
        )
        assert forwarder.flush(30)
        _fill(outbox, 200, start=300)  # more arrive while it is up
        forwarder.wake()
        assert forwarder.flush(30)
        # Down again, and back on the same ledger.
        server.stop()
        _fill(outbox, 100, start=500)
        forwarder.wake()
        failures = forwarder.stats().failures
        _deadline_wait(
            lambda: forwarder.stats().failures > failures, what="failure in second outage"
        )
        server = make_server(
            ledger=f"sqlite:///{tmp_path / 'central.db'}",
            http=("127.0.0.1", port),
            grpc_address=None,
        )
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    received = _received(server)
    assert len(received) == 600 == len(set(received))
    assert server.stats().duplicates == 0


def test_resumes_from_its_cursor_and_a_lost_cursor_duplicates_nothing(
    make_server, outbox, tmp_path
):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    endpoint = f"http://{host}:{port}/v1/traces"
    _fill(outbox, 100)
    first = Forwarder(outbox, endpoint, poll_interval=0.05).start()
    assert first.flush(30)
    first.stop()
    _fill(outbox, 50, start=100)
    second = Forwarder(outbox, endpoint, poll_interval=0.05).start()
    assert second.flush(30)
    second.stop()
    assert second.stats().forwarded == 50  # resumed, did not resend the first 100
    os.remove(second.state_path)
    third = Forwarder(outbox, endpoint, poll_interval=0.05).start()
    assert third.flush(30)
    third.stop()
    assert third.stats().forwarded == 150
    assert _count(server) == 150
    assert server.stats().duplicates == 150


def test_wrong_token_is_retried_not_dropped(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}", token="right")
    host, port = server.http_address
    _fill(outbox, 10)
    wrong = Forwarder(
        outbox, f"http://{host}:{port}", token="wrong", poll_interval=0.05, max_backoff=0.1
    ).start()
    try:
        _deadline_wait(lambda: wrong.stats().failures >= 2, what="refused attempts")
        assert "HTTP 401" in wrong.stats().last_error
    finally:
        wrong.stop()
    assert _count(server) == 0
    right = Forwarder(outbox, f"http://{host}:{port}", token="right", poll_interval=0.05).start()
    assert right.flush(30)
    right.stop()
    assert _count(server) == 10


def test_configure_starts_forwarding_from_the_environment(
    make_server, make_pipeline, tmp_path, monkeypatch
):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}", token="tok")
    host, port = server.http_address
    monkeypatch.setenv("OTEL_AUDIT_FORWARD_ENDPOINT", f"http://{host}:{port}")
    monkeypatch.setenv("OTEL_AUDIT_FORWARD_TOKEN", "tok")
    monkeypatch.setenv("OTEL_AUDIT_FORWARD_HEADERS", "x-tenant=shop%20eu")
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{tmp_path / 'local.db'}")
    tracer = provider.get_tracer("shop")
    for i in range(5):
        with tracer.start_as_current_span(f"action {i}", attributes={v.EVENT: True}):
            pass
    _deadline_wait(lambda: _count(server) == 5, what="forwarded records")
    with open_ledger(pipeline.ledger_url, create=False) as local:
        assert sorted(r.body for r in local.scan(pipeline.chain)) == sorted(_received(server))


def test_no_endpoint_no_forwarder(outbox):
    assert forwarder_from_env(outbox, {}) is None


def test_settings_are_validated():
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("https://h/v1/traces") == "https://h/v1/traces"
    assert parse_headers("a=1, B=x%3Dy") == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="not an http"):
        traces_url("ftp://h")
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_headers("novalue")
    with pytest.raises(ConfigError, match="OTEL_AUDIT_FORWARD_TIMEOUT must be a number"):
        forwarder_from_env(
            "x.db",
            {"OTEL_AUDIT_FORWARD_ENDPOINT": "http://h", "OTEL_AUDIT_FORWARD_TIMEOUT": "soon"},
        )
    with pytest.raises(ConfigError, match="OTEL_AUDIT_FORWARD_STATE"):
        forwarder_from_env("postgresql://x/y", {"OTEL_AUDIT_FORWARD_ENDPOINT": "http://h"})


def test_forward_command_once(make_server, outbox, tmp_path, capsys):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 20)
    assert (
        main(["forward", "--ledger", outbox, "--endpoint", f"http://{host}:{port}", "--once"]) == 0
    )
    assert "20 records sent" in capsys.readouterr().out
    assert _count(server) == 20
    down = f"http://127.0.0.1:{_free_port()}"
    assert main(["forward", "--ledger", outbox, "--endpoint", down, "--once"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("otel-audit: forwarding failed:") and len(err.strip().splitlines()) == 1
    assert main(["forward", "--ledger", outbox]) == 2


def test_killed_forwarder_process_resumes_exactly_once(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 3000)
    args = [
        sys.executable,
        "-m",
        "otel_audit",
        "forward",
        "--ledger",
        outbox,
        "--endpoint",
        f"http://{host}:{port}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _deadline_wait(lambda: _count(server) > 0, what="first records forwarded")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run(
        args + ["--once"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    received = _received(server)
    assert len(received) == 3000 == len(set(received))
