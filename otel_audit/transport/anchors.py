"""Checkpoints as ordinary OpenTelemetry log records, and reading them back as anchors.

Every checkpoint the writer (or ``otel-audit serve``) writes is also emitted
as a log record through the logs SDK, so the log backend (a second system,
with its own retention and access control) holds the chain heads. Someone who
rewrites the ledger, even recomputing every hash, cannot rewrite those; ``verify
--anchors FILE`` checks the ledger against them.

The emitted log record: event name ``otel_audit.checkpoint``, severity INFO,
body ``otel-audit checkpoint <chain> seq <n> head <hex>``, and the attributes
``otel_audit.checkpoint.chain``, ``.seq`` (int), ``.head`` (hex), ``.time``
(int, Unix ns), and when present ``.signature`` (hex), ``.key_id``,
``.merkle_root`` (hex), and for linked checkpoints ``.version`` (int) and
``.prev`` (hex: the link the signature covers).

``read_anchors`` accepts a JSONL file, one JSON value per line, each line one of:

* an OTLP/JSON ``ExportLogsServiceRequest`` (``{"resourceLogs": [...]}``), as
  the Collector's ``file`` exporter writes;
* one OTLP/JSON log record (``{"attributes": [{"key": ..., "value": {...}}]}``);
* one flat object with an ``attributes`` map (``{"attributes": {"otel_audit.checkpoint.seq": 3, ...}}``)
  or with those keys at its top level, as many log backends export.

Lines that carry no checkpoint are skipped (a log export holds other logs).
Thread-safe: the listener only calls the logs SDK, which is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry._logs import LoggerProvider, SeverityNumber, get_logger_provider

from otel_audit.errors import ConfigError
from otel_audit.proof.chain import CHECKPOINT_VERSIONS, Checkpoint

_log = logging.getLogger("otel_audit.transport.anchors")

EVENT_NAME = "otel_audit.checkpoint"
_PREFIX = "otel_audit.checkpoint."
CHAIN = _PREFIX + "chain"
SEQ = _PREFIX + "seq"
HEAD = _PREFIX + "head"
TIME = _PREFIX + "time"
SIGNATURE = _PREFIX + "signature"
KEY_ID = _PREFIX + "key_id"
MERKLE_ROOT = _PREFIX + "merkle_root"
VERSION = _PREFIX + "version"
PREV = _PREFIX + "prev"


def checkpoint_attributes(checkpoint: Checkpoint) -> dict[str, Any]:
    """The log attributes that carry ``checkpoint``."""
    attrs: dict[str, Any] = {
        CHAIN: checkpoint.chain,
        SEQ: checkpoint.seq,
        HEAD: checkpoint.head.hex(),
        TIME: checkpoint.time,
    }
    if checkpoint.signature:
        attrs[SIGNATURE] = checkpoint.signature.hex()
    if checkpoint.key_id:
        attrs[KEY_ID] = checkpoint.key_id
    if checkpoint.merkle_root:
        attrs[MERKLE_ROOT] = checkpoint.merkle_root.hex()
    if checkpoint.version >= 2:  # the signed message covers the link: carry it
        attrs[VERSION] = checkpoint.version
        attrs[PREV] = checkpoint.to_dict()["prev"]
    return attrs


class AnchorLogger:
    """A checkpoint listener that emits each checkpoint as a log record."""

    def __init__(self, logger_provider: LoggerProvider | None = None) -> None:
        provider = logger_provider or get_logger_provider()
        self._logger = provider.get_logger("otel_audit.anchors")

    def __call__(self, checkpoint: Checkpoint) -> None:
        try:
            self._logger.emit(
                timestamp=checkpoint.time,
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body=f"otel-audit checkpoint {checkpoint.chain} seq {checkpoint.seq} "
                f"head {checkpoint.head.hex()}",
                attributes=checkpoint_attributes(checkpoint),
                event_name=EVENT_NAME,
            )
        except Exception:  # anchors are a second line of defence; never break the writer
            _log.exception("otel-audit: could not emit checkpoint log record")


def install_anchor_logging(
    pipeline: Any, logger_provider: LoggerProvider | None = None
) -> AnchorLogger:
    """Emit ``pipeline``'s checkpoints as log records (the app's LoggerProvider by default).

    ``pipeline`` is an AuditPipeline, or anything with ``checkpoint_listeners``
    (an ``otel-audit serve`` receiver) or a ``writer`` that has them.
    """
    listener = AnchorLogger(logger_provider)
    target = getattr(pipeline, "writer", pipeline)
    target.checkpoint_listeners.append(listener)
    return listener


# -- reading anchors back ----------------------------------------------------------


def _otlp_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    for key in ("stringValue", "string_value"):
        if key in value:
            return value[key]
    for key in ("intValue", "int_value"):
        if key in value:
            return int(value[key])
    for key in ("boolValue", "bool_value"):
        if key in value:
            return value[key]
    for key in ("doubleValue", "double_value"):
        if key in value:
            return value[key]
    return None


def _attributes(obj: dict[str, Any]) -> dict[str, Any]:
    attrs = obj.get("attributes")
    if isinstance(attrs, list):  # OTLP/JSON KeyValue list
        return {
            kv["key"]: _otlp_value(kv.get("value"))
            for kv in attrs
            if isinstance(kv, dict) and isinstance(kv.get("key"), str)
        }
    if isinstance(attrs, dict):
        return attrs
    return obj


def _log_records(obj: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(obj, dict):
        return
    resource_logs = obj.get("resourceLogs", obj.get("resource_logs"))
    if isinstance(resource_logs, list):
        for rl in resource_logs:
            scopes = rl.get("scopeLogs", rl.get("scope_logs", [])) if isinstance(rl, dict) else []
            for sl in scopes if isinstance(scopes, list) else []:
                records = (
                    sl.get("logRecords", sl.get("log_records", [])) if isinstance(sl, dict) else []
                )
                for record in records if isinstance(records, list) else []:
                    if isinstance(record, dict):
                        yield record
        return
    yield obj


def _hex(value: Any, what: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {what} is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{where}: {what} {value!r} is not hex") from None


def checkpoint_from_attributes(attrs: dict[str, Any], where: str = "anchor") -> Checkpoint | None:
    """The checkpoint a log record's attributes carry, None when they carry none."""
    if CHAIN not in attrs or SEQ not in attrs or HEAD not in attrs:
        return None
    try:
        seq = int(attrs[SEQ])
        time_ns = int(attrs.get(TIME, 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as inf
        raise ConfigError(f"{where}: {SEQ} or {TIME} is not an integer") from None
    head = _hex(attrs[HEAD], HEAD, where)
    if len(head) != 32 or seq <= 0:
        raise ConfigError(f"{where}: not a valid checkpoint (seq {seq}, head of {len(head)} bytes)")
    signature = _hex(attrs[SIGNATURE], SIGNATURE, where) if attrs.get(SIGNATURE) else None
    merkle = _hex(attrs[MERKLE_ROOT], MERKLE_ROOT, where) if attrs.get(MERKLE_ROOT) else None
    key_id = attrs.get(KEY_ID)
    try:
        version = int(attrs.get(VERSION, 1))
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {VERSION} is not an integer") from None
    if version not in CHECKPOINT_VERSIONS:
        # The version says what the root is over (proof/walk.py, leaf_kind).
        raise ConfigError(f"{where}: checkpoint version {version} is not supported")
    prev = _hex(attrs[PREV], PREV, where) if version >= 2 and attrs.get(PREV) else None
    return Checkpoint(
        chain=str(attrs[CHAIN]),
        seq=seq,
        head=head,
        time=time_ns,
        signature=signature,
        key_id=str(key_id) if key_id else None,
        merkle_root=merkle,
        version=version,
        prev=prev,
    )


def read_anchors(path: str | os.PathLike[str]) -> list[Checkpoint]:
    """Checkpoints found in a JSONL export of log records; raises ConfigError on a bad file."""
    name = os.fspath(path)
    try:
        f = open(name, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read anchors file {name!r}: {exc.strerror}") from None
    anchors: list[Checkpoint] = []
    with f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{name}:{number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
                except RecursionError:
                    # A hostile line (``[[[[...``) nests deeper than the parser recurses.
                    raise ConfigError(f"{where}: JSON nested too deeply") from None
                except ValueError as exc:  # e.g. an integer too long to convert
                    raise ConfigError(f"{where}: not usable JSON ({exc})") from None
                try:
                    for record in _log_records(obj):
                        cp = checkpoint_from_attributes(_attributes(record), where)
                        if cp is not None:
                            anchors.append(cp)
                except ConfigError:
                    raise
                except (TypeError, ValueError, OverflowError) as exc:
                    # e.g. an OTLP intValue that is not an integer
                    raise ConfigError(f"{where}: not a usable log record ({exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"anchors file {name!r} is not UTF-8 text") from None
    return anchors
