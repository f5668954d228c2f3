"""Durability with real processes: SIGKILL mid-run, several writer processes, fork, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import otel_audit
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.engine.record import Record, encode
from otel_audit.engine.writer import Ticket
from otel_audit.proof.verify import verify_ledger

REPO = Path(__file__).resolve().parents[1]


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def span_ids(db: Path) -> list[str]:
    with open_ledger(str(db), readonly=True) as ledger:
        return [r.record.span_id for r in ledger.query(Query())]


def cli_verify(db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", str(db)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip


AUDIT_FOREVER = """
    import sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="crashy", durability="sync")
    lock = threading.Lock()
    def work():
        while True:
            with otel_audit.audit_action("order.create") as action:
                pass
            sid = format(action.span.get_span_context().span_id, "016x")
            with lock:
                print(sid, flush=True)
    for _ in range(8):
        threading.Thread(target=work, daemon=True).start()
    threading.Event().wait()
"""


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    db = tmp_path / "audit.db"
    proc = python(AUDIT_FOREVER, str(db))
    printed = []
    assert proc.stdout is not None
    for line in proc.stdout:
        printed.append(line.strip())
        if len(printed) >= 400:
            break
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate()
    # Lines already written by the child before it died were acknowledged too.
    printed += [ln.strip() for ln in rest.splitlines() if len(ln.strip()) == 16]
    assert proc.returncode == -signal.SIGKILL
    stored = set(span_ids(db))
    missing = [sid for sid in printed if sid not in stored]
    assert missing == []
    assert len(printed) >= 400
    result = cli_verify(db)
    assert result.returncode == 0, result.stderr


WRITER = """
    import sys, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", checkpoint_every=50)
    for i in range(int(sys.argv[2])):
        with otel_audit.audit_action("order.create", resource=("order", f"{sys.argv[3]}-{i}")):
            pass
    print("done", flush=True)
"""


def test_several_processes_share_one_sqlite_chain(tmp_path):
    db = tmp_path / "audit.db"
    procs = [python(WRITER, str(db), "150", f"p{n}") for n in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with open_ledger(str(db), readonly=True) as ledger:
        ids = sorted(r.record.attr("audit.resource.id") for r in ledger.query(Query()))
        report = verify_ledger(ledger)
    assert ids == sorted(f"p{n}-{i}" for n in range(4) for i in range(150))
    assert [c.chain for c in report.chains] == ["shop"]
    assert report.chains[0].last_seq == 600


FORKER = """
    import os, sys, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async")
    with otel_audit.audit_action("before.fork"):
        pass
    pid = os.fork()
    who = "child" if pid == 0 else "parent"
    for i in range(50):
        with otel_audit.audit_action(f"{who}.work"):
            pass
    if pid == 0:
        # os._exit skips atexit: flush explicitly, as a worker's exit path does.
        from opentelemetry import trace
        trace.get_tracer_provider().force_flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_fork_leaves_a_working_writer_in_the_child(tmp_path):
    db = tmp_path / "audit.db"
    proc = python(FORKER, str(db))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with open_ledger(str(db), readonly=True) as ledger:
        names = [r.record.name for r in ledger.query(Query())]
        verify_ledger(ledger)
    assert names.count("before.fork") == 1
    assert names.count("child.work") == 50 and names.count("parent.work") == 50


SIGTERMED = """
    import sys, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async",
                         checkpoint_every=100000, checkpoint_interval=3600)
    for i in range(3000):
        with otel_audit.audit_action("bulk.import"):
            pass
    print("queued", flush=True)
    import threading; threading.Event().wait()
"""


def test_sigterm_flushes_the_queue_and_checkpoints(tmp_path):
    db = tmp_path / "audit.db"
    proc = python(SIGTERMED, str(db))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "queued"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    with open_ledger(str(db), readonly=True) as ledger:
        assert ledger.count() == 3000
        checkpoints = ledger.checkpoints("shop")
    assert checkpoints and checkpoints[-1].seq == 3000


UNDER_LOAD = """
    import sys, threading, otel_audit
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", durability="async",
                         checkpoint_every=100000, checkpoint_interval=3600)

    def worker(n):
        i = 0
        while True:  # an ordinary job loop: nothing here knows about shutdown
            with otel_audit.audit_action("job.run", resource=("job", f"{n}-{i}")):
                pass
            i += 1

    for n in range(4):
        threading.Thread(target=worker, args=(n,), daemon=True).start()
    with otel_audit.audit_action("service.ready"):
        pass
    print("ready", flush=True)
    threading.Event().wait()
"""


def test_sigterm_under_sustained_load_stops_new_actions_and_commits_every_record(tmp_path):
    # Threads that never stop auditing kept the flush from ever seeing an
    # empty queue: the process ended only at the 30 s shutdown timeout, with
    # records left uncommitted. New actions are now refused once shutdown begins.
    import time

    db = tmp_path / "audit.db"
    proc = python(UNDER_LOAD, str(db))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 15
    with open_ledger(str(db), readonly=True) as ledger:
        count = ledger.count()
        verify_ledger(ledger)
        checkpoints = ledger.checkpoints("shop")
    assert count > 1 and checkpoints[-1].seq == count  # nothing left behind the last checkpoint


def test_async_queue_blocks_instead_of_dropping(make_pipeline):
    pipeline, _, _ = make_pipeline(durability="async", max_queue_size=4)
    for i in range(500):
        with otel_audit.audit_action("burst", resource=("n", i)):
            pass
    assert pipeline.flush(30)
    stats = pipeline.stats()
    assert (stats.submitted, stats.committed, stats.failed) == (500, 500, 0)


def test_group_commit_shares_fsyncs_between_threads(make_pipeline):
    import threading

    pipeline, _, _ = make_pipeline()
    barrier = threading.Barrier(16)

    def work():
        barrier.wait()
        for _ in range(50):
            with otel_audit.audit_action("x.y"):
                pass

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pipeline.stats()
    assert stats.committed == 800
    assert stats.batches < 800  # several records per commit
    assert stats.commit_latency_p99_ms > 0


def _body(name: str) -> bytes:
    """A record's canonical bytes, named ``name``, for queueing on a writer directly."""
    return encode(Record("ab" * 16, "cd" * 8, None, name, "INTERNAL", "shop", 1, 2))


def _actions_on_a_request_thread(count: int = 1, timeout: float = 60) -> threading.Thread:
    """``count`` sync audit actions on a thread named ``request-worker`` (not the
    main thread, as a server's request threads), joined; returned to check it ended."""

    def work() -> None:
        for i in range(count):
            with otel_audit.audit_action("order.update", resource=("order", i)):
                pass

    worker = threading.Thread(target=work, name="request-worker", daemon=True)
    worker.start()
    worker.join(timeout)
    return worker


def test_a_waiting_thread_leads_the_commit_when_the_writer_is_idle(make_pipeline):
    # Where each commit ran: a sync action on a worker thread commits its
    # records itself (no hand-over to the writer thread and back); on the
    # main thread the writer thread commits them (a signal's exception must
    # never stop a commit halfway). The thread writer's way (a writer process
    # commits in its worker).
    pipeline, _, _ = make_pipeline(writer="thread")
    ran_on: list[str] = []
    pipeline.writer.commit_listeners.append(
        lambda _seconds, _n: ran_on.append(threading.current_thread().name)
    )

    _actions_on_a_request_thread(20)
    assert ran_on and set(ran_on) == {"request-worker"}
    ran_on.clear()
    with otel_audit.audit_action("order.update", resource=("order", "main")):
        pass
    assert ran_on == ["otel-audit-writer"]
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert verify_ledger(ledger).records == 21


def test_checkpoints_every_n_records_when_waiters_lead_the_commits(make_pipeline):

    # Count-based checkpoints are the writer thread's: commits led by waiting
    # threads hand them over instead of leaving the records unsealed until
    # the (here hour-long) interval.
    pipeline, _, _ = make_pipeline(writer="thread", checkpoint_every=10, checkpoint_interval=3600)

    _actions_on_a_request_thread(200)
    assert pipeline.flush(10)
    deadline = time.monotonic() + 10
    while pipeline.stats().checkpoints < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.stats().checkpoints >= 15  # about one per 10 records
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert verify_ledger(ledger).records == 200


def test_a_waiter_whose_record_lies_beyond_one_batch_commits_it_too(make_pipeline):
    # A commit takes at most 8192 records; the waiter of the 9000th leads a
    # second commit for the rest instead of leaving them to the writer
    # thread's one-second look.
    pipeline, _, _ = make_pipeline(writer="thread", max_queue_size=50_000, checkpoint_every=100_000)
    writer = pipeline.writer
    commits: list[tuple[str, int]] = []
    writer.commit_listeners.append(
        lambda _seconds, n: commits.append((threading.current_thread().name, n))
    )
    tickets = [writer.enqueue(_body("bulk"), lazy=True) for _ in range(9000)]
    waiter = threading.Thread(target=tickets[-1].wait, args=(writer,), name="waiter")
    waiter.start()
    waiter.join(60)
    assert commits == [("waiter", 8192), ("waiter", 808)]
    assert all(t.done and t.error is None for t in tickets)


def test_queueing_into_a_full_queue_on_the_thread_leading_a_commit_does_not_hang(make_pipeline):
    # A finalizer run in the middle of a commit may queue records (an action
    # ending there): into a full queue it must not wait for room that only
    # its own thread's commit can make.
    pipeline, _, _ = make_pipeline(writer="thread", max_queue_size=2)
    writer = pipeline.writer
    queued: list[int] = []

    def nested(_seconds: float, _n: int) -> None:
        if threading.current_thread().name == "request-worker" and not queued:
            for _ in range(5):
                writer.submit(_body("nested"))
            queued.append(5)

    writer.commit_listeners.append(nested)

    worker = _actions_on_a_request_thread(timeout=10)
    assert not worker.is_alive() and queued == [5]
    assert pipeline.flush(10)
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert verify_ledger(ledger).records == 6


def test_a_checkpoint_that_keeps_failing_is_retried_once_per_interval(make_pipeline, tmp_path):
    import sqlite3

    # A checkpoint the ledger refuses (here a trigger; a refusing signer
    # alike) is tried again at the interval, not after every commit: 200
    # records with checkpoint_every=10 make one attempt in the hour.
    pipeline, _, _ = make_pipeline(writer="thread", checkpoint_every=10, checkpoint_interval=3600)
    with sqlite3.connect(tmp_path / "audit.db") as con:
        con.execute(
            "CREATE TRIGGER refuse_checkpoints BEFORE INSERT ON checkpoints"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    _actions_on_a_request_thread(100)
    for i in range(100):
        with otel_audit.audit_action("order.update", resource=("order", i)):
            pass
    assert pipeline.flush(10)
    stats = pipeline.stats()
    assert (stats.committed, stats.checkpoints, stats.checkpoint_errors) == (200, 0, 1)


STARTING_FINALIZER = """
    import gc, sys, otel_audit
    from otel_audit.engine.record import Record, encode
    pipeline = otel_audit.configure(ledger=sys.argv[1], service_name="shop",
                                    durability="async", handle_sigterm=False, writer="thread")
    writer = pipeline.writer
    body = encode(Record("ab" * 16, "cd" * 8, None, "finalizer", "INTERNAL", "shop", 1, 2))
    done = []

    def finalizer(phase, info):
        # A collection run while this thread starts the writer (its first
        # record) runs a finalizer that queues a record of its own.
        if phase == "start" and not done and writer._start_lock.locked():
            done.append(1)
            writer.submit(body)

    gc.callbacks.append(finalizer)
    gc.set_threshold(1)
    writer.submit(body)
    gc.set_threshold(700)
    gc.callbacks.remove(finalizer)
    assert pipeline.flush(10)
    pipeline.shutdown()
    print(len(done), pipeline.stats().committed)
"""


def test_a_finalizer_queueing_while_its_thread_starts_the_writer_does_not_hang(tmp_path):
    proc = python(STARTING_FINALIZER, str(tmp_path / "audit.db"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["1", "2"]


def test_waiting_for_a_record_on_the_thread_leading_a_commit_fails_and_it_is_never_written(
    make_pipeline,
):
    # A finalizer (garbage collection) can run any code on the thread that is
    # in the middle of a commit, including an action's exit: its wait could
    # never end (the commit it waits for is its own thread's). It fails, and
    # its record (and one queued after it) is taken back: a record its
    # waiter was told failed is never written later.
    pipeline, _, _ = make_pipeline(writer="thread")
    writer = pipeline.writer
    errors: list[BaseException] = []
    dependent: list[Ticket] = []

    def nested(_seconds: float, _n: int) -> None:
        if threading.current_thread().name == "request-worker" and not errors:
            ticket = writer.enqueue(_body("nested"), lazy=True)
            dependent.append(writer.enqueue(_body("nested"), lazy=True, after=[ticket]))
            try:
                ticket.wait(writer)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                errors.append(exc)

    writer.commit_listeners.append(nested)

    worker = _actions_on_a_request_thread(timeout=10)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], otel_audit.LedgerWriteError)
    assert "not written: waited for on the thread committing" in str(errors[0])
    assert pipeline.flush(10)
    assert dependent[0].done and isinstance(dependent[0].error, otel_audit.LedgerWriteError)
    assert pipeline.stats().failed == 2
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        # Only the action's record: neither the refused one nor the one after it.
        assert verify_ledger(ledger).records == 1
        names = [json.loads(row.body)["name"] for row in ledger.scan(writer.chain)]
        assert names == ["order.update"]


def test_a_record_queued_after_a_withdrawn_one_is_never_written_while_commits_race(
    make_pipeline,
):
    # The race a review found: a withdrawal on a thread that answers (here
    # held in that state, as ``lead`` and the writer's start hold it; a real
    # finalizer cannot be timed) while another thread keeps the writer
    # committing. A record queued ``after`` the withdrawn one must be refused
    # whichever commit drains it, and the withdrawn one never written.
    pipeline, _, _ = make_pipeline(writer="thread", durability="async")
    writer = pipeline.writer
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            writer.submit(_body("noise"))
            time.sleep(0)

    written_after_withdrawn: list[int] = []
    withdrawn = 0

    def answering_thread() -> None:
        nonlocal withdrawn
        for i in range(3000):
            with writer._answering():
                first = writer.enqueue(_body(f"T{i}"), lazy=True)
                then = writer.enqueue(_body(f"D{i}"), lazy=True, after=[first])
                try:
                    first.wait(writer)
                    continue
                except otel_audit.LedgerWriteError as exc:
                    if "not written" not in str(exc):
                        continue  # a commit held it already: it may be stored
                    withdrawn += 1
            try:
                then.wait(writer)
                written_after_withdrawn.append(i)
            except otel_audit.LedgerWriteError:
                pass

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threading.Thread(target=noise, daemon=True).start()
        worker = threading.Thread(target=answering_thread)
        worker.start()
        worker.join(120)
    finally:
        stop.set()
        sys.setswitchinterval(old)
    assert not worker.is_alive() and withdrawn > 1000
    assert written_after_withdrawn == []
    assert pipeline.flush(10)
    stats = pipeline.stats()
    assert stats.submitted == stats.committed + stats.failed
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        names = {json.loads(row.body)["name"] for row in ledger.scan(writer.chain)}
    # Every record stored that was queued after another has that one stored too.
    assert all(f"T{name[1:]}" in names for name in names if name.startswith("D"))


def test_shutdown_writes_a_final_checkpoint(make_pipeline, tmp_path):
    pipeline, _, _ = make_pipeline(checkpoint_every=1000, checkpoint_interval=3600)
    for _ in range(7):
        with otel_audit.audit_action("x.y"):
            pass
    pipeline.shutdown()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert [(c.seq, c.signature) for c in ledger.checkpoints()] == [(7, None)]


def test_many_producers_lose_nothing_through_a_small_queue(make_pipeline):
    import threading

    # 16 threads, async and sync mixed, through a queue of 32: every wake-up
    # and full-queue path of the lock-free producer side is exercised.
    pipeline, _, _ = make_pipeline(durability="async", max_queue_size=32)
    barrier = threading.Barrier(16)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(300):
            if n % 4 == 0:  # some threads write sync records among the async ones
                record = Record(f"{n:032x}", f"{i:016x}", None, "sync.write", "INTERNAL",
                                "shop", i, i + 1)  # fmt: skip
                pipeline.writer.write(encode(record))
            else:
                with otel_audit.audit_action("burst", resource=("n", f"{n}-{i}")):
                    pass

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pipeline.flush(60)
    stats = pipeline.stats()
    assert (stats.committed, stats.failed, stats.queue_depth) == (16 * 300, 0, 0)
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert ledger.count() == 16 * 300
        assert verify_ledger(ledger).records == 16 * 300


CREATOR = """
    import sys, time
    from otel_audit.engine.ledger import open_ledger
    from otel_audit.engine.record import Record, encode
    while time.time() < float(sys.argv[3]):
        pass  # start together: the race is in creating the same new file
    n = int(sys.argv[2])
    with open_ledger(sys.argv[1]) as ledger:
        ledger.append("c", [encode(Record(f"{n:032x}", f"{n:016x}", None, "x", "INTERNAL", "s", 1, 2))])
"""


def test_processes_creating_one_new_ledger_at_once_all_succeed(tmp_path):
    import time

    for round_ in range(5):
        db = tmp_path / f"new{round_}.db"
        start = time.time() + 0.5
        procs = [python(CREATOR, str(db), str(n), str(start)) for n in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        with open_ledger(str(db), readonly=True) as ledger:
            assert ledger.count() == 6
            verify_ledger(ledger)
