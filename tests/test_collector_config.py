"""The Collector configurations in collector-config/ are wired as their README says.

Structure here; the real Collector built from builder.yaml validates them
(test_configs_validate_in_the_built_collector), and tests/test_collector_jaeger.py
runs them.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest
import yaml

from otel_audit import vocabulary as v
from otel_audit._commands.dev_stack import Ports, Secrets, agent_env, gateway_env, write_tls_files
from otel_audit.transport.anchors import CHAIN as ANCHOR_CHAIN

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "collector-config"
FILES = [CONFIG_DIR / "agent.yaml", CONFIG_DIR / "gateway.yaml"]
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


def test_there_are_an_agent_a_gateway_a_manifest_jaeger_and_compose():
    assert {f.name for f in CONFIG_DIR.glob("*.yaml")} == {
        "agent.yaml", "gateway.yaml", "builder.yaml", "jaeger-dev.yaml", "compose.yaml",
    }  # fmt: skip


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
    routing = config["connectors"]["routing/audit"]
    (route,) = routing["table"]
    assert route["context"] == "span"
    assert route["condition"] == AUDIT_CONDITION
    # Audit spans to the audit pipeline and to Jaeger's; every other span to Jaeger's only.
    assert route["pipelines"] == ["traces/audit", "traces/jaeger"]
    assert routing["default_pipelines"] == ["traces/jaeger"]
    audit = pipelines["traces/audit"]
    (exporter_id,) = audit["exporters"]
    assert _type(exporter_id) in ("otlp_http", "otlphttp")
    exporter = config["exporters"][exporter_id]
    assert exporter["endpoint"] == "${env:OTELCOL_AUDIT_ENDPOINT:-http://otel-audit:4318}"
    assert exporter["headers"]["Authorization"].startswith("Bearer ${env:")
    _durable(exporter)
    # Nothing that acknowledges before export (batch) or drops (samplers,
    # filters) on any path into the audit exporter.
    for name in _upstream(pipelines, "traces/audit"):
        for processor in pipelines[name].get("processors") or []:
            assert _type(processor) == "memory_limiter", (
                f"{name}: {processor} before the audit exporter"
            )


def test_jaeger_and_the_log_backend_can_never_push_back_on_the_audit_route():
    """A full or dead Jaeger queue must not refuse data the audit route shares.

    Jaeger's exporter (and the log backend's) sit in pipelines of their own
    whose first processor is ``batch``, which accepts everything and drops on
    export failure; no pipeline that feeds the audit route exports to them.
    """
    config = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    upstream = _upstream(pipelines, "traces/audit")
    for name, pipeline in pipelines.items():
        lossy = [e for e in pipeline["exporters"] if "jaeger" in e or e == "otlp_http/logs"]
        if not lossy:
            continue
        assert name not in upstream, f"{name} feeds the audit route and exports to {lossy}"
        assert (pipeline.get("processors") or [None])[0] == "batch", (
            f"{name}: {lossy} can refuse upstream without a batch processor in front"
        )


def test_gateway_sends_all_traces_to_jaeger_and_logs_to_the_log_pipeline():
    config = yaml.safe_load((CONFIG_DIR / "gateway.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    entry = pipelines["traces/in"]
    assert entry["receivers"] == ["otlp"] and entry["exporters"] == ["routing/audit"]
    (jaeger,) = pipelines["traces/jaeger"]["exporters"]
    assert _type(jaeger) in ("otlp_grpc", "otlp")
    assert pipelines["logs/in"]["receivers"] == ["otlp"]
    assert pipelines["logs/backend"]["exporters"] == ["otlp_http/logs"]
    routing = config["connectors"]["routing/anchors"]
    (anchor_route,) = routing["table"]
    assert anchor_route["condition"] == f'attributes["{ANCHOR_CHAIN}"] != nil'
    assert anchor_route["pipelines"] == ["logs/anchors", "logs/backend"]
    assert routing["default_pipelines"] == ["logs/backend"]
    assert config["exporters"]["file/anchors"]["format"] == "json"


def test_agent_forwards_traces_durably():
    config = yaml.safe_load((CONFIG_DIR / "agent.yaml").read_text())
    traces = config["service"]["pipelines"]["traces"]
    assert "batch" not in [_type(p) for p in traces.get("processors") or []]
    (exporter_id,) = traces["exporters"]
    _durable(config["exporters"][exporter_id])
    for protocol in config["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("127.0.0.1:")  # loopback: services on this host only


# The component types each module of builder.yaml provides (the Collector's own names).
MODULE_TYPES = {
    "otlpreceiver": {"otlp"},
    "memorylimiterprocessor": {"memory_limiter"},
    "batchprocessor": {"batch"},
    "otlpexporter": {"otlp_grpc", "otlp"},
    "otlphttpexporter": {"otlp_http", "otlphttp"},
    "fileexporter": {"file"},
    "routingconnector": {"routing"},
    "filestorage": {"file_storage"},
    "bearertokenauthextension": {"bearertokenauth"},
    "healthcheckextension": {"health_check"},
}


def _manifest() -> dict:
    return yaml.safe_load((CONFIG_DIR / "builder.yaml").read_text())


def test_builder_manifest_lists_exactly_the_components_the_configs_use_at_one_release():
    manifest = _manifest()
    release = "v" + manifest["dist"]["version"]
    provided: dict[str, set[str]] = {}
    for kind in KINDS:
        for entry in manifest.get(kind) or []:
            module, version = entry["gomod"].split()
            assert version == release, (
                f"{module} is at {version}, the manifest's release is {release}"
            )
            provided.setdefault(kind, set()).update(MODULE_TYPES[module.rsplit("/", 1)[1]])
    used: dict[str, set[str]] = {}
    for path in FILES:
        config = yaml.safe_load(path.read_text())
        for kind in KINDS:
            used.setdefault(kind, set()).update(_type(c) for c in config.get(kind) or {})
    for kind in KINDS:
        # Every type used is built in; every module built in is used by some type.
        assert used[kind] <= provided.get(kind, set()), (
            f"{kind}: {used[kind] - provided[kind]} not built"
        )
        for entry in manifest.get(kind) or []:
            types = MODULE_TYPES[entry["gomod"].split()[0].rsplit("/", 1)[1]]
            assert types & used[kind], f"{entry['gomod']} is built but no config uses it"


def _collector_env(tmp_path: pathlib.Path) -> dict[str, str]:
    write_tls_files(tmp_path / "tls")
    ports, tokens = Ports().resolve(), Secrets()
    env = dict(os.environ)
    env.update(gateway_env(ports, tmp_path, tmp_path / "tls", tokens, "http://127.0.0.1:1"))
    env.update(agent_env(ports, tmp_path, tmp_path / "tls", tokens))
    return env


def test_configs_validate_in_the_built_collector(otel_binaries, tmp_path):
    collector, _ = otel_binaries
    version = subprocess.run([str(collector), "--version"], capture_output=True, text=True)
    # A stale cached build (older manifest) would run other components: rebuild it.
    assert version.stdout.split()[-1] == _manifest()["dist"]["version"], version.stdout
    for path in FILES:
        out = subprocess.run(
            [str(collector), "validate", f"--config={path}"],
            env=_collector_env(tmp_path), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, f"{path.name}: {out.stdout}{out.stderr}"


def test_every_address_and_path_is_a_documented_variable_with_the_production_default():
    readme = (CONFIG_DIR / "README.md").read_text()
    for path in FILES:
        for name, default in re.findall(r"\$\{env:(OTELCOL_[A-Z_]+):-([^}]*)\}", path.read_text()):
            assert f"`{name}`" in readme, f"{path.name}: {name} is not documented"
            assert default, f"{path.name}: {name} has no default"


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
