"""``otel-audit serve`` as a real process: startup, delivery, clean SIGTERM, user errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger

from .test_serve import _spans


def _start(args, env=None):
    proc = subprocess.Popen(
        [sys.executable, "-m", "otel_audit", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"serve did not start: {proc.stderr.read()}")
    return proc, line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_commits_and_stops_cleanly(tmp_path, sig):
    db = tmp_path / "served.db"
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    proc, line = _start(
        ["--ledger", str(db), "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
         "--token-file", str(token), "--checkpoint-every", "2"]
    )  # fmt: skip
    try:
        match = re.search(
            r"otlp/http on http://127\.0\.0\.1:(\d+)/v1/traces, otlp/grpc on 127\.0\.0\.1:(\d+)",
            line,
        )
        assert match, line
        http_port, grpc_port = match.groups()
        headers = {"authorization": "Bearer t0ken"}
        http = HttpExporter(
            endpoint=f"http://127.0.0.1:{http_port}/v1/traces", headers=headers, timeout=10
        )
        assert http.export(_spans(2, 1)) is SpanExportResult.SUCCESS
        grpc = GrpcExporter(
            endpoint=f"127.0.0.1:{grpc_port}", insecure=True, headers=headers, timeout=10
        )
        assert grpc.export(_spans(3, 0)) is SpanExportResult.SUCCESS
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "5 records committed" in stderr and "Traceback" not in stderr
    assert main(["verify", "--ledger", str(db)]) == 0
    with open_ledger(str(db), create=False) as ledger:
        assert ledger.count() == 5
        assert ledger.checkpoints()[-1].seq == 5  # the final checkpoint at shutdown


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "nohost:port"], "--listen 'nohost:port' is not HOST:PORT"),
        (["--grpc-listen", "127.0.0.1:70000"], "port outside 0-65535"),
        (["--max-request-size", "0"], "--max-request-size must be a positive integer"),
        (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
        (["--tls-cert", "/nonexistent/cert.pem"], "TLS needs both a certificate and its key"),
        (
            ["--effects", "data.read,bogus"],
            "--effects 'data.read,bogus': effects names unknown effects: bogus",
        ),
        (
            ["--listen", "off", "--grpc-listen", "off"],
            "at least one of the HTTP and gRPC listeners",
        ),
    ],
)
def test_serve_user_errors_are_one_line_exit_2(tmp_path, args, message, capsys):
    code = main(["serve", "--ledger", str(tmp_path / "x.db"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("listener", ["--listen", "--grpc-listen"])
def test_serve_port_in_use_is_a_clear_error(tmp_path, listener):
    """A busy port (e.g. a Collector already on 4317) is one line, exit 2, on either listener."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        other = "--grpc-listen" if listener == "--listen" else "--listen"
        proc = subprocess.run(
            [sys.executable, "-m", "otel_audit", "serve", "--ledger", str(tmp_path / "x.db"),
             listener, f"127.0.0.1:{port}", other, "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"otel-audit: serve cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_serve_unresolvable_grpc_host_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "otel_audit", "serve", "--ledger", str(tmp_path / "x.db"),
         "--listen", "127.0.0.1:0", "--grpc-listen", "garbage"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("otel-audit: serve cannot listen on garbage:4317: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
