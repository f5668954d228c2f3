"""``otel-audit demo``: the example shop, audited with no code change, end to end.

Starts the two example services (``otel_audit._demo``: shipped in the package
so this works right after ``pip install``) as real processes on loopback
under ``opentelemetry-instrument``, with the embedded SQLite ledger in a
temporary (or given) directory; performs a few user actions as alice and bob
(bob is denied); prints each trail as a tree with ``otel-audit trail``; ends
with ``otel-audit verify``. Exit 0 when every step did what it should.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from typing import Any

from otel_audit import vocabulary as v
from otel_audit._commands import _demo_boundary
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.errors import AuditError, ConfigError
from otel_audit.proof.keys import generate_keypair

# What the example services import or are instrumented by, and the pip names.
_NEEDS = {
    "flask": "flask",
    "requests": "requests",
    "opentelemetry.instrumentation.sqlite3": "opentelemetry-instrumentation-sqlite3",
    "opentelemetry.instrumentation.requests": "opentelemetry-instrumentation-requests",
}
# opentelemetry-instrument, run by module so no script directory is assumed.
_INSTRUMENT = (
    "import sys; sys.argv[0] = 'opentelemetry-instrument';"
    " from opentelemetry.instrumentation.auto_instrumentation import run; run()"
)
#: (user, password, method, path, json body, expected status)
_STEPS: list[tuple[str, str, str, str, dict[str, Any] | None, int]] = [
    ("alice", "alice-pw", "POST", "/orders", {"sku": "apple", "qty": 2}, 201),
    ("bob", "bob-pw", "POST", "/orders", {"sku": "apple", "qty": 1}, 403),
    ("alice", "alice-pw", "DELETE", "/orders/1", None, 200),
]


class DemoFailed(AuditError):
    exit_code = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the example shop audited, print its trails, verify")
    p.add_argument(
        "--dir", metavar="PATH", help="where to put the ledger and shop data (default: temp)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _check_installed() -> None:
    missing = [pip for mod, pip in _NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"the demo needs {', '.join(missing)}: pip install 'otel-audit[demo]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(
    url: str, method: str = "GET", body: Any = None, auth: tuple[str, str] | None = None
) -> int:
    import json

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class _Service:
    def __init__(self, name: str, directory: pathlib.Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"{name}.log"
        cmd = [sys.executable, "-c", _INSTRUMENT, sys.executable, "-m",
               f"otel_audit._demo.{name}", "--port", str(self.port)]  # fmt: skip
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                cmd, env=dict(env, OTEL_SERVICE_NAME=name), cwd=str(directory),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise DemoFailed(f"the {self.name} service exited; see {self.log}")
            try:
                if _request(self.url + "/healthz") == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DemoFailed(f"the {self.name} service did not start; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM: the service commits what is queued and writes its last checkpoint."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def _wait_for_job(ledger_url: str, timeout: float) -> None:
    """The restock job runs after the response: wait until its record is in the ledger."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open_ledger(ledger_url, create=False, readonly=True) as ledger:
            if any("restock" in str(r.record.attr("db.query.text") or r.record.attr("db.statement"))
                   for r in ledger.query(Query(service="inventory"))):  # fmt: skip
                return
        time.sleep(0.1)
    raise DemoFailed("the background job's record did not reach the ledger")


def _trails(ledger_url: str) -> list[tuple[str, str]]:
    """(trail id, one-line summary) of each user action on the orders service, in order."""
    out = []
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        for stored in ledger.query(Query(service="orders")):
            rec = stored.record
            if rec.attr(v.INTENT) or not rec.attr(v.EVENT):
                continue  # a request record before the view: its outcome record follows
            if rec.attr(v.ACTION) not in _demo_boundary.ACTIONS:
                who = rec.attr(v.ACTOR_ID) or rec.attr(v.ACTOR_TYPE)
                out.append((str(rec.attr(v.TRAIL_ID)),
                            f"{who} did {rec.attr(v.ACTION)}: {rec.attr(v.OUTCOME)}"))  # fmt: skip
    return out


def run(args: argparse.Namespace) -> int:
    _check_installed()
    if args.dir:
        directory = pathlib.Path(args.dir).resolve()
        try:
            directory.mkdir(exist_ok=True)  # its parent must exist: no surprise trees
        except OSError as exc:
            raise ConfigError(f"cannot use --dir {args.dir!r}: {exc.strerror}") from None
        if (directory / "audit.db").exists():
            raise ConfigError(f"{directory / 'audit.db'} exists: give the demo an empty --dir")
        return _run(directory, args.timeout)
    with tempfile.TemporaryDirectory(prefix="otel-audit-demo-") as tmp:
        return _run(pathlib.Path(tmp), args.timeout)


def _run(directory: pathlib.Path, timeout: float) -> int:
    from otel_audit.cli import main

    ledger_url = f"sqlite:///{directory / 'audit.db'}"
    # A signing key for the checkpoints, kept apart from the ledger as in
    # production (here a sibling directory; in production another host).
    keys = directory / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    generate_keypair(keys / "audit-signing.key", keys / "audit-signing.pub")
    public_key = keys / "audit-signing.pub"
    env = {k: val for k, val in os.environ.items() if not k.startswith(("OTEL_", "SHOP_"))}
    env.update(
        OTEL_AUDIT_LEDGER=ledger_url,
        OTEL_AUDIT_SIGNING_KEY=str(keys / "audit-signing.key"),
        OTEL_AUDIT_TRUSTED_PEERS="127.0.0.1/32",
        # No collector in the demo: keep the normal pipeline quiet.
        OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
        SHOP_DATA_DIR=str(directory),
    )  # fmt: skip
    print(f"otel-audit demo: ledger {ledger_url}")
    inventory = _Service("inventory", directory, env)
    boundary = _demo_boundary.BoundaryDemo(directory, inventory.url)
    orders = _Service(
        "orders", directory, dict(env, SHOP_INVENTORY_URL=inventory.url, **boundary.env())
    )
    failed: list[str] = []
    try:
        inventory.wait_ready(timeout)
        orders.wait_ready(timeout)
        print(f"started orders on {orders.url}, inventory on {inventory.url}\n")
        for user, password, method, path, body, expected in _STEPS:
            status = _request(orders.url + path, method, body, (user, password))
            print(f"  {user}: {method} {path} -> {status}")
            if status != expected:
                failed.append(f"{user} {method} {path}: expected {expected}, got {status}")
        failed += boundary.export(orders.url, _request)
        _wait_for_job(ledger_url, timeout)
    finally:
        codes = [orders.stop(), inventory.stop()]
        boundary.close()
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        failed.append(f"a service exited with {codes}; see {directory}")
    trails = _trails(ledger_url)
    if len(trails) != len(_STEPS):
        failed.append(f"expected {len(_STEPS)} audited actions, found {len(trails)}")
    for trail_id, summary in trails:
        print(f"\ntrail {trail_id}: {summary}")
        sys.stdout.flush()
        if main(["trail", "--ledger", ledger_url, trail_id]) != 0:
            failed.append(f"otel-audit trail {trail_id} failed")
    print()
    sys.stdout.flush()
    if main(["verify", "--ledger", ledger_url, "--public-key", str(public_key)]) != 0:
        failed.append("otel-audit verify failed")
    failed += boundary.report(ledger_url, main)
    if failed:
        raise DemoFailed("demo failed: " + "; ".join(failed))
    return 0
