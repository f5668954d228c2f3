"""``otel-audit boundary``: where classified data went, and every boundary violation.

For each trail touching classified data: its classifications, the services,
hosts and data stores its spans reached, and its violations. Ends with either
"no violation in N trails" and the checkpoints covering their records, or the
number of violations (exit 1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from otel_audit import vocabulary as v
from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit._commands._filters import parse_time
from otel_audit.engine.ledger import Query
from otel_audit.policy.boundary import (
    BLOCKED,
    DESTINATION,
    DESTINATION_KIND,
    VIOLATION_ACTION,
    data_store,
    host,
    parse_labels,
)
from otel_audit.review.export.jsonl import iso


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "boundary", help="report where classified data went; exit 1 on any boundary violation"
    )
    add_ledger_argument(p)
    p.add_argument("--since", help="only records from: ISO 8601 or relative (7d, 12h)")
    p.add_argument("--until", help="only records before: ISO 8601 or relative")
    p.set_defaults(func=run)


@dataclass
class _Trail:
    trail: str
    start: int
    labels: set[str] = field(default_factory=set)
    actors: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    stores: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    query = Query(
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
    )
    trails: dict[str, _Trail] = {}
    examined = 0
    with open_for_reading(args) as ledger:
        for stored in ledger.query(query):
            examined += 1
            rec = stored.record
            attrs = rec.attributes
            trail_id = attrs.get(v.TRAIL_ID)
            labels = parse_labels(attrs.get(v.DATA_CLASSIFICATION))
            if not isinstance(trail_id, str) or not labels:
                continue
            t = trails.setdefault(trail_id, _Trail(trail_id, rec.start))
            t.start = min(t.start, rec.start)
            t.labels |= labels
            t.services.add(rec.service)
            t.last_seq[stored.chain] = max(t.last_seq.get(stored.chain, 0), stored.seq)
            if isinstance(attrs.get(v.ACTOR_ID), str):
                t.actors.add(attrs[v.ACTOR_ID])
            if attrs.get(v.ACTION) == VIOLATION_ACTION:
                blocked = " (blocked)" if attrs.get(BLOCKED) is True else ""
                kind = str(attrs.get(DESTINATION_KIND, "")).replace("_", " ").rstrip("s")
                t.violations.append(
                    f"{stored.chain}:{stored.seq} {iso(rec.start)} {attrs.get(v.DATA_CLASSIFICATION)}"
                    f" data to {kind} {attrs.get(DESTINATION)}{blocked} (service {rec.service})"
                )
                continue
            store = data_store(attrs)
            if store is not None:
                t.stores.add(store)
            elif rec.kind in ("CLIENT", "PRODUCER"):
                found = host(attrs)
                if found is not None:
                    t.hosts.add(found[1] or found[0])
        checkpoints = {c: ledger.checkpoints(c) for c in ledger.chains()}

    if not trails:
        print(f"no trail touched classified data ({examined} records examined)")
        return 0
    bad = 0
    for t in sorted(trails.values(), key=lambda t: (t.start, t.trail)):
        print(f"trail {t.trail} ({', '.join(sorted(t.labels))}) started {iso(t.start)}")
        if t.actors:
            print(f"  actors:      {', '.join(sorted(t.actors))}")
        print(f"  services:    {', '.join(sorted(t.services))}")
        print(f"  hosts:       {', '.join(sorted(t.hosts)) or '-'}")
        print(f"  data stores: {', '.join(sorted(t.stores)) or '-'}")
        for line in t.violations:
            print(f"  VIOLATION    {line}")
        if t.violations:
            bad += 1
    print()
    violations = sum(len(t.violations) for t in trails.values())
    if violations:
        print(
            f"{violations} boundary violations in {bad} of {len(trails)} trails touching classified data"
        )
        return 1
    print(f"no violation in {len(trails)} trails touching classified data")
    needed: dict[str, int] = {}
    for t in trails.values():
        for chain, seq in t.last_seq.items():
            needed[chain] = max(needed.get(chain, 0), seq)
    for chain, seq in sorted(needed.items()):
        covering = [c for c in checkpoints.get(chain, []) if c.seq >= seq]
        if covering:
            c = covering[0]
            signed = f", signed by key {c.key_id}" if c.signature else ", unsigned"
            print(
                f"  covered by checkpoint {chain}:{c.seq} at {iso(c.time)} head {c.head.hex()[:16]}"
                f"{signed} (verify with otel-audit verify)"
            )
        else:
            print(f"  chain {chain}: records up to seq {seq} are not yet covered by a checkpoint")
    return 0
