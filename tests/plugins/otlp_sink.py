"""A real OTLP/HTTP receiver on loopback, as the ``otlp_sink`` fixture.

Accepts ``POST /v1/traces``, ``/v1/logs`` and ``/v1/metrics`` (protobuf,
optionally gzip), decodes them with opentelemetry-proto and keeps what it
got, so tests can prove the normal pipeline still exports. Thread-safe.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_MESSAGES = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OTLPSink:
    """What the receiver got; ``spans()``/``logs()`` flatten it with the service name."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.requests: dict[str, list[Any]] = {path: [] for path in _MESSAGES}
        self.endpoint = ""

    def add(self, path: str, message: Any) -> None:
        with self._lock:
            self.requests[path].append(message)
            self._lock.notify_all()

    def spans(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            batches = list(self.requests["/v1/traces"])
        for req in batches:
            for rs in req.resource_spans:
                res = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(
                            {
                                "service": res.get("service.name"),
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                            }
                        )
        return out

    def logs(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            batches = list(self.requests["/v1/logs"])
        for req in batches:
            for rl in req.resource_logs:
                res = {a.key: _value(a.value) for a in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        out.append(
                            {
                                "service": res.get("service.name"),
                                "body": _value(rec.body),
                                "trace_id": rec.trace_id.hex(),
                            }
                        )
        return out

    def wait_for(self, predicate: Callable[[OTLPSink], bool], timeout: float = 15.0) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked on every request), or time out."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
        return True


def _handler(sink: OTLPSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            message_type = _MESSAGES.get(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if message_type is None:
                self.send_response(404)
                self.end_headers()
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            message = message_type()
            message.ParseFromString(body)
            sink.add(self.path, message)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def otlp_sink() -> Iterator[OTLPSink]:
    """A running OTLP/HTTP receiver; ``sink.endpoint`` is its base URL."""
    sink = OTLPSink()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(sink))
    server.daemon_threads = True
    sink.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
