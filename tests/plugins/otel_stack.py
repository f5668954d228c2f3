"""The real OpenTelemetry Collector and Jaeger on loopback: the ``otel_stack`` fixture.

``otel_stack`` starts Jaeger v2, ``otel-audit serve`` (its own SQLite ledger),
the gateway and the agent of ``collector-config/`` as shipped (addresses,
directories, a throw-away CA and the tokens substituted through the documented
``OTELCOL_*`` variables, by the same code as ``otel-audit dev-stack``), and
dev-stack's log backend (``logs.jsonl``). One stack serves a test module;
``stack_running`` restarts whatever a previous test left stopped. Each part is
a ``Component`` a test can stop, kill and start again on the same ports.

The binaries come from the cache that ``scripts/build-otel-binaries`` fills
(``$OTEL_AUDIT_BIN_CACHE``, else ``~/.cache/otel-audit/bin``); when they are
missing the tests fail, naming the script, rather than skip.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from otel_audit._commands.dev_stack import (
    COLLECTOR_BINARY,
    JAEGER_BINARY,
    Component,
    LogFile,
    Ports,
    Secrets,
    agent_env,
    find_binary,
    gateway_env,
    jaeger_env,
    write_tls_files,
)
from otel_audit.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "collector-config"
_BIN = pathlib.Path(sys.executable).parent


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``predicate`` (with a deadline) until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(0.1)  # polling a condition with a deadline, not synchronisation


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 200 <= reply.status < 300
    except OSError:
        return False


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def ledger_records(ledger: str, *args: str) -> list[dict[str, Any]]:
    """Every record of ``ledger`` as ``otel-audit export --format jsonl`` prints it."""
    if ledger.startswith("sqlite:///") and not pathlib.Path(ledger[len("sqlite:///") :]).exists():
        return []
    out = subprocess.run(
        [str(_BIN / "otel-audit"), "export", "--ledger", ledger, "--format", "jsonl", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@dataclass
class OtelStack:
    dir: pathlib.Path
    ports: Ports
    tokens: Secrets
    ledger: str  # serve's
    jaeger: Component
    serve: Component
    gateway: Component
    agent: Component
    logs: LogFile  # the log backend: OTLP/JSON lines in logs.jsonl

    @property
    def anchors(self) -> pathlib.Path:
        return self.dir / "gateway" / "anchors.jsonl"

    def log_bodies(self) -> list[str]:
        """The bodies of the log records the log backend received."""
        if not self.logs.path.exists():
            return []
        return [
            str(rec.get("body", {}).get("stringValue", ""))
            for line in self.logs.path.read_text().splitlines()
            for rl in json.loads(line).get("resourceLogs", [])
            for sl in rl.get("scopeLogs", [])
            for rec in sl.get("logRecords", [])
        ]

    def components(self) -> list[Component]:
        return [self.jaeger, self.serve, self.gateway, self.agent]

    def service_env(self) -> dict[str, str]:
        """What a service needs to send its traces and logs to the agent (OTLP/HTTP)."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.ports.agent_http}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
        }

    def jaeger_api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.ports.jaeger_query}{path}{'?' + query if query else ''}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)

    def jaeger_traces(self, service: str, **tags: Any) -> list[dict[str, Any]]:
        """Traces of ``service`` in Jaeger (its query API, as the UI searches them)."""
        params = {"service": service, "limit": "1000", "lookback": "1h"}
        if tags:
            params["tags"] = json.dumps(tags)
        return list(self.jaeger_api("/api/traces", **params)["data"] or [])

    def jaeger_span_ids(self, service: str) -> set[str]:
        return {s["spanID"] for t in self.jaeger_traces(service) for s in t["spans"]}

    def metric(self, component: str, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric of the gateway's or agent's own telemetry."""
        port = self.ports.gateway_metrics if component == "gateway" else self.ports.agent_metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            # Counters carry Prometheus' "_total" suffix.
            if not line.startswith((f"{name}{{", f"{name} ", f"{name}_total{{", f"{name}_total ")):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _binaries() -> tuple[pathlib.Path, pathlib.Path]:
    try:
        return (
            find_binary(COLLECTOR_BINARY, search_path=False),
            find_binary(JAEGER_BINARY, search_path=False),
        )
    except ConfigError as exc:
        pytest.fail(f"the Collector/Jaeger tests need their binaries: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def otel_binaries() -> tuple[pathlib.Path, pathlib.Path]:
    """(otelcol-audit, jaeger) from the build cache; fails (never skips) without them."""
    return _binaries()


def make_jaeger(binary: pathlib.Path, ports: Ports, log_dir: pathlib.Path) -> Component:
    return Component(
        "jaeger", [str(binary), f"--config={CONFIG_DIR / 'jaeger-dev.yaml'}"],
        jaeger_env(ports), log_dir / "jaeger.log",
        lambda: _http_ok(f"http://127.0.0.1:{ports.jaeger_query}/api/services")
        and _tcp_open(ports.jaeger_otlp_grpc) and _tcp_open(ports.jaeger_otlp_http),
    )  # fmt: skip


@pytest.fixture(scope="module")
def otel_stack(
    tmp_path_factory: pytest.TempPathFactory, otel_binaries: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[OtelStack]:
    """One stack for a test module (starting it is most of a test's time); see ``stack_running``."""
    collector, jaeger = otel_binaries
    base = tmp_path_factory.mktemp("stack")
    ports = Ports(agent_grpc=0, agent_http=0, jaeger_query=0).resolve()
    tokens = Secrets()
    write_tls_files(base / "tls")
    ledger = f"sqlite:///{base / 'serve.db'}"
    logs = LogFile(base / "logs.jsonl", ports.logs_http).start()
    stack = OtelStack(
        dir=base, ports=ports, tokens=tokens, ledger=ledger,
        jaeger=make_jaeger(jaeger, ports, base),
        serve=Component(
            "serve",
            [str(_BIN / "otel-audit"), "serve", "--ledger", ledger, "--listen",
             f"127.0.0.1:{ports.serve_http}", "--grpc-listen", "off", "--checkpoint-interval", "1"],
            {"OTEL_AUDIT_SERVE_TOKEN": tokens.serve_token, "PATH": str(_BIN)},
            base / "serve.log", lambda: _tcp_open(ports.serve_http),
        ),
        gateway=Component.collector(
            "gateway", collector, CONFIG_DIR / "gateway.yaml",
            gateway_env(ports, base / "gateway", base / "tls", tokens, logs.endpoint), base,
            lambda: _http_ok(f"http://127.0.0.1:{ports.gateway_health}/"),
        ),
        agent=Component.collector(
            "agent", collector, CONFIG_DIR / "agent.yaml",
            agent_env(ports, base / "agent", base / "tls", tokens), base,
            lambda: _tcp_open(ports.agent_grpc) and _tcp_open(ports.agent_http),
        ),
        logs=logs,
    )  # fmt: skip
    try:
        for component in stack.components():
            component.start()
        yield stack
    finally:
        for component in reversed(stack.components()):
            component.stop()
        logs.stop()


@pytest.fixture
def stack_running(otel_stack: OtelStack, request: pytest.FixtureRequest) -> Iterator[OtelStack]:
    """The module's stack with every part running (a test may have stopped one); logs on failure."""
    for component in otel_stack.components():
        if not component.running():
            component.start()
    yield otel_stack
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for component in otel_stack.components():
            print(f"--- {component.name} log (tail) ---\n{component.tail(60)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # The outcome of the test's call phase, so the fixture can show the logs of a failed one.
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
