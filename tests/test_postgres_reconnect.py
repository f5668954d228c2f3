"""A connection lost around COMMIT: the append is resolved by reading back, never duplicated.

A real TCP proxy on loopback sits between the ledger and the real server and
cuts the connection at the exact moment that matters: after forwarding COMMIT
(the server commits, the reply is lost) or instead of forwarding it (the
server rolls back).
"""

from __future__ import annotations

import socket
import threading

import pytest

from otel_audit.engine.ledger.postgres import PostgresLedger
from otel_audit.errors import LedgerWriteError
from otel_audit.proof.verify import verify_ledger

from .test_ledger_backends import rec

COMMIT = b"COMMIT\x00"
# An append that continues from the head it remembers is one autocommit COPY:
# its CopyDone message commits it, and the reply to it is the COMMIT's.
COPY_DONE = b"c\x00\x00\x00\x04"


class CuttingProxy:
    """Forwards 127.0.0.1:port to the server; ``arm(mode, marker)`` cuts the next message
    holding ``marker`` (a COMMIT by default).

    ``after``: forward the COMMIT, wait for the server's reply, drop it and
    close the client side. ``before``: close both sides without forwarding it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode: str | None = None
        self.marker = COMMIT
        self.refuse = False  # True: accept and hang up at once, like a server that is away
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, marker: bytes = COMMIT) -> None:
        with self._lock:
            self.mode = mode
            self.marker = marker
            self.cut.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                _close(client)
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._socks += [client, server]
            state = {"commit_sent": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                _close(server)
                return
            with self._lock:
                mode = self.mode if self.marker in data else None
                if mode:
                    self.mode = None
            if mode == "before":
                _close(client, server)
                self.cut.set()
                return
            if mode == "after":
                state["commit_sent"] = True
            try:
                server.sendall(data)
            except OSError:
                return

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                return
            if not data:
                _close(client)
                return
            if state["commit_sent"]:
                # The server has answered the COMMIT: it is durable. The client never hears it.
                _close(client, server)
                self.cut.set()
                return
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        _close(*self._socks)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture
def proxied(pg_url, pg_server):
    proxy = CuttingProxy(pg_server.port)
    url = pg_url.replace(f":{pg_server.port}/", f":{proxy.port}/")
    yield proxy, url
    proxy.close()


@pytest.mark.parametrize("path", ["locked", "remembered head"])
@pytest.mark.parametrize("mode", ["after", "before"])
def test_lost_commit_is_resolved_without_loss_or_duplicate(proxied, pg_url, mode, path):
    proxy, url = proxied
    first = PostgresLedger(pg_url)
    ledger = PostgresLedger(url, retry_seconds=10)
    try:
        if path == "locked":
            # A ledger's first append to a chain reads the head under the lock
            # in a transaction (BEGIN ... COMMIT).
            first.append("c", [rec(1)])
            proxy.arm(mode)
        else:
            # Later ones continue from the head it wrote: one autocommit COPY.
            ledger.append("c", [rec(1)])
            proxy.arm(mode, COPY_DONE)
        appended = ledger.append("c", [rec(2), rec(3)])
        assert proxy.cut.is_set()  # the connection really was cut at the commit
        assert [(a.seq) for a in appended] == [2, 3]
        ledger.append("c", [rec(4)])
    finally:
        ledger.close()
        first.close()
    direct = PostgresLedger(pg_url, readonly=True)
    try:
        assert [r.body for r in direct.scan("c")] == [rec(1), rec(2), rec(3), rec(4)]
        assert [a.hash for a in appended] == [r.hash for r in list(direct.scan("c"))[1:3]]
        assert verify_ledger(direct).records == 4
    finally:
        direct.close()


def test_unknown_outcome_is_settled_by_the_next_append(proxied, pg_url, pg_server):
    """The server stays away past the retry window: the append fails, then a retry of the
    same records (as the writer does for async records) stores them once."""
    proxy, url = proxied
    ledger = PostgresLedger(url, retry_seconds=0.5)
    try:
        ledger.append("c", [rec(1)])
        proxy.refuse = True  # no reconnect possible
        proxy.arm("after", COPY_DONE)  # the append continues from its remembered head
        with pytest.raises(LedgerWriteError, match=r"failed \(commit outcome unknown\)"):
            ledger.append("c", [rec(2), rec(3)])
        assert proxy.cut.is_set()
        # The server is back: the same records again are found committed, not re-added.
        proxy.refuse = False
        again = ledger.append("c", [rec(2), rec(3), rec(4)])
        assert [a.seq for a in again] == [2, 3, 4]
        assert [r.body for r in ledger.scan("c")] == [rec(1), rec(2), rec(3), rec(4)]
    finally:
        ledger.close()
