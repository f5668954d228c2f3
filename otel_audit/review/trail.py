"""One audit trail across services: find its records, order them causally, render them.

A trail is every record whose ``audit.trail.id`` is the trail id, in every
chain (one chain per service, or one shared chain). The records form a tree
by parent span id, across services through the propagated trace context.
A record whose parent was never recorded (a span the policy did not keep)
attaches to its nearest recorded ancestor in time within the same trace (the
latest-starting record of the trace that encloses it), else to a record it
links to, else to the trail's root. Children are in causal (start time) order.

Rendering: ``render_text`` (the tree, one line per record), ``to_json`` and
``render_html`` (a self-contained page with a timeline, the actor, effects,
outcomes and the verification status of each record). Pure functions over
records read from a ledger; safe to call from any thread with its own ledger.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Ledger, Query, StoredRecord
from otel_audit.engine.record import Record
from otel_audit.proof.keys import key_id
from otel_audit.proof.verify import ChainReport, verify_ledger
from otel_audit.review.checked import DAMAGED, INTACT, UNANCHORED, Review

__all__ = [
    "DAMAGED",
    "INTACT",
    "UNANCHORED",
    "Trail",
    "TrailNode",
    "build_trail",
    "damaged",
    "describe",
    "find_trail",
    "outcome_of",
    "render_html",
    "render_text",
    "to_json",
    "verify_chain",
    "verify_trail",
]


@dataclass
class TrailNode:
    """One record of a trail with its children (in causal order)."""

    stored: StoredRecord
    record: Record
    children: list[TrailNode] = field(default_factory=list)
    attached: str = "parent"  # how it joined the tree: parent, ancestor, link, root
    status: str | None = None  # verification state, when verified
    status_detail: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.record.trace_id, self.record.span_id)

    def walk(self, depth: int = 0) -> Iterator[tuple[int, TrailNode]]:
        """Depth-first, pre-order: (depth, node)."""
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)


@dataclass
class Trail:
    """A trail's records as a forest (normally one root: the user action)."""

    trail_id: str
    roots: list[TrailNode]
    verified: bool = False
    public_key_id: str | None = None
    #: Records of the trail not in the tree: a second record of a span shown
    #: (an intent and its outcome, an OTLP retry into two chains, a forged copy).
    #: They are verified too: a damaged one makes the trail damaged.
    others: list[TrailNode] = field(default_factory=list)

    def nodes(self) -> Iterator[tuple[int, TrailNode]]:
        for root in self.roots:
            yield from root.walk()

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes())


def find_trail(ledger: Ledger, trail_id: str) -> Trail:
    """Read every record of ``trail_id`` (all chains) and build its tree."""
    stored = list(ledger.query(Query(trail_id=trail_id)))
    return build_trail(trail_id, stored)


def _shown_first(s: StoredRecord) -> tuple[int, int]:
    """Of two records of one span, the one the tree shows: a record in a chain's
    sequence before a stray row, an outcome before the intent it concludes."""
    in_sequence = isinstance(s.chain, str) and type(s.seq) is int and s.seq >= 1
    try:
        intent = s.record.attr(v.INTENT) is True
    except Exception:  # noqa: BLE001 - an undecodable body is damage, named by verify
        intent = False
    return (0 if in_sequence else 1, 1 if intent else 0)


def _place(stored: StoredRecord) -> tuple[str, int]:
    """(chain, seq) as text and an integer, whatever types a tampered row holds."""
    chain, seq = stored.chain, stored.seq
    return (
        chain if isinstance(chain, str) else repr(chain),
        seq if type(seq) is int else 0,
    )


def _order(node: TrailNode) -> tuple[int, str, int]:
    return (node.record.start, *_place(node.stored))


def build_trail(trail_id: str, stored: Iterable[StoredRecord]) -> Trail:
    """Arrange records into the trail tree (see the module docstring for the rules)."""
    nodes: list[TrailNode] = []
    others: list[TrailNode] = []
    by_key: dict[tuple[str, str], TrailNode] = {}
    for s in sorted(stored, key=_shown_first):
        node = TrailNode(s, s.record)
        # A span stored twice (an intent and its outcome, an OTLP retry into
        # two chains) shows once; the other record is kept aside and verified.
        if node.key in by_key:
            shown = by_key[node.key]
            if node.record.attr(v.INTENT) is True and shown.record.attr(v.INTENT) is not True:
                shown.stored = replace(shown.stored, concluded=True)
            others.append(node)
            continue
        by_key[node.key] = node
        nodes.append(node)
    nodes.sort(key=_order)
    parent_of: dict[tuple[str, str], TrailNode] = {}
    for node in nodes:
        pid = node.record.parent_span_id
        if pid is not None and (node.record.trace_id, pid) in by_key:
            parent_of[node.key] = by_key[(node.record.trace_id, pid)]
    root = _pick_root(trail_id, nodes, parent_of)
    by_trace: dict[str, list[TrailNode]] = {}
    for node in nodes:
        by_trace.setdefault(node.record.trace_id, []).append(node)
    for node in nodes:
        if node.key in parent_of or node is root:
            continue
        found = _enclosing(node, by_trace.get(node.record.trace_id, []), parent_of)
        if found is not None:
            parent_of[node.key], node.attached = found, "ancestor"
            continue
        linked = next(
            (by_key[(ln.trace_id, ln.span_id)] for ln in node.record.links
             if (ln.trace_id, ln.span_id) in by_key and by_key[(ln.trace_id, ln.span_id)] is not node),
            None,
        )  # fmt: skip
        if linked is not None and not _is_descendant(linked, node, parent_of):
            parent_of[node.key], node.attached = linked, "link"
        elif root is not None:
            parent_of[node.key], node.attached = root, "root"
    roots: list[TrailNode] = []
    for node in nodes:  # already in causal order, so children lists are too
        parent = parent_of.get(node.key)
        if parent is None:
            roots.append(node)
        else:
            parent.children.append(node)
    return Trail(trail_id, roots, others=others)


def _pick_root(
    trail_id: str, nodes: Sequence[TrailNode], parent_of: dict[tuple[str, str], TrailNode]
) -> TrailNode | None:
    # The trail id is the span id of the action that started it (actions.py).
    for node in nodes:
        if node.record.span_id == trail_id and node.key not in parent_of:
            return node
    for node in nodes:
        if node.record.attr(v.EVENT) is True and node.key not in parent_of:
            return node
    return next((n for n in nodes if n.key not in parent_of), None)


def _is_descendant(
    node: TrailNode, ancestor: TrailNode, parent_of: dict[tuple[str, str], TrailNode]
) -> bool:
    seen = 0
    cur: TrailNode | None = node
    while cur is not None and seen <= len(parent_of):
        if cur is ancestor:
            return True
        cur = parent_of.get(cur.key)
        seen += 1
    return False


def _enclosing(
    node: TrailNode, same_trace: list[TrailNode], parent_of: dict[tuple[str, str], TrailNode]
) -> TrailNode | None:
    """The latest-starting record of the trace whose time span contains ``node``'s."""
    best: TrailNode | None = None
    r = node.record
    for other in same_trace:
        o = other.record
        if other is node or not (o.start <= r.start and r.end <= o.end):
            continue
        if (o.start, o.end) == (r.start, r.end) and _order(other) > _order(node):
            continue  # identical times: the earlier-stored one is the ancestor
        if _is_descendant(other, node, parent_of):
            continue
        if best is None or o.start > best.record.start:
            best = other
    return best


# -- verification ----------------------------------------------------------


def verify_chain(
    ledger: Ledger,
    chain: str,
    public_key: Ed25519PublicKey | None = None,
    progress: Callable[[int], None] | None = None,
) -> ChainReport | None:
    """Verify one chain of ``ledger`` exactly as ``verify`` does; raises VerificationError.

    Returns its report (None when the chain has no records nor checkpoints).
    """
    report = verify_ledger(ledger, public_key, progress=progress, chains=[chain])
    return report.chains[0] if report.chains else None


def verify_trail(
    ledger: Ledger,
    trail: Trail,
    public_key: Ed25519PublicKey | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
) -> None:
    """Verify every chain the trail touches and mark each node intact/unanchored/damaged.

    The verdicts are review/checked.py's, the same search and export give: a
    record is ``damaged`` when it is at or after the first damage of its chain,
    anywhere in a chain whose checkpoint signature fails (a forger who
    recomputed every hash leaves the chain itself consistent: only the
    signature tells), outside its chain's sequence (seq 0, a chain id that is
    not text), or when the schema behind the query columns was altered.
    """
    review = Review(ledger, public_key, progress=progress, jobs=jobs)
    query = Query(trail_id=trail.trail_id)
    for node in [n for _, n in trail.nodes()] + trail.others:
        verdict = review.judge(node.stored, query)
        node.status, node.status_detail = verdict.status, verdict.detail
        if not verdict.damaged and not node.stored.concluded:
            node.stored = review.concluded(node.stored)
    trail.verified = True
    trail.public_key_id = key_id(public_key) if public_key is not None else None


def damaged(trail: Trail) -> list[TrailNode]:
    """The trail's records found damaged by ``verify_trail`` (empty when not verified)."""
    return [node for _, node in trail.nodes() if node.status == DAMAGED] + [
        node for node in trail.others if node.status == DAMAGED
    ]


# -- rendering ---------------------------------------------------------------


def _iso(ns: int) -> str:
    return (
        datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def outcome_of(node: TrailNode) -> str | None:
    """The node's outcome as every review command shows it (``StoredRecord.outcome``)."""
    return node.stored.outcome


def _first(attrs: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = attrs.get(name)
        if value is not None and value != "":
            return str(value)
    return None


def describe(rec: Record, outcome: str | None = None) -> str:
    """One line saying what a record is: 'alice did order.create on order 42 (success)'."""
    a = rec.attributes
    tail = f" ({outcome})" if outcome else ""
    action = a.get(v.ACTION)
    if a.get(v.EVENT) is True or (action and not a.get(v.EFFECT)):
        who = _first(a, v.ACTOR_ID) or _first(a, v.ACTOR_TYPE) or "someone"
        text = f"{who} did {action or rec.name}"
        rtype, rid = a.get(v.RESOURCE_TYPE), a.get(v.RESOURCE_ID)
        if rtype or rid:
            text += " on " + " ".join(str(x) for x in (rtype, rid) if x)
        return text + tail
    effect = a.get(v.EFFECT)
    if effect == v.DATA_WRITE or effect == v.DATA_READ:
        op = _first(a, "db.operation.name", "db.operation")
        table = _first(a, "db.collection.name", "db.sql.table", "db.name", "db.namespace")
        if op is None:
            # The first word of the statement is the verb (effects.py does the same).
            stmt = _first(a, "db.query.text", "db.statement")
            op = stmt.split()[0].upper() if stmt and stmt.split() else None
        detail = " ".join(x for x in (op, table) if x) or rec.name
        return f"{effect} {detail}{tail}"
    if effect == v.HTTP_CALL:
        method = _first(a, "http.request.method", "http.method") or ""
        target = _first(a, "server.address", "net.peer.name", "url.full", "http.url") or rec.name
        return f"{effect} {method} {target}".replace("  ", " ") + tail
    if effect:
        dest = _first(a, "messaging.destination.name", "messaging.destination")
        return f"{effect} {dest or rec.name}{tail}"
    return f"{rec.name}{tail}"


def render_text(trail: Trail, width: int = 56) -> str:
    """The tree as text, two spaces per level, the service right of the description."""
    lines = []
    for depth, node in trail.nodes():
        text = "  " * depth + describe(node.record, outcome_of(node))
        mark = f"  <{node.status}>" if node.status and node.status != INTACT else ""
        lines.append(f"{text.ljust(width)} [{node.record.service}]{mark}")
    return "\n".join(lines) + ("\n" if lines else "")


def node_dict(node: TrailNode) -> dict[str, Any]:
    """One node as JSON data (children nested)."""
    rec, a = node.record, node.record.attributes
    out: dict[str, Any] = {
        "chain": _place(node.stored)[0],
        "seq": node.stored.seq if type(node.stored.seq) is int else repr(node.stored.seq),
        "hash": node.stored.hash.hex(),
        "trace_id": rec.trace_id,
        "span_id": rec.span_id,
        "parent_span_id": rec.parent_span_id,
        "service": rec.service,
        "name": rec.name,
        "start": _iso(rec.start),
        "end": _iso(rec.end),
        "duration_ms": round((rec.end - rec.start) / 1e6, 3),
        "actor": a.get(v.ACTOR_ID),
        "actor_type": a.get(v.ACTOR_TYPE),
        "action": a.get(v.ACTION),
        "resource_type": a.get(v.RESOURCE_TYPE),
        "resource_id": a.get(v.RESOURCE_ID),
        "effect": a.get(v.EFFECT),
        "outcome": outcome_of(node),
        "reason": a.get(v.REASON),
        "description": describe(rec, outcome_of(node)),
        "attached": node.attached,
        "attributes": a,
    }
    if node.status is not None:
        out["verification"] = {"status": node.status, "detail": node.status_detail}
    out["children"] = [node_dict(c) for c in node.children]
    return out


def to_json(trail: Trail) -> str:
    data = {
        "trail_id": trail.trail_id,
        "records": len(trail),
        "verified": trail.verified,
        "public_key_id": trail.public_key_id,
        "roots": [node_dict(r) for r in trail.roots],
    }
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem;color:#1b1f24}
h1{font-size:1.4rem;margin:0 0 .3rem}
.summary{margin:.5rem 0 1.5rem;line-height:1.6}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border-bottom:1px solid #d8dee4;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.time{white-space:nowrap}
.what{white-space:pre}
.bar{height:.6rem;background:#0969da;border-radius:2px;min-width:2px}
.status{font-weight:600;border-radius:3px;padding:0 .35rem}
.intact{background:#dafbe1;color:#1a7f37}
.unanchored{background:#fff8c5;color:#7d4e00}
.damaged{background:#ffebe9;color:#cf222e}
.unverified{background:#eaeef2;color:#57606a}
.o-success{color:#1a7f37}.o-failure,.o-denied{color:#cf222e}
"""


def render_html(trail: Trail) -> str:
    """A self-contained HTML report (inline CSS, no scripts, no external assets)."""
    esc = html.escape
    all_nodes = list(trail.nodes())
    root_node = trail.roots[0] if trail.roots else None
    root = root_node.record if root_node else None
    t0 = min((n.record.start for _, n in all_nodes), default=0)
    t1 = max((n.record.end for _, n in all_nodes), default=t0)
    total = max(t1 - t0, 1)
    counts: dict[str, int] = {}
    for _, n in all_nodes:
        counts[n.status or "unverified"] = counts.get(n.status or "unverified", 0) + 1
    services = sorted({n.record.service for _, n in all_nodes})
    actors = sorted(
        {str(n.record.attr(v.ACTOR_ID)) for _, n in all_nodes if n.record.attr(v.ACTOR_ID)}
    )
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Audit trail {esc(trail.trail_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Audit trail <code id="trail-id">{esc(trail.trail_id)}</code></h1>',
        '<div class="summary">',
    ]
    if root_node is not None and root is not None:
        action = describe(root, outcome_of(root_node))
        head.append(f'<div>Action: <strong id="root-action">{esc(action)}</strong></div>')
        head.append(f"<div>Started: {esc(_iso(root.start))}</div>")
    root_actor = (
        str(root.attr(v.ACTOR_ID) or root.attr(v.ACTOR_TYPE) or "unknown") if root else "unknown"
    )
    head.append(f'<div>Actor: <strong id="actor">{esc(root_actor)}</strong></div>')
    others = [a for a in actors if a != root_actor]
    if others:
        head.append(
            f'<div>Also acting: <span id="other-actors">{esc(", ".join(others))}</span></div>'
        )
    head.append(f"<div>Services: {esc(', '.join(services))}</div>")
    if trail.verified:
        parts = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts))
        key = (
            f" with public key {esc(trail.public_key_id)}"
            if trail.public_key_id
            else " (no public key: signatures not checked)"
        )
        head.append(f'<div id="verification">Verification{key}: {esc(parts)}</div>')
    else:
        head.append('<div id="verification">Verification: not performed</div>')
    head.append(f"<div>Records: {len(all_nodes)}</div></div>")
    rows = [
        (
            '<table id="timeline"><thead><tr><th>Time (UTC)</th><th>+ms</th><th>Timeline</th>'
            "<th>What</th><th>Service</th><th>Actor</th><th>Effect</th><th>Outcome</th>"
            "<th>Record</th><th>Verification</th></tr></thead><tbody>"
        )
    ]
    for depth, node in all_nodes:
        rec, a = node.record, node.record.attributes
        left = 100 * (rec.start - t0) / total
        span = max(100 * (rec.end - rec.start) / total, 0.5)
        outcome = outcome_of(node) or ""
        status = node.status or "unverified"
        title = esc(node.status_detail or status)
        rows.append(
            f'<tr class="record" data-chain="{esc(node.stored.chain)}" data-seq="{node.stored.seq}"'
            f' data-status="{esc(status)}">'
            f'<td class="time">{esc(_iso(rec.start))}</td>'
            f"<td>{(rec.start - t0) / 1e6:.1f}</td>"
            f'<td style="width:15%"><div class="bar" style="margin-left:{left:.2f}%;width:{span:.2f}%"></div></td>'
            f'<td class="what">{esc("  " * depth + describe(rec, outcome_of(node)))}</td>'
            f"<td>{esc(rec.service)}</td>"
            f"<td>{esc(str(a.get(v.ACTOR_ID) or ''))}</td>"
            f"<td>{esc(str(a.get(v.EFFECT) or ''))}</td>"
            f'<td class="o-{esc(outcome)}">{esc(outcome)}</td>'
            f"<td><code>{esc(node.stored.chain)}#{node.stored.seq}</code></td>"
            f'<td><span class="status {esc(status)}" title="{title}">{esc(status)}</span></td></tr>'
        )
    rows.append("</tbody></table></body></html>\n")
    return "\n".join(head + rows)
