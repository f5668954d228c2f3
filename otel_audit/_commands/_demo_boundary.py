"""The data-boundary part of ``otel-audit demo`` (private).

The shop's ``orders`` table is classified ``production``; the policy allows
that data to reach the inventory service and nothing else. A "partner" (a
second local HTTP server, on no allow-list) receives the deliberate export
(``POST /orders/export``), and ``otel-audit boundary`` is shown detecting it.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Audit actions of this part (POST /orders/export is named order.export from
#: its route), left out of the demo's list of user steps.
ACTIONS = frozenset({"order.export", "boundary.violation"})

_POLICY = """\
# The demo shop's audit policy (see docs/policy.md).
# The orders table holds production data: it may reach the inventory service
# and nothing else. The partner export is outside the allow-list on purpose.
[[boundary.classify]]
classification = "production"
tables = ["orders"]

[boundary.allow.production]
hosts = ["{inventory}"]
"""


class _Partner(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        received: list[int] = self.server.received  # type: ignore[attr-defined]
        received.append(len(self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class BoundaryDemo:
    """The partner server, the policy file, the export step and the report."""

    def __init__(self, directory: pathlib.Path, inventory_url: str) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Partner)
        self.server.received = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.policy = directory / "policy.toml"
        inventory = inventory_url.split("://", 1)[-1]
        self.policy.write_text(_POLICY.format(inventory=inventory))

    def env(self) -> dict[str, str]:
        """Environment of the orders service: the policy, and where the export goes."""
        return {"OTEL_AUDIT_POLICY": str(self.policy), "SHOP_EXPORT_URL": f"{self.url}/import"}

    def export(self, orders_url: str, request: Callable[..., int]) -> list[str]:
        """alice exports the orders to the partner; returns what went wrong."""
        status = request(f"{orders_url}/orders/export", "POST", {}, ("alice", "alice-pw"))
        print(
            f"  alice: POST /orders/export -> {status}  (to a partner at {self.url}, not allowed)"
        )
        return [] if status == 200 else [f"the export answered {status}, expected 200"]

    def report(self, ledger_url: str, main: Callable[[list[str]], int]) -> list[str]:
        """Run ``otel-audit boundary``: it must find the export (exit 1)."""
        print(f"\ndata boundary ({self.policy.name}: production data may only reach inventory):")
        print(f"  the partner received {len(self.server.received)} export(s)")  # type: ignore[attr-defined]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["boundary", "--ledger", ledger_url])
        report = out.getvalue()
        for line in report.splitlines():
            print(f"  | {line}" if line else "  |")
        if code != 1 or "VIOLATION" not in report:
            return ["otel-audit boundary did not detect the export to the partner"]
        print("  the deliberate export was detected: otel-audit boundary exits 1")
        trail = ""
        for line in report.splitlines():
            if line.startswith("trail "):
                trail = line.split()[1]
            elif "VIOLATION" in line:
                break  # the trail just named holds the violation
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["trail", "--ledger", ledger_url, trail])
        print(f"  the export's trail {trail}:")
        for line in out.getvalue().splitlines():
            print(f"  | {line}")
        return []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
