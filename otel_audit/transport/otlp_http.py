"""OTLP/HTTP in front of an ``AuditReceiver``: an ASGI application (served by uvicorn).

``POST /v1/traces`` with a binary protobuf or OTLP/JSON body, optionally
gzip/deflate. The HTTP server (framing, chunked transfer coding, keep-alive,
TLS, idle timeouts, shutdown) is uvicorn's; this module only reads the body
and answers. The body limit counts the bytes the server hands us after
de-chunking, so it holds whatever the transfer encoding, and the reading
stops (connection closed, 413) the moment the limit is passed: memory per
request is bounded by the limit. The decompressed size is bounded the same
way. Parsing runs in a worker thread; waiting for the commit does not hold
one (the writer calls the event loop back).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.rpc import status_pb2  # type: ignore[import-untyped]

from otel_audit.errors import AuditError
from otel_audit.transport.otlp import MalformedRequest, response_bytes
from otel_audit.transport.receive import RETRY_AFTER_SECONDS, AuditReceiver, Overloaded, Pending

_log = logging.getLogger("otel_audit.transport.serve")

TRACES_PATH = "/v1/traces"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# google.rpc.Code of the Status body sent with each HTTP error.
_GRPC_CODE_OF_HTTP = {400: 3, 401: 16, 404: 5, 405: 12, 411: 3, 413: 3, 415: 3, 429: 8, 503: 14}


class _Refused(Exception):
    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.close = close


def _retry_after() -> dict[str, str]:
    return {"retry-after": str(RETRY_AFTER_SECONDS)}


class OTLPHTTPApp:
    """The ASGI application; ``workers`` threads parse and encode request bodies."""

    def __init__(self, receiver: AuditReceiver, workers: int = 8) -> None:
        self.receiver = receiver
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otel-audit-http")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        json_body = content_type == "application/json"
        try:
            payload = await self._handle(scope, headers, content_type, json_body, receive)
        except _Refused as refused:
            await _send(
                send,
                refused.status,
                _status_payload(refused.status, str(refused), json_body),
                json_body,
                refused.headers,
                refused.close,
            )
            return
        except Exception:  # a bug must cost one (retryable) request, not the server
            _log.exception("otel-audit serve: request failed")
            await _send(
                send,
                503,
                _status_payload(503, "internal error, retry later", json_body),
                json_body,
                _retry_after(),
                close=True,
            )
            return
        await _send(send, 200, payload, json_body)

    async def _handle(
        self,
        scope: Scope,
        headers: dict[str, str],
        content_type: str,
        json_body: bool,
        receive: Receive,
    ) -> bytes:
        receiver = self.receiver
        path = scope["path"]
        if path != TRACES_PATH:
            # Unread bodies are not drained: the connection is closed instead.
            raise _Refused(404, f"no OTLP endpoint at {path} (use {TRACES_PATH})", close=True)
        if scope["method"] != "POST":
            raise _Refused(405, "use POST", close=True)
        if not receiver.authorized(headers.get("authorization")):
            raise _Refused(
                401,
                "missing or wrong bearer token",
                {"www-authenticate": "Bearer"},
                close=True,
            )
        if content_type not in ("application/x-protobuf", "application/json"):
            raise _Refused(415, f"unsupported content type {content_type!r}", close=True)
        limit = receiver.max_request_size
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Refused(
                413, f"request of {declared} bytes exceeds the limit of {limit} bytes", close=True
            )
        body = await _read_body(receive, limit)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        loop = asyncio.get_running_loop()
        try:
            pending: Pending = await loop.run_in_executor(
                self._pool, _decode_and_submit, receiver, body, encoding, json_body
            )
        except MalformedRequest as exc:
            _log.info("otel-audit serve: 400 %s", exc)
            raise _Refused(400, str(exc)) from None
        except Overloaded as exc:
            raise _Refused(429, f"overloaded, retry later: {exc}", _retry_after()) from None
        except AuditError as exc:
            raise _Refused(503, f"ledger unavailable, retry later: {exc}", _retry_after()) from None
        done: asyncio.Future[None] = loop.create_future()

        def wake(_pending: Pending) -> None:
            try:
                loop.call_soon_threadsafe(_set, done)
            except RuntimeError:
                pass  # the loop is gone (answered 503 on timeout, then stopped)

        pending.add_done_callback(wake)
        try:
            await asyncio.wait_for(asyncio.shield(done), receiver.commit_timeout)
        except asyncio.TimeoutError:
            raise _Refused(
                503,
                f"ledger unavailable, retry later: commit did not finish within "
                f"{receiver.commit_timeout:g}s",
                _retry_after(),
            ) from None
        error = pending.error()
        if error is not None:
            raise _Refused(503, f"ledger unavailable, retry later: {error}", _retry_after())
        return response_bytes(pending.rejected, json_body)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _decode_and_submit(
    receiver: AuditReceiver, body: bytes, encoding: str, json_body: bool
) -> Pending:
    try:
        body = decompress(body, encoding, receiver.max_request_size)
    except TooLarge as exc:
        raise _Refused(413, str(exc)) from None
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from None
    return receiver.submit(body, json_body)


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The de-chunked body, refused (413, connection closed) as soon as it passes ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "client disconnected", close=True)
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"request exceeds the limit of {limit} bytes", close=True)
            parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class TooLarge(ValueError):
    """The decompressed body passes the limit."""


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded per Content-Encoding, at most ``limit`` bytes; raises ValueError."""
    if encoding in ("identity", ""):
        return body
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    try:
        # Bounded inflate: a small gzip bomb must not expand past the limit in memory.
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"decompressed request exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise ValueError(f"body is truncated {encoding}")
    return out


def _status_payload(code: int, message: str, json_body: bool) -> bytes:
    status = status_pb2.Status(code=_GRPC_CODE_OF_HTTP.get(code, 2), message=message)
    if json_body:
        return str(json_format.MessageToJson(status, indent=None)).encode("utf-8")
    return bytes(status.SerializeToString())


async def _send(
    send: Send,
    code: int,
    payload: bytes,
    json_body: bool,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> None:
    fields = [
        (b"content-type", b"application/json" if json_body else b"application/x-protobuf"),
        (b"content-length", str(len(payload)).encode("ascii")),
    ]
    fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        fields.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": code, "headers": fields})
    await send({"type": "http.response.body", "body": payload})
