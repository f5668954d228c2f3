"""Record filters shared by search, export and bundle (private)."""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timezone

from ..errors import ConfigError
from ..ledger import Query

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def parse_time(value: str, flag: str, now: float | None = None) -> int:
    """ISO 8601 (naive = UTC) or relative like ``7d``/``12h``, as Unix nanoseconds."""
    match = _RELATIVE.match(value.strip())
    if match:
        seconds = int(match.group(1)) * _UNIT[match.group(2)]
        return int(((time.time() if now is None else now) - seconds) * 1e9)
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{flag} {value!r} is neither ISO 8601 nor relative like 7d, 12h, 30m"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1e9)


def parse_cursor(value: str) -> tuple[str, int]:
    """A pagination cursor ``CHAIN:SEQ`` (the chain may itself contain ':')."""
    chain, sep, seq = value.rpartition(":")
    if not sep or not chain or not seq.isdigit():
        raise ConfigError(f"--after {value!r} is not a cursor like CHAIN:SEQ (printed by search)")
    return chain, int(seq)


def format_cursor(chain: str, seq: int) -> str:
    return f"{chain}:{seq}"


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--actor", help="audit.actor.id")
    g.add_argument("--action", help="audit.action")
    g.add_argument("--resource-type", help="audit.resource.type")
    g.add_argument("--resource-id", help="audit.resource.id")
    g.add_argument("--outcome", choices=["success", "failure", "denied", "unknown"])
    g.add_argument("--service", help="service name")
    g.add_argument("--trail", dest="trail_id", help="audit.trail.id")
    g.add_argument("--trace-id", help="trace id (32 hex)")
    g.add_argument("--chain", help="chain id")
    g.add_argument("--since", help="start time: ISO 8601 or relative (7d, 12h)")
    g.add_argument("--until", help="end time (exclusive): ISO 8601 or relative")


def query_from_args(args: argparse.Namespace) -> Query:
    trace_id = args.trace_id.lower() if args.trace_id else None
    if trace_id is not None and not _TRACE_ID.match(trace_id):
        raise ConfigError(f"--trace-id {args.trace_id!r} is not 32 hexadecimal digits")
    query = Query(
        actor=args.actor,
        action=args.action,
        resource_type=args.resource_type,
        resource_id=args.resource_id,
        outcome=args.outcome,
        service=args.service,
        trail_id=args.trail_id,
        trace_id=trace_id,
        chain=args.chain,
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
    )
    if query.since is not None and query.until is not None and query.since >= query.until:
        raise ConfigError("--since must be earlier than --until")
    return query
