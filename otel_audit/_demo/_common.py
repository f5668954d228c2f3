"""Shared parts of the example services: users, SQLite helpers, the route table, main()."""

from __future__ import annotations

import argparse
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import flask
from flask import g, request

#: Demo users: name -> (password, roles). Only "customer" may change orders.
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("alice-pw", ("customer",)),
    "bob": ("bob-pw", ("viewer",)),
}

#: (rule, methods, view): each service's whole HTTP surface, one line per route,
#: so a new endpoint is one function and one line.
Route = tuple[str, Sequence[str], Callable[..., Any]]


def data_dir() -> str:
    return os.environ.get("SHOP_DATA_DIR", ".")


def connect(name: str) -> sqlite3.Connection:
    # sqlite3.connect looked up at call time: the instrumentation patches it.
    return sqlite3.connect(os.path.join(data_dir(), name), timeout=30)


def run_sql(name: str, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
    """Run statements in one transaction through a cursor (the traced path); return last rows."""
    con = connect(name)
    try:
        cur = con.cursor()
        rows: list[Any] = []
        for sql, params in statements:
            cur.execute(sql, tuple(params))
            rows = cur.fetchall()
        con.commit()
        return [cur.lastrowid, cur.rowcount, rows]
    finally:
        con.close()


def init_db(name: str, schema: str) -> None:
    con = sqlite3.connect(os.path.join(data_dir(), name), timeout=30)
    try:
        # WAL (kept in the file): many request threads in several worker
        # processes read and write at once. In the default rollback-journal
        # mode, commits under that load (benchmarks/bench_flask.py, with or
        # without OpenTelemetry) sometimes failed with "disk I/O error".
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(schema)
        con.commit()
    finally:
        con.close()


def authenticate() -> Any:
    """before_request: HTTP basic auth against USERS; sets flask.g.user or answers 401."""
    if request.endpoint == "healthz":
        return None
    auth = request.authorization
    known = USERS.get(auth.username or "") if auth is not None else None
    if auth is None or known is None or auth.password != known[0]:
        # Service-to-service calls carry no user credentials: a request from
        # a peer the shop trusts is let through without a local user.
        if request.headers.get("X-Shop-Internal") == "1" and request.remote_addr == "127.0.0.1":
            return None
        return flask.Response("login required\n", 401, {"WWW-Authenticate": 'Basic realm="shop"'})
    g.user = {"id": auth.username, "username": auth.username, "roles": list(known[1])}
    return None


def healthz() -> Any:
    return {"ok": True}


def create_app(name: str, routes: Sequence[Route], schema: str, db_name: str) -> flask.Flask:
    app = flask.Flask(name)
    init_db(db_name, schema)
    app.before_request(authenticate)
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    for rule, methods, view in routes:
        app.add_url_rule(rule, view.__name__, view, methods=list(methods))
    return app


def main(app: flask.Flask, argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
