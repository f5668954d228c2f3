"""How records spell span kinds, status codes and times: one table for every part.

The record format stores kind and status by name; OTLP numbers them (kind
1..5, status 0..2, in these tuples' order). Exports and review print times
as RFC 3339 UTC with a ``Z``. Pure functions; thread-safe.
"""

from __future__ import annotations

from datetime import datetime, timezone

#: Span kinds as records name them, in OTLP's order (``SPAN_KIND_INTERNAL`` = 1).
KINDS = ("INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
#: Status codes as records name them, in OTLP's order (``STATUS_CODE_UNSET`` = 0).
STATUSES = ("UNSET", "OK", "ERROR")

_KIND_NUMBERS = {name: number for number, name in enumerate(KINDS, start=1)}
_STATUS_NUMBERS = {name: number for number, name in enumerate(STATUSES)}


def kind_name(number: int) -> str:
    """The record's kind for an OTLP kind number (unknown and unspecified: INTERNAL)."""
    return KINDS[number - 1] if 1 <= number <= len(KINDS) else "INTERNAL"


def kind_number(name: str) -> int:
    """The OTLP kind number of a record's kind (unknown: INTERNAL)."""
    return _KIND_NUMBERS.get(name, 1)


def status_name(number: int) -> str:
    """The record's status for an OTLP status code (unknown: UNSET)."""
    return STATUSES[number] if 0 <= number < len(STATUSES) else "UNSET"


def status_number(name: str) -> int:
    """The OTLP status code of a record's status (unknown: UNSET)."""
    return _STATUS_NUMBERS.get(name, 0)


def iso_time(ns: int, timespec: str = "microseconds") -> str:
    """Unix nanoseconds as RFC 3339 UTC, ``2026-11-30T00:05:47.078140Z``."""
    when = datetime.fromtimestamp(ns // 1000 / 1e6, tz=timezone.utc)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")
