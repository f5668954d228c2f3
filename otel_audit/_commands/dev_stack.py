"""``otel-audit dev-stack``: Jaeger and the Collector wired to a local ledger, one command.

Starts on loopback only, each as a child process: Jaeger v2 (in-memory
storage, ``collector-config/jaeger-dev.yaml``), ``otel-audit serve`` on a
local ledger, a small OTLP/HTTP log backend (log records to ``logs.jsonl``),
and the Collector twice with the configurations of ``collector-config/`` as
shipped: the gateway, and in front of it the agent that services send to on
4317/4318. The addresses, paths, a throw-away CA and certificate, and the
tokens are substituted the documented way (``OTELCOL_*`` variables), so what
runs is what production runs. Binaries come from PATH, else from the cache
``scripts/build-otel-binaries`` fills. The tests start their stacks with the
same pieces (:class:`Component`, :func:`write_tls_files`, :class:`Ports`).
Nothing here is thread-safe; one stack per directory.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import ipaddress
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from otel_audit._commands._common import termination_signals
from otel_audit.errors import ConfigError
from otel_audit.settings import OTEL_AUDIT_SERVE_TOKEN

#: Where scripts/build-otel-binaries puts the Collector and Jaeger.
BIN_CACHE_ENV = "OTEL_AUDIT_BIN_CACHE"
COLLECTOR_BINARY = "otelcol-audit"
JAEGER_BINARY = "jaeger"
#: The gateway's ingest token variable (gateway.yaml, agent.yaml).
INGEST_TOKEN_ENV = "OTEL_GATEWAY_INGEST_TOKEN"
_HOST = "127.0.0.1"


def bin_cache_dir() -> pathlib.Path:
    """``$OTEL_AUDIT_BIN_CACHE``, else ``~/.cache/otel-audit/bin`` (as the build script)."""
    configured = os.environ.get(BIN_CACHE_ENV)
    if configured:
        return pathlib.Path(configured)
    return pathlib.Path.home() / ".cache" / "otel-audit" / "bin"


def find_binary(name: str, *, search_path: bool = True) -> pathlib.Path:
    """The program ``name`` on PATH (when ``search_path``), else in the build cache."""
    found = shutil.which(name) if search_path else None
    if found:
        return pathlib.Path(found)
    cached = bin_cache_dir() / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    raise ConfigError(
        f"{name} not found {'on PATH or ' if search_path else ''}in {bin_cache_dir()}: "
        "build it with scripts/build-otel-binaries (Go and the Go module proxy), "
        f"or set ${BIN_CACHE_ENV}"
    )


def config_dir() -> pathlib.Path:
    """``collector-config/``: in the current directory, else beside the package (a checkout)."""
    for candidate in (
        pathlib.Path.cwd() / "collector-config",
        pathlib.Path(__file__).resolve().parents[2] / "collector-config",
    ):
        if (candidate / "gateway.yaml").is_file():
            return candidate
    raise ConfigError(
        "collector-config/ not found: run from a checkout of otel-audit or pass --config-dir"
    )


def free_port() -> int:
    """A port free on loopback now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    """Every loopback port a stack listens on; 0 means "pick a free one"."""

    agent_grpc: int = 4317
    agent_http: int = 4318
    jaeger_query: int = 16686
    agent_metrics: int = 0
    gateway_grpc: int = 0
    gateway_http: int = 0
    gateway_health: int = 0
    gateway_metrics: int = 0
    jaeger_otlp_grpc: int = 0
    jaeger_otlp_http: int = 0
    jaeger_query_grpc: int = 0
    jaeger_metrics: int = 0
    serve_http: int = 0
    logs_http: int = 0

    def resolve(self) -> Ports:
        """A copy with every 0 replaced by a free port."""
        return Ports(**{f.name: getattr(self, f.name) or free_port() for f in fields(self)})


@dataclass
class Secrets:
    """The gateway's ingest token and serve's token, made fresh for each stack."""

    ingest_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    serve_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


def write_tls_files(directory: pathlib.Path) -> None:
    """A throw-away CA (``ca.crt``) and the gateway's loopback certificate and key.

    The names are the ones gateway.yaml and agent.yaml read under
    ``$OTELCOL_TLS_DIR``; the certificate is for 127.0.0.1 and localhost.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otel-audit dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otel-gateway")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(_HOST))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "gateway.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "gateway.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


def gateway_env(ports: Ports, state_dir: pathlib.Path, tls_dir: pathlib.Path,
                tokens: Secrets, logs_endpoint: str) -> dict[str, str]:  # fmt: skip
    """gateway.yaml's variables for a loopback gateway feeding this stack's Jaeger and serve."""
    return {
        "OTELCOL_STATE_DIR": str(state_dir),
        "OTELCOL_TLS_DIR": str(tls_dir),
        "OTELCOL_GATEWAY_HOST": _HOST,
        "OTELCOL_GATEWAY_GRPC_PORT": str(ports.gateway_grpc),
        "OTELCOL_GATEWAY_HTTP_PORT": str(ports.gateway_http),
        "OTELCOL_HEALTH_PORT": str(ports.gateway_health),
        "OTELCOL_METRICS_PORT": str(ports.gateway_metrics),
        "OTELCOL_JAEGER_ENDPOINT": f"{_HOST}:{ports.jaeger_otlp_grpc}",
        "OTELCOL_AUDIT_ENDPOINT": f"http://{_HOST}:{ports.serve_http}",
        "OTELCOL_LOGS_ENDPOINT": logs_endpoint,
        INGEST_TOKEN_ENV: tokens.ingest_token,
        OTEL_AUDIT_SERVE_TOKEN: tokens.serve_token,
    }


def agent_env(ports: Ports, state_dir: pathlib.Path, tls_dir: pathlib.Path,
              tokens: Secrets) -> dict[str, str]:  # fmt: skip
    """agent.yaml's variables for an agent on this stack's ports sending to its gateway."""
    return {
        "OTELCOL_STATE_DIR": str(state_dir),
        "OTELCOL_TLS_DIR": str(tls_dir),
        "OTELCOL_AGENT_GRPC_PORT": str(ports.agent_grpc),
        "OTELCOL_AGENT_HTTP_PORT": str(ports.agent_http),
        "OTELCOL_METRICS_PORT": str(ports.agent_metrics),
        "OTELCOL_GATEWAY_ENDPOINT": f"{_HOST}:{ports.gateway_grpc}",
        INGEST_TOKEN_ENV: tokens.ingest_token,
    }


def jaeger_env(ports: Ports) -> dict[str, str]:
    """jaeger-dev.yaml's variables."""
    return {
        "JAEGER_OTLP_GRPC_PORT": str(ports.jaeger_otlp_grpc),
        "JAEGER_OTLP_HTTP_PORT": str(ports.jaeger_otlp_http),
        "JAEGER_QUERY_PORT": str(ports.jaeger_query),
        "JAEGER_QUERY_GRPC_PORT": str(ports.jaeger_query_grpc),
        "JAEGER_METRICS_PORT": str(ports.jaeger_metrics),
    }


def _clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    # The children must see only this stack's addresses, not a caller's
    # OTELCOL_*/JAEGER_* variables or its OTel SDK configuration (serve keeps
    # the OTEL_AUDIT_* ones: a policy, a signing key).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTELCOL_", "JAEGER_", "OTEL_")) or k.startswith("OTEL_AUDIT_")
    }
    env.update(extra)
    return env


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 200 <= int(reply.status) < 300
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Component:
    """One program of the stack: its command, environment, log file and readiness test.

    ``start`` launches it and waits until ``ready()`` holds; ``stop`` sends
    SIGTERM and waits (SIGKILL after ``timeout``); ``kill`` is a crash. It can
    be started again on the same ports after either.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log: pathlib.Path
    ready: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def collector(cls, name: str, binary: pathlib.Path, config: pathlib.Path,
                  env: Mapping[str, str], log_dir: pathlib.Path,
                  ready: Callable[[], bool]) -> Component:  # fmt: skip
        return cls(
            name, [str(binary), f"--config={config}"], _clean_environment(env),
            log_dir / f"{name}.log", ready,
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> Component:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ConfigError(f"{self.name} exited at start:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ConfigError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)  # polling a readiness probe with a deadline
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; the exit code (None when never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LogFile:
    """A minimal OTLP/HTTP log backend: each ``/v1/logs`` request as one OTLP/JSON line.

    Enough for trying the stack (``otel-audit verify --anchors`` reads the
    file too); not a log store. Thread-safe: appends under a lock.
    """

    def __init__(self, path: pathlib.Path, port: int) -> None:
        self.path = path
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportLogsServiceRequest()
                if self.path != "/v1/logs" or not _parse(request, body):
                    self.send_response(404 if self.path != "/v1/logs" else 400)
                    self.end_headers()
                    return
                line = json.dumps(json_format.MessageToDict(request), separators=(",", ":"))
                with lock, open(path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                reply = ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((_HOST, port), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{_HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dev-stack-logs", daemon=True
        )

    def start(self) -> LogFile:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _parse(request: ExportLogsServiceRequest, body: bytes) -> bool:
    try:
        request.ParseFromString(body)
    except DecodeError:  # a bad body is the sender's problem
        return False
    return True


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dev-stack",
        help="run Jaeger and the Collector wired to a local ledger, on loopback",
        description="Start Jaeger v2, otel-audit serve on a local ledger and the Collector "
        "(agent and gateway of collector-config/, as shipped) on loopback; send your "
        "service's OTLP to the agent and find its trails in Jaeger. Ctrl-C stops all.",
    )
    p.add_argument("--dir", default=".otel-audit-dev", metavar="DIR",
                   help="ledger, queues, certificates and logs (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--ledger", metavar="URL", help="ledger of serve (default sqlite:///DIR/audit.db)"
    )
    p.add_argument("--otlp-grpc-port", type=int, default=4317, metavar="PORT",
                   help="the agent's OTLP/gRPC port (default %(default)s)")  # fmt: skip
    p.add_argument("--otlp-http-port", type=int, default=4318, metavar="PORT",
                   help="the agent's OTLP/HTTP port (default %(default)s)")  # fmt: skip
    p.add_argument("--jaeger-port", type=int, default=16686, metavar="PORT",
                   help="Jaeger's query API and UI (default %(default)s)")  # fmt: skip
    p.add_argument("--config-dir", metavar="DIR",
                   help="collector-config/ (default: ./collector-config, else the checkout's)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("otlp_grpc_port", "otlp_http_port", "jaeger_port"):
        if not 0 < getattr(args, name) < 65536:
            raise ConfigError(f"--{name.replace('_', '-')} must be a port in 1-65535")
    configs = pathlib.Path(args.config_dir) if args.config_dir else config_dir()
    collector, jaeger = find_binary(COLLECTOR_BINARY), find_binary(JAEGER_BINARY)
    base = pathlib.Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    ledger = args.ledger or f"sqlite:///{base / 'audit.db'}"
    ports = Ports(args.otlp_grpc_port, args.otlp_http_port, args.jaeger_port).resolve()
    tokens = Secrets()
    write_tls_files(base / "tls")
    logs = LogFile(base / "logs.jsonl", ports.logs_http).start()
    components = [
        Component(
            "jaeger",
            [str(jaeger), f"--config={configs / 'jaeger-dev.yaml'}"],
            _clean_environment(jaeger_env(ports)),
            base / "jaeger.log",
            lambda: (
                _http_ok(f"http://{_HOST}:{ports.jaeger_query}/api/services")
                and _tcp_open(ports.jaeger_otlp_grpc)
            ),
        ),  # fmt: skip
        Component(
            "serve",
            [
                sys.executable,
                "-m",
                "otel_audit",
                "serve",
                "--ledger",
                ledger,
                "--listen",
                f"{_HOST}:{ports.serve_http}",
                "--grpc-listen",
                "off",
            ],
            _clean_environment({OTEL_AUDIT_SERVE_TOKEN: tokens.serve_token}),
            base / "serve.log",
            lambda: _tcp_open(ports.serve_http),
        ),  # fmt: skip
        Component.collector(
            "gateway",
            collector,
            configs / "gateway.yaml",
            gateway_env(ports, base / "gateway", base / "tls", tokens, logs.endpoint),
            base,
            lambda: _http_ok(f"http://{_HOST}:{ports.gateway_health}/"),
        ),  # fmt: skip
        Component.collector(
            "agent",
            collector,
            configs / "agent.yaml",
            agent_env(ports, base / "agent", base / "tls", tokens),
            base,
            lambda: _tcp_open(ports.agent_grpc) and _tcp_open(ports.agent_http),
        ),  # fmt: skip
    ]
    with termination_signals() as stop:
        try:
            for component in components:
                if stop.is_set():
                    return 130
                component.start()
            _print_recipe(ports, ledger, base)
            while not stop.wait(0.5):
                dead = next((c for c in components if not c.running()), None)
                if dead is not None:
                    print(f"otel-audit: dev-stack: {dead.name} exited:\n{dead.tail()}",
                          file=sys.stderr)  # fmt: skip
                    return 1
        finally:
            # The agent first: what it holds reaches the gateway, then serve and Jaeger.
            for component in reversed(components):
                component.stop()
            logs.stop()
    print("otel-audit dev-stack: stopped", file=sys.stderr)
    return 0


def _print_recipe(ports: Ports, ledger: str, base: pathlib.Path) -> None:
    print(
        f"""otel-audit dev-stack: ready (loopback only; logs in {base})
  your service   OTEL_EXPORTER_OTLP_ENDPOINT=http://{_HOST}:{ports.agent_grpc} (gRPC) or
                 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_EXPORTER_OTLP_ENDPOINT=http://{_HOST}:{ports.agent_http}
  Jaeger         http://{_HOST}:{ports.jaeger_query}  search tag audit.trail.id=<trail id>
                 (API: /api/traces?service=NAME&tags={{"audit.trail.id":"<trail id>"}})
  ledger         {ledger}  (otel-audit search --ledger {ledger})
  anchors        {base / "gateway" / "anchors.jsonl"}; other log records in {base / "logs.jsonl"}
Ctrl-C stops everything.""",
        flush=True,
    )
