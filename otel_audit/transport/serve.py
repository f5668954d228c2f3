"""``otel-audit serve``: OTLP/HTTP and OTLP/gRPC listeners in front of one receiver.

The listeners are maintained servers: uvicorn runs the OTLP/HTTP side
(``otlp_http``, an ASGI application) on its own event-loop thread, grpcio
the OTLP/gRPC side (``otlp_grpc``). Both hand request bodies to one
``AuditReceiver`` (``receive``), which commits through the one commit engine,
``LedgerWriter``: a request is answered with success only after its records
are durable, and checkpoints (Merkle root, signature) are the writer's, so a
central ledger yields evidence bundles like an in-process one.

``stop`` stops listening, lets in-flight requests finish (bounded by
``grace``; idle kept-alive connections are closed at once), commits what is
queued, writes the final checkpoint and closes the ledger. Thread-safe.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from otel_audit.errors import ConfigError
from otel_audit.transport.otlp_grpc import grpc_handler
from otel_audit.transport.otlp_http import OTLPHTTPApp
from otel_audit.transport.receive import (
    DEFAULT_CHAIN_NAME,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_REQUEST_SIZE,
    RETRY_AFTER_SECONDS,
    AuditReceiver,
    Overloaded,
    ReceiverStats,
    Unavailable,
)

__all__ = [
    "DEFAULT_CHAIN_NAME",
    "DEFAULT_GRPC_ADDRESS",
    "DEFAULT_HTTP_ADDRESS",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_REQUEST_SIZE",
    "RETRY_AFTER_SECONDS",
    "AuditReceiver",
    "AuditServer",
    "Overloaded",
    "ReceiverStats",
    "Unavailable",
    "parse_address",
]

_log = logging.getLogger("otel_audit.transport.serve")

DEFAULT_HTTP_ADDRESS = ("127.0.0.1", 4318)
DEFAULT_GRPC_ADDRESS = ("127.0.0.1", 4317)
# Seconds an idle kept-alive HTTP connection stays open.
_KEEP_ALIVE = 30
# Many exporters reconnecting at once after an outage must not be refused.
_BACKLOG = 2048
# Largest request line plus headers.
_MAX_HEAD = 64 * 1024


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
        http_workers: int = 8,
        **receiver_options: Any,
    ) -> None:
        if http_address is None and grpc_address is None:
            raise ConfigError("serve needs at least one of the HTTP and gRPC listeners")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if tls_cert and tls_key:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    tls_cert, tls_key
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"serve cannot load --tls-cert {tls_cert!r} / --tls-key {tls_key!r}: {exc}"
                ) from exc
        self.ledger_url = ledger_url
        self.receiver = AuditReceiver(ledger_url, **receiver_options)
        self._socket: socket.socket | None = None
        self._http_bound: tuple[str, int] | None = None  # kept after stop (the socket is closed)
        self._app: OTLPHTTPApp | None = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._grpc: Any = None
        self._stopped = False
        try:
            if http_address is not None:
                self._socket = _listen(http_address)
                host, port = self._socket.getsockname()[:2]
                self._http_bound = (str(host), int(port))
                self._app = OTLPHTTPApp(self.receiver, workers=http_workers)
                self._http = self._http_server(self._app, tls_cert, tls_key)
            if grpc_address is not None:
                self._grpc = self._grpc_server(grpc_address, tls_cert, tls_key, grpc_workers)
        except BaseException:
            self._close_partial()
            raise

    @staticmethod
    def _http_server(app: OTLPHTTPApp, cert: str | None, key: str | None) -> Any:
        import uvicorn

        config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=_KEEP_ALIVE,
            ssl_certfile=cert,
            ssl_keyfile=key,
            backlog=_BACKLOG,
            http=_bounded_head_protocol(),
        )
        return uvicorn.Server(config)

    def _grpc_server(
        self, address: tuple[str, int], cert: str | None, key: str | None, workers: int
    ) -> Any:
        import grpc  # type: ignore[import-untyped]

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
            handlers=[grpc_handler(self.receiver)],
            # Above our own limit so that we answer INVALID_ARGUMENT ourselves.
            options=[
                ("grpc.max_receive_message_length", 4 * limit),
                ("grpc.so_reuseport", 0),
            ],
        )
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
        self._grpc_host = address[0]
        return server

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The (host, port) the HTTP receiver listens (or, once stopped, listened) on."""
        return self._http_bound

    @property
    def grpc_address(self) -> tuple[str, int] | None:
        if self._grpc is None:
            return None
        return self._grpc_host, self._grpc_port

    def start(self) -> AuditServer:
        if self._http is not None and self._http_thread is None:
            sockets = [self._socket]
            self._http_thread = threading.Thread(
                target=self._http.run,
                kwargs={"sockets": sockets},
                name="otel-audit-serve-http",
                daemon=True,
            )
            self._http_thread.start()
            # Listening already (the socket is ours); wait until requests are served.
            deadline = time.monotonic() + 30
            while not self._http.started and self._http_thread.is_alive():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            if not self._http.started:
                raise ConfigError("serve: the OTLP/HTTP listener did not start")
        if self._grpc is not None:
            self._grpc.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let in-flight requests finish, commit, checkpoint, close."""
        if self._stopped:
            return
        self._stopped = True
        grpc_stopped = self._grpc.stop(grace) if self._grpc is not None else None
        if self._http is not None:
            self._http.config.timeout_graceful_shutdown = grace
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(grace + 5)
        if grpc_stopped is not None:
            grpc_stopped.wait(grace + 1)
        # Requests already queued are committed and answered before this returns.
        if self._app is not None:
            self._app.close()
        self.receiver.close()
        if self._socket is not None:
            self._socket.close()

    def _close_partial(self) -> None:
        if self._socket is not None:
            self._socket.close()
        if self._app is not None:
            self._app.close()
        self.receiver.close()

    def stats(self) -> ReceiverStats:
        return self.receiver.stats()

    def __enter__(self) -> AuditServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bounded_head_protocol() -> type[Any]:
    """uvicorn's httptools protocol, refusing a request line plus headers over ``_MAX_HEAD``.

    httptools parses in C (chunked framing included, so a million one-byte
    chunks cost little), but neither it nor uvicorn bounds the head: endless
    header lines would grow the process without limit. Counted here as the
    parser hands them over; past the limit the parser is stopped and uvicorn
    answers 400 and closes the connection (``tests/test_serve_hostile.py``).
    """
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHead(HttpToolsProtocol):
        _head = 0

        def on_message_begin(self) -> None:
            self._head = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._head += size
            if self._head > _MAX_HEAD:
                raise httptools.HttpParserError(f"request head over {_MAX_HEAD} bytes")

    return BoundedHead


def _listen(address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on ``address``; ConfigError with the reason when it cannot be."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            f"serve cannot listen on {_target(address)}: cannot resolve {host!r}: {exc}"
        ) from None
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            problem = exc
            continue
        sock.set_inheritable(True)
        return sock
    raise ConfigError(
        f"serve cannot listen on {_target(address)}: {problem or 'no address to bind'}"
    )
