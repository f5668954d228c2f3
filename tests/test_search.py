"""``otel-audit search`` on both backends: filters and pagination against hand-counted records."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest

from otel_audit import audit_action
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import Query, open_ledger


@dataclass
class Fixture:
    url: str
    mid: int  # ns between phase 1 and phase 2
    trail: str  # the trail of alice's first order.create (2 records)
    trace: str


def build(make_pipeline, url: str) -> Fixture:
    """Two services, chains 'shop' and 'billing' (fixed, so both backends name them alike).

    phase 1 (shop)
      1 alice order.create order/1 success  + its data.write effect (actor alice, no action)
      2 alice order.update order/1 success
      3 alice order.delete order/2 denied
      4 bob   order.create order/2 success
      5 bob   user.login   (no resource)  failure
    phase 2
      6 alice order.update order/2 success            (shop)
      7 carol invoice.create invoice/7 success        (billing)
      8 alice invoice.read invoice/7 success          (billing)
    shop: 7 records, billing: 2.
    """
    shop, p1, _ = make_pipeline(url, service_name="shop", chain="shop")
    billing, p2, _ = make_pipeline(url, service_name="billing", chain="billing")
    t1, t2 = p1.get_tracer("shop"), p2.get_tracer("billing")
    with audit_action("order.create", resource=("order", "1"), actor="alice", tracer=t1) as act:
        trail = str(act.trail_id)
        trace = format(act.span.get_span_context().trace_id, "032x")
        with t1.start_as_current_span(
            "INSERT orders", attributes={"db.system": "sqlite", "db.operation.name": "INSERT"}
        ):
            pass
    with audit_action("order.update", resource=("order", "1"), actor="alice", tracer=t1):
        pass
    with audit_action("order.delete", resource=("order", "2"), actor="alice", tracer=t1) as act:
        act.deny("not the owner")
    with audit_action("order.create", resource=("order", "2"), actor="bob", tracer=t1):
        pass
    with audit_action("user.login", actor="bob", tracer=t1) as act:
        act.fail("bad password")
    time.sleep(0.002)  # distinct clock readings around the boundary, not synchronisation
    mid = time.time_ns()
    time.sleep(0.002)
    with audit_action("order.update", resource=("order", "2"), actor="alice", tracer=t1):
        pass
    with audit_action("invoice.create", resource=("invoice", "7"), actor="carol", tracer=t2):
        pass
    with audit_action("invoice.read", resource=("invoice", "7"), actor="alice", tracer=t2):
        pass
    shop.shutdown()
    billing.shutdown()
    return Fixture(url, mid, trail, trace)


@pytest.fixture
def fx(make_pipeline, ledger_kind, ledger_url_for) -> Fixture:
    return build(make_pipeline, ledger_url_for(ledger_kind))


def _iso(ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat()


def search(capsys, url: str, *args: str) -> tuple[list[dict], str]:
    assert main(["search", "--ledger", url, "--format", "jsonl", *args]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_filters_match_hand_counts(fx: Fixture, capsys) -> None:
    def n(*args: str) -> int:
        return len(search(capsys, fx.url, "--limit", "0", *args)[0])

    assert n() == 9
    assert n("--actor", "alice") == 6
    assert n("--actor", "bob") == 2
    assert n("--actor", "carol") == 1
    assert n("--actor", "nobody") == 0
    assert n("--action", "order.update") == 2
    assert n("--action", "order.create") == 2
    assert n("--resource-type", "order") == 5
    assert n("--resource-type", "order", "--resource-id", "2") == 3
    assert n("--resource-id", "7") == 2
    assert n("--outcome", "denied") == 1
    assert n("--outcome", "failure") == 1
    assert n("--outcome", "success") == 6
    assert n("--service", "billing") == 2
    assert n("--chain", "shop") == 7
    assert n("--trail", fx.trail) == 2
    assert n("--trace-id", fx.trace) == 2
    assert n("--trace-id", fx.trace.upper()) == 2
    assert n("--since", _iso(fx.mid)) == 3
    assert n("--until", _iso(fx.mid)) == 6
    assert n("--actor", "alice", "--since", _iso(fx.mid)) == 2
    assert n("--actor", "alice", "--action", "order.update", "--resource-id", "2") == 1
    assert n("--since", "1h") == 9
    assert n("--since", "7d", "--until", "1h") == 0
    rows, _ = search(capsys, fx.url, "--outcome", "denied")
    assert (rows[0]["attributes"][v.ACTOR_ID], rows[0]["attributes"][v.REASON]) == (
        "alice",
        "not the owner",
    )


def test_pages_are_stable_and_complete(fx: Fixture, capsys) -> None:
    everything, _ = search(capsys, fx.url, "--limit", "0")
    order = [(r["chain"], r["seq"]) for r in everything]
    assert order == [("billing", 1), ("billing", 2)] + [("shop", s) for s in range(1, 8)]
    seen: list[tuple[str, int]] = []
    after: list[str] = []
    pages = 0
    while True:
        rows, err = search(capsys, fx.url, "--limit", "4", *after)
        seen += [(r["chain"], r["seq"]) for r in rows]
        pages += 1
        if not err:
            break
        cursor = err.strip().rsplit(" ", 1)[1]
        assert cursor == f"{rows[-1]['chain']}:{rows[-1]['seq']}"
        after = ["--after", cursor]
    assert pages == 3 and seen == order
    # Filtered pages continue inside the filter.
    rows, err = search(capsys, fx.url, "--actor", "alice", "--limit", "2")
    assert [(r["chain"], r["seq"]) for r in rows] == [("billing", 2), ("shop", 1)]
    assert err == "more records: continue with --after shop:1\n"
    rows, err = search(capsys, fx.url, "--actor", "alice", "--limit", "10", "--after", "shop:1")
    assert [(r["chain"], r["seq"]) for r in rows] == [
        ("shop", 2),
        ("shop", 3),
        ("shop", 4),
        ("shop", 7),
    ]
    assert err == ""


def test_pages_do_not_shift_while_writers_append(fx: Fixture, make_pipeline, capsys) -> None:
    first, err = search(capsys, fx.url, "--chain", "shop", "--limit", "3")
    cursor = err.strip().rsplit(" ", 1)[1]
    pipeline, provider, _ = make_pipeline(fx.url, service_name="shop", chain="shop")
    with audit_action(
        "order.create", resource=("order", "9"), actor="dave", tracer=provider.get_tracer("t")
    ):
        pass
    pipeline.shutdown()
    rest, _ = search(capsys, fx.url, "--chain", "shop", "--limit", "0", "--after", cursor)
    assert [r["seq"] for r in first] == [1, 2, 3]
    assert [r["seq"] for r in rest] == [4, 5, 6, 7, 8]


def test_table_output(fx: Fixture, capsys) -> None:
    assert main(["search", "--ledger", fx.url, "--outcome", "denied"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split() == [
        "TIME",
        "RECORD",
        "SERVICE",
        "ACTOR",
        "ACTION",
        "RESOURCE",
        "OUTCOME",
        "EFFECT",
        "TRAIL",
        "CHECK",
    ]
    cells = lines[1].split()
    assert cells[1:][:7] == ["shop:4", "shop", "alice", "order.delete", "order", "2", "denied"]
    assert out.err == ""
    assert main(["search", "--ledger", fx.url, "--actor", "nobody"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == "no records match\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--since", "yesterday"],
            "--since 'yesterday' is neither ISO 8601 nor relative like 7d, 12h, 30m",
        ),
        (["--after", "shop"], "--after 'shop' is not a cursor like CHAIN:SEQ (printed by search)"),
        (["--trace-id", "xyz"], "--trace-id 'xyz' is not 32 hexadecimal digits"),
        (["--limit", "-1"], "--limit must be 0 (all) or a positive number"),
        (["--since", "1h", "--until", "2h"], "--since must be earlier than --until"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    open_ledger(url).close()
    assert main(["search", "--ledger", url, *args]) == 2
    assert capsys.readouterr().err == f"otel-audit: {message}\n"


def test_query_interface_cursor_on_both_backends(fx: Fixture) -> None:
    with open_ledger(fx.url, readonly=True) as ledger:
        got = [
            (s.chain, s.seq) for s in ledger.query(Query(actor="alice", after=("shop", 2), limit=2))
        ]
    assert got == [("shop", 3), ("shop", 4)]
