"""otel-audit serve with the real OTLP exporters (HTTP and gRPC) as clients."""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import json
import socket
import sqlite3
import threading
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format
from google.rpc import status_pb2
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import decode
from otel_audit.proof.verify import verify_ledger
from otel_audit.transport.serve import parse_address


def _deadline_wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _spans(n_audit=3, n_plain=2, service="shop"):
    """Finished SDK spans: ``n_audit`` audit events and ``n_plain`` ordinary spans."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("shop.orders")
    for i in range(n_audit):
        with tracer.start_as_current_span(
            f"order.update {i}",
            attributes={v.EVENT: True, v.ACTION: "order.update", v.ACTOR_ID: "alice"},
        ):
            pass
    for i in range(n_plain):
        with tracer.start_as_current_span(f"plain {i}"):
            pass
    return list(memory.get_finished_spans())


def _stored(server_or_url):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.ledger_url
    with open_ledger(url, create=False) as ledger:
        return [decode(r.body) for chain in ledger.chains() for r in ledger.scan(chain)]


def _http_exporter(server, **kw):
    host, port = server.http_address
    return HttpExporter(endpoint=f"http://{host}:{port}/v1/traces", timeout=10, **kw)


def _grpc_exporter(server, **kw):
    host, port = server.grpc_address
    return GrpcExporter(endpoint=f"{host}:{port}", insecure=True, timeout=10, **kw)


def _post(server, body, content_type="application/x-protobuf", headers=None, path="/v1/traces"):
    host, port = server.http_address
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# -- delivery ------------------------------------------------------------------


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_http_exporter_delivers_audit_spans_only(make_server, compression):
    server = make_server()
    spans = _spans(3, 2)
    assert _http_exporter(server, compression=compression).export(spans) is SpanExportResult.SUCCESS
    stored = _stored(server)
    assert sorted(r.name for r in stored) == [f"order.update {i}" for i in range(3)]
    assert {r.service for r in stored} == {"shop"}
    assert server.stats().ignored == 2


def test_grpc_exporter_delivers_audit_spans(make_server):
    server = make_server()
    assert _grpc_exporter(server).export(_spans(4, 1)) is SpanExportResult.SUCCESS
    assert sorted(r.name for r in _stored(server)) == [f"order.update {i}" for i in range(4)]


def test_keep_all_stores_every_span(make_server):
    server = make_server(keep_all=True)
    assert _http_exporter(server).export(_spans(1, 2)) is SpanExportResult.SUCCESS
    assert len(_stored(server)) == 3


def test_same_span_in_process_and_over_otlp_gives_the_same_bytes(tmp_path, make_server):
    server = make_server()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "shop"}), shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(_http_exporter(server)))
    pipeline = otel_audit.configure(
        ledger=f"sqlite:///{tmp_path / 'local.db'}",
        service_name="shop",
        tracer_provider=provider,
        handle_sigterm=False,
    )
    tracer = provider.get_tracer("shop")
    with otel_audit.audit_action(
        "order.update", resource=("order", "42"), actor="alice", tracer=tracer
    ):
        with tracer.start_as_current_span(
            "INSERT orders",
            attributes={"db.system": "sqlite", "db.statement": "INSERT INTO orders VALUES (1)"},
        ):
            pass
    pipeline.flush()
    pipeline.shutdown()
    provider.shutdown()
    with open_ledger(pipeline.ledger_url, create=False) as local:
        mine = sorted(r.body for c in local.chains() for r in local.scan(c))
    with open_ledger(server.ledger_url, create=False) as remote:
        theirs = sorted(r.body for c in remote.chains() for r in remote.scan(c))
    assert len(mine) == 2
    assert theirs == mine


def test_otlp_json_request_and_response(make_server):
    server = make_server()
    request = json_format.MessageToDict(encode_spans(_spans(2, 0)))
    for rs in request["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                import base64

                span["traceId"] = base64.b64decode(span["traceId"]).hex()
                span["spanId"] = base64.b64decode(span["spanId"]).hex()
    status, headers, body = _post(server, json.dumps(request).encode(), "application/json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {}
    assert len(_stored(server)) == 2


def test_gzip_json_body(make_server):
    server = make_server()
    body = gzip.compress(json_format.MessageToJson(encode_spans(_spans(1, 0))).encode())
    status, _, _ = _post(server, body, "application/json", {"Content-Encoding": "gzip"})
    assert status == 200
    assert len(_stored(server)) == 1


# -- idempotency and chain -------------------------------------------------------


def test_a_span_delivered_twice_is_stored_once(make_server):
    server = make_server()
    spans = _spans(5, 0)
    assert _http_exporter(server).export(spans) is SpanExportResult.SUCCESS
    assert _grpc_exporter(server).export(spans) is SpanExportResult.SUCCESS
    assert _http_exporter(server).export(spans[:2] + _spans(1, 0)) is SpanExportResult.SUCCESS
    stored = _stored(server)
    assert len(stored) == 6
    assert len({(r.trace_id, r.span_id) for r in stored}) == 6
    assert server.stats().duplicates == 7


def test_served_ledger_verifies_with_checkpoints(make_server, tmp_path):
    server = make_server(checkpoint_every=3)
    for _ in range(3):
        assert _http_exporter(server).export(_spans(2, 0)) is SpanExportResult.SUCCESS
    server.stop()
    with open_ledger(server.ledger_url, create=False) as ledger:
        assert ledger.chains() == ["otel-audit-serve"]
        report = verify_ledger(ledger)
        assert report.records == 6
        assert ledger.checkpoints()[-1].seq == 6


# -- errors ----------------------------------------------------------------------


def test_malformed_protobuf_is_400_with_a_status(make_server):
    server = make_server()
    status, _, body = _post(server, b"\xff\xff\xff garbage")
    assert status == 400
    message = status_pb2.Status.FromString(body).message
    assert "not an OTLP protobuf trace request" in message
    assert _stored(server) == []


@pytest.mark.parametrize(
    "body, content_type, expected",
    [
        (b"{oops", "application/json", 400),
        (
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abc"}]}]}]}',
            "application/json",
            400,
        ),
        (b"hello", "text/plain", 415),
    ],
)
def test_malformed_json_and_wrong_type(make_server, body, content_type, expected):
    server = make_server()
    status, _, payload = _post(server, body, content_type)
    assert status == expected
    if content_type == "application/json":
        assert json.loads(payload)["message"]


def test_bad_gzip_is_400(make_server):
    server = make_server()
    status, _, _ = _post(server, b"not gzip", headers={"Content-Encoding": "gzip"})
    assert status == 400


def test_unknown_path_is_404(make_server):
    server = make_server()
    assert _post(server, b"", path="/v1/logs")[0] == 404


def test_partial_success_names_rejected_spans(make_server):
    server = make_server()
    request = encode_spans(_spans(2, 0))
    request.resource_spans[0].scope_spans[0].spans[0].span_id = bytes(8)
    status, _, body = _post(server, request.SerializeToString())
    assert status == 200
    response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 1
    assert "invalid span id" in response.partial_success.error_message
    assert len(_stored(server)) == 1


def test_over_size_is_413_and_not_retried(make_server):
    server = make_server(max_request_size=2000)
    spans = _spans(40, 0)
    status, _, body = _post(server, encode_spans(spans).SerializeToString())
    assert status == 413
    assert "exceeds the limit of 2000 bytes" in status_pb2.Status.FromString(body).message
    started = time.monotonic()
    assert _http_exporter(server).export(spans) is SpanExportResult.FAILURE
    assert time.monotonic() - started < 5  # not retried with backoff
    # A gzip body that inflates past the limit is refused as well.
    status, _, _ = _post(
        server, gzip.compress(b"\0" * 100_000), headers={"Content-Encoding": "gzip"}
    )
    assert status == 413
    assert _stored(server) == []


def test_grpc_over_size_and_malformed_are_invalid_argument(make_server):
    server = make_server(max_request_size=2000)
    host, port = server.grpc_address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff garbage", timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            call(encode_spans(_spans(40, 0)).SerializeToString(), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the limit" in info.value.details()


# -- auth ------------------------------------------------------------------------


def test_bearer_token_required_http(make_server):
    server = make_server(token="s3cret")
    spans = _spans(1, 0)
    status, headers, _ = _post(server, encode_spans(spans).SerializeToString())
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert _post(server, b"", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert _http_exporter(server).export(spans) is SpanExportResult.FAILURE
    assert _stored(server) == []
    good = _http_exporter(server, headers={"Authorization": "Bearer s3cret"})
    assert good.export(spans) is SpanExportResult.SUCCESS
    assert len(_stored(server)) == 1


def test_bearer_token_required_grpc(make_server):
    server = make_server(token="s3cret")
    spans = _spans(1, 0)
    assert _grpc_exporter(server).export(spans) is SpanExportResult.FAILURE
    assert _stored(server) == []
    good = _grpc_exporter(server, headers={"authorization": "Bearer s3cret"})
    assert good.export(spans) is SpanExportResult.SUCCESS
    assert len(_stored(server)) == 1


# -- TLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls_http_and_grpc(make_server, certificate, monkeypatch):
    # requests lets these variables override the exporter's certificate_file.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = certificate
    server = make_server(tls_cert=cert, tls_key=key)
    host, port = server.http_address
    exporter = HttpExporter(
        endpoint=f"https://{host}:{port}/v1/traces", certificate_file=cert, timeout=10
    )
    assert exporter.export(_spans(1, 0)) is SpanExportResult.SUCCESS
    _, gport = server.grpc_address
    with open(cert, "rb") as f:
        credentials = grpc.ssl_channel_credentials(f.read())
    gexporter = GrpcExporter(
        endpoint=f"https://localhost:{gport}", credentials=credentials, timeout=10
    )
    assert gexporter.export(_spans(1, 0)) is SpanExportResult.SUCCESS
    assert len(_stored(server)) == 2
    # Plain HTTP to the TLS port is not served.
    plain = HttpExporter(endpoint=f"http://{host}:{port}/v1/traces", timeout=2)
    assert plain.export(_spans(1, 0)) is SpanExportResult.FAILURE
    assert len(_stored(server)) == 2


# -- pushback and outages --------------------------------------------------------


def _hold_write_lock(path):
    """Another connection holding the SQLite write lock: the ledger cannot commit."""
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    con.execute("BEGIN IMMEDIATE")
    return con


def test_overload_pushes_back_with_retry_after_then_delivers(make_server, tmp_path):
    path = tmp_path / "serve.db"
    server = make_server(max_pending=3)
    blocker = _hold_write_lock(str(path))
    first_result: list[SpanExportResult] = []
    first_spans = _spans(3, 0)
    first = threading.Thread(
        target=lambda: first_result.append(_http_exporter(server).export(first_spans))
    )
    first.start()
    _deadline_wait(lambda: server.stats().requests >= 1, what="first request queued")
    # The queue is full: a raw request is pushed back, retryably.
    status, headers, _ = _post(server, encode_spans(_spans(2, 0)).SerializeToString())
    assert status == 429 and headers["Retry-After"] == "1"
    host, port = server.grpc_address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as info:
            call(encode_spans(_spans(2, 0)).SerializeToString(), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        retry = dict(info.value.trailing_metadata())["google.rpc.retryinfo-bin"]
        assert RetryInfo.FromString(retry).retry_delay.seconds == 1
    # A real exporter pushed back retries (after Retry-After) and gets through.
    second_result: list[SpanExportResult] = []
    second_spans = _spans(2, 0)
    second = threading.Thread(
        target=lambda: second_result.append(_http_exporter(server).export(second_spans))
    )
    pushed = server.stats().pushed_back
    second.start()
    _deadline_wait(lambda: server.stats().pushed_back > pushed, what="second exporter pushed back")
    blocker.execute("ROLLBACK")
    blocker.close()
    first.join(30)
    second.join(30)
    assert first_result == [SpanExportResult.SUCCESS]
    assert second_result == [SpanExportResult.SUCCESS]
    assert len(_stored(server)) == 5


def test_ledger_unavailable_is_503_and_the_retry_is_not_duplicated(make_server, tmp_path):
    path = tmp_path / "serve.db"
    server = make_server(commit_timeout=0.5)
    spans = _spans(3, 0)
    body = encode_spans(spans).SerializeToString()
    blocker = _hold_write_lock(str(path))
    status, headers, payload = _post(server, body)
    assert status == 503 and headers["Retry-After"] == "1"
    assert "retry later" in status_pb2.Status.FromString(payload).message
    blocker.execute("ROLLBACK")
    blocker.close()
    # The refused batch may still commit once the lock is gone; the client's
    # retry must not store it twice.
    assert _post(server, body)[0] == 200
    _deadline_wait(lambda: server.stats().requests == 2 and server.receiver.pending == 0)
    assert len(_stored(server)) == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exporter_retries_until_the_server_is_back(make_server, tmp_path):
    port = _free_port()
    # While "down", the port refuses: a listener that accepts and closes at once,
    # so the test knows the exporter has tried before the server comes back.
    refuser = socket.socket()
    refuser.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    refuser.bind(("127.0.0.1", port))
    refuser.listen(8)
    tried = threading.Event()

    def refuse():
        while True:
            try:
                conn, _ = refuser.accept()
            except OSError:
                return
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()
            tried.set()

    threading.Thread(target=refuse, daemon=True).start()
    spans = _spans(3, 0)
    result: list[SpanExportResult] = []
    exporter = HttpExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)
    sender = threading.Thread(target=lambda: result.append(exporter.export(spans)))
    sender.start()
    assert tried.wait(20)
    refuser.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(), releasing the port
    refuser.close()
    server = make_server(http=("127.0.0.1", port), grpc_address=None)
    sender.join(40)
    assert result == [SpanExportResult.SUCCESS]
    assert len(_stored(server)) == 3
    # Restart: stop, start again on the same port and ledger; the same spans resent are not duplicated.
    server.stop()
    again = make_server(http=("127.0.0.1", port), grpc_address=None)
    assert exporter.export(spans + _spans(1, 0)) is SpanExportResult.SUCCESS
    assert len(_stored(again)) == 4


def test_many_concurrent_exporters_lose_nothing(make_server):
    server = make_server()
    batches = [_spans(50, 5) for _ in range(16)]
    results: list[SpanExportResult] = []
    lock = threading.Lock()

    def send(i, spans):
        exporter = _http_exporter(server) if i % 2 else _grpc_exporter(server)
        outcome = exporter.export(spans)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [SpanExportResult.SUCCESS] * 16
    stored = _stored(server)
    assert len(stored) == 16 * 50
    assert server.stats().ignored == 16 * 5


# -- settings --------------------------------------------------------------------


def test_defaults_bind_loopback():
    from otel_audit.transport.serve import DEFAULT_GRPC_ADDRESS, DEFAULT_HTTP_ADDRESS

    assert DEFAULT_HTTP_ADDRESS == ("127.0.0.1", 4318)
    assert DEFAULT_GRPC_ADDRESS == ("127.0.0.1", 4317)
    assert parse_address(":9000", 4318, "--listen") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:9000", 4318, "--listen") == ("::1", 9000)


def test_a_retry_reaching_another_instance_is_stored_once_and_verifies(make_server, tmp_path):
    """Two serve instances (one chain each) on one ledger: a span is stored once, anywhere."""
    from otel_audit.cli import main

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    body = encode_spans(_spans(3, 0)).SerializeToString()
    first = make_server(ledger=url, grpc_address=None, chain="serve-a")
    assert _post(first, body)[0] == 200
    served_on = first.http_address
    first.stop()
    assert first.http_address == served_on  # still answers once its socket is closed
    # The sender did not see the answer and retries on the other instance,
    # whose chain is still empty.
    second = make_server(ledger=url, grpc_address=None, chain="serve-b")
    assert _post(second, body)[0] == 200
    assert second.stats().duplicates == 3
    second.stop()
    assert len(_stored(url)) == 3
    assert main(["verify", "--ledger", url]) == 0
