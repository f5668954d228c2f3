"""Fixtures for a real PostgreSQL server, and ledgers on both backends.

``pg_server`` (session): a throwaway cluster started from the machine's
PostgreSQL packages (see tests/pgserver.py); missing binaries fail the tests
that need it loudly, never skip them. ``pg_url`` (function): the URL of a
fresh database. ``make_ledger(kind)``: open a new ledger of kind ``sqlite`` or
``postgres``; ``ledger_kind`` is parametrized over both for contract tests.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable, Iterator

import pytest

from otel_audit.engine.ledger import Ledger, open_ledger
from tests.pgserver import PostgresServer, PostgresUnavailable

_counter = itertools.count(1)
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the test server (superuser URL)."""
    # The server may have been stopped by a test that checks outages: bring it back.
    try:
        return pg_server.create_database(f"audit_{next(_counter)}")
    except Exception:  # noqa: BLE001 - any failure: the server is down
        pg_server.start()
        return pg_server.create_database(f"audit_{next(_counter)}")


@pytest.fixture(params=BACKENDS)
def ledger_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger_url_for(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Callable[[str], str]:
    """Factory: the URL of a new, empty ledger of ``kind`` (sqlite or postgres)."""
    n = itertools.count(1)

    def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'ledger-{next(n)}.db'}"
        if kind == "postgres":
            return str(
                request.getfixturevalue("pg_server").create_database(f"audit_{next(_counter)}")
            )
        raise ValueError(f"unknown ledger kind {kind!r}")

    return make


@pytest.fixture
def make_ledger(ledger_url_for: Callable[[str], str]) -> Iterator[Callable[..., Ledger]]:
    """Factory: ``make_ledger(kind)`` opens a new, empty ledger; all closed at teardown."""
    opened: list[Ledger] = []

    def make(kind: str, url: str | None = None, **kwargs: object) -> Ledger:
        ledger = open_ledger(url or ledger_url_for(kind), **kwargs)  # type: ignore[arg-type]
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()
