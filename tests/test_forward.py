"""Store-and-forward from a local ledger to a real ``otel-audit serve``: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.errors import ConfigError
from otel_audit.transport.forward import Forwarder, forwarder_from_env, parse_headers, traces_url

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
    with open_ledger(server.ledger_url, create=False) as ledger:
        return [r.body for c in ledger.chains() for r in ledger.scan(c)]


def _count(server):
    with open_ledger(server.ledger_url, create=False) as ledger:
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
    with open_ledger(outbox, create=False) as ledger:
        heads = {chain: ledger.head(chain) for chain in ("shop", "billing")}
    walks = entry.pop("sweeps")
    assert entry == {
        "endpoint": f"http://{host}:{port}/v1/traces",
        "chains": {"shop": 700, "billing": 5},
        # the hash of the last record sent, checked at the start of each pass
        "hashes": {chain: head.hash.hex() for chain, head in heads.items()},
        # seqs passed that held no record (a real chain has none), looked into each pass
        "holes": {},
        # links that broke below the cursor, reported once (a real chain has none)
        "breaks": {},
        # the hash of the record below each gap (there is none)
        "edges": {},
        # chains being sent again after a rewind (none)
        "resend": {},
    }
    # The walk of the records sent: how far it read, the last record and its hash.
    assert {chain: walk[:3] for chain, walk in walks.items()} == {
        "shop": [700, 700, heads["shop"].hash.hex()],
        "billing": [5, 5, heads["billing"].hash.hex()],
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


# -- regressions: the forwarder never dies, and --once always returns ----------------


def _forward_cli(*args, env=None, timeout=60):
    """``otel-audit forward`` as a real process; a hang fails the test instead of the suite."""
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", "forward", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def _one_line(stderr):
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


def test_unwritable_cursor_file_is_retried_not_fatal(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 30)
    state = tmp_path / "st.json"
    blocker = tmp_path / "st.json.tmp"
    blocker.mkdir()  # the atomic cursor write (tmp file + rename) cannot create its tmp file
    forwarder = Forwarder(
        outbox, f"http://{host}:{port}", state_path=str(state), poll_interval=0.05, max_backoff=0.1
    ).start()
    try:
        _deadline_wait(lambda: forwarder.stats().failures >= 3, what="retried cursor failures")
        assert forwarder.running
        assert "cannot write cursor file" in forwarder.stats().last_error
        blocker.rmdir()
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert json.loads(state.read_text())  # the cursor was written once it could be
    received = _received(server)
    assert len(received) == 30 == len(set(received))  # resent batches were deduplicated


def test_unopenable_lock_file_is_retried_until_it_can_be_opened(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 5)
    state_dir = tmp_path / "later"
    forwarder = Forwarder(
        outbox,
        f"http://{host}:{port}",
        state_path=str(state_dir / "s.json"),
        poll_interval=0.05,
        max_backoff=0.1,
    ).start()
    try:
        _deadline_wait(lambda: forwarder.stats().failures >= 2, what="lock open failures")
        assert forwarder.running
        assert "cannot open lock file" in forwarder.stats().last_error
        state_dir.mkdir()
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    assert _count(server) == 5


def test_undecodable_outbox_record_is_reported_and_retried(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 3)
    with open_ledger(outbox) as ledger:
        ledger.append("shop", [b'{"v": 99}'])  # valid JSON, not a record of this format
    forwarder = Forwarder(
        outbox, f"http://{host}:{port}", poll_interval=0.05, max_backoff=0.1
    ).start()
    try:
        _deadline_wait(lambda: forwarder.stats().failures >= 2, what="undecodable record failures")
        assert forwarder.running
        assert "record 4 of chain 'shop' in the outbox cannot be sent" in (
            forwarder.stats().last_error
        )
    finally:
        forwarder.stop()
    assert _count(server) == 0  # nothing skipped: the batch waits for the outbox to be repaired


def test_a_damaged_record_in_one_chain_does_not_hold_the_others(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    with open_ledger(outbox) as ledger:
        ledger.append("a-damaged", [b'{"v": 99}'])  # sorts first; not a record of this format
    good = _fill(outbox, 5) + _fill(outbox, 4, chain="zz", start=5)
    forwarder = Forwarder(
        outbox, f"http://{host}:{port}", poll_interval=0.05, max_backoff=0.1
    ).start()
    try:
        _deadline_wait(lambda: _count(server) == len(good), what="the good chains' records")
        _deadline_wait(lambda: forwarder.stats().failures >= 2, what="the damaged chain retried")
        assert "chain 'a-damaged'" in (forwarder.stats().last_error or "")
    finally:
        forwarder.stop()
    assert _count(server) == len(good)


def test_once_fails_fast_when_the_cursor_cannot_be_written(make_server, outbox, tmp_path):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 5)
    state = tmp_path / "st.json"
    (tmp_path / "st.json.tmp").mkdir()
    done = _forward_cli(
        "--ledger", outbox, "--endpoint", f"http://{host}:{port}", "--state", str(state), "--once"
    )
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert line.startswith("otel-audit: forwarding failed: cannot write cursor file")


def test_once_fails_when_the_lock_file_cannot_be_opened(outbox, tmp_path):
    _fill(outbox, 1)
    done = _forward_cli(
        "--ledger", outbox, "--endpoint", f"http://127.0.0.1:{_free_port()}",
        "--state", str(tmp_path / "missing" / "s.json"), "--once",
    )  # fmt: skip
    assert done.returncode == 1
    assert _one_line(done.stderr).startswith("otel-audit: forwarding failed: cannot open lock file")


def test_once_gives_up_when_another_forwarder_holds_the_outbox(outbox, tmp_path):
    import fcntl

    _fill(outbox, 1)
    state = tmp_path / "s.json"
    with open(f"{state}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _forward_cli(
            "--ledger", outbox, "--endpoint", f"http://127.0.0.1:{_free_port()}",
            "--state", str(state), "--once", "--lock-timeout", "0.5",
        )  # fmt: skip
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert line.startswith("otel-audit: forwarding failed: another forwarder holds")


def test_once_returns_when_the_thread_has_ended(make_server, outbox, tmp_path):
    import threading

    from otel_audit._commands.forward import _healthy_run

    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 1)
    forwarder = Forwarder(outbox, f"http://{host}:{port}", poll_interval=0.05).start()
    assert forwarder.flush(30)
    forwarder.stop()
    assert not forwarder.running and forwarder.stats().failures == 0
    result = []
    waiter = threading.Thread(target=lambda: result.append(_healthy_run(forwarder)), daemon=True)
    waiter.start()
    waiter.join(10)
    assert result == [False]


@pytest.mark.parametrize(
    "header, env",
    [
        (["--header", "x-a=b%0D%0Ac"], {}),
        (["--header", "x-a=b%0Ac"], {}),
        (["--header", "bad%20name=1"], {}),
        ([], {"OTEL_AUDIT_FORWARD_HEADERS": "x-a=b%0D%0Ac"}),
    ],
)
def test_header_with_control_characters_is_a_config_error(
    make_server, outbox, tmp_path, header, env
):
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")
    host, port = server.http_address
    _fill(outbox, 1)
    done = _forward_cli(
        "--ledger", outbox, "--endpoint", f"http://{host}:{port}", *header, "--once", env=env
    )
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert ("--header" if header else "OTEL_AUDIT_FORWARD_HEADERS") in line
    assert _count(server) == 0


def test_header_and_token_values_are_checked_by_the_forwarder(outbox):
    with pytest.raises(ConfigError, match="control character"):
        Forwarder(outbox, "http://127.0.0.1:9", headers={"x-a": "b\r\nx-b: c"})
    with pytest.raises(ConfigError, match="OTEL_AUDIT_FORWARD_TOKEN"):
        Forwarder(outbox, "http://127.0.0.1:9", token="abc\ndef")
    with pytest.raises(ConfigError, match="OTEL_AUDIT_FORWARD_HEADERS"):
        parse_headers("x-a=%E2%82%AC")  # not Latin-1: http.client could not send it


@pytest.mark.parametrize(
    "endpoint, reason",
    [
        ("http://[::1", "is not a valid URL: Invalid IPv6 URL"),
        ("http://127.0.0.1:99999/", "is not a valid URL: Port out of range"),
        ("http://h:abc/", "is not a valid URL: Port could not be cast"),
        ("http://127.0.0.1:0/", "has port 0"),
    ],
)
def test_bad_endpoint_is_a_config_error(outbox, endpoint, reason, capsys, monkeypatch):
    code = main(["forward", "--ledger", outbox, "--endpoint", endpoint, "--once"])
    assert code == 2
    err = _one_line(capsys.readouterr().err)
    assert reason in err and "--endpoint / OTEL_AUDIT_FORWARD_ENDPOINT" in err
    monkeypatch.setenv("OTEL_AUDIT_FORWARD_ENDPOINT", endpoint)
    with pytest.raises(ConfigError, match="OTEL_AUDIT_FORWARD_ENDPOINT"):
        forwarder_from_env(outbox)


def test_retry_after_is_honoured_and_the_client_does_not_retry_a_503_itself(outbox, tmp_path):
    """A receiver answering 503 + Retry-After: 1 once: one wait of about a second, one resend."""
    import http.server

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    arrivals: list[float] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:
                self.send_response(503)
                self.send_header("Retry-After", "1")
                payload = b""
            else:
                self.send_response(200)
                payload = ExportTraceServiceResponse().SerializeToString()
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    _fill(outbox, 3)
    forwarder = Forwarder(
        outbox,
        f"http://127.0.0.1:{stub.server_address[1]}",
        state_path=str(tmp_path / "cursor.json"),
    ).start()
    try:
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
        stub.shutdown()
        stub.server_close()
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.85  # Retry-After: 1, with +-10% jitter
    assert forwarder.stats().forwarded == 3 and "HTTP 503" in (forwarder.stats().last_error or "")
