"""A real ``otel-audit serve`` (HTTP and gRPC on loopback, free ports), as the ``make_server`` fixture."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from otel_audit.transport.serve import AuditServer


@pytest.fixture
def make_server(tmp_path: pathlib.Path) -> Iterator[Callable[..., AuditServer]]:
    """Factory: a started AuditServer on a SQLite ledger; every one is stopped at teardown."""
    servers: list[AuditServer] = []

    def make(
        ledger: str | None = None,
        http: tuple[str, int] | None = ("127.0.0.1", 0),
        grpc_address: tuple[str, int] | None = ("127.0.0.1", 0),
        **options: Any,
    ) -> AuditServer:
        server = AuditServer(
            ledger or f"sqlite:///{tmp_path / 'serve.db'}",
            http_address=http,
            grpc_address=grpc_address,
            **options,
        ).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        try:
            server.stop(grace=0.5)
        except Exception:  # already stopped by the test
            pass
