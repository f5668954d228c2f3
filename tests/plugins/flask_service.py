"""Real audited services as processes: the ``run_service`` factory fixture.

``run_service(target, env=..., gunicorn_workers=N)`` starts ``target`` (a
``module:app``) under ``opentelemetry-instrument`` (werkzeug via ``python -m``
or ``flask run``, or gunicorn with N workers) on a free loopback port, waits until ``/healthz`` answers,
and stops it with SIGTERM at the end of the test (audit records are flushed
on the way out). Output goes to a log file shown when a test fails.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import requests

_BIN = pathlib.Path(sys.executable).parent
_ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: pathlib.Path
    stopped: bool = field(default=False)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if not self.stopped:
            self.stopped = True
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def base_env(ledger: str, data_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment of an audited shop service with no OTLP export (override to export)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SHOP_"))}
    env.update(
        OTEL_AUDIT_LEDGER=ledger,
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        SHOP_DATA_DIR=str(data_dir),
        PYTHONPATH=str(_ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture
def run_service(tmp_path: pathlib.Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def run(
        target: str,
        *,
        env: dict[str, str],
        name: str | None = None,
        gunicorn_workers: int = 0,
        flask_cli: bool = False,
        instrument: bool = True,
        ready_path: str = "/healthz",
        timeout: float = 30.0,
    ) -> Service:
        port = free_port()
        name = name or target.split(":")[0].rsplit(".", 1)[-1]
        if gunicorn_workers:
            cmd = [
                str(_BIN / "gunicorn"), "-w", str(gunicorn_workers), "-b", f"127.0.0.1:{port}",
                "--graceful-timeout", "10", target,
            ]  # fmt: skip
        elif flask_cli:
            cmd = [str(_BIN / "flask"), "--app", target, "run", "--port", str(port)]
        else:
            cmd = [sys.executable, "-m", target.split(":")[0], "--port", str(port)]
        if instrument:
            cmd = [str(_BIN / "opentelemetry-instrument")] + cmd
        log = tmp_path / f"{name}-{port}.log"
        env = dict(env)
        env.setdefault("OTEL_SERVICE_NAME", name)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(tmp_path),
            )  # fmt: skip
        service = Service(name, f"http://127.0.0.1:{port}", process, log)
        started.append(service)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{service.output()}")
            try:
                if requests.get(service.url + ready_path, timeout=2).status_code < 500:
                    return service
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not become ready:\n{service.output()}")
            time.sleep(0.05)  # polling with a deadline, not synchronisation

    yield run
    for service in reversed(started):
        service.stop()
