"""In-process WSGI servers on loopback: the ``serve_wsgi`` factory fixture.

``serve_wsgi()`` binds a threading WSGI server to 127.0.0.1 on a free port and
returns it at once (so its URL can go into a policy before the app exists);
``server.set_app(app)`` then serves ``app``. Every server is shut down at the
end of the test.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import pytest


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


@pytest.fixture
def serve_wsgi() -> Iterator[Callable[[], _Server]]:
    started: list[tuple[_Server, threading.Thread]] = []

    def serve() -> _Server:
        server = _Server(("127.0.0.1", 0), _QuietHandler)
        server.set_app(lambda environ, start: [])  # replaced by the test
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        started.append((server, thread))
        return server

    yield serve
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)
