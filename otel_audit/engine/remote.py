"""ProcessWriter: the ledger writer in a process of its own (``writer="process"``).

The in-process writer builds, redacts, encodes, hashes and appends every
record on the application's interpreter, so under the interpreter lock an
audited span costs about twice a plain one. With ``configure(writer=
"process")`` the application keeps the cheap part: ``on_end`` selects the
span, asks the policy, and queues the span object; a sender thread turns a
batch of queued spans into one frame of plain values (``snapshot``) and
writes it to the writer process (``engine/worker.py``), which runs the same
record path and a LedgerWriter there, and acknowledges each record once it
is committed. Tickets, ``flush``, ``check``, ``stats``, listeners and
shutdown behave as LedgerWriter's, so actions, scopes and integrations do
not know which writer they have.

Frames, both ways: a 4-byte little-endian length, then orjson. To the
worker: ``["config", {...}]`` once, then ``["b", [item, ...]]`` batches and
``["q"]`` (shut down). An item is ``[id, "s", snapshot, extra, level,
durability]`` (a span) or ``[id, "r", body]`` (finished canonical bytes).
From the worker: ``["ready", pid]`` or ``["error", message]``, then ``["a",
acks, commits, health]`` (``[id, seq, hash, error]`` each), ``["c",
checkpoint]`` and finally ``["q", health]``.

A value a frame cannot carry exactly (a non-finite float, an integer beyond
64 bits, bytes, a lone surrogate) makes that span's record be built here by
the in-process path and sent finished: the bytes are the same either way.
Durability is unchanged: a sync record's ticket resolves only when the
worker says it committed; async records are retried by the worker's writer
until they commit. If the worker dies, every record not acknowledged fails
(its action raises) and the writer refuses new actions, like a dead writer
thread. Fork-safe: a forked child closes the inherited pipes and starts its
own worker on first use.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import orjson

from otel_audit.engine.ledger import Appended
from otel_audit.engine.writer import Ticket, WriterStats, safe, wait_idle
from otel_audit.errors import LedgerError, LedgerUnavailable, LedgerWriteError
from otel_audit.proof.chain import Checkpoint

_log = logging.getLogger("otel_audit")

_HEADER = struct.Struct("<I")
# Subclasses of str, int, float and dict raise instead of being written as
# their base value (a str-enum span name would lose its str()): such a span
# goes down the exact in-process path.
_EXACT = orjson.OPT_PASSTHROUGH_SUBCLASS
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # Linux; elsewhere Python ignores SIGPIPE
# The worker's command: the working directory (often the ledger's, writable
# by others) is dropped from sys.path before anything is imported.
_WORKER = (
    "import sys; del sys.path[0]; "
    "from otel_audit.engine.worker import main; raise SystemExit(main())"
)
_MAX_BATCH = 4096
_WAKE_AT = 512  # async records queued before the sender is woken again
_LINGER = 0.005  # seconds the sender waits for an async batch to fill
# The longest the idle sender sleeps without looking at its queue: a record
# queued lazily whose waiter never came (an action abandoned) is still sent.
_LOOK = 1.0
_INHERITED: list[object] = []  # pipes inherited across fork: kept, never flushed or closed

#: Builds the canonical bytes of a span in this process (the processor's path),
#: for a span whose values a frame cannot carry exactly.
Fallback = Callable[[Any, dict[str, Any], str, str], bytes]


def framed(frame: Any) -> bytes:
    """``frame`` as it goes on the wire: a 4-byte little-endian length, then JSON."""
    data = orjson.dumps(frame)
    return _HEADER.pack(len(data)) + data


def write_frame(out: IO[bytes], frame: Any) -> None:
    out.write(framed(frame))
    out.flush()


def read_frame(inp: IO[bytes]) -> Any:
    """The next frame, or None at the end of the stream."""
    head = inp.read(4)
    if len(head) < 4:
        return None
    (size,) = _HEADER.unpack(head)
    data = inp.read(size)
    if len(data) < size:
        return None
    return orjson.loads(data)


def snapshot(span: Any) -> tuple[Any, ...]:
    """A finished span as plain values (``worker.span_view`` reads them back).

    Reads the SDK span's fields directly: the public properties copy the
    attributes, events and links on every access, which cost five times the
    rest (``tests/test_sdk_contract.py`` pins that this equals the public
    view). An ended span is immutable, so its attribute dict is passed as is.
    Never writes ``null`` itself (no parent is 0, no message ""), so a
    ``null`` in the encoded item can only be a value JSON cannot carry (a
    non-finite float) and sends the span down the in-process path.
    """
    ctx = span._context
    parent = span._parent
    status = span._status
    scope = span._instrumentation_scope
    events = span._events
    links = span._links
    attrs = span._attributes
    name = span._name
    return (
        format(ctx.trace_id, "032x"),
        ctx.span_id,
        parent.span_id if parent is not None else 0,
        name if type(name) is str else str(name),  # as record_from_span reads a str-enum
        span._kind._value_,
        span._start_time or 0,
        span._end_time or 0,
        status.status_code._value_,
        status.description or "",
        getattr(attrs, "_dict", attrs) or {},
        [[ev.name, ev.timestamp or 0, dict(ev.attributes or ())] for ev in events]
        if events
        else (),
        [
            [format(ln.context.trace_id, "032x"), ln.context.span_id, dict(ln.attributes or ())]
            for ln in links
        ]
        if links
        else (),
        scope.name if scope is not None and scope.name else "",
    )


def worker_environment() -> dict[str, str]:
    """The writer process's environment: this one, without OpenTelemetry's auto-instrumentation.

    Under ``opentelemetry-instrument`` the application's PYTHONPATH holds the
    auto-instrumentation's sitecustomize: a worker started with it would
    instrument (and, with ``OTEL_AUDIT_WRITER=process``, start a worker of
    its own, and so on). The worker needs no SDK and no instrumentation.
    """
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = env.get("PYTHONPATH", "").split(os.pathsep) + [package_root]
    env["PYTHONPATH"] = os.pathsep.join(
        p
        for p in paths
        if p
        and not p.rstrip("/\\").endswith(os.path.join("instrumentation", "auto_instrumentation"))
    )
    env["OTEL_SDK_DISABLED"] = "true"
    env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "*"
    env["OTEL_AUDIT_LEDGER"] = ""  # the zero-code hook stays off even if something loads it
    return env


class _Queued:
    __slots__ = ("ident", "span", "body", "extra", "level", "durability", "ticket")

    def __init__(
        self,
        ident: int,
        span: Any,
        body: bytes | None,
        extra: dict[str, Any] | None,
        level: str,
        durability: str,
        ticket: Ticket | None,
    ) -> None:
        self.ident = ident
        self.span = span
        self.body = body
        self.extra = extra
        self.level = level
        self.durability = durability
        self.ticket = ticket


class ProcessWriter:
    """A LedgerWriter's interface, with the records built and committed in a worker process."""

    def __init__(
        self,
        ledger_url: str,
        chain: str,
        *,
        service: str,
        policy: str | None = None,
        signing_key: str | None = None,
        max_queue_size: int = 8192,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        start_timeout: float = 60.0,
    ) -> None:
        if max_queue_size <= 0:
            raise ValueError("max_queue_size must be a positive integer.")
        self.url = ledger_url
        self.chain = chain
        self.max_queue_size = max_queue_size
        self.probe_interval = 1.0
        self.start_timeout = start_timeout
        self.checkpoint_listeners: list[Callable[[Checkpoint], None]] = []
        self.commit_listeners: list[Callable[[float, int], None]] = []
        self.fallback: Fallback | None = None
        self._config = {
            "ledger": ledger_url,
            "chain": chain,
            "service": service,
            "policy": policy,
            "signing_key": signing_key,
            "max_queue_size": max_queue_size,
            "checkpoint_every": checkpoint_every,
            "checkpoint_interval": checkpoint_interval,
        }
        self._reset_state()
        self._start()  # now: a ledger or key the worker cannot open fails configure()
        weak_child = weakref.WeakMethod(self._after_fork)

        def _child() -> None:
            method = weak_child()
            if method is not None:
                method()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_child)

    def _reset_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._start_lock = threading.Lock()
        self._queue: deque[_Queued] = deque()
        self._pending: dict[int, Ticket | None] = {}
        self._ids = itertools.count(1)
        self._wake = threading.Event()
        self._write_lock = threading.Lock()  # one writer of frames at a time
        self._urgent = False  # a sync record is queued: send without lingering
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None  # frames to the worker
        self._thread: threading.Thread | None = None  # reads the worker's answers
        self._sender: threading.Thread | None = None
        self._closed = False
        self._draining = False  # shutdown has begun: new actions are refused (``check``)
        self._stopped: str | None = None  # why the worker is gone
        self._healthy = True
        self._refuse_until = 0.0
        self._last_error: str | None = None
        self._stats: WriterStats | None = None
        self._failed_here = 0  # records that never reached the worker
        self._sender_done = False  # the sender sent "q": nothing queued later is sent

    def _after_fork(self) -> None:
        proc, sock = self._proc, self._sock
        if proc is not None:
            # The parent's pipe and socket: never written, flushed or closed
            # through their objects here (only their descriptors are closed,
            # so the worker sees its end of input when the parent exits).
            _INHERITED.append(proc)
            if proc.stdout is not None:
                _INHERITED.append(proc.stdout)
                try:
                    os.close(proc.stdout.fileno())
                except OSError:
                    pass
        if sock is not None:
            try:
                os.close(sock.detach())
            except OSError:
                pass
        self._reset_state()

    # -- the worker ------------------------------------------------------

    def _start(self) -> None:
        # Frames go over a socket sent with MSG_NOSIGNAL: writing to a dead
        # worker must fail the records, not kill an application that set
        # SIGPIPE back to its default.
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
                env=worker_environment(),
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert proc.stdout is not None
        try:
            ours.sendall(framed(["config", self._config]), _NOSIGNAL)
            first = self._first_answer(proc)
        except BaseException:
            ours.close()
            proc.kill()
            proc.wait()
            raise
        if first is None or first[0] != "ready":
            ours.close()
            proc.wait(5.0)
            why = first[1] if first is not None else f"exited with code {proc.returncode}"
            raise LedgerError(f"audit writer process for {self.url} did not start: {why}")
        self._proc, self._sock = proc, ours
        reader = threading.Thread(target=self._read, name="otel-audit-worker-reader", daemon=True)
        sender = threading.Thread(target=self._send, name="otel-audit-worker-sender", daemon=True)
        reader.start()
        sender.start()
        self._thread, self._sender = reader, sender

    def _first_answer(self, proc: subprocess.Popen[bytes]) -> Any:
        stdout = proc.stdout
        assert stdout is not None
        answer: list[Any] = []
        reader = threading.Thread(target=lambda: answer.append(read_frame(stdout)))
        reader.daemon = True
        reader.start()
        reader.join(self.start_timeout)
        if reader.is_alive():
            raise LedgerError(
                f"audit writer process for {self.url} did not start within {self.start_timeout}s"
            )
        return answer[0]

    def _ensure_started(self) -> None:
        if self._proc is None:
            with self._start_lock:
                if self._closed:
                    raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
                if self._proc is None:
                    try:
                        self._start()
                    except LedgerError as exc:
                        raise LedgerUnavailable(str(exc)) from None

    def _send(self) -> None:
        """The sender thread: writes what producers queued and did not write themselves."""
        while True:
            if not self._wake.wait(_LOOK) and self._queue:
                self._urgent = True  # lazy records nobody asked for yet: send them
            self._wake.clear()
            if not self._urgent and len(self._queue) < _WAKE_AT and not self._closed:
                time.sleep(_LINGER)  # let an async batch fill (no sync record is waiting)
            self._urgent = False
            with self._write_lock:
                if not self._send_queued():
                    return
                if self._closed and not self._queue:
                    self._sender_done = True
                    self._send_quit()
                    return

    def _send_queued(self) -> bool:
        """Write everything queued, a frame per batch; False when the worker is gone.

        Called with ``_write_lock`` held, by the sender thread or by a sync
        producer that found the lock free (one hand-off less per record).
        """
        sock = self._sock
        if sock is None:
            return False
        queue = self._queue
        while queue:
            items: list[_Queued] = []
            with self._cond:
                pending = self._pending
                while queue and len(items) < _MAX_BATCH:
                    item = queue.popleft()
                    pending[item.ident] = item.ticket
                    items.append(item)
            try:
                data = self._frame(items)
            except Exception as exc:  # never leave a ticket unanswered
                self._failed(items, f"audit records not sent to the writer process: {exc!r}")
                continue
            try:
                sock.sendall(data, _NOSIGNAL)
            except OSError:  # the worker is gone: the reader answers
                return False
        return True

    def _send_quit(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendall(framed(["q"]), _NOSIGNAL)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _frame(self, items: list[_Queued]) -> bytes:
        """One batch frame; spans a frame cannot carry exactly go as finished bytes.

        An item that cannot be sent at all (its span cannot be read or encoded
        even in this process) fails alone, counted; the rest of the batch goes.
        """
        try:
            batch = [self._entry(item) for item in items]
            data = orjson.dumps(["b", batch], option=_EXACT)
        except Exception:  # a span this path cannot read or encode: find it, one by one
            data = b"null"
        if b"null" in data:
            kept = []
            for item in items:
                try:
                    kept.append(self._exact(item))
                except Exception as exc:
                    self._failed([item], f"audit record not sent to the writer process: {exc!r}")
            data = orjson.dumps(["b", kept], option=_EXACT)
        return _HEADER.pack(len(data)) + data

    @staticmethod
    def _entry(item: _Queued) -> list[Any]:
        if item.body is not None:
            return [item.ident, "r", item.body.decode("utf-8"), item.durability]
        return [item.ident, "s", snapshot(item.span), item.extra, item.level, item.durability]

    def _exact(self, item: _Queued) -> list[Any]:
        if item.body is not None:  # finished bytes: their nulls are JSON's own
            return self._entry(item)
        try:
            # A span the snapshot cannot read (an int for its kind, which the
            # SDK accepts) goes down the in-process path too.
            entry = self._entry(item)
            if b"null" not in orjson.dumps(entry, option=_EXACT):
                return entry
        except Exception:
            pass
        if self.fallback is None:
            raise LedgerWriteError("span values cannot be sent to the writer process")
        body = self.fallback(item.span, item.extra or {}, item.level, item.durability)
        return [item.ident, "r", body.decode("utf-8"), item.durability]

    def _failed(self, items: list[_Queued], why: str) -> None:
        _log.error("otel-audit: %d audit record(s) failed: %s", len(items), why)
        error = LedgerWriteError(why)
        with self._cond:
            for item in items:
                self._pending.pop(item.ident, None)
            self._failed_here += len(items)
            self._cond.notify_all()
        for item in items:
            if item.ticket is not None:
                item.ticket.resolve(None, error)

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        inp = proc.stdout
        while True:
            try:
                frame = read_frame(inp)
            except (OSError, ValueError):
                frame = None
            if frame is None:
                break
            kind = frame[0]
            if kind == "a":
                self._acked(frame[1], frame[2], frame[3], frame[4])
            elif kind == "c":
                checkpoint = Checkpoint.from_dict(frame[1])
                for listener in self.checkpoint_listeners:
                    safe(listener, checkpoint)
            elif kind == "q":
                self._health(frame[1])
        code = proc.wait()
        self._gone(f"audit writer process exited with code {code}")

    def _health(self, health: list[Any]) -> None:
        healthy, last_error, values = health
        self._stats = WriterStats(*values)
        if not healthy and self._healthy:
            self._refuse_until = time.monotonic() + self.probe_interval
        self._healthy, self._last_error = bool(healthy), last_error

    def _acked(
        self,
        acks: list[list[Any]],
        done: list[int],
        commits: list[list[Any]],
        health: list[Any],
    ) -> None:
        self._health(health)
        if not self._healthy:
            self._refuse_until = time.monotonic() + self.probe_interval
        resolved = []
        with self._cond:
            pending = self._pending
            for ident in done:  # async records: committed, nobody waits for where
                del pending[ident]
            for ident, seq, digest, error in acks:
                ticket = pending.pop(ident, None)
                if ticket is not None:
                    resolved.append((ticket, seq, digest, error))
            self._cond.notify_all()
        chain = self.chain
        for ticket, seq, digest, error in resolved:
            if error is None:
                ticket.resolve(Appended(chain, seq, bytes.fromhex(digest)), None)
            else:
                ticket.resolve(None, LedgerWriteError(error))
        for seconds, n in commits:
            for listener in self.commit_listeners:
                safe(listener, seconds, n)

    def _gone(self, why: str) -> None:
        """The worker exited: answer every record it did not acknowledge."""
        with self._cond:
            if not self._closed or self._pending or self._queue:
                self._stopped = why
            leftovers = list(self._pending.values())
            self._pending.clear()
            while self._queue:
                leftovers.append(self._queue.popleft().ticket)
            self._failed_here += len(leftovers)  # counted as well as logged
            self._cond.notify_all()
        if leftovers:
            _log.error("otel-audit: %s; %d audit records not committed", why, len(leftovers))
        error = LedgerWriteError(f"{why} before the record was committed")
        for ticket in leftovers:
            if ticket is not None:
                ticket.resolve(None, error)

    # -- producer side ----------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed and self._stopped is None

    def check(self) -> None:
        """Raise LedgerUnavailable when new audited actions should be refused (as LedgerWriter)."""
        if self._closed or self._draining:
            raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        if self._stopped is not None:
            raise LedgerUnavailable(f"audit writer for {self.url} has stopped: {self._stopped}")
        if not self._healthy and time.monotonic() < self._refuse_until:
            raise LedgerUnavailable(f"audit ledger {self.url} is unavailable: {self._last_error}")

    def _put(self, item: _Queued, lazy: bool = False) -> None:
        if self._closed:
            raise LedgerUnavailable(f"audit writer for {self.url} is shut down")
        if self._stopped is not None:
            raise LedgerWriteError(f"audit writer for {self.url} has stopped: {self._stopped}")
        self._ensure_started()
        if len(self._queue) + len(self._pending) >= self.max_queue_size:
            self.wake()  # lazy records held here: send them to make room
            with self._cond:  # full: block, never drop
                while (
                    len(self._queue) + len(self._pending) >= self.max_queue_size
                    and self._stopped is None
                    and not self._closed
                ):
                    self._cond.wait(0.5)
            if self._stopped is not None:
                raise LedgerWriteError(f"audit writer for {self.url} has stopped: {self._stopped}")
        queue = self._queue
        queue.append(item)
        if self._stopped is not None or (self._closed and self._sender_done):
            # Shutdown or the worker's death raced this append: take the record
            # back if nobody has; if someone has, it is answered from there.
            try:
                queue.remove(item)
            except ValueError:
                pass
            else:
                raise LedgerWriteError(f"audit writer for {self.url} has stopped: {self._stopped}")
        if lazy:
            # Its waiter (Ticket.wait, settle_async) or a flush wakes the
            # sender (``wake``): an action's effects travel in one frame.
            if len(queue) < min(_WAKE_AT, self.max_queue_size // 2):
                return
        elif item.ticket is not None:
            self._urgent = True  # someone waits: the sender must not linger
            if self._write_lock.acquire(blocking=False):
                # A sync record and nobody writing: write it now, from this thread.
                try:
                    self._send_queued()
                finally:
                    self._write_lock.release()
                if not queue:
                    return
        elif len(queue) != 1 and len(queue) < _WAKE_AT and self._wake.is_set():
            # Async: the sender was woken by the first record of this batch
            # and lingers for more; waking it for each would cost a thread
            # switch per record.
            return
        if not self._wake.is_set():
            self._wake.set()

    def send_span(
        self,
        span: Any,
        extra: dict[str, Any],
        level: str,
        durability: str,
        wait: bool,
        lazy: bool = False,
    ) -> Ticket | None:
        """Queue a selected span's record, built by the worker (``level``: the policy's decision).

        ``lazy``: as ``LedgerWriter.enqueue``: sent when its ticket is first waited for.
        """
        ticket = Ticket() if wait else None
        record = _Queued(next(self._ids), span, None, extra, level, durability, ticket)
        self._put(record, lazy and wait)
        return ticket

    def enqueue(self, body: bytes, *, lazy: bool = False) -> Ticket:
        """Queue ``body`` (sync); ``lazy`` as ``LedgerWriter.enqueue``."""
        ticket = Ticket()
        self._put(_Queued(next(self._ids), None, body, None, "", "sync", ticket), lazy)
        return ticket

    def submit(self, body: bytes) -> None:
        self._put(_Queued(next(self._ids), None, body, None, "", "async", None))

    def write(self, body: bytes) -> Appended:
        return self.enqueue(body).wait(self)

    def lead(self, ticket: Ticket) -> bool:
        """Never: the worker process commits (``wake`` sends from this thread)."""
        return False

    def answers_here(self) -> bool:
        """The reader thread resolves tickets: a wait there could never end."""
        return self._thread is threading.current_thread()

    def withdraw(self, ticket: Ticket) -> bool:
        """Never: a record queued here may already be on its way to the worker."""
        return False

    def wake(self) -> None:
        """Send what is queued now (records queued lazily wait for this)."""
        if not self._queue or threading.current_thread() is self._sender:
            # Nothing held back (a sync record is sent by its own thread), or
            # this is the sender: a finalizer run here may hold the event's lock.
            return
        self._urgent = True
        if self._write_lock.acquire(blocking=False):
            # Nobody writing: send from this thread, as a sync record is (no hand-off).
            try:
                self._send_queued()
            finally:
                self._write_lock.release()
            if not self._queue:
                return
        if not self._wake.is_set():
            self._wake.set()

    def write_many(self, bodies: list[bytes]) -> list[Appended]:
        tickets = [self.enqueue(body) for body in bodies]
        return [ticket.wait(self) for ticket in tickets]

    # -- lifecycle --------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (or failed)."""
        self.wake()
        return wait_idle(
            self._cond,
            lambda: bool(self._queue or self._pending),
            lambda: self._stopped is None and self._proc is not None,
            timeout,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Commit what is queued, let the worker write its final checkpoint, stop it."""
        deadline = time.monotonic() + timeout
        self._draining = True  # a process under load must still stop: no new actions
        self.flush(timeout)
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        proc, reader = self._proc, self._thread
        self._wake.set()
        if proc is None or reader is None:
            return
        reader.join(max(0.0, deadline - time.monotonic()))
        if reader.is_alive():
            _log.error(
                "otel-audit: writer process for %s did not stop within %ss; stopping it",
                self.url,
                timeout,
            )
            proc.kill()
            reader.join(5.0)

    def stats(self) -> WriterStats:
        """The worker's counters as last reported, with what is still on its way there."""
        with self._cond:
            waiting = len(self._queue) + len(self._pending)
        base = self._stats
        if base is None:
            base = WriterStats(0, 0, 0, 0, 0, 0, 0, 0, True, None, 0.0, 0.0)
        depth = max(waiting, base.queue_depth)
        failed = base.failed + self._failed_here
        return WriterStats(
            submitted=base.committed + failed + depth,
            committed=base.committed,
            failed=failed,
            retries=base.retries,
            batches=base.batches,
            checkpoints=base.checkpoints,
            checkpoint_errors=base.checkpoint_errors,
            queue_depth=depth,
            healthy=self.healthy,
            last_error=self._stopped or self._last_error,
            commit_latency_p50_ms=base.commit_latency_p50_ms,
            commit_latency_p99_ms=base.commit_latency_p99_ms,
        )
