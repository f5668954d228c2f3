"""Hostile input to ``otel-audit serve`` (issue 11): each test is the attacker's script.

Bodies that lie about their framing, bodies far over the limit, deeply nested
JSON, thousands of idle connections at shutdown, and the ledger file pulled
from under a running receiver.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time

import pytest

from otel_audit.engine.ledger import open_ledger

from .test_serve import _post, _spans, encode_spans
from .test_serve_cli import _start

LIMIT = 1 << 20
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads peak RSS from /proc"
)


def _peak_rss(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def served(tmp_path):
    """A serve process with a 1 MiB body limit: (pid, port)."""
    proc, line = _start(
        ["--ledger", str(tmp_path / "served.db"), "--listen", "127.0.0.1:0",
         "--grpc-listen", "off", "--max-request-size", str(LIMIT)]
    )  # fmt: skip
    match = re.search(r"127\.0\.0\.1:(\d+)/v1/traces", line)
    assert match, line
    yield proc, int(match.group(1))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait()


def _attack(port: int, head: bytes, chunks, timeout: float = 60.0) -> bytes:
    """Send ``head`` then every chunk of ``chunks`` while reading the answer; returns it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answer = bytearray()
    finished = threading.Event()

    def read() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer.extend(data)
        except OSError:
            pass
        finished.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head)
        for chunk in chunks:
            if finished.is_set():
                break
            sock.sendall(chunk)
    except OSError:
        pass  # the server closed the connection on us: expected
    assert finished.wait(timeout), "the server never answered"
    sock.close()
    return bytes(answer)


def _head(extra: str) -> bytes:
    return (
        "POST /v1/traces HTTP/1.1\r\nHost: serve\r\n"
        "Content-Type: application/x-protobuf\r\n" + extra + "\r\n"
    ).encode()


def test_negative_chunk_size_is_refused_without_reading_to_eof(served):
    proc, port = served
    before = _peak_rss(proc.pid)
    mib = b"\0" * (1 << 20)
    answer = _attack(
        port, _head("Transfer-Encoding: chunked\r\n") + b"-1\r\n", (mib for _ in range(200))
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert _peak_rss(proc.pid) - before < 32 << 20


def test_200_mib_chunked_body_with_1_mib_limit_is_413_in_bounded_memory(served):
    proc, port = served
    before = _peak_rss(proc.pid)
    chunk = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
    answer = _attack(port, _head("Transfer-Encoding: chunked\r\n"), (chunk for _ in range(200)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"exceeds the limit" in answer
    assert _peak_rss(proc.pid) - before < 32 << 20
    assert proc.poll() is None


def test_many_tiny_chunks_cost_memory_of_the_limit_not_50x(served):
    proc, port = served
    before = _peak_rss(proc.pid)
    # 2 MiB of one-byte chunks (6 MiB on the wire), sent in 64 KiB writes.
    tiny = b"1\r\n\0\r\n" * 10_000
    answer = _attack(port, _head("Transfer-Encoding: chunked\r\n"), (tiny for _ in range(210)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _peak_rss(proc.pid) - before < 32 << 20


def test_content_length_over_the_limit_is_413_before_reading(served):
    _proc, port = served
    answer = _attack(port, _head(f"Content-Length: {200 << 20}\r\n"), iter(()))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _nested_kvlist(levels: int) -> str:
    """An OTLP/JSON request whose one attribute nests ``levels`` JSON levels deep."""
    opening = '{"kvlistValue":{"values":[{"key":"k","value":'  # four levels each
    inner = opening * (levels // 4) + '{"stringValue":"bottom"}' + "}]}}" * (levels // 4)
    head = '{"resourceSpans":[{"resource":{"attributes":[{"key":"deep","value":'
    return head + inner + "}]}}]}"


@pytest.mark.parametrize(
    "body",
    ["[" * 1000 + "]" * 1000, _nested_kvlist(1000)],
    ids=["arrays", "kvlist"],
)
def test_json_nested_1000_levels_is_400_with_one_line_in_the_log(make_server, caplog, body):
    server = make_server(grpc_address=None)
    with caplog.at_level(logging.INFO, logger="otel_audit"):
        status, _headers, payload = _post(server, body.encode(), "application/json")
    assert status == 400, payload[:300]
    assert b"nested too deeply" in payload or b"not an OTLP/JSON" in payload
    ours = [r for r in caplog.records if r.name.startswith("otel_audit")]
    assert ours and all(r.exc_info is None and "\n" not in r.getMessage() for r in ours)


def test_shutdown_with_2000_idle_connections_is_prompt(served):
    proc, port = served
    idle = []
    for i in range(2000):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            # Half have made a request and are kept alive; half never said anything.
            body = encode_spans(_spans(1, 0)).SerializeToString()
            sock.sendall(_head(f"Content-Length: {len(body)}\r\n") + body)
        idle.append(sock)
    for sock in idle[1::2]:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    cpu_before = _cpu_seconds(proc.pid)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # The CPU it used is read just before it exits (it is gone after wait).
    cpu = _cpu_until_exit(proc)
    assert proc.wait(30) == 0
    elapsed = time.monotonic() - began
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"
    assert cpu - cpu_before < 5, f"shutdown burnt {cpu - cpu_before:.1f}s of CPU"
    for sock in idle:
        sock.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_until_exit(proc) -> float:
    cpu = 0.0
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            cpu = _cpu_seconds(proc.pid)
        except (OSError, IndexError):
            break  # exited between poll and read
        time.sleep(0.05)
    return cpu


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_ledger_pulled_from_under_serve_is_503_never_200(make_server, tmp_path, how):
    path = tmp_path / "serve.db"
    server = make_server(ledger=f"sqlite:///{path}", grpc_address=None)
    assert _post(server, encode_spans(_spans(1, 0)).SerializeToString())[0] == 200
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.unlink(f"{path}{suffix}")
    else:
        other = tmp_path / "other.db"
        with open_ledger(f"sqlite:///{other}"):
            pass
        sqlite3.connect(other).close()
        os.replace(other, path)
    status, headers, _ = _post(server, encode_spans(_spans(1, 0)).SerializeToString())
    assert status == 503 and headers["Retry-After"] == "1"


def test_endless_header_lines_are_refused_in_bounded_memory(served):
    proc, port = served
    before = _peak_rss(proc.pid)
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    answer = _attack(
        port,
        b"POST /v1/traces HTTP/1.1\r\nHost: serve\r\n",
        (line * 64 for _ in range(3200)),  # 200 MiB of headers
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert _peak_rss(proc.pid) - before < 32 << 20
