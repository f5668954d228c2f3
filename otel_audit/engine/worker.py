"""The writer process: builds, redacts, encodes and commits what an application sends.

Started by ``engine/remote.py`` (``configure(writer="process")``), which
runs ``main`` with the working directory left out of ``sys.path``; it talks
over its standard input (a socket) and output (a pipe) in frames (``engine/remote.py`` describes them). The
application's process keeps only the cheap part of each audit record (the
span's fields and the policy's decision); the record's Python work (build,
redaction, encoding, hashing, the ledger's append) runs here, on another
interpreter and another core, through the same functions the in-process
path calls, so the bytes are the same.

One thread builds and commits (an ``inline`` LedgerWriter, driven by
``LedgerWriter.turn``): every frame that arrived while a commit was in
flight goes into the next one, with no hand-off between threads; a second
thread only reads the input as it arrives, so an application never blocks
writing a frame while the worker is inside a long commit.

Standard input closing (the application exited or was killed) drains what
arrived and shuts the writer down with a final checkpoint. SIGINT and
SIGTERM are ignored: a terminal's Ctrl-C or a service manager's SIGTERM to
the whole process group must not lose records the application already
handed over; the application's own shutdown ends this process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, BinaryIO

import orjson
from opentelemetry.trace import SpanKind, StatusCode

from otel_audit.capture.decision import Decision
from otel_audit.engine.record import encode, record_from_span
from otel_audit.engine.remote import _HEADER, write_frame
from otel_audit.engine.writer import LedgerWriter, Ticket, WriterStats
from otel_audit.errors import AuditError

_KINDS = {k.value: k for k in SpanKind}
_STATS_FIELDS = [field.name for field in dataclasses.fields(WriterStats)]
_P50 = _STATS_FIELDS.index("commit_latency_p50_ms")
_P99 = _STATS_FIELDS.index("commit_latency_p99_ms")
_CODES = {c.value: c for c in StatusCode}


def span_view(snap: list[Any]) -> SimpleNamespace:
    """The fields ``record_from_span`` reads, from a span snapshot (``remote.snapshot``)."""
    (trace_id, span_id, parent_id, name, kind, start, end, code, message, attrs, events, links,
     scope) = snap  # fmt: skip
    parent_id = parent_id or None
    message = message or None
    scope = scope or None
    trace = int(trace_id, 16)
    return SimpleNamespace(
        name=name,
        context=SimpleNamespace(trace_id=trace, span_id=span_id),
        parent=SimpleNamespace(span_id=parent_id) if parent_id is not None else None,
        kind=_KINDS.get(kind, SpanKind.INTERNAL),
        status=SimpleNamespace(status_code=_CODES.get(code, StatusCode.UNSET), description=message),
        start_time=start,
        end_time=end,
        attributes=attrs,
        events=[SimpleNamespace(name=n, timestamp=t, attributes=a) for n, t, a in events or ()],
        links=[
            SimpleNamespace(context=SimpleNamespace(trace_id=int(t, 16), span_id=s), attributes=a)
            for t, s, a in links or ()
        ],
        instrumentation_scope=SimpleNamespace(name=scope) if scope is not None else None,
    )


class _Frames:
    """Frames from a file descriptor (``remote.read_frame``'s format).

    A thread of its own reads the bytes as they arrive, whatever the worker
    is doing: an application writing a frame must never block because the
    worker is inside a long commit (an event loop thread writes its own sync
    frames). The application bounds what it has sent but not yet seen
    answered (``max_queue_size``), and with it this buffer.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self.ended = False
        #: The input ended and every frame in it has been returned by ``read``.
        self.drained = False
        threading.Thread(target=self._pump, name="otel-audit-worker-reader", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    self._buffer += data
                else:
                    self.ended = True
                self._cond.notify()
            if not data:
                return

    def _whole(self) -> bool:
        buffer = self._buffer
        return len(buffer) >= 4 and len(buffer) - 4 >= _HEADER.unpack_from(buffer)[0]

    def read(self, timeout: float | None) -> list[Any]:
        """Every whole frame that has arrived, after waiting up to ``timeout``
        seconds (None: for as long as it takes) for the first."""
        with self._cond:
            self._cond.wait_for(lambda: self.ended or self._whole(), timeout)
            # Seen before the buffer is parsed: nothing is added after the end,
            # so this read returns the last frame. (``ended`` seen later could
            # come with bytes that arrived after the parse.)
            self.drained = self.ended
            buffer = self._buffer
            frames = []
            start = 0
            with memoryview(buffer) as view:  # released before the buffer is cut
                while len(view) - start >= 4:
                    (size,) = _HEADER.unpack_from(view, start)
                    if len(view) - start - 4 < size:
                        break
                    frames.append(orjson.loads(view[start + 4 : start + 4 + size]))
                    start += 4 + size
            del buffer[:start]
        return frames


class Worker:
    """One writer process: reads frames, commits records, answers with acknowledgements."""

    def __init__(self, config: dict[str, Any], out: BinaryIO) -> None:
        from otel_audit.policy.rules import load_policy
        from otel_audit.proof.keys import Signer

        self.service = config["service"]
        self.policy = load_policy(config.get("policy"))
        signer = Signer.from_file(config["signing_key"]) if config.get("signing_key") else None
        self.writer = LedgerWriter(
            config["ledger"],
            config["chain"],
            max_queue_size=config["max_queue_size"],
            checkpoint_every=config["checkpoint_every"],
            checkpoint_interval=config["checkpoint_interval"],
            signer=signer,
        )
        # One thread builds and commits: no hand-off to a writer thread, no
        # contention for the interpreter lock between the two.
        self.writer.inline = True
        self.writer.checkpoint_listeners.append(self._checkpointed)
        self.writer.commit_listeners.append(self._committed)
        self._out = out
        self._out_lock = threading.Lock()
        self._gone = False
        self._acks: list[list[Any]] = []
        self._async_acks: list[int] = []
        self._commits: list[list[float]] = []
        self._acks_lock = threading.Lock()
        self._latency = (0.0, 0.0)
        self._latency_at = 0.0
        # Answers go out once per commit, when its tickets are resolved.
        self.writer.resolved_listeners.append(self._send_acks)

    # -- answers -----------------------------------------------------------

    def send(self, frame: Any) -> None:
        """Answer the application; once it is gone (killed, or exited without
        shutdown) there is nobody to answer, and the records still commit."""
        with self._out_lock:
            if self._gone:
                return
            try:
                write_frame(self._out, frame)
            except OSError:  # BrokenPipeError, or the socket reset
                self._gone = True

    def _checkpointed(self, checkpoint: Any) -> None:
        self.send(["c", checkpoint.to_dict()])

    def _committed(self, seconds: float, n: int) -> None:
        with self._acks_lock:
            self._commits.append([seconds, n])

    def _ack(self, ack: list[Any]) -> None:
        with self._acks_lock:
            self._acks.append(ack)

    def _resolved(self, ident: int, durable: bool) -> Any:
        """The answer of one record: where it landed, or (async, committed) just its id."""

        def callback(ticket: Ticket) -> None:
            if ticket.error is not None:
                self._ack([ident, None, None, str(ticket.error)])
            elif not durable:
                with self._acks_lock:
                    self._async_acks.append(ident)
            else:
                assert ticket.appended is not None
                self._ack([ident, ticket.appended.seq, ticket.appended.hash.hex(), None])

        return callback

    def _send_acks(self) -> None:
        """Send what is answered so far (one frame), with the writer's health."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
            done, self._async_acks = self._async_acks, []
            commits, self._commits = self._commits, []
        if acks or done or commits:
            self.send(["a", acks, done, commits, self._health()])

    def _health(self, fresh: bool = False) -> list[Any]:
        """Health and counters; the latency percentiles (a sort) at most once a second.

        Sent with every answer, so read field by field: ``dataclasses.astuple``
        deep-copies and cost more than a sync record's commit.
        """
        now = time.monotonic()
        writer = self.writer
        if fresh or now - self._latency_at >= 1.0:
            stats = writer.stats()
            self._latency = (stats.commit_latency_p50_ms, stats.commit_latency_p99_ms)
            self._latency_at = now
        else:
            stats = writer.stats(latencies=False)
        values = [getattr(stats, name) for name in _STATS_FIELDS]
        values[_P50], values[_P99] = self._latency
        return [stats.healthy, stats.last_error, values]

    # -- requests ----------------------------------------------------------

    def body(self, item: list[Any]) -> bytes:
        """The canonical bytes of one item: a finished record, or a span with its decision."""
        if item[1] == "r":
            body: bytes = item[2].encode("utf-8")
            return body
        _, _, snap, extra, level, durability = item
        view = span_view(snap)
        if level:
            decision = Decision(level, durability or None, {})
            return self.policy.encode_span(view, self.service, extra, decision)  # type: ignore[arg-type]
        return encode(record_from_span(view, self.service, extra))

    def batch(self, items: list[list[Any]]) -> None:
        failed = False
        for item in items:
            ident = item[0]
            try:
                durable = item[-1] != "async"
                ticket = self.writer.enqueue(self.body(item), retry=not durable)
            except AuditError as exc:
                self._ack([ident, None, None, str(exc)])
                failed = True
            except Exception as exc:  # one bad item must not stop the others
                self._ack([ident, None, None, f"record not built: {exc!r}"])
                failed = True
            else:
                ticket.add_callback(self._resolved(ident, durable))
                # Already committed: its answer missed that batch's send.
                failed = failed or ticket.done
        if failed:
            self._send_acks()

    def run(self, frames: _Frames, early: Sequence[list[Any]] = ()) -> None:
        """Read, build and commit until the application says quit or goes away.

        Each round takes every frame that has arrived, queues their records
        and commits them together (one commit for all the frames that came in
        while the last one was in flight), then waits for input no longer than
        the writer's next retry or timed checkpoint.
        """
        self.send(["ready", os.getpid()])
        done = False
        arrived = list(early)  # frames that came with the configuration
        while not done:
            wait = self.writer.turn()
            arrived += frames.read(0 if arrived else wait)
            for frame in arrived:
                if frame[0] == "q":
                    done = True
                    break
                if frame[0] == "b":
                    self.batch(frame[1])
            arrived = []
            done = done or frames.drained
        self.writer.shutdown()
        self._send_acks()
        self.send(["q", self._health(fresh=True)])


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = sys.stdout.buffer
    # Nothing else may write to the frame stream.
    sys.stdout = sys.stderr
    frames = _Frames(sys.stdin.fileno())
    first: list[Any] = []
    while not first and not frames.drained:
        first = frames.read(None)
    if not first:
        return 0
    try:
        worker = Worker(first[0][1], out)
    except Exception as exc:
        write_frame(out, ["error", f"{type(exc).__name__}: {exc}"])
        return 1
    worker.run(frames, first[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Worker", "main", "span_view"]
