"""``otel-audit dev-stack``: one command, a trail from a real service visible in Jaeger and the ledger."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import requests

from otel_audit import vocabulary as v
from otel_audit._commands.dev_stack import BIN_CACHE_ENV, free_port
from tests.plugins.flask_service import base_env
from tests.plugins.otel_stack import ledger_records, wait_until

_BIN = pathlib.Path(sys.executable).parent


def test_dev_stack_shows_a_services_trail_in_jaeger_and_stops_cleanly(otel_binaries, run_service, tmp_path):  # fmt: skip
    grpc_port, http_port, jaeger_port = free_port(), free_port(), free_port()
    # The binaries only from the build cache: PATH has none of them.
    env = {k: val for k, val in os.environ.items() if not k.startswith("OTEL")}
    env.update({BIN_CACHE_ENV: str(otel_binaries[0].parent), "PATH": f"{_BIN}:/usr/bin:/bin"})
    dev = subprocess.Popen(
        [str(_BIN / "otel-audit"), "dev-stack", "--dir", str(tmp_path / "dev"),
         "--otlp-grpc-port", str(grpc_port), "--otlp-http-port", str(http_port),
         "--jaeger-port", str(jaeger_port)],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(dev.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: any("ready" in line for line in lines) or dev.poll() is not None, 90,
                   "dev-stack ready")  # fmt: skip
        assert dev.poll() is None, "".join(lines)
        assert f"http://127.0.0.1:{jaeger_port}" in "".join(lines)

        extra = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        inventory = run_service(
            "otel_audit._demo.inventory:app",
            env=base_env(f"sqlite:///{tmp_path / 'local.db'}", tmp_path, **extra),
        )
        reply = requests.post(
            inventory.url + "/stock/apple/release",
            json={"qty": 1},
            auth=("alice", "alice-pw"),
            timeout=30,
        )
        assert reply.status_code == 200, reply.text

        ledger = f"sqlite:///{tmp_path / 'dev' / 'audit.db'}"
        (action,) = wait_until(
            lambda: [r for r in ledger_records(ledger) if r["attributes"].get(v.EVENT)], 30,
            "the action in dev-stack's ledger",
        )  # fmt: skip
        trail = action["attributes"][v.TRAIL_ID]

        def in_jaeger() -> bool:
            reply = requests.get(
                f"http://127.0.0.1:{jaeger_port}/api/traces",
                params={"service": "inventory", "tags": f'{{"{v.TRAIL_ID}":"{trail}"}}'},
                timeout=10,
            )
            return any(s["spanID"] == action["span_id"] for t in reply.json()["data"] or []
                       for s in t["spans"])  # fmt: skip

        wait_until(in_jaeger, 30, "the trail in dev-stack's Jaeger")
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(60)
        reader.join(10)
    assert code == 0, "".join(lines)
    # Every child stopped with it: its ports are free again.
    for port in (grpc_port, http_port, jaeger_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
