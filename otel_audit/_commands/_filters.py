"""Record filters shared by search, export and bundle (private)."""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timedelta, timezone

from otel_audit.engine.ledger import Query
from otel_audit.errors import ConfigError

_RELATIVE = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SEQ = re.compile(r"[0-9]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Times and seqs are signed 64-bit integers in every ledger (nanoseconds since
# the epoch: 1677-09-21 to 2262-04-11); a value beyond that matches nothing and
# the database driver cannot even bind it, so it is refused with the flag named.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_RANGE = "between 1677-09-22 and 2262-04-11 UTC"


def parse_time(value: str, flag: str, now: float | None = None) -> int:
    """ISO 8601 (naive = UTC) or relative like ``7d``/``12h``, as Unix nanoseconds.

    Exact integer arithmetic (no float rounding); a time outside the signed
    64-bit nanosecond range is a ConfigError naming ``flag``.
    """
    text = value.strip()
    match = _RELATIVE.match(text)
    if match:
        now_ns = time.time_ns() if now is None else int(now * 1_000_000_000)
        digits = match.group(1).lstrip("0") or "0"
        if len(digits) > 20:  # far beyond the range; also keeps int() off huge strings
            raise _out_of_range(value, flag)
        ns = now_ns - int(digits) * _UNIT[match.group(2)] * 1_000_000_000
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"{flag} {value!r} is neither ISO 8601 nor relative like 7d, 12h, 30m"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        try:
            delta = parsed - _EPOCH
        except OverflowError:  # an offset that pushes year 1 or 9999 past the calendar
            raise _out_of_range(value, flag) from None
        ns = delta // timedelta(microseconds=1) * 1000
    if not _INT64_MIN <= ns <= _INT64_MAX:
        raise _out_of_range(value, flag)
    return ns


def _out_of_range(value: str, flag: str) -> ConfigError:
    return ConfigError(f"{flag} {value!r} is out of range (times must be {_RANGE})")


def parse_cursor(value: str) -> tuple[str, int]:
    """A pagination cursor ``CHAIN:SEQ`` (the chain may itself contain ':')."""
    chain, sep, seq = value.rpartition(":")
    if not sep or not chain or not _SEQ.fullmatch(seq):
        raise ConfigError(f"--after {value!r} is not a cursor like CHAIN:SEQ (printed by search)")
    digits = seq.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > _INT64_MAX:
        raise ConfigError(f"--after {value!r}: seq is out of range (at most {_INT64_MAX})")
    return chain, int(digits)


def check_limit(value: int, flag: str) -> None:
    """A row count: 0 means all; it must fit the ledger's 64-bit integers."""
    if value < 0:
        raise ConfigError(f"{flag} must be 0 (all) or a positive number")
    if value >= _INT64_MAX:  # search asks for one more than the limit
        raise ConfigError(f"{flag} {value} is too large (at most {_INT64_MAX - 1})")


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
