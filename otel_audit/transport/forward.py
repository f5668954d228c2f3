"""Store-and-forward: ship a local ledger (the outbox) to a remote OTLP receiver.

The forwarder reads every chain of the local ledger after a per-chain cursor,
sends the records as an OTLP/HTTP protobuf trace request, and moves the cursor
(persisted in a small JSON sidecar file, written atomically) only after the
receiver answered success. A failure of any kind (refused connection, 5xx,
429, a wrong token) is retried with capped exponential backoff, honouring
``Retry-After``, for as long as it takes: nothing is skipped. A crash between
the receiver's success and the cursor write resends the batch; the receiver
(``otel-audit serve``) stores each (trace id, span id) once, so the receiver
ends with every record exactly once.

The cursor file also keeps the hash of the last record sent on each chain. A
pass first reads the record at the cursor (one indexed lookup); when it is gone
or its hash changed, someone edited the outbox (e.g. a row planted far ahead of
the head, sent, then deleted, so that the writer refills seqs the cursor has
passed): that is logged as an error, counted (``stats().rewinds``) and the
chain is sent again from its first record, so no committed record is skipped.
It also keeps the gaps it passed (seqs below the cursor that held no record
when it sent the records around them; a real chain has none), and every pass
looks into them: records that appear there (a writer appending below a row
planted ahead, which was then deleted and put back unchanged) are sent, and
that is logged and counted too (``stats().late``). And it walks the records it
has sent, ``check_slice`` records per pass over all chains (taken in turn),
resuming from the cursor file, a new walk every ``check_interval`` seconds:
each must hash to its stored hash, link to the record before it, and a
missing seq must be a gap seen when sending, with the same record below it. A place where that fails means records already sent
were replaced or removed under the cursor (the newest rows deleted, a
restarted writer appending new records at their seqs, the old rows put back
above them, so that the record at the cursor is unchanged): logged, counted
(``stats().breaks``), remembered (reported once) and the chain is sent again
from its first record: at once, then at most once every ``check_interval``.

One forwarder per outbox: the cursor file is guarded by an exclusive lock, so
several worker processes that all configured forwarding share the work safely
(one sends, the others wait for the lock). Thread-safe.

Settings (argument, then variable, then default), in the
``OTEL_EXPORTER_OTLP_*`` style:

* ``OTEL_AUDIT_FORWARD_ENDPOINT``: base URL (``/v1/traces`` is appended) or the
  full ``.../v1/traces`` URL. Unset: no forwarding.
* ``OTEL_AUDIT_FORWARD_HEADERS``: ``key=value,key2=value2`` (values URL-encoded).
* ``OTEL_AUDIT_FORWARD_TOKEN``: sent as ``Authorization: Bearer <token>``.
* ``OTEL_AUDIT_FORWARD_CERTIFICATE``: CA bundle (PEM) to trust for https.
* ``OTEL_AUDIT_FORWARD_COMPRESSION``: ``gzip`` (default) or ``none``.
* ``OTEL_AUDIT_FORWARD_TIMEOUT``: seconds per request (default 10).
* ``OTEL_AUDIT_FORWARD_STATE``: cursor file (default ``<ledger file>.forward.json``;
  required for a PostgreSQL outbox).
"""

from __future__ import annotations

import atexit
import bisect
import errno
import gzip
import hashlib
import itertools
import json
import logging
import os
import random
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.util.re import parse_env_headers
from urllib3.exceptions import HTTPError, InvalidHeader
from urllib3.util.retry import Retry

from otel_audit.engine.ledger import Ledger, RawRow, open_ledger, sqlite_path
from otel_audit.engine.record import decode
from otel_audit.errors import AuditError, ConfigError
from otel_audit.proof.chain import GENESIS, link_hash
from otel_audit.settings import (
    OTEL_AUDIT_FORWARD_CERTIFICATE,
    OTEL_AUDIT_FORWARD_COMPRESSION,
    OTEL_AUDIT_FORWARD_ENDPOINT,
    OTEL_AUDIT_FORWARD_HEADERS,
    OTEL_AUDIT_FORWARD_STATE,
    OTEL_AUDIT_FORWARD_TIMEOUT,
    OTEL_AUDIT_FORWARD_TOKEN,
)
from otel_audit.transport.otlp import request_from_records

if TYPE_CHECKING:
    from otel_audit.setup import AuditPipeline

_log = logging.getLogger("otel_audit.transport.forward")


_DEFAULT_BATCH_SIZE = 512
_DEFAULT_TIMEOUT = 10.0
_DEFAULT_POLL_INTERVAL = 1.0
_DEFAULT_MAX_BACKOFF = 30.0
_DEFAULT_CHECK_INTERVAL = 600.0  # seconds between walks of the sent records' links
_DEFAULT_CHECK_SLICE = 1024  # records whose links and hashes one pass checks, all chains
_KEEP_BREAKS = 4096  # places of replaced records remembered per chain (each reported once)
_LOGGED_BREAKS = 5  # logged one by one per slice; the rest summed up
_RETRYABLE = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class ForwarderStats:
    """Counters since start (a snapshot)."""

    forwarded: int
    batches: int
    failures: int
    rejected: int
    #: Chains sent again from their first record because the record at their
    #: cursor was gone or changed: the outbox was edited outside the writer.
    rewinds: int
    #: Records found, and sent, in a gap the cursor had passed: the outbox was
    #: edited outside the writer (or a writer appended below a planted row).
    late: int
    #: Places where records already sent were found replaced or removed (a
    #: link or hash that does not match, a gap the forwarder never saw); their
    #: chains were sent again from the first record.
    breaks: int
    last_error: str | None


@dataclass
class _Cursors:
    """What the cursor file keeps per chain: the seq of the last record sent, its
    hash (hex), the gaps below it ([first, last] seqs that held no record), where
    the walk of the sent records is ([seq it has read to, last record read,
    that record's hash hex, Unix time the walk began, Unix time of its last
    rewind of the chain, a rewind due]), the places where it found records
    replaced (reported once each) and the hash of the record below each gap."""

    seqs: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    holes: dict[str, list[list[int]]] = field(default_factory=dict)
    sweeps: dict[str, list[Any]] = field(default_factory=dict)
    breaks: dict[str, list[str]] = field(default_factory=dict)
    #: Per chain, gap start seq (text) -> hash hex of the record just below the
    #: gap when it was sent: a walk crossing the gap checks that record.
    edges: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Per chain being sent again after a rewind: the cursor before it. Below
    #: it a record that no longer decodes was sent before, whole; it is
    #: skipped (logged) rather than hold the chain.
    resend: dict[str, int] = field(default_factory=dict)
    dirty: bool = False  # changed since it was last saved (not kept in the file)


class _SendFailed(Exception):
    def __init__(self, message: str, retry_after: float | None = None, too_large: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.too_large = too_large


def traces_url(endpoint: str) -> str:
    """The ``/v1/traces`` URL of ``endpoint`` (a base URL or already the full one).

    Raises ConfigError for anything that is not an http(s) URL with a host and a
    valid port, so that a typo fails at start rather than in the sending thread.
    """
    endpoint = endpoint.strip()
    where = f"forward endpoint {endpoint!r} (--endpoint / {OTEL_AUDIT_FORWARD_ENDPOINT})"
    try:
        parts = urlsplit(endpoint)
        port = parts.port  # raises ValueError for a port that is not 0-65535
    except ValueError as exc:
        raise ConfigError(f"{where} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} is not an http(s) URL")
    if port == 0:
        raise ConfigError(f"{where} has port 0")
    if parts.path.rstrip("/").endswith("/v1/traces"):
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"


# RFC 9110 field names are tokens; values may not hold control characters
# (CR/LF would split the request: the HTTP client refuses them mid-send).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_header(key: str, value: str, setting: str) -> None:
    """Raise ConfigError naming ``setting`` unless ``key: value`` can be sent as an HTTP header."""
    if not _TOKEN.fullmatch(key):
        raise ConfigError(f"{setting}: {key!r} is not a valid HTTP header name")
    if _CONTROL.search(value):
        raise ConfigError(
            f"{setting}: the value of header {key!r} contains a control character (CR, LF, ...)"
        )
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{setting}: the value of header {key!r} has characters outside Latin-1"
        ) from None


def parse_headers(value: str | None, setting: str = OTEL_AUDIT_FORWARD_HEADERS) -> dict[str, str]:
    """``k=v,k2=v2`` (OTEL_EXPORTER_OTLP_HEADERS syntax) -> dict; raises ConfigError naming ``setting``.

    Each item is parsed by OpenTelemetry's own helper (the one its OTLP
    exporters use); an item it cannot read is an error here, not a header
    silently left out of every request.
    """
    headers: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        parsed = parse_env_headers(item, liberal=True) if "=" in item else {}
        if not parsed:
            raise ConfigError(f"{setting} item {item.strip()!r} is not key=value")
        for name, text in parsed.items():
            check_header(name, text, setting)
            headers[name] = text
    return headers


def default_state_path(ledger_url: str) -> str:
    path = sqlite_path(ledger_url)
    if path is None:
        raise ConfigError(
            f"set {OTEL_AUDIT_FORWARD_STATE} to a cursor file path for a non-SQLite outbox"
        )
    return path + ".forward.json"


class Forwarder:
    """Ships the records of ``ledger_url`` to ``endpoint``; see the module docstring."""

    def __init__(
        self,
        ledger_url: str,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        state_path: str | None = None,
        certificate: str | None = None,
        compression: str = "gzip",
        timeout: float = _DEFAULT_TIMEOUT,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        poll_interval: float = _DEFAULT_POLL_INTERVAL,
        max_backoff: float = _DEFAULT_MAX_BACKOFF,
        alive: Callable[[], bool] | None = None,
        lock_timeout: float | None = None,
        check_interval: float = _DEFAULT_CHECK_INTERVAL,
        check_slice: int = _DEFAULT_CHECK_SLICE,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be a positive integer.")
        if check_slice <= 0:
            raise ValueError("check_slice must be a positive integer.")
        if compression not in ("gzip", "none"):
            raise ConfigError(f"forward compression must be gzip or none, got {compression!r}")
        self.ledger_url = ledger_url
        self.url = traces_url(endpoint)
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = {"content-type": "application/x-protobuf", **dict(headers or {})}
        for key, value in self.headers.items():
            check_header(key, value, "forward headers")
        if token:
            check_header("authorization", token, f"forward token ({OTEL_AUDIT_FORWARD_TOKEN})")
            self.headers["authorization"] = f"Bearer {token}"
        if compression == "gzip":
            self.headers["content-encoding"] = "gzip"
        self.compression = compression
        self.timeout = timeout
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        # None: wait for the outbox lock as long as it takes (workers share the
        # work); a number: after that many seconds waiting, count a failure.
        self.lock_timeout = lock_timeout
        # The walk of the sent records' links: a slice per chain and pass, a
        # new walk at most every check_interval seconds.
        self.check_interval = check_interval
        self.check_slice = check_slice
        self.state_path = state_path or default_state_path(ledger_url)
        self._key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        tls = ssl.create_default_context(cafile=certificate) if self._https else None
        # urllib3: a kept-alive connection, reconnected when it drops; two quick
        # reconnects (a receiver restarting) before the batch counts as failed.
        # Retries on a status are this class's own (interruptible by stop,
        # Retry-After capped by max_backoff), so the pool makes none.
        self._retries = Retry(
            total=2, connect=2, read=0, status=0, redirect=0, other=0,
            backoff_factor=0.1, allowed_methods=None, raise_on_status=False,
        )  # fmt: skip
        self._pool_options: dict[str, Any] = {
            "maxsize": 1,
            "timeout": urllib3.Timeout(total=timeout),
            "retries": self._retries,
        }
        if tls is not None:
            self._pool_options["ssl_context"] = tls
        self._pool = urllib3.connection_from_url(self.url, **self._pool_options)
        # When ``alive`` turns False (the pipeline shut down) one last pass runs, then the thread ends.
        self._alive = alive
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._passes = 0
        self._idle_pass = 0
        self._thread: threading.Thread | None = None
        self._walked_last = ""  # the chain whose walk the last pass reached last
        self._said_odd_chains = False
        self._counts = {
            "forwarded": 0, "batches": 0, "failures": 0, "rejected": 0, "rewinds": 0, "late": 0,
            "breaks": 0,
        }  # fmt: skip
        self._last_error: str | None = None

    # -- lifecycle -----------------------------------------------------

    def start(self) -> Forwarder:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="otel-audit-forward", daemon=True
            )
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the forwarding thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """New records were committed: look now instead of at the next poll."""
        self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until a pass that began after this call found nothing left to send."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._passes + 1
        self._wake.set()
        with self._cond:
            while self._idle_pass < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.5))
                self._wake.set()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current request; unsent records stay in the outbox for next time."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> ForwarderStats:
        with self._cond:
            return ForwarderStats(**self._counts, last_error=self._last_error)

    # -- the loop ------------------------------------------------------

    def _run(self) -> None:
        """The thread: never ends on an error, only when stopped (or after shutdown)."""
        lock = self._acquire_lock()
        if lock is None:
            return  # stopped while waiting
        ledger: Ledger | None = None
        ending = False
        backoff = self.poll_interval
        try:
            while not self._stop.is_set():
                with self._cond:
                    self._passes += 1
                    this_pass = self._passes
                try:
                    if ledger is None:
                        ledger = open_ledger(self.ledger_url, create=False)
                    sent = self._pass(ledger)
                except Exception as exc:
                    # Whatever failed (the outbox unreadable, the cursor file
                    # unwritable, a damaged record), this thread is the only
                    # way records leave: say so, count it, and retry with backoff.
                    if isinstance(exc, AuditError):
                        self._note_error(f"outbox {self.ledger_url}: {exc}")
                    elif isinstance(exc, (OSError, ValueError)):
                        self._note_error(str(exc))
                    else:  # a bug: keep going, but with the traceback in the log
                        self._note_error(f"{type(exc).__name__}: {exc}", unexpected=True)
                    if ledger is not None:
                        _close_quietly(ledger)
                        ledger = None
                    self._drop_connection()
                    delay = max(0.01, min(backoff, self.max_backoff))
                    backoff = min(backoff * 2, max(self.max_backoff, self.poll_interval))
                    self._stop.wait(delay * random.uniform(0.9, 1.1))
                    continue
                backoff = self.poll_interval
                if sent:
                    continue
                with self._cond:
                    self._idle_pass = this_pass
                    self._cond.notify_all()
                if self._alive is not None and not self._alive():
                    if ending:
                        return
                    ending = True  # one more pass: records committed at shutdown
                    continue
                self._wake.wait(self.poll_interval)
                self._wake.clear()
        finally:
            if ledger is not None:
                _close_quietly(ledger)
            self._drop_connection()
            lock.close()

    def _acquire_lock(self) -> Any:
        """Open and exclusively lock the cursor lock file; None when stopped first.

        Several processes may forward the same outbox: one holds the lock, the
        others wait. Failing to open the file is a failure (counted, retried),
        and so is waiting longer than ``lock_timeout``.
        """
        lock_path = self.state_path + ".lock"
        backoff = self.poll_interval
        lock = None
        waiting_since = time.monotonic()
        timed_out = False
        while not self._stop.is_set():
            if lock is None:
                try:
                    lock = open(lock_path, "a+")
                except OSError as exc:
                    self._note_error(f"cannot open lock file {lock_path}: {exc}")
                    self._stop.wait(max(0.01, min(backoff, self.max_backoff)))
                    backoff = min(backoff * 2, max(self.max_backoff, self.poll_interval))
                    continue
            try:
                _lock_exclusive(lock)
                return lock
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    self._note_error(f"cannot lock {lock_path}: {exc}")
                elif (
                    not timed_out
                    and self.lock_timeout is not None
                    and time.monotonic() - waiting_since >= self.lock_timeout
                ):
                    timed_out = True
                    self._note_error(
                        f"another forwarder holds {lock_path} (waited {self.lock_timeout:g} s)"
                    )
            self._stop.wait(min(self.poll_interval, 0.5))
        if lock is not None:
            lock.close()
        return None

    def _pass(self, ledger: Ledger) -> int:
        """Send every record after the cursors, and any found in gaps; returns how many were sent.

        A chain that fails (a damaged record in it) does not hold the others:
        they are sent, then the first failure is raised for the thread to log,
        count and retry.
        """
        cursors = self._load_cursors()
        sent = 0
        failed: Exception | None = None
        listed = ledger.chains()
        chains = [c for c in listed if isinstance(c, str)]
        if len(chains) != len(listed) and not self._said_odd_chains:
            self._said_odd_chains = True  # verify names those rows; they are no records
            _log.error(
                "otel-audit forward: the outbox has rows whose chain id is not text (run"
                " otel-audit verify); they are not sent"
            )
        for chain in chains:
            try:
                got = self._pass_chain(ledger, chain, cursors)
            except Exception as exc:
                failed = failed or exc
                continue
            if got is None:
                return sent  # stopping
            sent += got
        # Then the walks of the records sent, one budget for all chains, the
        # chains taken in turn from where the last pass's budget ran out: a
        # long chain cannot keep the others from ever being walked.
        budget = [self.check_slice]
        turn = sum(1 for c in chains if c <= self._walked_last) % max(1, len(chains))
        for chain in chains[turn:] + chains[:turn]:
            if budget[0] <= 0:
                break
            try:
                if self._links_broke(ledger, chain, cursors, budget):
                    again = self._send_after_cursor(ledger, chain, cursors)
                    if again is None:
                        return sent
                    sent += again
            except Exception as exc:
                failed = failed or exc
            self._walked_last = chain
        present = set(chains)
        gone = [c for c in cursors.seqs if c not in present and cursors.seqs[c]]
        for chain in gone[:_LOGGED_BREAKS]:
            _log.error(
                "otel-audit forward: chain %r is gone from the outbox, %d record(s) of it sent:"
                " the outbox was edited outside the writer (run otel-audit verify)",
                chain, cursors.seqs[chain],
            )  # fmt: skip
        if len(gone) > _LOGGED_BREAKS:
            _log.error("otel-audit forward: %d more chains are gone", len(gone) - _LOGGED_BREAKS)
        if gone:
            with self._cond:
                self._counts["breaks"] += len(gone)
        for chain in [c for c in cursors.seqs if c not in present]:
            # Nothing left to check or send: the cursor file keeps no entry for it.
            for kept in (cursors.seqs, cursors.hashes, cursors.holes, cursors.sweeps,
                         cursors.breaks, cursors.edges, cursors.resend):  # fmt: skip
                kept.pop(chain, None)
            cursors.dirty = True
        if cursors.dirty:  # the walks moved: saved once per pass, not once per chain
            self._save_cursors(cursors)
        if failed is not None:
            raise failed
        return sent

    def _pass_chain(self, ledger: Ledger, chain: str, cursors: _Cursors) -> int | None:
        """One chain's share of a pass: how many records it sent (None: stopping)."""
        hashes, holes = cursors.hashes, cursors.holes
        sent = 0
        if chain in hashes and self._cursor_row_lost(
            ledger, chain, cursors.seqs[chain], hashes[chain]
        ):
            # Why the chain's start, not its head or the cursor - 1: the
            # records never sent are those the writer appended after the
            # row at the cursor vanished (it appends after whatever the
            # head is then), at seqs the cursor has already passed, and
            # nothing tells them from records sent before: "1..12 sent,
            # then a row planted at 1000" and "1..10 sent, 1000 planted,
            # sent, deleted, 11..12 written" leave the same outbox and the
            # same cursor file. Any point above the start can skip some;
            # the start cannot. The resend happens only after tampering,
            # and the receiver stores each (trace id, span id) once.
            cursors.resend[chain] = max(cursors.resend.get(chain, 0), cursors.seqs[chain])
            cursors.seqs[chain] = 0
            del hashes[chain]
            holes.pop(chain, None)
            cursors.edges.pop(chain, None)
            cursors.sweeps.pop(chain, None)
            self._save_cursors(cursors)
        if holes.get(chain):
            late = self._fill_holes(ledger, chain, cursors)
            if late is None:
                return None
            sent += late
        new = self._send_after_cursor(ledger, chain, cursors)
        if new is None:
            return None
        return sent + new

    def _send_after_cursor(self, ledger: Ledger, chain: str, cursors: _Cursors) -> int | None:
        """Send ``chain``'s records after its cursor; how many (None: stopping)."""
        hashes, holes = cursors.hashes, cursors.holes
        sent = 0
        while not self._stop.is_set():
            after = cursors.seqs.get(chain, 0)
            rows = list(itertools.islice(ledger.scan(chain, after), self.batch_size))
            if not rows:
                break
            if not self._deliver(chain, rows, cursors.resend.get(chain, 0)):
                return None
            if rows[-1].seq >= cursors.resend.get(chain, 0):
                cursors.resend.pop(chain, None)
            edges = cursors.edges.setdefault(chain, {})
            _note_gaps(holes.setdefault(chain, []), after, rows, None, edges, hashes.get(chain))
            if not holes[chain]:
                del holes[chain]
            if not edges:
                del cursors.edges[chain]
            cursors.seqs[chain] = rows[-1].seq
            hashes[chain] = rows[-1].hash.hex()
            self._save_cursors(cursors)
            sent += len(rows)
        return sent

    def _links_broke(
        self, ledger: Ledger, chain: str, cursors: _Cursors, budget: list[int]
    ) -> bool:
        """Walk the next records of ``chain`` already sent; True when it rewound the chain.

        Each record must hash to its stored hash (SHA-256 of prev_hash and
        body) and link to the record before it; a seq missing between two
        records must be a gap seen when sending, and the record below that
        gap the one that was there then. Anything else means records already
        sent were replaced or removed under the cursor: each such place is
        logged, counted and remembered (reported once), and the chain is
        rewound to its first record (as when the record at the cursor is
        lost), so that the records which replaced them are sent too: at once,
        and then at most once every ``check_interval``. ``budget`` (records,
        shared by the chains of a pass) bounds the pass.
        """
        top = cursors.seqs.get(chain, 0)
        if not top or budget[0] <= 0:
            return False
        now = time.time()
        walk = cursors.sweeps.get(chain)
        if walk is None or walk[0] > top:
            walk = [0, 0, GENESIS.hex(), now, 0.0, False]
        scan, last, prev = walk[0], walk[1], bytes.fromhex(walk[2])
        began, rewound_at, due = walk[3], walk[4], walk[5]
        if due and not 0 <= now - rewound_at < self.check_interval:  # (a clock set back: due)
            return self._rewind_for_breaks(chain, cursors, [scan, last, walk[2], began, now, False])
        if scan >= top:  # this walk is done: the next begins check_interval after it began
            if 0 <= now - began < self.check_interval:
                return False
            scan, last, prev, began = 0, 0, GENESIS, now
        holes = sorted(cursors.holes.get(chain, []))
        starts = [low for low, _high in holes]
        at = bisect.bisect_right(starts, scan + 1) - 1
        if at >= 0 and holes[at][0] <= scan + 1 <= holes[at][1]:
            scan = holes[at][1]  # a gap seen when sending is watched apart
        until = min(top, scan + budget[0])
        rows = list(ledger.scan(chain, scan, until))
        if not rows and until < top:
            # Nothing in this stretch: go to the next record at once rather
            # than stretch by stretch (a gap nobody saw would take forever).
            rows = list(itertools.islice(ledger.scan(chain, until, top), 1))
            until = rows[0].seq if rows else top
        edges = cursors.edges.get(chain, {})
        known = cursors.breaks.setdefault(chain, [])
        seen = set(known)
        found: list[tuple[int, str]] = []
        for row in rows:
            digest = link_hash(row.prev_hash, row.body)
            wrong = []
            if row.seq > last + 1:
                if not _covered(holes, starts, last + 1, row.seq - 1):
                    wrong.append(f"seqs {last + 1} to {row.seq - 1} were removed")
                elif edges.get(str(last + 1), prev.hex()) != prev.hex():
                    wrong.append(f"the record below the gap at seq {last + 1} was replaced")
            elif row.prev_hash != prev:
                wrong.append("it does not link to the record before it")
            if digest != row.hash:
                wrong.append("its hash does not match its bytes")
            if wrong:
                key = (
                    f"{row.seq}:{digest.hex()}:{row.prev_hash.hex()}:{prev.hex()}:{row.hash.hex()}"
                )
                if key not in seen:
                    seen.add(key)
                    known.append(key)
                    found.append((row.seq, "; ".join(wrong)))
            last, prev = row.seq, row.hash
        budget[0] -= max(len(rows), 1)
        del known[:-_KEEP_BREAKS]  # the oldest go: one found again is reported again
        if not known:
            del cursors.breaks[chain]
        walk = [until, last, prev.hex(), began, rewound_at, due]
        cursors.sweeps[chain] = walk
        cursors.dirty = True
        if not found:
            return False
        with self._cond:
            self._counts["breaks"] += len(found)
        for seq, what in found[:_LOGGED_BREAKS]:
            _log.error(
                "otel-audit forward: chain %r: seq %d: %s: records already sent were"
                " replaced or removed outside the writer (run otel-audit verify)",
                chain, seq, what,
            )  # fmt: skip
        if len(found) > _LOGGED_BREAKS:
            _log.error(
                "otel-audit forward: chain %r: %d more such places up to seq %d",
                chain, len(found) - _LOGGED_BREAKS, found[-1][0],
            )  # fmt: skip
        if 0 <= now - rewound_at < self.check_interval:
            walk[5] = True  # rewound lately: again once check_interval has passed
            self._save_cursors(cursors)
            return False
        walk[4], walk[5] = now, False
        return self._rewind_for_breaks(chain, cursors, walk)

    def _rewind_for_breaks(self, chain: str, cursors: _Cursors, walk: list[Any]) -> bool:
        """Send ``chain`` again from its first record; the walk goes on where it was."""
        cursors.resend[chain] = max(cursors.resend.get(chain, 0), cursors.seqs.get(chain, 0))
        cursors.seqs[chain] = 0
        cursors.hashes.pop(chain, None)
        cursors.holes.pop(chain, None)
        cursors.edges.pop(chain, None)
        cursors.sweeps[chain] = walk
        self._save_cursors(cursors)
        _log.error(
            "otel-audit forward: chain %r: sending it again from its first record, so that"
            " the records which replaced those already sent reach the receiver",
            chain,
        )
        return True

    def _fill_holes(self, ledger: Ledger, chain: str, cursors: _Cursors) -> int | None:
        """Send the records that appeared in ``chain``'s gaps; how many (None: stopping).

        One indexed range read per gap. A gap that stays empty costs only that;
        a real chain has none, a tampered one as many as were made (each kept:
        merging two would take in the records between them, sent already).
        """
        holes = cursors.holes
        found: list[RawRow] = []
        for low, high in holes[chain]:
            found += ledger.scan(chain, low - 1, high)  # bounded in the query itself
        if not found:
            return 0
        for start in range(0, len(found), self.batch_size):
            if not self._deliver(chain, found[start : start + self.batch_size]):
                return None
        remaining: list[list[int]] = []
        was = cursors.edges.pop(chain, {})
        edges: dict[str, str] = {}
        for low, high in holes[chain]:
            inside = [r for r in found if low <= r.seq <= high]
            _note_gaps(remaining, low - 1, inside, high, edges, was.get(str(low)))
        holes[chain] = remaining
        if not remaining:
            del holes[chain]
        if edges:
            cursors.edges[chain] = edges
        self._save_cursors(cursors)
        # Said once they are sent and the gaps saved: a failed save sends them
        # again (deduplicated) without counting or logging them twice.
        with self._cond:
            self._counts["late"] += len(found)
        _log.error(
            "otel-audit forward: chain %r: %d record(s) appeared below the forward cursor, in"
            " gaps between seqs %d and %d that held no record when it passed them: the outbox"
            " was edited outside the writer (run otel-audit verify); sent them",
            chain, len(found), found[0].seq, found[-1].seq,
        )  # fmt: skip
        return len(found)

    def _cursor_row_lost(self, ledger: Ledger, chain: str, seq: int, sent_hash: str) -> bool:
        """True (logged and counted) when the record at ``chain``'s cursor is gone or changed.

        The writer only appends, so the last record sent stays where it was
        with the same hash; one indexed lookup per chain and pass checks it.
        """
        # scan reads integer seqs only: a row planted at 9.5 is not the record at 10.
        found = list(ledger.scan(chain, seq - 1, seq))
        if found:
            if found[0].hash.hex() == sent_hash:
                return False
            what = (
                f"was changed (hash now {found[0].hash.hex()[:16]}..., sent with"
                f" {sent_hash[:16]}...)"
            )
        else:
            what = "is gone"
        with self._cond:
            self._counts["rewinds"] += 1
        _log.error(
            "otel-audit forward: chain %r: the record at the forward cursor (seq %d, the last"
            " one sent) %s: the outbox was edited outside the writer (run otel-audit verify);"
            " sending the chain again from its first record so that no record written below"
            " seq %d is skipped",
            chain, seq, what, seq,
        )  # fmt: skip
        return True

    def _deliver(self, chain: str, rows: list[RawRow], sent_upto: int = 0) -> bool:
        """Send one batch until the receiver takes it; False only when stopping.

        A record at or below ``sent_upto`` (a chain sent again) that no longer
        decodes was sent before as it was: it is skipped, and said.
        """
        backoff = 0.5
        last_seq = rows[-1].seq
        size = len(rows)
        start = 0
        while start < len(rows):
            part = rows[start : start + size]
            records = []
            for row in part:
                try:
                    records.append(decode(row.body))
                except ValueError as exc:
                    if row.seq <= sent_upto:
                        _log.error(
                            "otel-audit forward: chain %r: record %d, sent before, no longer"
                            " decodes (%s): the outbox was edited; not sent again",
                            chain, row.seq, exc,
                        )  # fmt: skip
                        continue
                    # Not skipped (nothing is): the outbox needs repair; retried with backoff.
                    raise ValueError(
                        f"record {row.seq} of chain {chain!r} in the outbox cannot be sent: {exc}"
                    ) from exc
            if not records:
                start += len(part)
                continue
            try:
                rejected, message = self._send(records)
            except _SendFailed as exc:
                if exc.too_large and size > 1:
                    size = max(1, size // 2)
                    continue
                self._note_error(f"sending chain {chain!r} up to seq {last_seq}: {exc}")
                delay = exc.retry_after if exc.retry_after is not None else backoff
                delay = min(delay, self.max_backoff) * random.uniform(0.9, 1.1)
                backoff = min(backoff * 2, self.max_backoff)
                if self._stop.wait(delay):
                    return False
                continue
            with self._cond:
                self._counts["forwarded"] += len(part) - rejected
                self._counts["batches"] += 1
                self._counts["rejected"] += rejected
            if rejected:
                # The receiver refused them for good (invalid ids); resending
                # would block the outbox forever. Said loudly and counted.
                _log.error(
                    "otel-audit forward: receiver rejected %d records of chain %r: %s",
                    rejected, chain, message,
                )  # fmt: skip
            start += len(part)
            backoff = 0.5
        return True

    def _send(self, records: list) -> tuple[int, str]:  # type: ignore[type-arg]
        payload = request_from_records(records).SerializeToString()
        if self.compression == "gzip":
            payload = gzip.compress(payload, compresslevel=5)
        try:
            response = self._pool.urlopen(
                "POST",
                self._path,
                body=payload,
                headers=self.headers,
                retries=self._retries,
                assert_same_host=False,
            )
            body = response.data
        except (OSError, HTTPError) as exc:
            self._drop_connection()
            raise _SendFailed(_reason(exc)) from None
        status = response.status
        if 200 <= status < 300:
            reply = ExportTraceServiceResponse()
            try:
                reply.ParseFromString(body)
            except DecodeError:  # a non-otel-audit receiver may answer an odd body
                return 0, ""
            return int(reply.partial_success.rejected_spans), reply.partial_success.error_message
        retry_after = (
            _retry_after(response.headers.get("retry-after")) if status in _RETRYABLE else None
        )
        raise _SendFailed(
            f"HTTP {status} from {self.url}: {_status_message(body)}",
            retry_after=retry_after,
            too_large=status == 413,
        )

    def _drop_connection(self) -> None:
        # A connection in an unknown state is never reused: a fresh pool.
        self._pool.close()
        self._pool = urllib3.connection_from_url(self.url, **self._pool_options)

    def _note_error(self, message: str, unexpected: bool = False) -> None:
        with self._cond:
            self._counts["failures"] += 1
            first = self._last_error != message
            self._last_error = message
        # Logged once per distinct error, not once per retry of a long outage;
        # an unexpected exception once with its traceback, for the bug report.
        if first:
            _log.warning(
                "otel-audit forward: %s (will retry)", message, exc_info=unexpected or None
            )

    # -- cursor file ---------------------------------------------------

    def _load_cursors(self) -> _Cursors:
        """The cursor file's entry for this endpoint (empty when there is none, or a bad one)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return _Cursors()
        except (OSError, ValueError) as exc:
            # Starting again from 0 is safe (the receiver deduplicates), only slower.
            _log.error(
                "otel-audit forward: cursor file %s unreadable (%s); resending",
                self.state_path,
                exc,
            )
            return _Cursors()
        try:
            entry = data.get(self._key, {}) if isinstance(data, dict) else {}
            cursors = {str(k): int(v) for k, v in entry.get("chains", {}).items()}
            # A file written before hashes were kept has none: that chain's
            # cursor is taken on trust until its next send records a hash.
            hashes = {}
            for k, h in entry.get("hashes", {}).items():
                bytes.fromhex(h)  # TypeError or ValueError when not hex text
                if str(k) in cursors:
                    hashes[str(k)] = h
            holes: dict[str, list[list[int]]] = {}
            for k, gaps in entry.get("holes", {}).items():
                kept = [[int(low), int(high)] for low, high in gaps]
                if any(low > high for low, high in kept):
                    raise ValueError(f"a gap of chain {k!r} ends before it starts")
                if str(k) in cursors and kept:
                    holes[str(k)] = kept
            found = _Cursors(cursors, hashes, holes, *_checks(entry, cursors))
            for k, below in (entry.get("edges") or {}).items():
                if str(k) in holes and isinstance(below, dict):
                    found.edges[str(k)] = {str(a): str(b) for a, b in below.items()}
            for k, upto in (entry.get("resend") or {}).items():
                if isinstance(upto, int) and str(k) in cursors:
                    found.resend[str(k)] = upto
            return found
        except (AttributeError, TypeError, ValueError) as exc:
            _log.error(
                "otel-audit forward: cursor file %s malformed (%s); resending",
                self.state_path,
                exc,
            )
            return _Cursors()

    def _save_cursors(self, cursors: _Cursors) -> None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[self._key] = {
            "endpoint": self.url,
            "chains": cursors.seqs,
            "hashes": cursors.hashes,
            "holes": cursors.holes,
            "sweeps": cursors.sweeps,
            "breaks": cursors.breaks,
            "edges": cursors.edges,
            "resend": cursors.resend,
        }
        tmp = f"{self.state_path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            # The batch was delivered; it is sent again (and deduplicated) on retry.
            raise OSError(f"cannot write cursor file {self.state_path}: {exc}") from exc


if sys.platform == "win32":
    import msvcrt

    def _lock_exclusive(file: IO[str]) -> None:
        """Lock ``file`` for this process or raise OSError at once (held until closed)."""
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    def _lock_exclusive(file: IO[str]) -> None:
        """Lock ``file`` for this process or raise OSError at once (held until closed)."""
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _note_gaps(
    holes: list[list[int]],
    after: int,
    rows: list[RawRow],
    upto: int | None = None,
    edges: dict[str, str] | None = None,
    below: str | None = None,
) -> None:
    """Add to ``holes`` the seqs after ``after`` that ``rows`` (in seq order) skip, and,
    with ``upto``, those after the last of them up to ``upto``. ``edges`` gets, for
    each gap, the hash of the record just below it (``below``: that of ``after``)."""
    prev = after
    for row in rows:
        if row.seq > prev + 1:
            holes.append([prev + 1, row.seq - 1])
            if edges is not None and below is not None:
                edges[str(prev + 1)] = below
        prev = row.seq
        below = row.hash.hex()
    if upto is not None and upto > prev:
        holes.append([prev + 1, upto])
        if edges is not None and below is not None:
            edges[str(prev + 1)] = below


def _checks(
    entry: Mapping[str, Any], cursors: Mapping[str, int]
) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """The walks' positions and the places reported, from a cursor file entry.

    Lenient: a value that does not read (a file from an older version has
    none) only starts that chain's walk again, which is always safe.
    """
    sweeps: dict[str, list[Any]] = {}
    breaks: dict[str, list[str]] = {}
    for k, walk in (entry.get("sweeps") or {}).items():
        try:
            scan, last, digest, began = int(walk[0]), int(walk[1]), str(walk[2]), float(walk[3])
            rewound_at, due = float(walk[4]), bool(walk[5])
            if len(bytes.fromhex(digest)) != 32:
                continue
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if str(k) in cursors and 0 <= last <= scan:
            sweeps[str(k)] = [scan, last, digest, began, rewound_at, due]
    for k, seen in (entry.get("breaks") or {}).items():
        if str(k) in cursors and isinstance(seen, list):
            breaks[str(k)] = [str(x) for x in seen][-_KEEP_BREAKS:]
    return sweeps, breaks


def _covered(holes: list[list[int]], starts: list[int], low: int, high: int) -> bool:
    """True when every seq from ``low`` to ``high`` lies in the gaps ``holes`` (sorted;
    ``starts``: their first seqs)."""
    at = bisect.bisect_right(starts, low) - 1
    while 0 <= at < len(holes) and holes[at][0] <= low <= holes[at][1]:
        low = holes[at][1] + 1
        if low > high:
            return True
        at += 1
    return low > high


def _close_quietly(ledger: Ledger) -> None:
    try:
        ledger.close()
    except Exception:  # closing a broken outbox must not end the thread
        _log.debug("otel-audit forward: closing the outbox failed", exc_info=True)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value (seconds or an HTTP date), read by urllib3."""
    if not value:
        return None
    try:
        return max(0.0, Retry().parse_retry_after(value))
    except InvalidHeader:
        return None


def _reason(exc: BaseException) -> str:
    """The root cause of a urllib3 error, e.g. ``ConnectionRefusedError: [Errno 111] ...``."""
    root = exc
    seen = 0
    while seen < 10:
        seen += 1
        below = getattr(root, "reason", None)
        if not isinstance(below, BaseException):
            below = root.__cause__ or root.__context__
        if below is None:
            break
        root = below
    return f"{type(root).__name__}: {root}"


def _status_message(body: bytes) -> str:
    from google.rpc import status_pb2  # type: ignore[import-untyped]

    status = status_pb2.Status()
    try:
        status.ParseFromString(body)
    except DecodeError:
        status.message = ""  # not a google.rpc.Status: show the raw body
    if status.message:
        return str(status.message)
    return body[:200].decode("utf-8", "replace").strip() or "(no body)"


def forwarder_from_env(
    ledger_url: str, env: Mapping[str, str] | None = None, alive: Callable[[], bool] | None = None
) -> Forwarder | None:
    """A Forwarder configured from ``OTEL_AUDIT_FORWARD_*``, or None when no endpoint is set."""
    env = os.environ if env is None else env
    endpoint = env.get(OTEL_AUDIT_FORWARD_ENDPOINT, "").strip()
    if not endpoint:
        return None
    timeout_text = env.get(OTEL_AUDIT_FORWARD_TIMEOUT, "").strip()
    try:
        timeout = float(timeout_text) if timeout_text else _DEFAULT_TIMEOUT
    except ValueError:
        raise ConfigError(
            f"{OTEL_AUDIT_FORWARD_TIMEOUT} must be a number, got {timeout_text!r}"
        ) from None
    if not timeout > 0:
        raise ConfigError(f"{OTEL_AUDIT_FORWARD_TIMEOUT} must be positive, got {timeout_text!r}")
    return Forwarder(
        ledger_url,
        endpoint,
        headers=parse_headers(env.get(OTEL_AUDIT_FORWARD_HEADERS)),
        token=env.get(OTEL_AUDIT_FORWARD_TOKEN, "").strip() or None,
        state_path=env.get(OTEL_AUDIT_FORWARD_STATE, "").strip() or None,
        certificate=env.get(OTEL_AUDIT_FORWARD_CERTIFICATE, "").strip() or None,
        compression=(env.get(OTEL_AUDIT_FORWARD_COMPRESSION, "").strip().lower() or "gzip"),
        timeout=timeout,
        alive=alive,
    )


def start_forwarder_from_env(pipeline: AuditPipeline) -> Forwarder | None:
    """Start forwarding ``pipeline``'s ledger when ``OTEL_AUDIT_FORWARD_ENDPOINT`` is set."""
    writer = pipeline.writer
    # The writer has no public "shut down" flag; ``_closed`` is read, never written.
    forwarder = forwarder_from_env(
        pipeline.ledger_url, alive=lambda: not getattr(writer, "_closed", False)
    )
    if forwarder is None:
        return None
    forwarder.start()
    pipeline.writer.commit_listeners.append(lambda _seconds, _n: forwarder.wake())
    atexit.register(forwarder.stop, 2.0)
    return forwarder
