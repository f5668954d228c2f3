"""The ledger interface contract, on SQLite and on a real PostgreSQL server alike."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query
from otel_audit.engine.record import Record, encode, record_from_span
from otel_audit.errors import AuditError, LedgerWriteError
from otel_audit.proof.chain import GENESIS, Checkpoint, link_hash
from otel_audit.proof.verify import verify_ledger


def span_bodies(n: int = 1, **attrs: object) -> list[bytes]:
    """Canonical bodies of ``n`` real SDK spans carrying awkward values."""
    provider = TracerProvider(shutdown_on_exit=False)
    tracer = provider.get_tracer("contract")
    bodies = []
    for i in range(n):
        with tracer.start_as_current_span("order.update", kind=SpanKind.SERVER) as span:
            span.set_attributes(
                {
                    v.EVENT: True,
                    v.ACTION: "order.update",
                    v.ACTOR_ID: "ålice \u2603",
                    v.RESOURCE_TYPE: "order",
                    v.RESOURCE_ID: str(i),
                    "nul": "a\x00b",
                    "float": 0.1,
                    "nan": float("nan"),
                    "list": [1, 2, 3],
                    "blob": b"\xff\x00",
                    **attrs,  # type: ignore[dict-item]
                }
            )
            span.add_event("checked", {"ok": True})
            span.set_status(Status(StatusCode.ERROR, "déjà \ud800 vu"))
        bodies.append(encode(record_from_span(span, "shop")))  # type: ignore[arg-type]
    return bodies


def rec(i: int, *, chain_service: str = "shop", start: int = 0, **attrs: object) -> bytes:
    return encode(
        Record(
            trace_id=f"{i:032x}",
            span_id=f"{i:016x}",
            parent_span_id=None,
            name="op",
            kind="INTERNAL",
            service=chain_service,
            start=start or 1_700_000_000_000_000_000 + i,
            end=1_700_000_000_000_000_000 + i + 1,
            attributes=dict(attrs),
        )
    )


def test_same_span_gives_same_bytes_and_hashes_on_both_backends(make_ledger):
    bodies = span_bodies(3)
    results = {}
    for kind in ("sqlite", "postgres"):
        ledger = make_ledger(kind)
        appended = ledger.append("shop/a", bodies)
        rows = list(ledger.scan("shop/a"))
        assert [r.body for r in rows] == bodies  # stored byte-exact
        assert [r.seq for r in rows] == [1, 2, 3]
        assert rows[0].prev_hash == GENESIS
        assert rows[0].hash == link_hash(GENESIS, bodies[0])
        assert [a.hash for a in appended] == [r.hash for r in rows]
        results[kind] = rows
        report = verify_ledger(ledger)
        assert report.records == 3
    assert results["sqlite"] == results["postgres"]


def test_append_scan_head_count_chains(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    assert ledger.head("a") is None and ledger.count() == 0 and ledger.chains() == []
    assert ledger.append("a", []) == []
    first = ledger.append("a", [rec(1), rec(2)])
    second = ledger.append("b", [rec(3)])
    third = ledger.append("a", [rec(4)])
    assert [(x.chain, x.seq) for x in first + second + third] == [
        ("a", 1), ("a", 2), ("b", 1), ("a", 3),
    ]  # fmt: skip
    assert third[0].hash == link_hash(first[1].hash, rec(4))
    assert ledger.head("a") == third[0]
    assert ledger.count() == 4
    assert ledger.chains() == ["a", "b"]
    assert [r.seq for r in ledger.scan("a", after_seq=1)] == [2, 3]
    assert [r.body for r in ledger.scan("a")] == [rec(1), rec(2), rec(4)]


def test_scan_pages_through_long_chains(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    bodies = [rec(i) for i in range(1, 4602)]
    ledger.append("long", bodies)
    rows = list(ledger.scan("long"))
    assert [r.seq for r in rows] == list(range(1, 4602))
    assert verify_ledger(ledger).records == 4601
    assert len(list(ledger.query(Query(chain="long")))) == 4601
    assert len(list(ledger.query(Query(chain="long", limit=2500)))) == 2500


def test_query_filters_order_and_cursor(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    ledger.append(
        "b",
        [
            rec(1, **{v.ACTOR_ID: "alice", v.ACTION: "order.create", v.RESOURCE_TYPE: "order",
                      v.RESOURCE_ID: "42", v.OUTCOME: "success", v.TRAIL_ID: "t1"}),
            rec(2, **{v.ACTOR_ID: "bob", v.ACTION: "order.update", v.RESOURCE_TYPE: "order",
                      v.RESOURCE_ID: "42", v.OUTCOME: "denied", v.TRAIL_ID: "t2"}),
        ],
    )  # fmt: skip
    ledger.append(
        "a",
        [
            rec(3, chain_service="billing", **{v.ACTOR_ID: "alice", v.ACTION: "invoice.send",
                                              v.RESOURCE_TYPE: "invoice", v.RESOURCE_ID: "7",
                                              v.TRAIL_ID: "t1", v.EFFECT: "notification"}),
            rec(4, chain_service="billing", **{v.ACTOR_ID: "carol"}),
        ],
    )  # fmt: skip

    def keys(**filters: object) -> list[tuple[str, int]]:
        return [(r.chain, r.seq) for r in ledger.query(Query(**filters))]  # type: ignore[arg-type]

    assert keys() == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert keys(actor="alice") == [("a", 1), ("b", 1)]
    assert keys(action="order.update") == [("b", 2)]
    assert keys(resource_type="order", resource_id="42") == [("b", 1), ("b", 2)]
    assert keys(outcome="denied") == [("b", 2)]
    assert keys(service="billing") == [("a", 1), ("a", 2)]
    assert keys(trail_id="t1") == [("a", 1), ("b", 1)]
    assert keys(trace_id=f"{2:032x}") == [("b", 2)]
    assert keys(chain="a", actor="carol") == [("a", 2)]
    base = 1_700_000_000_000_000_000
    assert keys(since=base + 2, until=base + 4) == [("a", 1), ("b", 2)]
    assert keys(after=("a", 2)) == [("b", 1), ("b", 2)]
    assert keys(after=("a", 1), limit=2) == [("a", 2), ("b", 1)]
    assert keys(actor="nobody") == []
    got = next(iter(ledger.query(Query(trail_id="t1", chain="a"))))
    assert got.record.attr(v.EFFECT) == "notification"
    assert got.body == rec(3, chain_service="billing", **{
        v.ACTOR_ID: "alice", v.ACTION: "invoice.send", v.RESOURCE_TYPE: "invoice",
        v.RESOURCE_ID: "7", v.TRAIL_ID: "t1", v.EFFECT: "notification"})  # fmt: skip


def test_awkward_span_values_are_stored_and_queryable(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    bodies = span_bodies(2)
    ledger.append("x", bodies)
    found = list(ledger.query(Query(actor="ålice \u2603", resource_id="1")))
    assert [r.body for r in found] == [bodies[1]]
    assert found[0].record.attributes["nul"] == "a\x00b"


def test_dedupe_skips_stored_and_repeated_spans(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    ledger.append("a", [rec(1), rec(2)])
    got = ledger.append("b", [rec(2), rec(3), rec(3), rec(4)], dedupe=True)
    assert [(x.chain, x.seq) for x in got] == [("b", 1), ("b", 2)]
    assert [r.body for r in ledger.scan("b")] == [rec(3), rec(4)]
    # Without dedupe the same span may be stored twice (the writer's own retries never do).
    assert len(ledger.append("b", [rec(4)])) == 1
    assert ledger.count() == 5


def test_checkpoints_round_trip_and_are_idempotent(make_ledger, ledger_kind):
    ledger = make_ledger(ledger_kind)
    appended = ledger.append("a", [rec(1), rec(2)])
    ledger.append("b", [rec(3)])
    one = Checkpoint("a", 2, appended[1].hash, 123, b"\x01" * 64, "kid", b"\x02" * 32)
    two = Checkpoint("a", 1, appended[0].hash, 100)
    ledger.add_checkpoint(one)
    ledger.add_checkpoint(one)
    ledger.add_checkpoint(two)
    ledger.add_checkpoint(Checkpoint("zz", 5, b"\x03" * 32, 7))  # a chain with no records
    assert ledger.checkpoints("a") == [two, one]
    assert [c.chain for c in ledger.checkpoints()] == ["a", "a", "zz"]
    assert ledger.chains() == ["a", "b", "zz"]


def test_reopened_ledger_keeps_everything(make_ledger, ledger_url_for, ledger_kind):
    url = ledger_url_for(ledger_kind)
    first = make_ledger(ledger_kind, url=url)
    first.append("a", [rec(1)])
    first.close()
    again = make_ledger(ledger_kind, url=url, readonly=True)
    assert [r.body for r in again.scan("a")] == [rec(1)]
    assert verify_ledger(again).records == 1


# -- a SQLite ledger file deleted or replaced under a running writer -----------------

_WRITER = """
import sys, time
from otel_audit.engine.ledger import open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.errors import LedgerWriteError

ledger = open_ledger(sys.argv[1])
i = 0
while True:
    i += 1
    body = encode(Record(trace_id=f"{i:032x}", span_id=f"{i:016x}", parent_span_id=None,
                         name="op", kind="INTERNAL", service="shop", start=i, end=i + 1,
                         attributes={}))
    try:
        ledger.append("shop", [body])
    except LedgerWriteError as exc:
        print("refused", i, exc, flush=True)
        try:
            ledger.append("shop", [body])   # every later commit is refused too
        except LedgerWriteError:
            print("refused again", flush=True)
        sys.exit(0)
    if i == 3:
        print("ready", flush=True)
    time.sleep(0.001)
"""


def _swap(path, how: str, tmp_path) -> None:
    if how == "deleted":
        os.remove(path)
    else:  # another valid database moved over it, as a restore or an attacker would
        other = tmp_path / "other.db"
        sqlite3.connect(other).close()
        os.replace(other, path)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_sqlite_file_swapped_under_a_writer_process_fails_every_commit(tmp_path, how) -> None:
    path = tmp_path / "audit.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        _swap(path, how, tmp_path)
        refused = writer.stdout.readline()
        assert refused.startswith("refused ") and "was deleted or replaced while open" in refused
        assert writer.stdout.readline() == "refused again\n"
        assert writer.wait(30) == 0
    finally:
        writer.kill()
        writer.wait()


def test_sqlite_file_deleted_under_audited_actions_refuses_them(tmp_path, make_pipeline) -> None:
    path = tmp_path / "audit.db"
    make_pipeline(ledger=f"sqlite:///{path}", durability="sync")
    with otel_audit.audit_action("order.update", resource=("order", 1)):
        pass
    os.remove(path)
    # The writer thread commits to the unlinked file and finds the path empty:
    # the action fails closed, and the ones after it are refused too.
    with pytest.raises(LedgerWriteError, match="was deleted or replaced while open"):
        with otel_audit.audit_action("order.update", resource=("order", 2)):
            pass
    for i in range(3):
        with pytest.raises(AuditError):
            with otel_audit.audit_action("order.update", resource=("order", 3 + i)):
                pass


SEARCHES = {
    "actor": (v.ACTOR_ID, "alice"),
    "action": (v.ACTION, "order.update"),
    "resource_type": (v.RESOURCE_TYPE, "order"),
    "trail_id": (v.TRAIL_ID, "t1"),
}


def _action_and_effects(i: int) -> list[bytes]:
    """An action's record and two effects' records, which carry no action or
    resource (and here, as for an anonymous request, no actor id)."""
    action = rec(3 * i + 1, **{v.ACTOR_ID: "alice", v.ACTION: "order.update",
                               v.RESOURCE_TYPE: "order", v.RESOURCE_ID: str(i), v.TRAIL_ID: "t1"})  # fmt: skip
    effects = [rec(3 * i + k, **{v.TRAIL_ID: "t1", v.EFFECT: "data.write"}) for k in (2, 3)]
    return [action, *effects]


def test_sqlite_query_indexes_answer_every_search_from_new_and_older_files(tmp_path):
    # The query indexes leave out records without the field (partial indexes):
    # searches must still be index searches, and find exactly the records that
    # have it. A file made before holds full indexes under the same names: it
    # answers the same, and its schema is not reported as altered.
    from otel_audit.engine.ledger import open_ledger

    former = {
        "records_trail": "records (trail_id)",
        "records_actor": "records (actor_id)",
        "records_resource": "records (resource_type, resource_id)",
        "records_action": "records (action)",
    }
    for made in ("new", "older"):
        path = tmp_path / f"{made}.db"
        with open_ledger(str(path)) as ledger:
            for i in range(20):
                ledger.append("shop", _action_and_effects(i))
        if made == "older":
            with sqlite3.connect(path) as con:
                for name, on in former.items():
                    con.execute(f"DROP INDEX {name}")
                    con.execute(f"CREATE INDEX {name} ON {on}")
        with open_ledger(str(path), readonly=True) as ledger:
            assert ledger.schema_problems() == [], made
            assert verify_ledger(ledger).records == 60
            for field, (name, value) in SEARCHES.items():
                found = [r.seq for r in ledger.query(Query(**{field: value}))]
                expected = 60 if name == v.TRAIL_ID else 20
                assert len(found) == expected, (made, field)
        with sqlite3.connect(path) as con:
            for column, index in (("actor_id", "records_actor"), ("action", "records_action"),
                                  ("trail_id", "records_trail"), ("resource_type", "records_resource")):  # fmt: skip
                plan = " ".join(
                    str(row[-1])
                    for row in con.execute(
                        f"EXPLAIN QUERY PLAN SELECT chain, seq FROM records WHERE {column} = ?"
                        " ORDER BY chain, seq",
                        ("x",),
                    )
                )
                assert f"USING INDEX {index}" in plan, (made, plan)
            # How many entries each index holds (ANALYZE counts them; run after the
            # plans, which its statistics change): a new file's hold only the
            # records that have the field.
            con.execute("ANALYZE")
            entries = {
                str(index): int(str(stat).split()[0])
                for index, stat in con.execute("SELECT idx, stat FROM sqlite_stat1")
            }
            full = made == "older"
            assert entries["records_actor"] == (60 if full else 20)
            assert entries["records_action"] == (60 if full else 20)
            assert entries["records_resource"] == (60 if full else 20)
            assert entries["records_trail"] == 60
            assert entries["records_trace"] == 60


def test_sqlite_a_query_index_of_another_definition_is_reported(tmp_path):
    # An index that differs from both this version's and the former one
    # (here leaving one actor out) is reported, as any schema change is.
    from otel_audit.engine.ledger import open_ledger

    path = tmp_path / "altered.db"
    with open_ledger(str(path)) as ledger:
        ledger.append("shop", _action_and_effects(0))
    with sqlite3.connect(path) as con:
        con.execute("DROP INDEX records_actor")
        con.execute("CREATE INDEX records_actor ON records (actor_id) WHERE actor_id <> 'mallory'")
    with open_ledger(str(path), readonly=True) as ledger:
        assert ledger.schema_problems() == [
            "index records_actor differs from the one this version creates"
        ]
