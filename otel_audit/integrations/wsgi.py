"""Hold a WSGI response until the request's audit records are committed.

A state-changing Flask request writes its records in two commits: the
request record before the view runs (``blocking``), then, once the response
is made, its effects' records (queries, calls) together with its own record
(the server span, which ends in Flask's teardown) in one transaction. The
own record is queued after its effects and is never written without them
(``LedgerWriter.enqueue(after=)``); when it was not written, it is written
again saying ``failure`` (``capture.actions.record_lost``). So a record
saying the request succeeded never stands in the ledger without what it
caused.

Flask has made the response and called ``start_response`` by the time the
server span ends. ``CommitBeforeReply`` wraps the app outermost and hands it
a ``start_response`` that holds the status and headers: once the app has
made its response (teardown done, the span ended), it waits for the
request's records, and the client gets the app's response only when all of
them are durable, else a 503. No byte of the response has left the process
before that. An app (or a middleware inside this one) that calls
``start_response`` only when its body is first iterated is waited for at
that first iteration.

Thread-safe: one call per request, nothing shared between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from otel_audit.capture.actions import record_lost
from otel_audit.capture.scope import ActionScope
from otel_audit.errors import AuditError

#: The environ key under which a request hands its scope and server span to the middleware.
PENDING_KEY = "otel_audit.pending"

_NOT_WRITTEN = b"audit record of a change not written\n"
_log = logging.getLogger("otel_audit.integrations.flask")

StartResponse = Callable[..., Callable[[bytes], Any]]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class CommitBeforeReply:
    """WSGI middleware: the response is sent once the request's audit records are durable."""

    def __init__(self, app: App) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        reply = _Reply(environ, start_response)
        environ[PENDING_KEY] = reply.pending
        try:
            result = self.app(environ, reply.hold)
        except BaseException:
            reply.settle()  # the records still commit; the server answers the error
            raise
        if reply.held is None:
            # start_response comes with the body's first chunk: wait there.
            return _FirstChunk(result, reply)
        return reply.send(result)


class _Reply:
    """One request's held status line and the records it waits for."""

    def __init__(self, environ: dict[str, Any], start_response: StartResponse) -> None:
        self.environ = environ
        self.start_response = start_response
        #: (scope, server span) of each audited action of the request (one, from AuditFlask).
        self.pending: list[tuple[ActionScope, Any]] = []
        self.held: tuple[str, list[tuple[str, str]], Any] | None = None
        self.early: list[bytes] = []  # the legacy write() callable, used before the reply
        self.sent = False

    def hold(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if self.sent:  # an error after the reply began: the server decides (WSGI)
            return self.start_response(status, headers, exc_info)
        self.held = (status, headers, exc_info)
        return self.early.append

    def settle(self) -> AuditError | None:
        """Wait for every record of the request; the first failure, if any."""
        failure = None
        for scope, span in self.pending:
            # Finished first: an own record that ends later (a streamed response
            # ends after its request) is waited for by the thread that ends it.
            scope.finish()
            lost = scope.settle()
            if scope.pipeline is not None:
                scope.pipeline.processor.forget(span)
            if lost is not None:
                record_lost(scope, span, lost)
            failure = failure or lost
        return failure

    def send(self, result: Iterable[bytes], close: bool = True) -> Iterable[bytes]:
        """The app's response once its records are durable, else a 503 (and the
        app's body closed, unless ``close`` is False: its owner closes it)."""
        failure = self.settle()
        self.sent = True
        if failure is not None:
            closing = getattr(result, "close", None) if close else None
            if closing is not None:
                closing()
            _log.error(
                "otel-audit: %s %s: %s",
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
                failure,
            )
            self.start_response(
                "503 SERVICE UNAVAILABLE",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(_NOT_WRITTEN))),
                    ("Retry-After", "5"),
                ],
            )
            return [_NOT_WRITTEN]
        if self.held is not None:
            status, headers, exc_info = self.held
            write = self.start_response(status, headers, exc_info)
            if self.early:
                write(b"".join(self.early))
        return result


class _FirstChunk:
    """The body of an app that calls start_response at its first chunk: the
    chunk is made, then the records are waited for, then the reply begins."""

    def __init__(self, result: Iterable[bytes], reply: _Reply) -> None:
        self.result = result
        self.reply = reply

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self.result)
        try:
            first = [next(chunks)]
        except StopIteration:
            first = []
        except BaseException:
            self.reply.settle()
            raise
        body = self.reply.send(self.result, close=False)  # the server calls our close()
        if body is not self.result:  # the 503
            yield from body
            return
        yield from first
        yield from chunks

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
