"""The example inventory service with two bare durable commits per request: the floor
``bench_flask.py`` measures beside the audited run.

One row is committed before the app runs and four after it, before the reply
is returned (the request record before the view, then its effects and its
own record: five records, two commits, as the audited service writes them),
each commit an autocommit INSERT into a plain SQLite table in WAL mode with
synchronous=FULL (one fsync), the file shared by every worker process like
the ledger. Nothing else: no records built from spans, no policy, no hash
chain, no query index, no checks. What the audit's durability alone costs
this service, done barely: each request commits on its own (at this load the
audited writer groups little across requests either: about 2.5 records per
commit), so a design grouping more could come in a little under it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

from otel_audit._demo.inventory import app as inventory

_BODY = b"x" * 600  # about an audit record's size
_local = threading.local()


def _commit(rows: int) -> None:
    con = getattr(_local, "con", None)
    if con is None:
        path = os.path.join(os.environ["SHOP_DATA_DIR"], "bare.db")
        con = _local.con = sqlite3.connect(path, isolation_level=None, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE IF NOT EXISTS records (body BLOB NOT NULL)")
    con.execute("INSERT INTO records (body) VALUES " + ",".join(["(?)"] * rows), [_BODY] * rows)


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    _commit(1)
    reply = inventory(environ, start_response)
    try:
        body = b"".join(reply)
    finally:
        close = getattr(reply, "close", None)
        if close is not None:
            close()
    _commit(4)
    return [body]
