"""``otel-audit trail``: one trail across two services, as a tree, JSON and verified."""

from __future__ import annotations

import json
import pathlib
import sqlite3
from dataclasses import dataclass, field

from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from otel_audit import Actor, audit_action
from otel_audit import vocabulary as v
from otel_audit.cli import main
from otel_audit.engine.ledger import open_ledger
from otel_audit.proof.keys import generate_keypair
from otel_audit.review.trail import DAMAGED, INTACT, UNANCHORED, find_trail


@dataclass
class Shop:
    url: str
    path: pathlib.Path
    public_key: pathlib.Path
    trails: list[str] = field(default_factory=list)
    denied_trail: str = ""


def run_shop(
    make_pipeline,
    tmp_path: pathlib.Path,
    orders: int = 1,
    checkpoint_every: int = 1000,
    url: str | None = None,
) -> Shop:
    """Two services on one ledger (one chain each): per order 3 records in each chain.

    orders:    alice|bob did order.create on order N; data.write INSERT orders; http.call POST inventory
    inventory: orders did inventory.reserve on sku A1; data.write UPDATE stock; notification
    then one denied action: bob did order.delete on order 0 (denied), 1 record in orders.
    """
    key, pub = tmp_path / "signing.key", tmp_path / "signing.pub"
    if not key.exists():
        generate_keypair(key, pub)
    path = tmp_path / "audit.db"
    url = url or f"sqlite:///{path}"
    opts = {"signing_key": str(key), "checkpoint_every": checkpoint_every}
    shop = Shop(url, path, pub)
    p_orders, prov1, _ = make_pipeline(url, service_name="orders", **opts)
    p_inv, prov2, _ = make_pipeline(url, service_name="inventory", **opts)
    t1, t2 = prov1.get_tracer("orders"), prov2.get_tracer("inventory")
    for i in range(orders):
        who = "alice" if i % 2 == 0 else "bob"
        with audit_action("order.create", resource=("order", str(i)), actor=who, tracer=t1) as act:
            with t1.start_as_current_span(
                "INSERT orders",
                kind=SpanKind.CLIENT,
                attributes={"db.system": "sqlite", "db.query.text": "INSERT INTO orders VALUES (?)",
                            "db.collection.name": "orders"},
            ):  # fmt: skip
                pass
            with t1.start_as_current_span(
                "POST",
                kind=SpanKind.CLIENT,
                attributes={"http.request.method": "POST", "server.address": "inventory"},
            ):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                remote = propagate.extract(carrier)
                # The inventory service's server span is traced, not audited: its
                # records attach to the nearest recorded ancestor (the http.call).
                with (
                    t2.start_as_current_span("POST /reserve", context=remote, kind=SpanKind.SERVER),
                    audit_action(
                        "inventory.reserve",
                        resource=("sku", "A1"),
                        actor=Actor("orders", v.ACTOR_SERVICE),
                        tracer=t2,
                    ),
                ):
                    with t2.start_as_current_span(
                        "UPDATE stock",
                        kind=SpanKind.CLIENT,
                        attributes={"db.system": "sqlite", "db.operation.name": "UPDATE",
                                    "db.collection.name": "stock"},
                    ):  # fmt: skip
                        pass
                    with t2.start_as_current_span(
                        "notify customer", attributes={v.EFFECT: v.NOTIFICATION}
                    ):
                        pass
            shop.trails.append(str(act.trail_id))
    with audit_action("order.delete", resource=("order", "0"), actor="bob", tracer=t1) as act:
        act.deny("not the owner")
        shop.denied_trail = str(act.trail_id)
    p_orders.shutdown()
    p_inv.shutdown()
    return shop


EXPECTED_TREE = [
    "alice did order.create on order 0 (success)",
    "  data.write INSERT orders",
    "  http.call POST inventory",
    "    orders did inventory.reserve on sku A1 (success)",
    "      data.write UPDATE stock",
    "      notification notify customer",
]
EXPECTED_SERVICES = ["orders", "orders", "orders", "inventory", "inventory", "inventory"]


def test_text_tree_across_services(
    make_pipeline, tmp_path, capsys, ledger_kind, ledger_url_for
) -> None:
    # Both backends; on PostgreSQL each service instance has its own chain name.
    shop = run_shop(make_pipeline, tmp_path, orders=2, url=ledger_url_for(ledger_kind))
    assert main(["trail", "--ledger", shop.url, shop.trails[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("[")[0].rstrip() for line in lines] == EXPECTED_TREE
    assert [line.rsplit("[", 1)[1].rstrip("]") for line in lines] == EXPECTED_SERVICES
    # The second order is bob's and is a separate trail.
    assert main(["trail", "--ledger", shop.url, shop.trails[1]]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("bob did order.create on order 1 (success)") and len(out.splitlines()) == 6
    )


def test_json_has_tree_fields_and_verification(
    make_pipeline, tmp_path, capsys, ledger_kind, ledger_url_for
) -> None:
    shop = run_shop(make_pipeline, tmp_path, url=ledger_url_for(ledger_kind))
    assert main(["trail", "--ledger", shop.url, shop.trails[0], "--format", "json",
                 "--public-key", str(shop.public_key)]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["trail_id"] == shop.trails[0] and data["records"] == 6 and data["verified"]
    root = data["roots"][0]
    assert (root["actor"], root["action"], root["resource_id"], root["outcome"]) == (
        "alice",
        "order.create",
        "0",
        "success",
    )
    assert [c["effect"] for c in root["children"]] == [v.DATA_WRITE, v.HTTP_CALL]
    reserve = root["children"][1]["children"][0]
    assert reserve["service"] == "inventory" and reserve["attached"] == "ancestor"
    assert [c["effect"] for c in reserve["children"]] == [v.DATA_WRITE, v.NOTIFICATION]

    def statuses(node):
        yield node["verification"]["status"]
        for c in node["children"]:
            yield from statuses(c)

    # Shutdown wrote a final signed checkpoint per chain: everything is covered.
    assert set(statuses(root)) == {INTACT}


def test_denied_action_and_unknown_trail(make_pipeline, tmp_path, capsys) -> None:
    shop = run_shop(make_pipeline, tmp_path)
    assert main(["trail", "--ledger", shop.url, shop.denied_trail]) == 0
    assert capsys.readouterr().out.startswith("bob did order.delete on order 0 (denied)")
    assert main(["trail", "--ledger", shop.url, "nosuchtrail"]) == 2
    err = capsys.readouterr().err
    assert err == "otel-audit: no records of trail 'nosuchtrail' in the ledger\n"


def test_damage_marks_records_from_the_first_damage_on(make_pipeline, tmp_path) -> None:
    shop = run_shop(make_pipeline, tmp_path, orders=2)
    # Rewrite inventory record 2 (UPDATE stock of the first order) in place.
    con = sqlite3.connect(shop.path)
    body = con.execute("SELECT body FROM records WHERE chain='inventory' AND seq=1").fetchone()[0]
    con.execute(
        "UPDATE records SET body = ? WHERE chain='inventory' AND seq=1",
        (body.replace(b"UPDATE", b"DELETE"),),
    )
    con.commit()
    con.close()
    from otel_audit.proof.keys import load_public_key
    from otel_audit.review.trail import verify_trail

    with open_ledger(shop.url, readonly=True) as ledger:
        trail = find_trail(ledger, shop.trails[0])
        verify_trail(ledger, trail, load_public_key(shop.public_key))
    by_service = {(n.stored.chain, n.stored.seq): n.status for _, n in trail.nodes()}
    assert {k: s for k, s in by_service.items() if k[0] == "orders"} == {
        ("orders", 1): INTACT, ("orders", 2): INTACT, ("orders", 3): INTACT,
    }  # fmt: skip
    inv = {k[1]: s for k, s in by_service.items() if k[0] == "inventory"}
    assert inv == {1: DAMAGED, 2: DAMAGED, 3: DAMAGED}


def test_unanchored_records_are_marked(make_pipeline, tmp_path) -> None:
    # No signed checkpoint yet: the verifier cannot vouch beyond the chain itself.
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}"
    _pipeline, provider, _ = make_pipeline(url, service_name="orders", checkpoint_every=10_000)
    with audit_action("order.create", actor="alice", tracer=provider.get_tracer("t")) as act:
        trail_id = act.trail_id  # sync durability: committed when the block ends
    with open_ledger(url, readonly=True) as ledger:
        from otel_audit.review.trail import verify_trail

        trail = find_trail(ledger, str(trail_id))
        verify_trail(ledger, trail)
        assert [n.status for _, n in trail.nodes()] == [UNANCHORED]


def test_missing_ledger_is_one_line(tmp_path, capsys) -> None:
    assert main(["trail", "--ledger", str(tmp_path / "none.db"), "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def _forge_unsigned(path: pathlib.Path, chain: str) -> None:
    """An insider rewrites the actor in ``chain``, recomputes every later hash and the
    checkpoints (head and Merkle root), but cannot sign: the signatures are dropped."""
    from otel_audit.proof.chain import GENESIS, link_hash
    from otel_audit.proof.merkle import Frontier

    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT seq, body FROM records WHERE chain=? ORDER BY seq", (chain,)
    ).fetchall()
    prev, tree, heads = GENESIS, Frontier(), {}
    for seq, body in rows:
        body = body.replace(b'"alice"', b'"carol"')
        digest = link_hash(prev, body)
        tree.append(body)
        con.execute(
            "UPDATE records SET body=?, prev_hash=?, hash=? WHERE chain=? AND seq=?",
            (body, prev, digest, chain, seq),
        )
        heads[seq] = (digest, tree.root())
        prev = digest
    for (seq,) in con.execute("SELECT seq FROM checkpoints WHERE chain=?", (chain,)).fetchall():
        con.execute(
            "UPDATE checkpoints SET head=?, merkle_root=?, signature=NULL WHERE chain=? AND seq=?",
            (*heads[seq], chain, seq),
        )
    con.commit()
    con.close()


def test_bad_signature_damages_the_whole_chain_and_exits_1(make_pipeline, tmp_path, capsys) -> None:
    shop = run_shop(make_pipeline, tmp_path)  # one checkpoint per chain, at its last record
    _forge_unsigned(shop.path, "orders")
    key = ["--public-key", str(shop.public_key)]
    assert main(["verify", "--ledger", shop.url, *key]) == 1
    assert "chain 'orders' seq 4: bad signature" in capsys.readouterr().err
    # JSON: every record of the forged chain is damaged (the forger recomputed
    # the hashes, so only the missing signature tells); inventory is intact.
    out = tmp_path / "trail.json"
    assert main(["trail", "--ledger", shop.url, shop.trails[0], "--format", "json",
                 "-o", str(out), *key]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "otel-audit: 3 of 6 records of the trail are damaged: chain 'orders' seq 4:"
        " bad signature: checkpoint at seq 4 is not signed"
    )
    data = json.loads(out.read_text())  # the report is still written, whole
    assert data["verified"] and data["roots"][0]["actor"] == "carol"

    def statuses(node):
        yield (node["chain"], node["seq"]), node["verification"]["status"]
        for c in node["children"]:
            yield from statuses(c)

    assert dict(statuses(data["roots"][0])) == {
        ("orders", 1): DAMAGED, ("orders", 2): DAMAGED, ("orders", 3): DAMAGED,
        ("inventory", 1): INTACT, ("inventory", 2): INTACT, ("inventory", 3): INTACT,
    }  # fmt: skip
    # Text (verified with the key) and HTML: the same exit code, the marks shown.
    assert main(["trail", "--ledger", shop.url, shop.trails[0], *key]) == 1
    text = capsys.readouterr().out
    assert text.count("<damaged>") == 3
    assert main(["trail", "--ledger", shop.url, shop.trails[0], "--format", "html", *key]) == 1
    assert capsys.readouterr().out.count('data-status="damaged"') == 3
    # Without the key, the recomputed chain verifies: nothing can tell.
    assert main(["trail", "--ledger", shop.url, shop.trails[0], "--format", "json"]) == 0


def test_a_chain_break_exits_1_and_keeps_earlier_records(make_pipeline, tmp_path, capsys) -> None:
    shop = run_shop(make_pipeline, tmp_path)
    con = sqlite3.connect(shop.path)
    body = con.execute("SELECT body FROM records WHERE chain='orders' AND seq=2").fetchone()[0]
    con.execute(
        "UPDATE records SET body=? WHERE chain='orders' AND seq=2",
        (body.replace(b'"POST"', b'"GET"'),),
    )
    con.commit()
    con.close()
    assert main(["trail", "--ledger", shop.url, shop.trails[0], "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("<damaged>") == 2  # seqs 2 and 3; seq 1 is before the damage
    assert captured.err == (
        "otel-audit: 2 of 6 records of the trail are damaged:"
        " chain 'orders' seq 2: modified: hash does not match the record's bytes\n"
    )
