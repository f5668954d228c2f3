"""The Collector configurations in collector-config/ are wired as their README says."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from otel_audit import vocabulary as v
from otel_audit.transport.anchors import CHAIN as ANCHOR_CHAIN

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "collector-config"
FILES = sorted(CONFIG_DIR.glob("*.yaml"))
SIGNALS = ("traces", "metrics", "logs")
KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")
# Connector type -> allowed (exporter pipeline signal, receiver pipeline signal) pairs.
CONNECTOR_PAIRS = {
    "routing": {(s, s) for s in SIGNALS},
    "forward": {(s, s) for s in SIGNALS},
    "spanmetrics": {("traces", "metrics")},
    "count": {(s, "metrics") for s in SIGNALS},
}
# The audit route's condition, built from the vocabulary: a rename breaks this test.
AUDIT_CONDITION = f'attributes["{v.EVENT}"] == true or attributes["{v.TRAIL_ID}"] != nil'


def _type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def _signal(pipeline_id: str) -> str:
    return pipeline_id.split("/", 1)[0]


@pytest.fixture(params=FILES, ids=[f.name for f in FILES])
def config(request):
    return yaml.safe_load(request.param.read_text())


def test_there_are_an_agent_and_a_gateway():
    assert {f.name for f in FILES} == {"agent.yaml", "gateway.yaml"}


def test_every_referenced_component_is_defined(config):
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in (config.get("extensions") or {}), f"extension {ext} not defined"
    connectors = config.get("connectors") or {}
    for name, pipeline in service["pipelines"].items():
        assert _signal(name) in SIGNALS, f"pipeline {name} has no signal type"
        assert pipeline.get("receivers"), f"pipeline {name} has no receiver"
        assert pipeline.get("exporters"), f"pipeline {name} has no exporter"
        for r in pipeline["receivers"]:
            assert r in (config.get("receivers") or {}) or r in connectors, (
                f"{name}: receiver {r} undefined"
            )
        for p in pipeline.get("processors") or []:
            assert p in (config.get("processors") or {}), f"{name}: processor {p} undefined"
        for e in pipeline["exporters"]:
            assert e in (config.get("exporters") or {}) or e in connectors, (
                f"{name}: exporter {e} undefined"
            )
    # Every defined component is used (an unused one is usually a typo elsewhere).
    used = {
        c
        for p in service["pipelines"].values()
        for k in ("receivers", "processors", "exporters")
        for c in p.get(k) or []
    }
    for kind in ("receivers", "processors", "exporters", "connectors"):
        for name in config.get(kind) or {}:
            assert name in used, f"{kind[:-1]} {name} is defined but not used"
    for name in config.get("extensions") or {}:
        assert name in service.get("extensions", []), f"extension {name} is not enabled"


def _authenticators(node):
    """Every ``auth: {authenticator: ...}`` reference anywhere under ``node``."""
    if isinstance(node, dict):
        auth = node.get("auth")
        if isinstance(auth, dict) and "authenticator" in auth:
            yield auth["authenticator"]
        for value in node.values():
            yield from _authenticators(value)
    elif isinstance(node, list):
        for value in node:
            yield from _authenticators(value)


def test_every_referenced_authenticator_is_an_enabled_extension(config):
    enabled = config["service"].get("extensions", [])
    for kind in ("receivers", "exporters"):
        for name in _authenticators(config.get(kind) or {}):
            assert name in (config.get("extensions") or {}), (
                f"{kind}: authenticator {name} undefined"
            )
            assert name in enabled, f"{kind}: authenticator {name} is not enabled"


def test_gateway_receivers_authenticate_every_sender():
    """Audit spans reaching the gateway become audit records: no anonymous sender."""
    config = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    receivers = config["receivers"]
    assert receivers
    for name, receiver in receivers.items():
        protocols = (receiver or {}).get("protocols") or {}
        assert protocols, f"{name}: a receiver without protocols cannot be authenticated"
        for protocol, conf in protocols.items():
            conf = conf or {}
            authenticator = (conf.get("auth") or {}).get("authenticator")
            assert authenticator, f"{name}.{protocol} accepts unauthenticated senders"
            assert _type(authenticator) in ("bearertokenauth", "oidc", "basicauth")
            ext = config["extensions"][authenticator]
            assert "${env:" in str(ext.get("token") or ext.get("tokens") or ext.get("filename"))
            tls = conf.get("tls") or {}
            # The token (or client certificate) must not cross the network in clear.
            assert tls.get("cert_file") and tls.get("key_file"), f"{name}.{protocol} has no TLS"


def test_agent_authenticates_to_the_gateway_over_tls():
    gateway = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    agent = yaml.safe_load((CONFIG_DIR / "agent.yaml").read_text())
    (ingest,) = {
        conf["auth"]["authenticator"] for conf in gateway["receivers"]["otlp"]["protocols"].values()
    }
    expected = gateway["extensions"][ingest]["token"]
    for name, exporter in agent["exporters"].items():
        if "gateway" not in name:
            continue
        authenticator = exporter["auth"]["authenticator"]
        assert agent["extensions"][authenticator]["token"] == expected, name
        assert not exporter["tls"].get("insecure"), f"{name}: the token would travel in clear"


def test_connectors_join_pipelines_of_allowed_signal_types(config):
    pipelines = config["service"]["pipelines"]
    for name, conf in (config.get("connectors") or {}).items():
        as_exporter = {_signal(p) for p, c in pipelines.items() if name in c["exporters"]}
        as_receiver = {_signal(p) for p, c in pipelines.items() if name in c["receivers"]}
        assert as_exporter and as_receiver, (
            f"connector {name} must be an exporter in one pipeline and a receiver in another"
        )
        allowed = CONNECTOR_PAIRS[_type(name)]
        for pair in {(e, r) for e in as_exporter for r in as_receiver}:
            assert pair in allowed, f"connector {name} cannot join {pair[0]} to {pair[1]}"
        if _type(name) == "routing":
            receiving = {p for p, c in pipelines.items() if name in c["receivers"]}
            routed = {p for route in conf["table"] for p in route["pipelines"]} | set(
                conf.get("default_pipelines") or []
            )
            assert routed == receiving, f"{name} routes to {routed}, receivers are {receiving}"


def test_queue_storage_refers_to_an_enabled_extension(config):
    for name, exporter in (config.get("exporters") or {}).items():
        storage = ((exporter or {}).get("sending_queue") or {}).get("storage")
        if storage:
            assert storage in config["service"]["extensions"], (
                f"{name}: storage {storage} not enabled"
            )
            assert _type(storage) == "file_storage"
            assert config["extensions"][storage].get("fsync") is True


def _durable(exporter: dict) -> None:
    queue = exporter["sending_queue"]
    assert queue["enabled"] is True
    assert _type(queue["storage"]) == "file_storage"
    assert queue["block_on_overflow"] is True
    assert "batch" not in queue  # no in-memory batching in front of the audit receiver
    retry = exporter["retry_on_failure"]
    assert retry["enabled"] is True
    assert str(retry["max_elapsed_time"]) in ("0", "0s")


def _upstream(pipelines: dict, target: str) -> set[str]:
    """Pipelines whose data can reach pipeline ``target`` (itself included)."""
    found = {target}
    changed = True
    while changed:
        changed = False
        for name, conf in pipelines.items():
            if name in found:
                continue
            feeds = {p for p in found for r in pipelines[p]["receivers"] if r in conf["exporters"]}
            if feeds:
                found.add(name)
                changed = True
    return found


def test_gateway_routes_audit_spans_durably_to_otel_audit_serve():
    config = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    (route,) = config["connectors"]["routing/audit"]["table"]
    assert route["context"] == "span"
    assert route["condition"] == AUDIT_CONDITION
    assert route["pipelines"] == ["traces/audit"]
    assert not config["connectors"]["routing/audit"].get("default_pipelines")
    audit = pipelines["traces/audit"]
    (exporter_id,) = audit["exporters"]
    assert _type(exporter_id) in ("otlp_http", "otlphttp")
    exporter = config["exporters"][exporter_id]
    assert re.match(r"^https?://[^/]+:4318$", exporter["endpoint"])
    assert exporter["headers"]["Authorization"].startswith("Bearer ${env:")
    _durable(exporter)
    # Nothing that acknowledges before export (batch) or drops (samplers,
    # filters) on any path into the audit exporter.
    for name in _upstream(pipelines, "traces/audit"):
        for processor in pipelines[name].get("processors") or []:
            assert _type(processor) == "memory_limiter", (
                f"{name}: {processor} before the audit exporter"
            )


def test_gateway_sends_all_traces_to_jaeger_and_logs_to_the_log_pipeline():
    config = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    entry = pipelines["traces/in"]
    assert entry["receivers"] == ["otlp"]
    jaeger = [e for e in entry["exporters"] if "jaeger" in e]
    assert jaeger and _type(jaeger[0]) in ("otlp_grpc", "otlp")
    logs = pipelines["logs"]
    assert logs["receivers"] == ["otlp"] and "otlp_http/logs" in logs["exporters"]
    (anchor_route,) = config["connectors"]["routing/anchors"]["table"]
    assert anchor_route["condition"] == f'attributes["{ANCHOR_CHAIN}"] != nil'
    assert config["exporters"]["file/anchors"]["format"] == "json"


def test_agent_forwards_traces_durably():
    config = yaml.safe_load((CONFIG_DIR / "agent.yaml").read_text())
    traces = config["service"]["pipelines"]["traces"]
    assert "batch" not in [_type(p) for p in traces.get("processors") or []]
    (exporter_id,) = traces["exporters"]
    _durable(config["exporters"][exporter_id])
    for protocol in config["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("127.0.0.1:")  # loopback: services on this host only


def test_readme_explains_each_loss_point():
    text = (CONFIG_DIR / "README.md").read_text()
    for setting in (
        "fsync",
        "block_on_overflow",
        "max_elapsed_time",
        "batch",
        "memory_limiter",
        "routing",
        "anchors",
        "trust boundary",
        "bearertokenauth",
        "client_ca_file",
    ):
        assert setting in text, f"README.md does not mention {setting}"
