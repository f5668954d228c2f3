"""``otel-audit serve``: a durable OTLP trace receiver that writes audit spans to a ledger.

OTLP/HTTP (``POST /v1/traces``, binary protobuf or OTLP/JSON, gzip/deflate)
and OTLP/gRPC (``TraceService/Export``) share one ``AuditReceiver``: parse,
keep the audit spans (or all, by flag), encode them canonically and hand them
to one committer thread that appends every concurrent request's records in one
transaction (group commit, ``dedupe=True`` so a retried span is stored once).
A request is answered with success only after its records are committed.

Pushback instead of loss: when more records wait for commit than
``max_pending``, a request is refused with HTTP 429 / gRPC UNAVAILABLE and a
retry delay (``Retry-After`` / ``google.rpc.RetryInfo``); when the ledger
cannot be written it is refused with 503 / UNAVAILABLE. Nothing accepted is
ever dropped. Thread-safe.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.rpc import status_pb2  # type: ignore[import-untyped]

from otel_audit.engine.ledger import Appended, Ledger, open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.errors import AuditError, ConfigError, LedgerWriteError
from otel_audit.proof.chain import Checkpoint
from otel_audit.proof.keys import Signer
from otel_audit.transport.otlp import (
    MalformedRequest,
    Rejected,
    parse_request,
    records_from_request,
    response_bytes,
)

_log = logging.getLogger("otel_audit.transport.serve")

DEFAULT_HTTP_ADDRESS = ("127.0.0.1", 4318)
DEFAULT_GRPC_ADDRESS = ("127.0.0.1", 4317)
#: Default chain of a receiver (``Ledger.default_chain`` of this name).
DEFAULT_CHAIN_NAME = "otel-audit-serve"
#: Largest request body, before and after decompression (the Collector's default).
DEFAULT_MAX_REQUEST_SIZE = 20 * 1024 * 1024
#: Records waiting for commit above which new requests are pushed back.
DEFAULT_MAX_PENDING = 50_000
#: Seconds a pushed-back client is asked to wait.
RETRY_AFTER_SECONDS = 1
_MAX_BATCH = 20_000
_TRACES_PATH = "/v1/traces"
_GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
# A body this much larger than the limit is not drained before the 413: the
# connection is closed instead (reading it would be the attack).
_MAX_DRAIN = 64 * 1024 * 1024


class Overloaded(AuditError):
    """More records wait for commit than the receiver accepts: retry later."""


class Unavailable(AuditError):
    """The ledger cannot be written right now: retry later."""


@dataclass(frozen=True)
class ReceiverStats:
    """Counters since start (a snapshot)."""

    requests: int
    spans_received: int
    committed: int
    duplicates: int
    rejected: int
    ignored: int
    pushed_back: int
    failed_commits: int
    checkpoints: int


class _Ticket:
    __slots__ = ("appended", "bodies", "done", "error")

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.done = threading.Event()
        self.error: AuditError | None = None
        self.appended = 0


class _Committer:
    """One thread appending every waiting request's records in one transaction."""

    def __init__(
        self,
        ledger: Ledger,
        chain: str,
        *,
        max_pending: int,
        signer: Signer | None,
        checkpoint_every: int,
        checkpoint_interval: float,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.max_pending = max_pending
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_listeners: list[Callable[[Checkpoint], None]] = []
        self.commit_listeners: list[Callable[[int], None]] = []
        self._cond = threading.Condition()
        self._queue: list[_Ticket] = []
        self._pending = 0
        self._closed = False
        self._head: Appended | None = ledger.head(chain)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.counts = {"committed": 0, "duplicates": 0, "failed_commits": 0, "checkpoints": 0}
        self._thread = threading.Thread(
            target=self._run, name="otel-audit-serve-commit", daemon=True
        )
        self._thread.start()

    def commit(self, bodies: list[bytes], timeout: float) -> int:
        """Commit ``bodies``; returns how many were new. Raises Overloaded/Unavailable."""
        if not bodies:
            return 0
        ticket = _Ticket(bodies)
        with self._cond:
            if self._closed:
                raise Unavailable("receiver is shutting down")
            # One request larger than the limit is still accepted when nothing
            # waits, or it could never be delivered.
            if self._pending and self._pending + len(bodies) > self.max_pending:
                raise Overloaded(f"{self._pending} records are waiting for commit")
            self._queue.append(ticket)
            self._pending += len(bodies)
            self._cond.notify_all()
        if not ticket.done.wait(timeout):
            # Still queued or committing: the client retries and dedupe keeps one copy.
            raise Unavailable(f"commit did not finish within {timeout:g}s")
        if ticket.error is not None:
            raise ticket.error
        return ticket.appended

    def _take(self) -> list[_Ticket] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if self._since_checkpoint:
                    due = self._last_checkpoint + self.checkpoint_interval - time.monotonic()
                    if due <= 0:
                        return []
                    self._cond.wait(due)
                else:
                    self._cond.wait()
            taken: list[_Ticket] = []
            size = 0
            while self._queue and (not taken or size + len(self._queue[0].bodies) <= _MAX_BATCH):
                ticket = self._queue.pop(0)
                taken.append(ticket)
                size += len(ticket.bodies)
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                self._checkpoint()
                return
            if taken:
                self._commit(taken)
            if self._since_checkpoint and (
                self._since_checkpoint >= self.checkpoint_every
                or time.monotonic() - self._last_checkpoint >= self.checkpoint_interval
            ):
                self._checkpoint()

    def _commit(self, taken: list[_Ticket]) -> None:
        bodies = [body for ticket in taken for body in ticket.bodies]
        error: AuditError | None = None
        appended: list[Appended] = []
        try:
            appended = self.ledger.append(self.chain, bodies, dedupe=True)
        except AuditError as exc:
            error = exc
        except Exception as exc:  # a backend bug must not kill the committer
            error = LedgerWriteError(f"audit ledger write failed: {exc!r}")
        if error is not None:
            _log.error("otel-audit serve: %s", error)
            self.counts["failed_commits"] += 1
        else:
            self.counts["committed"] += len(appended)
            self.counts["duplicates"] += len(bodies) - len(appended)
            if appended:
                self._head = appended[-1]
                self._since_checkpoint += len(appended)
            for listener in self.commit_listeners:
                _safe(listener, len(appended))
        # Which request's records were new is not known per ticket when one
        # transaction holds several; report the batch's share to each.
        new = len(appended)
        with self._cond:
            self._pending -= len(bodies)
        for ticket in taken:
            ticket.error = Unavailable(f"ledger write failed: {error}") if error else None
            ticket.appended = min(new, len(ticket.bodies))
            new -= ticket.appended
            ticket.done.set()
        if error is not None:
            # Do not spin on a ledger that is down; waiting requests are refused
            # (retryable) and come back.
            time.sleep(0.2)

    def _checkpoint(self) -> None:
        head = self._head
        self._last_checkpoint = time.monotonic()
        if head is None or not self._since_checkpoint:
            return
        checkpoint = Checkpoint(self.chain, head.seq, head.hash, time.time_ns())
        if self.signer is not None:
            checkpoint = Checkpoint(
                checkpoint.chain, checkpoint.seq, checkpoint.head, checkpoint.time,
                self.signer.sign(checkpoint.message()), self.signer.key_id,
            )  # fmt: skip
        try:
            self.ledger.add_checkpoint(checkpoint)
        except AuditError as exc:
            _log.error("otel-audit serve: checkpoint failed: %s", exc)
            return
        self._since_checkpoint = 0
        self.counts["checkpoints"] += 1
        for listener in self.checkpoint_listeners:
            _safe(listener, checkpoint)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, write the final checkpoint, stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


def _safe(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except Exception:  # a listener must never stop the committer
        _log.exception("otel-audit serve: listener failed")


class AuditReceiver:
    """Protocol-independent core: one OTLP trace request in, committed records out."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        chain: str | None = None,
        keep_all: bool = False,
        token: str | None = None,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        commit_timeout: float = 30.0,
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        redact: Callable[[Record], Record] | None = None,
    ) -> None:
        if max_request_size <= 0:
            raise ConfigError("max_request_size must be a positive integer")
        if max_pending <= 0:
            raise ConfigError("max_pending must be a positive integer")
        self.ledger = ledger
        self.chain = chain or ledger.default_chain(DEFAULT_CHAIN_NAME)
        self.keep_all = keep_all
        if redact is None:
            # Secrets never reach the ledger (DESIGN rule 4), whoever sent them:
            # the same default redaction (or OTEL_AUDIT_POLICY's) as in-process.
            from otel_audit.policy.rules import load_policy

            redact = load_policy().redactor.record
        self._redact = redact
        self._token = token.encode("utf-8") if token else None
        self.max_request_size = max_request_size
        self.commit_timeout = commit_timeout
        self._lock = threading.Lock()
        self._counts = {
            "requests": 0,
            "spans_received": 0,
            "rejected": 0,
            "ignored": 0,
            "pushed_back": 0,
        }
        self.committer = _Committer(
            ledger,
            self.chain,
            max_pending=max_pending,
            signer=signer,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
        )

    @property
    def checkpoint_listeners(self) -> list[Callable[[Checkpoint], None]]:
        """Called with every checkpoint written (e.g. ``anchors`` log emission)."""
        return self.committer.checkpoint_listeners

    def authorized(self, authorization: str | None) -> bool:
        """True when no token is configured or ``authorization`` is ``Bearer <token>``."""
        if self._token is None:
            return True
        if not authorization:
            return False
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode("utf-8"), self._token)

    def export(self, body: bytes, json_body: bool = False) -> list[Rejected]:
        """Store the audit spans of one request body; returns the rejected spans.

        Raises MalformedRequest (not retryable), Overloaded or Unavailable (retryable).
        """
        request = parse_request(body, json_body)
        records, rejected, ignored = records_from_request(request, keep_all=self.keep_all)
        with self._lock:
            self._counts["requests"] += 1
            self._counts["spans_received"] += len(records) + len(rejected) + ignored
            self._counts["rejected"] += len(rejected)
            self._counts["ignored"] += ignored
        try:
            bodies = [encode(self._redact(r)) for r in records]
            self.committer.commit(bodies, self.commit_timeout)
        except Overloaded:
            with self._lock:
                self._counts["pushed_back"] += 1
            raise
        return rejected

    def stats(self) -> ReceiverStats:
        with self._lock:
            counts = dict(self._counts)
        return ReceiverStats(**counts, **self.committer.counts)

    def close(self) -> None:
        self.committer.close()


# -- OTLP/HTTP -------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many exporters reconnecting at once after an outage must not be refused.
    request_queue_size = 128
    receiver: AuditReceiver
    tls: ssl.SSLContext | None = None

    def server_activate(self) -> None:
        self.connections: set[Any] = set()
        self.connections_lock = threading.Lock()
        super().server_activate()

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # Handshake in the handler thread (lazily), never in the accept loop.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.connections_lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Close kept-alive connections, so clients reconnect to whoever serves next."""
        with self.connections_lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "otel-audit"
    # Idle or stalled connections are closed instead of holding a thread for ever.
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._status_only(405 if urlsplit(self.path).path == _TRACES_PATH else 404, "use POST")

    def do_POST(self) -> None:
        try:
            self._post()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug must cost one (retryable) request, not the server
            _log.exception("otel-audit serve: request failed")
            self.close_connection = True
            try:
                # 503, retryable: the sender keeps the spans until the fault is fixed.
                self._error(503, "internal error, retry later", False, _retry_after())
            except OSError:
                pass

    def _post(self) -> None:
        receiver = self.server.receiver
        json_body = False
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            json_body = True
        path = urlsplit(self.path).path
        if path != _TRACES_PATH:
            self._discard_body()
            self._error(404, f"no OTLP endpoint at {path} (use {_TRACES_PATH})", json_body)
            return
        if not receiver.authorized(self.headers.get("Authorization")):
            self._discard_body()
            self._error(
                401, "missing or wrong bearer token", json_body, {"WWW-Authenticate": "Bearer"}
            )
            return
        if content_type not in ("application/x-protobuf", "application/json"):
            self._discard_body()
            self._error(415, f"unsupported content type {content_type!r}", json_body)
            return
        body = self._read_body(receiver.max_request_size, json_body)
        if body is None:
            return
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            body = _decompress(body, encoding, receiver.max_request_size)
        except _TooLarge as exc:
            self._error(413, str(exc), json_body)
            return
        except ValueError as exc:
            self._error(400, str(exc), json_body)
            return
        try:
            rejected = receiver.export(body, json_body)
        except MalformedRequest as exc:
            self._error(400, str(exc), json_body)
            return
        except Overloaded as exc:
            self._error(429, f"overloaded, retry later: {exc}", json_body, _retry_after())
            return
        except (Unavailable, AuditError) as exc:
            self._error(503, f"ledger unavailable, retry later: {exc}", json_body, _retry_after())
            return
        self._send(200, response_bytes(rejected, json_body), json_body)

    def _read_body(self, limit: int, json_body: bool) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(limit, json_body)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(411, "Content-Length required", json_body)
            return None
        if length < 0:
            self.close_connection = True
            self._error(400, "negative Content-Length", json_body)
            return None
        if length > limit:
            if length <= _MAX_DRAIN:
                self._drain(length)
            else:
                self.close_connection = True
            self._error(
                413, f"request of {length} bytes exceeds the limit of {limit} bytes", json_body
            )
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self, limit: int, json_body: bool) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                self._error(400, "bad chunked encoding", json_body)
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                break
            total += size
            if total > limit:
                self.close_connection = True
                self._error(413, f"request exceeds the limit of {limit} bytes", json_body)
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)
        return b"".join(parts)

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if 0 <= length <= _MAX_DRAIN:
            self._drain(length)
        else:
            self.close_connection = True

    def _error(
        self, code: int, message: str, json_body: bool, headers: dict[str, str] | None = None
    ) -> None:
        status = status_pb2.Status(code=_GRPC_CODE_OF_HTTP.get(code, 2), message=message)
        if json_body:
            payload = json_format.MessageToJson(status, indent=None).encode("utf-8")
        else:
            payload = status.SerializeToString()
        self._send(code, payload, json_body, headers)

    def _status_only(self, code: int, message: str) -> None:
        self._error(code, message, False)

    def _send(
        self, code: int, payload: bytes, json_body: bool, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header(
            "Content-Type", "application/json" if json_body else "application/x-protobuf"
        )
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


# google.rpc.Code of the Status body sent with each HTTP error.
_GRPC_CODE_OF_HTTP = {400: 3, 401: 16, 404: 5, 405: 12, 411: 3, 413: 3, 415: 3, 429: 8, 503: 14}


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class _TooLarge(ValueError):
    pass


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("identity", ""):
        return body
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    try:
        # Bounded inflate: a small gzip bomb must not expand past the limit in memory.
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _TooLarge(f"decompressed request exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise ValueError(f"body is truncated {encoding}")
    return out


# -- OTLP/gRPC -------------------------------------------------------------------


def _grpc_handler(receiver: AuditReceiver) -> Any:
    import grpc  # type: ignore[import-untyped]
    from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
    from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]

    retry_info = RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS)).SerializeToString()

    def export(request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        if not receiver.authorized(metadata.get("authorization")):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if len(request) > receiver.max_request_size:
            # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: clients retry the latter.
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request of {len(request)} bytes exceeds the limit of {receiver.max_request_size} bytes",
            )
        try:
            rejected = receiver.export(request)
        except MalformedRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (Overloaded, Unavailable, AuditError) as exc:
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", retry_info),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"retry later: {exc}")
        return response_bytes(rejected)

    # Raw bytes in (request_deserializer=None) so a malformed body is answered
    # INVALID_ARGUMENT by us rather than INTERNAL by the framework; the method is
    # the generated TraceService/Export of opentelemetry-proto.
    return grpc.method_handlers_generic_handler(
        _GRPC_SERVICE,
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )


# -- the server ------------------------------------------------------------------


def parse_address(value: str, default_port: int, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT`` -> (host, port); raises ConfigError."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {value!r} has a port outside 0-65535")
    return host, port


def _target(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_problem(address: tuple[str, int]) -> str | None:
    """Why ``address`` cannot be listened on, or None when a probe socket binds it."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    problem = "no address to bind"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As the real listener does: a port in TIME_WAIT is free, a listening one is not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            problem = str(exc)
            continue
        return None  # grpc listens when at least one resolved address binds
    return problem


class AuditServer:
    """OTLP/HTTP and OTLP/gRPC listeners in front of one AuditReceiver."""

    def __init__(
        self,
        ledger_url: str,
        *,
        http_address: tuple[str, int] | None = DEFAULT_HTTP_ADDRESS,
        grpc_address: tuple[str, int] | None = DEFAULT_GRPC_ADDRESS,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        grpc_workers: int = 16,
        **receiver_options: Any,
    ) -> None:
        if http_address is None and grpc_address is None:
            raise ConfigError("serve needs at least one of the HTTP and gRPC listeners")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        self.ledger: Ledger = open_ledger(ledger_url)
        try:
            self.receiver = AuditReceiver(self.ledger, **receiver_options)
        except BaseException:
            self.ledger.close()
            raise
        self._http: _HTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc: Any = None
        tls_context: ssl.SSLContext | None = None
        try:
            if tls_cert and tls_key:
                try:
                    tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    tls_context.load_cert_chain(tls_cert, tls_key)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"serve cannot load --tls-cert {tls_cert!r} / --tls-key {tls_key!r}: {exc}"
                    ) from exc
            if http_address is not None:
                try:
                    self._http = _HTTPServer(http_address, _Handler)
                except OSError as exc:
                    raise ConfigError(
                        f"serve cannot listen on {_target(http_address)}: {exc}"
                    ) from exc
                self._http.receiver = self.receiver
                self._http.tls = tls_context
            if grpc_address is not None:
                self._grpc = self._grpc_server(grpc_address, tls_cert, tls_key, grpc_workers)
        except BaseException:
            self._close_partial()
            raise

    def _grpc_server(
        self, address: tuple[str, int], cert: str | None, key: str | None, workers: int
    ) -> Any:
        import grpc

        target = _target(address)
        # grpc reports a failed bind only as RuntimeError("Failed to bind") after
        # logging the reason from C to stderr; probing first gives the reason as
        # one line (an address in use, e.g. by a Collector on 4317, or unresolvable).
        reason = _bind_problem(address)
        if reason is not None:
            raise ConfigError(f"serve cannot listen on {target}: {reason}")
        limit = self.receiver.max_request_size
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otel-audit-grpc"),
            handlers=[_grpc_handler(self.receiver)],
            # Above our own limit so that we answer INVALID_ARGUMENT ourselves.
            options=[
                ("grpc.max_receive_message_length", 4 * limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        host = address[0]
        try:
            if cert and key:
                with open(cert, "rb") as c, open(key, "rb") as k:
                    credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
                bound = server.add_secure_port(target, credentials)
            else:
                bound = server.add_insecure_port(target)
        except (OSError, RuntimeError) as exc:
            # RuntimeError: the port was taken between the probe and the bind.
            raise ConfigError(f"serve cannot listen on {target}: {exc}") from exc
        if not bound:
            raise ConfigError(f"serve cannot listen on {target}: the gRPC bind failed")
        self._grpc_port = bound
        self._grpc_host = host
        return server

    @property
    def http_address(self) -> tuple[str, int] | None:
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def grpc_address(self) -> tuple[str, int] | None:
        if self._grpc is None:
            return None
        return self._grpc_host, self._grpc_port

    def start(self) -> AuditServer:
        if self._http is not None:
            self._http_thread = threading.Thread(
                target=self._http.serve_forever, name="otel-audit-serve-http", daemon=True
            )
            self._http_thread.start()
        if self._grpc is not None:
            self._grpc.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let in-flight requests finish, commit, checkpoint, close."""
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        # Requests already queued are committed and answered before this returns.
        self.receiver.close()
        if self._http is not None:
            self._http.close_connections()
        self.ledger.close()

    def _close_partial(self) -> None:
        if self._http is not None:
            self._http.server_close()
        self.receiver.close()
        self.ledger.close()

    def stats(self) -> ReceiverStats:
        return self.receiver.stats()

    def __enter__(self) -> AuditServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
