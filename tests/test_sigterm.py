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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.proof.verify import verify_ledger

from .test_durability import python


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
    proc = python(SERVICE, str(db))
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
    proc = python(FORKING, str(db), stdin=subprocess.PIPE)
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
        proc = python(APP_HANDLER, str(db), how)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out.strip()) == (0, "stopped"), (how, err)
        assert names(db) == ["app.graceful_stop"]


FORK_AND_TERMINATE_AT_ONCE = """
    import multiprocessing, sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async")
    codes = []
    for i in range(30):
        child = multiprocessing.get_context("fork").Process(target=threading.Event().wait)
        child.start()
        child.terminate()  # as soon as it exists
        child.join(30)
        codes.append(child.exitcode)
    print(sorted(set(map(str, codes))), flush=True)
    with otel_audit.audit_action("parent.after"):
        pass
    print("parent audited", flush=True)
"""


def test_sigterm_to_a_child_as_soon_as_it_is_forked_ends_the_child_and_never_the_parent(tmp_path):
    # Until the child has its own pipe, its signal handler would wake the
    # parent's thread, which shut the parent down; and a signal taken before
    # CPython's after-fork reset was forgotten, leaving the child running.
    db = tmp_path / "audit.db"
    proc = python(FORK_AND_TERMINATE_AT_ONCE, str(db))
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out.splitlines()) == (0, [str(["-15"]), "parent audited"]), err
    assert names(db) == ["parent.after"]


DAEMON = """
    import os, signal, sys, time, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop")
    if os.fork():
        os._exit(0)
    os.setsid()
    os.closerange(3, 1024)  # as daemons do: every descriptor closed, numbers reused
    logs = [os.open(f"{sys.argv[2]}.{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) for i in range(8)]
    signal.signal(signal.SIGHUP, lambda *_: None)  # reload, as daemons do
    print(os.getpid(), flush=True)
    while True:
        time.sleep(0.1)
"""


def test_a_daemon_that_closes_every_descriptor_gets_no_signal_bytes_in_its_files(tmp_path):
    import time

    db, log = tmp_path / "audit.db", tmp_path / "log"
    proc = python(DAEMON, str(db), str(log))
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    for _ in range(5):
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the daemon did not end on SIGTERM")
    proc.communicate(timeout=30)
    written = {p.name: p.read_bytes() for p in tmp_path.glob("log.*") if p.stat().st_size}
    assert written == {}


APP_WAKEUP_FD = """
    import os, select, signal, socket, sys, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop")
    # A pre-fork server's own loop: its wakeup socket and SIGTERM handler.
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGTERM, lambda *_: None)
    pid = os.fork()
    if pid == 0:
        print("child ready", flush=True)
        ready, _, _ = select.select([wake_r], [], [], 20)
        os._exit(7 if ready else 1)
    sys.stdin.readline()
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_forked_child_keeps_the_applications_own_wakeup_descriptor(tmp_path):
    proc = python(APP_WAKEUP_FD, str(tmp_path / "audit.db"), stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "child ready"
    out, err = proc.communicate("go\n", timeout=60)
    assert (proc.returncode, out.strip()) == (0, "child exit 7"), err
