"""Trails across services and into background work: the example shop as two real processes."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import pytest
import requests

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.semantics.effects import http_peer
from tests.plugins.flask_service import base_env

ALICE = ("alice", "alice-pw")


def sql(rec: Any) -> str:
    """The statement of a database record, old or stable semconv."""
    return str(rec.attr("db.query.text") or rec.attr("db.statement") or "")


def records(ledger_url: str, **filters: Any) -> list[Any]:
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        # Outcome records: each audited request also committed an intent before its view.
        return [r.record for r in ledger.query(Query(**filters)) if not r.record.attr(v.INTENT)]


def wait_for_records(ledger_url: str, predicate, timeout: float = 15.0) -> list[Any]:
    """Poll the ledger (with a deadline) until ``predicate(records)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = records(ledger_url)
        if predicate(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def shop(run_service, tmp_path: pathlib.Path):
    def start(trusted: str | None = "127.0.0.1/32", semconv: str = ""):
        ledger = f"sqlite:///{tmp_path / 'audit.db'}"
        extra = {"OTEL_AUDIT_TRUSTED_PEERS": trusted} if trusted else {}
        if semconv:
            extra["OTEL_SEMCONV_STABILITY_OPT_IN"] = semconv
        inventory = run_service(
            "otel_audit._demo.inventory:app", env=base_env(ledger, tmp_path, **extra)
        )
        orders = run_service(
            "otel_audit._demo.orders:app",
            env=base_env(ledger, tmp_path, SHOP_INVENTORY_URL=inventory.url, **extra),
        )
        return orders, inventory, ledger

    return start


# "" = the old semantic conventions; "http,database" = the stable ones.
@pytest.mark.parametrize("semconv", ["", "http,database"])
def test_trail_crosses_services_and_reaches_the_background_job(shop, semconv):
    orders, inventory, ledger = shop(semconv=semconv)
    reply = requests.post(orders.url + "/orders", json={"sku": "apple", "qty": 2}, auth=ALICE)
    assert reply.status_code == 201, reply.text
    got = wait_for_records(ledger, lambda rs: any(r.name == "INSERT" and r.service == "inventory"
                                                  and "restock" in sql(r)
                                                  for r in rs))  # fmt: skip
    (action,) = [r for r in got if r.service == "orders" and r.attr(v.EVENT)]
    trail = action.attr(v.TRAIL_ID)
    assert trail == action.span_id and action.attr(v.ACTION) == "order.create"
    assert action.attr(v.ACTOR_ID) == "alice" and action.attr(v.OUTCOME) == v.SUCCESS
    assert {r.attr(v.TRAIL_ID) for r in got} == {trail}
    assert {r.trace_id for r in got} == {action.trace_id}

    call = next(r for r in got if r.service == "orders" and r.attr(v.EFFECT) == v.HTTP_CALL)
    (served,) = [r for r in got if r.service == "inventory" and r.attr(v.EVENT)]
    # B's record links back to A's outbound call by trace and parent span id.
    assert served.parent_span_id == call.span_id and served.kind == "SERVER"
    assert served.attr(v.ACTION) == "stock.reserve" and served.attr(v.RESOURCE_ID) == "apple"
    # A is a trusted peer: B records the actor A authenticated.
    assert (served.attr(v.ACTOR_ID), served.attr(v.ACTOR_AUTH)) == ("alice", "trusted-peer")

    effects = sorted((r.service, r.attr(v.EFFECT), r.name) for r in got if not r.attr(v.EVENT))
    assert effects == [
        ("inventory", v.DATA_WRITE, "INSERT"),  # the notification's outbox row
        ("inventory", v.DATA_WRITE, "INSERT"),  # the background job's restock row
        ("inventory", v.DATA_WRITE, "UPDATE"),  # stock
        ("inventory", v.NOTIFICATION, "notify alice"),
        ("orders", v.DATA_WRITE, "INSERT"),  # the order
        ("orders", v.HTTP_CALL, "POST"),  # the call to inventory
    ]
    assert all(r.attr(v.ACTOR_ID) == "alice" for r in got)
    job = next(r for r in got if "restock" in sql(r))
    assert job.parent_span_id not in {r.span_id for r in got}  # below the CONSUMER span
    assert http_peer(call.attributes) == "127.0.0.1"
    stable = bool(semconv)
    assert (call.attr("http.request.method") is not None) is stable
    assert (job.attr("db.query.text") is not None) is stable


def test_untrusted_peer_gets_neither_the_trail_nor_the_actor(shop):
    orders, inventory, ledger = shop(trusted=None)
    assert requests.post(orders.url + "/orders", json={"sku": "pear", "qty": 1}, auth=ALICE).ok
    got = records(ledger)
    (served,) = [r for r in got if r.service == "inventory" and r.attr(v.EVENT)]
    (action,) = [r for r in got if r.service == "orders" and r.attr(v.EVENT)]
    (call,) = [r for r in got if r.service == "orders" and r.attr(v.EFFECT) == v.HTTP_CALL]
    # inventory starts a trail of its own; the records still link by trace context.
    assert served.attr(v.TRAIL_ID) == served.span_id != action.attr(v.TRAIL_ID)
    assert served.trace_id == action.trace_id and served.parent_span_id == call.span_id
    assert served.attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS and served.attr(v.ACTOR_ID) is None


def test_forged_actor_baggage_from_an_untrusted_client_is_ignored(shop):
    # inventory trusts only 10.9.9.9: our loopback client is not that peer.
    orders, inventory, ledger = shop(trusted="10.9.9.9/32")
    forged = {
        "baggage": "audit.actor.id=root,audit.actor.type=system",
        "X-Shop-Internal": "1",
    }
    reply = requests.post(inventory.url + "/stock/apple/reserve", json={"qty": 1}, headers=forged)
    assert reply.status_code == 200
    got = wait_for_records(ledger, lambda rs: any("restock" in sql(r)
                                                  for r in rs))  # fmt: skip
    (served,) = [r for r in got if r.attr(v.EVENT)]
    assert served.attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS
    assert all(r.attr(v.ACTOR_ID) != "root" for r in got)
    assert all("root" not in str(r.attributes) for r in got)
    notice = next(r for r in got if r.attr(v.EFFECT) == v.NOTIFICATION)
    assert notice.name == "notify unknown"


def test_forged_actor_baggage_is_ignored_even_next_to_a_real_login(shop):
    orders, inventory, ledger = shop()
    forged = {"baggage": "audit.actor.id=root,audit.actor.type=system"}
    reply = requests.post(
        orders.url + "/orders", json={"sku": "apple", "qty": 1}, auth=ALICE, headers=forged
    )
    assert reply.status_code == 201
    got = records(ledger)
    # orders believes its own login; the forged id is not forwarded to inventory either.
    assert {r.attr(v.ACTOR_ID) for r in got} == {"alice"}
