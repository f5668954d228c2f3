"""Hold a WSGI response until the request's audit records are committed.

A state-changing Flask request writes its records in two commits: the
request record before the view runs (``blocking``), then, once the response
is made, its effects' records (queries, calls) together with its own record
(the server span, which ends in Flask's teardown) in one transaction. The
own record is queued after its effects and is never written without them
(``LedgerWriter.enqueue(after=)``), so a record saying the request succeeded
never stands in the ledger without what it caused.

Flask has made the response and called ``start_response`` by the time the
server span ends. ``CommitBeforeReply`` wraps the app outermost and hands it
a ``start_response`` that holds the status and headers: once the app has
returned (teardown done, the span ended), it waits for the request's records,
and the client gets the app's response only when all of them are durable,
else a 503, as when the request record before the view could not be written.
No byte of the response has left the process before that.

Thread-safe: one call per request, nothing shared between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from otel_audit.capture.scope import ActionScope
from otel_audit.errors import AuditError

#: The environ key under which the request's scope is handed to the middleware.
PENDING_KEY = "otel_audit.pending"

_NOT_WRITTEN = b"audit record of a change not written\n"
_log = logging.getLogger("otel_audit.integrations.flask")

StartResponse = Callable[..., Callable[[bytes], Any]]


class CommitBeforeReply:
    """WSGI middleware: the response is sent once the request's audit records are durable."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        pending: list[ActionScope] = []
        environ[PENDING_KEY] = pending
        held: list[Any] = []
        early: list[bytes] = []  # the legacy write() callable, used before the app returned

        def hold(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            held[:] = [status, headers, exc_info]
            return early.append

        try:
            result = self.app(environ, hold)
        except BaseException:
            _settle(pending)  # the records still commit; the server answers the error
            raise
        failure = _settle(pending)
        if failure is not None:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            _log.error(
                "otel-audit: %s %s: %s",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
                failure,
            )
            start_response(
                "503 SERVICE UNAVAILABLE",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(_NOT_WRITTEN))),
                    ("Retry-After", "5"),
                ],
            )
            return [_NOT_WRITTEN]
        if held:
            status, headers, exc_info = held
            write = (
                start_response(status, headers)
                if exc_info is None
                else start_response(status, headers, exc_info)
            )
            if early:
                write(b"".join(early))
        return result


def _settle(pending: list[ActionScope]) -> AuditError | None:
    """Wait for every record of the request; the first failure, if any."""
    failure = None
    for scope in pending:
        # Finished first: an own record that ends later (a streamed response
        # ends after its request) is waited for by the thread that ends it.
        scope.finish()
        lost = scope.settle()
        failure = failure or lost
    return failure
