"""Exports of ledger records to the formats reviewers' tools read.

Each format is a module here exposing ``NAME`` and ``write(records, out)``,
where ``records`` yields ``StoredRecord`` and ``out`` is a text stream. The
registry is filled by discovery so a new format is one new module.

Writers receive only records already checked against their chains (the
``export`` command passes them through ``review.checked.Review``), so a
format needs no checks of its own; the outcome it shows is
``StoredRecord.outcome`` (``unknown`` for an action whose request record was
written and whose outcome record never was), never its own derivation.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TextIO

from otel_audit.engine.ledger import StoredRecord

Writer = Callable[[Iterable[StoredRecord], TextIO], int]


def formats() -> dict[str, Writer]:
    """Format name -> writer function (returns the number of records written)."""
    found: dict[str, Writer] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.NAME] = module.write
    return found
