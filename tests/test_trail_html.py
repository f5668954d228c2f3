"""The trail's HTML report, rendered in headless Chromium: what a reviewer sees."""

from __future__ import annotations

import re
import sqlite3
from html.parser import HTMLParser

from otel_audit.cli import main

from .test_trail import EXPECTED_TREE, run_shop


class _Rows(HTMLParser):
    """Collects the text of each timeline row as rendered (cells in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, object]] = []
        self._cell: list[str] | None = None
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "record":
            self.rows.append({"status": a.get("data-status"), "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(str(a[name]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell))  # type: ignore[union-attr]
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _render(shop, tmp_path, dump_dom, *extra: str, code: int = 0) -> tuple[str, _Rows]:
    out = tmp_path / "trail.html"
    args = ["trail", "--ledger", shop.url, shop.trails[0], "--format", "html", "-o", str(out)]
    assert main(args + list(extra)) == code
    dom = dump_dom(out)
    parser = _Rows()
    parser.feed(dom)
    return dom, parser


def test_report_shows_timeline_actor_effects_and_verification(
    make_pipeline, tmp_path, dump_dom, screenshot
) -> None:
    shop = run_shop(make_pipeline, tmp_path)
    dom, page = _render(shop, tmp_path, dump_dom, "--public-key", str(shop.public_key))
    assert page.external == [] and page.scripts == 0  # self-contained: nothing to fetch
    assert re.search(r'id="actor">alice<', dom) and re.search(r'id="other-actors">orders<', dom)
    assert "alice did order.create on order 0 (success)" in dom
    assert re.search(
        r'id="verification">Verification with public key [0-9a-f]{16}: intact: 6<', dom
    )
    # Columns: time, +ms, bar, what, service, actor, effect, outcome, record, verification.
    rows = [r["cells"] for r in page.rows]
    assert [c[3] for c in rows] == EXPECTED_TREE
    assert [c[4] for c in rows] == ["orders"] * 3 + ["inventory"] * 3
    assert [c[6] for c in rows] == ["", "data.write", "http.call", "", "data.write", "notification"]
    assert [c[7] for c in rows] == ["success", "", "", "success", "", ""]
    assert [c[9] for c in rows] == ["intact"] * 6
    assert [c[8] for c in rows] == [
        "orders#3",
        "orders#1",
        "orders#2",
        "inventory#3",
        "inventory#1",
        "inventory#2",
    ]
    # Timeline times are in causal order.
    assert [c[0] for c in rows] == sorted(c[0] for c in rows)
    screenshot(tmp_path / "trail.html", tmp_path / "trail.png")


def test_report_marks_damaged_records(make_pipeline, tmp_path, dump_dom) -> None:
    shop = run_shop(make_pipeline, tmp_path)
    con = sqlite3.connect(shop.path)
    body = con.execute("SELECT body FROM records WHERE chain='orders' AND seq=2").fetchone()[0]
    con.execute(
        "UPDATE records SET body = ? WHERE chain='orders' AND seq=2",
        (body.replace(b'"POST"', b'"GET"'),),
    )
    con.commit()
    con.close()
    # Exit 1 (damage), and the report is still written: it shows which records.
    dom, page = _render(shop, tmp_path, dump_dom, "--public-key", str(shop.public_key), code=1)
    statuses = {r["cells"][8]: r["status"] for r in page.rows}  # type: ignore[index]
    assert statuses == {
        "orders#1": "intact", "orders#2": "damaged", "orders#3": "damaged",
        "inventory#1": "intact", "inventory#2": "intact", "inventory#3": "intact",
    }  # fmt: skip
    assert "damaged: 2" in dom and "intact: 4" in dom
    # The record as stored now says GET: the report shows what is there, marked damaged.
    assert "http.call GET inventory" in dom


def test_hostile_values_are_escaped(make_pipeline, tmp_path, dump_dom) -> None:
    from otel_audit import audit_action

    pipeline, provider, _ = make_pipeline(service_name="web")
    evil = '<script>alert(1)</script><img src="http://example.invalid/x.png">'
    with audit_action(
        "order.create", resource=("order", evil), actor="mallory", tracer=provider.get_tracer("t")
    ) as act:
        trail_id = act.trail_id
    url = pipeline.ledger_url
    out = tmp_path / "evil.html"
    assert main(["trail", "--ledger", url, str(trail_id), "--format", "html", "-o", str(out)]) == 0
    page = _Rows()
    page.feed(dump_dom(out))
    assert page.scripts == 0 and page.external == []
    assert page.rows[0]["cells"][3] == f"mallory did order.create on order {evil} (success)"  # type: ignore[index]
