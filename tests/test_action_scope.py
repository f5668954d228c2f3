"""The action scope travels with the context: lost records on other threads and tasks,
async actions that share commits, two pipelines in one process, SIGTERM at a bad moment."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.errors import LedgerUnavailable, LedgerWriteError

REPO = Path(__file__).resolve().parents[1]


def _records(url: str, **query):
    with open_ledger(url, readonly=True) as ledger:
        return [r.record for r in ledger.query(Query(**query))]


class _Locker:
    """Holds the SQLite write lock of ``db`` from another connection (a real outage)."""

    def __init__(self, db: Path) -> None:
        self.db, self.release, self.held = str(db), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        con = sqlite3.connect(self.db, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        self.held.set()
        self.release.wait(30)
        con.execute("ROLLBACK")
        con.close()

    def __enter__(self) -> _Locker:
        self.thread.start()
        assert self.held.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join()


def _refuse_effects(db: Path) -> None:
    """An insider's trigger: the ledger refuses the records of ``_write_effect``'s spans."""
    with sqlite3.connect(db) as con:
        con.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records"
            " WHEN instr(CAST(NEW.body AS TEXT), 'INSERT orders') > 0"
            " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )


def _wait_failed(pipeline, at_least: int = 1) -> None:
    deadline = time.monotonic() + 10
    while pipeline.stats().failed < at_least:
        assert time.monotonic() < deadline, "the writer never tried the commit"
        time.sleep(0.01)


def _write_effect(provider: TracerProvider) -> None:
    with provider.get_tracer("app").start_as_current_span(
        "INSERT orders",
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system": "sqlite", "db.statement": "INSERT INTO orders VALUES (1)"},
    ):
        pass


@pytest.mark.parametrize("how", ["to_thread", "executor", "thread"])
def test_an_effect_lost_on_another_thread_fails_its_action(make_pipeline, tmp_path, how):
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    pipeline.writer.probe_interval = 0.0
    with otel_audit.audit_action("warm.up"):
        pass

    def effect_then_wait() -> None:
        _write_effect(provider)
        _wait_failed(pipeline)  # keep the ledger locked until the effect's commit failed

    async def in_task() -> None:
        await asyncio.to_thread(effect_then_wait)

    with pytest.raises(LedgerWriteError):
        with otel_audit.audit_action("order.pay"):
            with _Locker(db):
                if how == "to_thread":
                    asyncio.run(in_task())
                elif how == "executor":
                    with concurrent.futures.ThreadPoolExecutor(1) as pool:
                        ctx = contextvars.copy_context()
                        pool.submit(ctx.run, effect_then_wait).result()
                else:
                    ctx = contextvars.copy_context()
                    worker = threading.Thread(target=ctx.run, args=(effect_then_wait,))
                    worker.start()
                    worker.join()
    pipeline.flush()
    (pay,) = _records(pipeline.ledger_url, action="order.pay")
    assert (pay.attr(v.OUTCOME), pay.attr(v.REASON)) == ("failure", "LedgerWriteError")
    assert "INSERT orders" not in [r.name for r in _records(pipeline.ledger_url)]


def test_a_lost_record_fails_the_enclosing_action_even_when_the_inner_error_is_caught(
    make_pipeline, tmp_path
):
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    pipeline.writer.probe_interval = 0.0
    with pytest.raises(LedgerWriteError):
        with otel_audit.audit_action("batch.run"):
            try:
                with otel_audit.audit_action("order.pay"):
                    with _Locker(db):
                        _write_effect(provider)
                        _wait_failed(pipeline)
            except LedgerWriteError:
                pass  # the application swallows it; the outer action must not


def test_an_action_whose_effects_fail_at_its_exit_leaves_no_record_of_success(
    make_pipeline, tmp_path
):
    """An insider locks the ledger while an action runs: its effects' records,
    still queued, fail at its exit, and nothing says the action succeeded."""
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    with otel_audit.audit_action("warm.up"):
        pass
    locker = _Locker(db)
    with pytest.raises(LedgerWriteError):
        with otel_audit.audit_action("order.pay"):
            for _ in range(3):
                _write_effect(provider)  # queued lazily: committed at the exit
            locker.__enter__()  # held until after the exit
    locker.__exit__()
    pipeline.flush()
    assert "INSERT orders" not in [r.name for r in _records(pipeline.ledger_url)]
    pay = _records(pipeline.ledger_url, action="order.pay")
    assert all(r.attr(v.OUTCOME) == v.FAILURE for r in pay)


def test_an_action_whose_effect_the_ledger_refuses_is_recorded_as_failed(make_pipeline, tmp_path):
    """An insider's trigger refuses one effect's record: the action raises, and
    its record (refused with the effect when it said success) says failure."""
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}")
    with otel_audit.audit_action("warm.up"):
        pass
    _refuse_effects(db)
    with pytest.raises(LedgerWriteError):
        with otel_audit.audit_action("order.pay"):
            _write_effect(provider)
    pipeline.flush()
    (pay,) = _records(pipeline.ledger_url, action="order.pay")
    assert (pay.attr(v.OUTCOME), pay.attr(v.REASON)) == ("failure", "LedgerWriteError")


def test_effects_are_committed_before_the_action_returns_in_one_wait(make_pipeline):
    pipeline, provider, _ = make_pipeline()
    with otel_audit.audit_action("order.create", resource=("order", "1")):
        for _ in range(5):
            _write_effect(provider)
    # No flush: sync durability means everything is already durable.
    names = [r.name for r in _records(pipeline.ledger_url)]
    assert names.count("INSERT orders") == 5 and "order.create" in names


def test_an_actions_effects_are_committed_together(make_pipeline):
    pipeline, provider, _ = make_pipeline()
    with otel_audit.audit_action("warm.up"):
        pass
    before = pipeline.stats().batches
    for i in range(20):
        with otel_audit.audit_action("order.create", resource=("order", str(i))):
            for _ in range(5):
                _write_effect(provider)
                time.sleep(0.002)  # a real service waits on I/O between its effects
    # One commit per action with the thread writer: its effects' records and
    # its own, queued after them (never written without them); two with the
    # writer process (the effects, then the own record, whose outcome says
    # whether they were written); one per record before either. A few more
    # are allowed: the idle writer looks at its queue every second.
    assert pipeline.stats().committed >= 121
    per_action = 1 if pipeline.processor.commits_together else 2
    assert pipeline.stats().batches - before <= 20 * per_action + 5
    assert [r.name for r in _records(pipeline.ledger_url)].count("INSERT orders") == 100


def test_an_async_actions_exit_starts_the_commit_of_its_effects(make_pipeline):
    pipeline, provider, _ = make_pipeline()

    @otel_audit.audit_action("order.read")
    async def one() -> None:
        for _ in range(5):
            _write_effect(provider)
        await asyncio.sleep(0)

    async def main() -> None:
        for _ in range(20):
            await one()

    started = time.monotonic()
    asyncio.run(main())
    # Waiting for the writer's one-second look at its queue would take 20 s.
    assert time.monotonic() - started < 5
    assert [r.name for r in _records(pipeline.ledger_url)].count("INSERT orders") == 100


def test_the_effect_of_an_action_that_never_exits_is_still_committed(make_pipeline):
    pipeline, provider, _ = make_pipeline()

    def job():
        with otel_audit.audit_action("report.build"):
            _write_effect(provider)
            yield

    def committed() -> list[str]:
        return [r.name for r in _records(pipeline.ledger_url)]

    left_open = job()
    next(left_open)  # the action stays open: nobody waits for its effect's record
    deadline = time.monotonic() + 10
    while "INSERT orders" not in committed():
        assert time.monotonic() < deadline, "a record queued in an open action was never committed"
        time.sleep(0.05)
    # And a flush commits such a record at once.
    second = job()
    next(second)
    started = time.monotonic()
    assert pipeline.flush()
    assert committed().count("INSERT orders") == 2
    assert time.monotonic() - started < 0.9
    second.close()  # innermost first: each restores the context it found
    left_open.close()
    assert committed().count("report.build") == 2


def test_an_async_action_cancelled_in_its_exit_is_still_recorded(make_pipeline):
    # A request timeout fires while the action's exit waits for its effects'
    # commit (which starts there, since they are queued lazily).
    pipeline, provider, _ = make_pipeline()

    async def handler(i: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        async with otel_audit.audit_action(f"order.{i}"):
            _write_effect(provider)
            await asyncio.sleep(0.01)  # I/O
            asyncio.get_running_loop().call_soon(task.cancel)

    async def main() -> list[str]:
        ends = []
        for i in range(10):
            try:
                await asyncio.create_task(handler(i))
                ends.append("returned")
            except asyncio.CancelledError:
                ends.append("cancelled")
        return ends

    assert "cancelled" in asyncio.run(main())
    pipeline.flush()
    records = {r.name: r for r in _records(pipeline.ledger_url)}
    assert all(f"order.{i}" in records for i in range(10)), sorted(records)
    assert [r.name for r in _records(pipeline.ledger_url)].count("INSERT orders") == 10


def test_an_async_action_cancelled_in_its_exit_whose_effect_is_refused_says_failure(
    make_pipeline, tmp_path
):
    """As above, with an insider's trigger refusing the effects' records: the
    cancelled actions' records say failure once the commit is answered."""
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}")
    with otel_audit.audit_action("warm.up"):
        pass
    _refuse_effects(db)
    pipeline.writer.probe_interval = 0.0

    async def handler(i: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        async with otel_audit.audit_action(f"order.{i}"):
            _write_effect(provider)
            await asyncio.sleep(0.01)
            asyncio.get_running_loop().call_soon(task.cancel)

    def outcome(name: str) -> str | None:
        # One action at a time: the next one's refused effect must not share the
        # commit of this one's failure record (each would fail the other's).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [r.attr(v.OUTCOME) for r in _records(pipeline.ledger_url, action=name)]
            if found:
                return str(found)
            time.sleep(0.02)
        return None

    async def main() -> list[str | None]:
        outcomes = []
        for i in range(10):
            with pytest.raises((asyncio.CancelledError, LedgerWriteError)):
                await asyncio.create_task(handler(i))
            outcomes.append(await asyncio.to_thread(outcome, f"order.{i}"))
        return outcomes

    outcomes = asyncio.run(main())
    if pipeline.processor.commits_together:
        assert outcomes == [str([v.FAILURE])] * 10
    else:
        # The writer process keeps the two-commit exit: the cancellation while
        # it waits for the effects is recorded (outcome unknown), and that
        # record can share the refused effect's frame and fail with it.
        assert str([v.SUCCESS]) not in outcomes and str([v.UNKNOWN]) in outcomes


def test_an_abandoned_coroutine_still_records_its_action(make_pipeline):
    pipeline, provider, _ = make_pipeline()

    async def job() -> None:
        async with otel_audit.audit_action("report.build"):
            _write_effect(provider)
            await asyncio.Future()  # never resolves: the action stays open

    async def main() -> None:
        coroutine = job()
        coroutine.send(None)  # driven by hand, as a framework may
        await asyncio.sleep(0.05)
        coroutine.close()  # closed while suspended: no await is possible in its exit

    asyncio.run(main())
    # Nobody waits for these records: they are committed at once all the
    # same (not after the writer's one-second look, nor only at a flush).
    closed = time.monotonic()
    while len(_records(pipeline.ledger_url)) < 2 and time.monotonic() - closed < 5:
        time.sleep(0.01)
    assert time.monotonic() - closed < 0.6
    (action,) = _records(pipeline.ledger_url, action="report.build")
    assert (action.attr(v.OUTCOME), action.attr(v.REASON)) == ("unknown", "GeneratorExit")
    assert "INSERT orders" in [r.name for r in _records(pipeline.ledger_url)]


FORK_CHILD_EFFECT = textwrap.dedent(
    """
    import os, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    provider = TracerProvider(shutdown_on_exit=False)
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", tracer_provider=provider,
                         handle_sigterm=False)
    with otel_audit.audit_action("batch.run"):
        pid = os.fork()
        if pid == 0:  # a worker process, as multiprocessing starts one: ends with os._exit
            with provider.get_tracer("app").start_as_current_span(
                "INSERT child", kind=trace.SpanKind.CLIENT,
                attributes={"db.system": "sqlite", "db.statement": "INSERT INTO t VALUES (1)"},
            ):
                pass
            os._exit(0)
        os.waitpid(pid, 0)
    print("done", flush=True)
    """
)


def _run_app(script: str, db: Path, says: str) -> list[str]:
    """Run ``script`` on the ledger ``db``; check it printed ``says``; the names it recorded."""
    out = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == says, out.stderr[-2000:]
    return [r.name for r in _records(f"sqlite:///{db}")]


def test_an_effect_in_a_forked_child_of_an_open_action_is_committed_by_the_child(tmp_path):
    names = _run_app(FORK_CHILD_EFFECT, tmp_path / "audit.db", "done")
    assert "INSERT child" in names and "batch.run" in names


def test_a_full_queue_of_an_actions_effects_does_not_stall_it(make_pipeline):
    pipeline, provider, _ = make_pipeline(max_queue_size=100)
    started = time.monotonic()
    with otel_audit.audit_action("import.run"):
        for _ in range(1000):
            _write_effect(provider)
    # Ten fills of the queue; waiting for the writer's one-second look at each took 9 s.
    assert time.monotonic() - started < 5
    assert [r.name for r in _records(pipeline.ledger_url)].count("INSERT orders") == 1000


GC_ON_THE_WRITER_THREAD = textwrap.dedent(
    """
    import gc, sys, threading, time
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    provider = TracerProvider(shutdown_on_exit=False)
    otel_audit.configure(ledger=sys.argv[1], service_name="shop", tracer_provider=provider,
                         handle_sigterm=False)

    def query():
        with provider.get_tracer("app").start_as_current_span(
            "SELECT rows", kind=trace.SpanKind.CLIENT, attributes={"db.system": "sqlite"}
        ):
            pass

    with otel_audit.audit_action("warm.up"):
        query()

    class Stream:  # holds an open action in a reference cycle: self -> generator -> self
        def __init__(self):
            self.rows = self.produce()
        def produce(self):
            with otel_audit.audit_action("export.stream"):
                query()
                yield 1
                yield 2

    stream = Stream()
    next(stream.rows)
    time.sleep(0.05)
    gc.set_threshold(1, 1, 1)  # collect at almost every allocation, on whichever thread
    stream = None  # abandoned: the collector finalizes it, here on otel-audit's own threads
    for _ in range(6):
        time.sleep(0.5)  # the application is idle
    gc.set_threshold(700, 10, 10)
    done = threading.Event()
    def probe():
        with otel_audit.audit_action("probe"):
            query()
        done.set()
    threading.Thread(target=probe, daemon=True).start()
    print("ok" if done.wait(10) else "hung", flush=True)
    """
)


def test_an_action_finalized_on_the_writers_own_thread_hangs_nothing(tmp_path):
    # The finalizer's exit must neither wait for the thread it runs on nor set
    # the writer's wake-up event while that thread holds the event's lock.
    assert "probe" in _run_app(GC_ON_THE_WRITER_THREAD, tmp_path / "audit.db", "ok")


def test_async_actions_share_commits_and_never_block_the_event_loop(make_pipeline, tmp_path):
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=20000")
    ticks: list[float] = []
    bodies_done = 0
    all_waiting = threading.Event()

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    @otel_audit.audit_action("order.read")
    async def one(i: int) -> int:
        nonlocal bodies_done
        _write_effect(provider)
        await asyncio.sleep(0)
        bodies_done += 1
        if bodies_done == 200:
            all_waiting.set()  # every action is now at its exit, waiting for its commit
        return i

    async def main() -> list[int]:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        results = await asyncio.gather(*(one(i) for i in range(200)))
        stop.set()
        await tick
        return list(results)

    before = pipeline.stats().batches
    window: list[float] = []
    # The ledger is locked by another connection: every commit waits. The lock
    # is let go half a second after all 200 actions reached their exits; a loop
    # blocked on one commit would never get them all there (the safety
    # release at 15 s then lets the test fail instead of hang).
    with _Locker(db) as locker:

        def release_later() -> None:
            all_waiting.wait(15)
            window.append(time.monotonic())
            time.sleep(0.5)
            window.append(time.monotonic())
            locker.release.set()

        releaser = threading.Thread(target=release_later)
        releaser.start()
        assert asyncio.run(main()) == list(range(200))
        releaser.join()
    assert all_waiting.is_set(), "the event loop was blocked while actions waited for commits"
    during = [t for t in ticks if window[0] + 0.05 < t < window[1] - 0.05]
    assert len(during) >= 5, "the event loop did not run while actions waited for commits"
    # 400 records (200 actions + 200 effects) in far fewer commits than records.
    assert pipeline.stats().committed >= 400
    assert pipeline.stats().batches - before < 50
    assert len(_records(pipeline.ledger_url, action="order.read")) == 200


def test_async_with_fails_closed_without_blocking(make_pipeline, tmp_path):
    db = tmp_path / "audit.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    pipeline.writer.probe_interval = 0.0

    async def main() -> None:
        async with otel_audit.audit_action("order.pay"):
            with _Locker(db):
                _write_effect(provider)
                await asyncio.to_thread(_wait_failed, pipeline)

    with pytest.raises(LedgerWriteError):
        asyncio.run(main())


def test_two_pipelines_in_one_process_have_their_own_health(tmp_path):
    broken_db, good_db = tmp_path / "broken.db", tmp_path / "good.db"
    p1, p2 = TracerProvider(shutdown_on_exit=False), TracerProvider(shutdown_on_exit=False)
    broken = otel_audit.configure(ledger=f"sqlite:///{broken_db}?busy_timeout=50",
                                  service_name="a", tracer_provider=p1, handle_sigterm=False)  # fmt: skip
    good = otel_audit.configure(ledger=f"sqlite:///{good_db}", service_name="b",
                                tracer_provider=p2, handle_sigterm=False)  # fmt: skip
    try:
        broken.writer.probe_interval = 60.0
        with _Locker(broken_db):
            with pytest.raises(LedgerWriteError):
                with broken.audit_action("a.write"):
                    pass
            with pytest.raises(LedgerUnavailable):
                with broken.audit_action("a.again"):
                    pass
            # The other provider's pipeline is healthy and keeps auditing.
            with good.audit_action("b.write"):
                pass
        assert [r.attr(v.ACTION) for r in _records(good.ledger_url)] == ["b.write"]
        assert _records(good.ledger_url)[0].service == "b"
    finally:
        broken.shutdown()
        good.shutdown()


def test_sigterm_while_the_main_thread_holds_the_writers_lock_does_not_deadlock(tmp_path):
    db = tmp_path / "audit.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        import otel_audit
        pipeline = otel_audit.configure(ledger="sqlite:///{db}", service_name="svc",
                                        durability="async")
        for i in range(50):
            with otel_audit.audit_action("job.step", resource=("step", str(i))):
                pass
        print("ready", flush=True)
        # The signal lands while this thread holds the writer's condition lock
        # (as it does for a moment on every full queue and flush): a handler that
        # flushed here would wait for this very lock forever.
        with pipeline.writer._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
        time.sleep(30)
        print("not terminated", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not terminated" not in proc.stdout
    # Everything queued before the signal was flushed and checkpointed on the way out.
    assert len(_records(f"sqlite:///{db}", action="job.step")) == 50
    with open_ledger(f"sqlite:///{db}", readonly=True) as ledger:
        assert ledger.checkpoints("svc")
