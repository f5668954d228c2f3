"""SIGTERM with otel-audit's handler: the process still ends, after its records are committed.

Real processes and signals. Stock Python ends on SIGTERM in the kernel; a
Python handler runs only on the main thread between bytecodes, so these
are the cases where a handler could leave a process that never ends, or end
the wrong one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.proof.verify import verify_ledger

REPO = Path(__file__).resolve().parents[1]


def start(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def names(db: Path) -> list[str]:
    with open_ledger(str(db), readonly=True) as ledger:
        verify_ledger(ledger)
        return [r.record.name for r in ledger.query(Query())]


# An ordinary service: worker threads that keep busy (here a heartbeat over a
# socket pair) and a main thread that waits forever for the process to be stopped.
SERVICE = """
    import socket, sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async",
                         checkpoint_every=100000, checkpoint_interval=3600)
    for i in range(200):
        with otel_audit.audit_action("order.import", resource=("order", str(i))):
            pass
    a, b = socket.socketpair()
    def ping():
        while True:
            a.sendall(b"ping"); a.recv(4)
    def pong():
        while True:
            b.recv(4); b.sendall(b"pong")
    for target in (ping, pong):
        threading.Thread(target=target, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
"""


def _stop_at_once(db: Path) -> tuple[int | None, str]:
    proc = start(SERVICE, str(db))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)  # as the main thread is about to block
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, "still running 30 s after SIGTERM"
    return proc.returncode, err


def test_sigterm_as_the_main_thread_starts_a_wait_without_timeout_still_ends_it(tmp_path):
    # The signal often lands between the main thread's last check for
    # handlers and its blocking wait, or on a busy worker thread; with only a
    # Python handler a few percent of these processes never ended.
    dbs = [tmp_path / f"audit{i}.db" for i in range(60)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_stop_at_once, dbs))
    assert [code for code, _ in results] == [-signal.SIGTERM] * len(dbs), [
        err for code, err in results if code != -signal.SIGTERM
    ]
    for db in dbs:
        assert names(db) == ["order.import"] * 200
        with open_ledger(str(db), readonly=True) as ledger:
            assert ledger.checkpoints("shop")[-1].seq == 200  # the final checkpoint


FORKING = """
    import multiprocessing, sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async")

    def work():
        with otel_audit.audit_action("child.work"):
            pass
        print("child working", flush=True)
        threading.Event().wait()

    with otel_audit.audit_action("parent.start"):
        pass
    child = multiprocessing.get_context("fork").Process(target=work)
    child.start()
    sys.stdin.readline()  # the test saw the child working
    child.terminate()
    child.join(30)
    print("child exit", child.exitcode, flush=True)
    with otel_audit.audit_action("parent.after"):  # the parent still audits
        pass
    print("parent audited", flush=True)
    threading.Event().wait()
"""


def test_sigterm_to_a_forked_child_flushes_and_ends_the_child_and_leaves_the_parent(tmp_path):
    db = tmp_path / "audit.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FORKING), str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "child working"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == f"child exit {-signal.SIGTERM}"
        assert proc.stdout.readline().strip() == "parent audited"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert sorted(names(db)) == ["child.work", "parent.after", "parent.start"]


APP_HANDLER = """
    import asyncio, signal, sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async")
    stopped = threading.Event()

    def on_term(*_):
        stopped.set()

    if sys.argv[2] == "signal":
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        while not stopped.wait(0.1):
            pass
    else:
        async def main():
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
            print("ready", flush=True)
            while not stopped.is_set():
                await asyncio.sleep(0.05)
        asyncio.run(main())
    with otel_audit.audit_action("app.graceful_stop"):  # the pipeline was left running
        pass
    print("stopped", flush=True)
"""


def test_an_application_that_handles_sigterm_itself_keeps_its_handler(tmp_path):
    for how in ("signal", "asyncio"):
        db = tmp_path / f"{how}.db"
        proc = start(APP_HANDLER, str(db), how)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out.strip()) == (0, "stopped"), (how, err)
        assert names(db) == ["app.graceful_stop"]
