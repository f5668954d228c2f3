"""A central ledger fed by ``otel-audit serve`` yields evidence like an in-process one,
and keeps what each sender decided to keep (issue 10)."""

from __future__ import annotations

import re
import signal

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode
from otel_audit.transport.forward import Forwarder

from .test_serve import _spans
from .test_serve_cli import _start


def test_serve_with_a_signing_key_yields_a_verifiable_bundle(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "signer")]) == 0
    db = tmp_path / "central.db"
    proc, line = _start(
        ["--ledger", str(db), "--listen", "127.0.0.1:0", "--grpc-listen", "off",
         "--signing-key", str(tmp_path / "signer.key"), "--checkpoint-every", "3"]
    )  # fmt: skip
    try:
        match = re.search(r"127\.0\.0\.1:(\d+)/v1/traces", line)
        assert match, line
        exporter = HttpExporter(endpoint=f"http://127.0.0.1:{match.group(1)}/v1/traces")
        assert exporter.export(_spans(4, 2)) is SpanExportResult.SUCCESS
        assert exporter.export(_spans(3, 0)) is SpanExportResult.SUCCESS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open_ledger(str(db), create=False) as ledger:
        checkpoints = ledger.checkpoints()
        assert ledger.count() == 7
    assert checkpoints[-1].seq == 7
    assert all(c.merkle_root and c.signature for c in checkpoints)
    bundle = tmp_path / "evidence.zip"
    public = str(tmp_path / "signer.pub")
    capsys.readouterr()
    assert main(["bundle", "--ledger", str(db), "--actor", "alice", "-o", str(bundle),
                 "--public-key", public]) == 0  # fmt: skip
    assert main(["verify-bundle", "--public-key", public, str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "7" in out, out


def _outbox_with_a_data_read(tmp_path):
    """A service whose own OTEL_AUDIT_EFFECTS keeps data.read: one action, one read effect."""
    provider = TracerProvider(shutdown_on_exit=False)
    pipeline = otel_audit.configure(
        ledger=f"sqlite:///{tmp_path / 'outbox.db'}",
        service_name="reports",
        tracer_provider=provider,
        effects="data.read,data.write",
        handle_sigterm=False,
    )
    tracer = provider.get_tracer("reports")
    with otel_audit.audit_action("report.view", actor="alice", resource=("report", "7")):
        with tracer.start_as_current_span(
            "SELECT reports",
            kind=trace.SpanKind.CLIENT,
            attributes={"db.system": "sqlite", "db.statement": "SELECT * FROM reports"},
        ):
            pass
    pipeline.shutdown()
    provider.shutdown()
    with open_ledger(pipeline.ledger_url, create=False) as ledger:
        local = [decode(r.body) for c in ledger.chains() for r in ledger.scan(c)]
    assert sorted(r.attr(v.EFFECT) or "action" for r in local) == ["action", "data.read"]
    return pipeline.ledger_url, local


def test_a_forwarded_data_read_is_stored_not_reselected(tmp_path, make_server):
    outbox, local = _outbox_with_a_data_read(tmp_path)
    server = make_server(ledger=f"sqlite:///{tmp_path / 'central.db'}")  # default effects
    host, port = server.http_address
    forwarder = Forwarder(
        outbox, f"http://{host}:{port}", state_path=str(tmp_path / "cursor.json")
    ).start()
    try:
        assert forwarder.flush(30)
    finally:
        forwarder.stop()
    with open_ledger(server.ledger_url, create=False) as ledger:
        central = [decode(r.body) for c in ledger.chains() for r in ledger.scan(c)]
    assert sorted(r.span_id for r in central) == sorted(r.span_id for r in local)
    assert server.stats().ignored == 0


def test_an_exported_span_carrying_its_effect_is_kept(make_server):
    """The OTLP exporter path: a trail span that says which effect it is was decided by its sender."""
    server = make_server()
    provider = TracerProvider(shutdown_on_exit=False)
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("reports")
    attrs = {v.TRAIL_ID: "t-1", "db.system": "sqlite", "db.statement": "SELECT 1"}
    with tracer.start_as_current_span("SELECT marked", attributes={**attrs, v.EFFECT: "data.read"}):
        pass
    with tracer.start_as_current_span("SELECT unmarked", attributes=attrs):
        pass  # undecided: serve classifies it, and data.read is not kept by default
    host, port = server.http_address
    exporter = HttpExporter(endpoint=f"http://{host}:{port}/v1/traces")
    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    with open_ledger(server.ledger_url, create=False) as ledger:
        names = [decode(r.body).name for c in ledger.chains() for r in ledger.scan(c)]
    assert names == ["SELECT marked"]
    assert server.stats().ignored == 1
