"""A Flask (any WSGI) app served over real HTTP on loopback by werkzeug: the ``serve`` fixture.

``serve(app)`` starts a threaded werkzeug server on a free port in a thread
and returns its base URL; every server is shut down at the end of the test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server


@pytest.fixture
def serve() -> Iterator[Any]:
    servers = []

    def start(app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
