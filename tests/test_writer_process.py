"""The writer process (``configure(writer="process")``): same bytes, same guarantees.

Real worker processes, real SQLite files, the real SDK. Each promise of the
in-process writer is checked here for the worker: the records are the same
bytes, a sync action returns only after its records are committed, a worker
that dies fails the records it did not acknowledge and refuses new actions,
a killed application loses nothing it handed over, Ctrl-C to the process
group does not stop the worker, checkpoints are signed there and reach the
application's listeners.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import otel_audit
from otel_audit.engine.remote import _WORKER, framed, read_frame, worker_environment
from otel_audit.errors import ConfigError, LedgerUnavailable, LedgerWriteError
from otel_audit.proof.keys import generate_keypair

REPO = Path(__file__).resolve().parent.parent


class Op(str, enum.Enum):
    SHIP = "order.ship.enum"


class CountingIds(IdGenerator):
    """Deterministic ids, so two runs make the same spans."""

    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        return self.n

    def generate_trace_id(self) -> int:
        self.n += 1
        return (1 << 100) + self.n


def workload(provider: TracerProvider, pipeline: otel_audit.AuditPipeline) -> None:
    """Spans with every kind of value a record normalises, at fixed times."""
    tracer = provider.get_tracer("shop.orders", "1.2")
    t = 1_700_000_000_000_000_000
    values = [
        {"note": "plain"},
        {"unicode": "é中\U0001f600\u2028", "count": 3, "ok": True, "ratio": 0.25},
        {"tiny": 1e-7, "huge": 1.5e300, "neg": -0.0},
        {"nan": float("nan"), "inf": float("-inf")},
        {"big": 2**70, "bytes": b"\x00\xff"},
        {"seq": ("a", "b"), "nums": [1, 2, 3], "floats": [0.5, float("nan")]},
        {"long": "x" * 70_000},
        {"surrogate": "bad\udcff"},
        {"password": "hunter2", "db.statement": "UPDATE users SET password='s3cret' WHERE id=1"},
    ]
    names = [f"order.{i}" for i in range(len(values))]
    names[0] = Op.SHIP  # a str-enum name: stored as str() gives it, by both writers
    for i, extra in enumerate(values):
        attrs = {"audit.event": True, "audit.action": f"order.{i}", "audit.actor.id": "alice"}
        attrs.update(extra)
        span = tracer.start_span(
            names[i], kind=SpanKind.SERVER, attributes=attrs, start_time=t + i,
            links=[Link(span_context_of(provider), {"why": "retry"})] if i == 2 else None,
        )  # fmt: skip
        span.add_event("step", {"n": i}, timestamp=t + i + 1)
        if i % 3 == 0:
            span.set_status(Status(StatusCode.ERROR, f"failed {i}"))
        span.end(end_time=t + i + 2)
    with pipeline.audit_action("order.ship", resource_type="order", resource_id="7"):
        with tracer.start_as_current_span(
            "INSERT orders", kind=SpanKind.CLIENT, start_time=t + 50,
            attributes={"db.system": "sqlite", "db.operation": "INSERT"},
        ) as child:  # fmt: skip
            child.set_attribute("db.statement", "INSERT INTO orders VALUES (1)")


def span_context_of(provider: TracerProvider):  # type: ignore[no-untyped-def]
    span = provider.get_tracer("links").start_span("linked", start_time=1)
    span.end(end_time=2)
    return span.get_span_context()


def bodies(db: Path) -> list[bytes]:
    con = sqlite3.connect(db)
    try:
        return [bytes(b) for (b,) in con.execute("SELECT body FROM records ORDER BY seq")]
    finally:
        con.close()


def pipeline_for(db: Path, writer: str, **options):  # type: ignore[no-untyped-def]
    provider = TracerProvider(id_generator=CountingIds(), shutdown_on_exit=False)
    options.setdefault("handle_sigterm", False)
    pipeline = otel_audit.configure(
        ledger=str(db), service_name="shop", tracer_provider=provider, writer=writer, **options
    )
    return provider, pipeline


def test_the_worker_writes_the_same_bytes_as_the_in_process_writer(tmp_path: Path) -> None:
    ledgers = {}
    for writer in ("thread", "process"):
        db = tmp_path / f"{writer}.db"
        provider, pipeline = pipeline_for(db, writer)
        try:
            workload(provider, pipeline)
        finally:
            pipeline.shutdown()
        ledgers[writer] = bodies(db)
    # Actions and effect spans carry their own wall-clock times; compare the rest byte for byte.
    fixed = [b for b in ledgers["thread"] if b'"order.ship"' not in b and b"INSERT" not in b]
    assert len(fixed) == 9
    assert fixed == [b for b in ledgers["process"] if b in fixed]
    assert len(ledgers["process"]) == len(ledgers["thread"]) == 11
    stored = b"".join(ledgers["process"])
    assert b"hunter2" not in stored and b"s3cret" not in stored
    assert b'{"double":"nan"}' in stored and b"1180591620717411303424" in stored


def test_a_sync_action_returns_only_after_its_records_are_committed(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    provider, pipeline = pipeline_for(db, "process")
    tracer = provider.get_tracer("t")
    try:
        for i in range(20):
            with pipeline.audit_action("order.update", resource_type="order", resource_id=str(i)):
                with tracer.start_as_current_span(
                    "UPDATE orders", kind=SpanKind.CLIENT,
                    attributes={"db.system": "sqlite", "db.operation": "UPDATE"},
                ):  # fmt: skip
                    pass
            # Read by another connection, right after the action returned: both are there.
            assert len(bodies(db)) == 2 * (i + 1)
    finally:
        pipeline.shutdown()
    verify = subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", str(db)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_worker_that_dies_fails_its_records_and_refuses_new_actions(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    provider, pipeline = pipeline_for(db, "process")
    try:
        with pipeline.audit_action("order.update"):
            pass
        proc = pipeline.writer._proc  # type: ignore[union-attr]
        assert proc is not None
        # The attacker (or the OOM killer) stops the worker, then kills it while an action waits.
        os.kill(proc.pid, signal.SIGSTOP)
        raised: list[BaseException] = []
        import threading

        def act() -> None:
            try:
                with pipeline.audit_action("order.delete", resource_type="order", resource_id="9"):
                    pass
            except LedgerWriteError as exc:
                raised.append(exc)

        actor = threading.Thread(target=act)
        actor.start()
        time.sleep(0.3)
        assert actor.is_alive()  # waiting for the commit, not returning unrecorded
        os.kill(proc.pid, signal.SIGKILL)
        actor.join(10)
        assert not actor.is_alive()
        assert raised and "exited" in str(raised[0])
        with pytest.raises(LedgerUnavailable, match="has stopped"):
            with pipeline.audit_action("order.update"):
                pass
        assert not pipeline.writer.healthy
    finally:
        pipeline.shutdown()
    assert all(b"order.delete" not in b for b in bodies(db))


def _records_and_checkpoint(db: Path) -> tuple[int, int | None]:
    """How many records ``db`` holds, and the seq of its last checkpoint."""
    con = sqlite3.connect(db)
    try:
        n = con.execute("SELECT count(*) FROM records").fetchone()[0]
        last = con.execute("SELECT max(seq) FROM checkpoints").fetchone()[0]
    finally:
        con.close()
    return int(n), last


APP = textwrap.dedent(
    """
    import os, signal, sys, time
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    provider = TracerProvider()
    pipeline = otel_audit.configure(ledger=sys.argv[1], service_name="app", tracer_provider=provider,
                                    writer="process", durability="async", checkpoint_every=100000)
    tracer = provider.get_tracer("app")
    for i in range(500):
        tracer.start_span("order.update", attributes={"audit.event": True, "n": i}).end()
    if sys.argv[2] == "kill":
        assert pipeline.flush(30)
        os.kill(os.getpid(), signal.SIGKILL)   # no shutdown, no atexit: the worker must finish alone
    if sys.argv[2] == "exit":
        sys.exit(0)                            # the script just ends, without shutdown()
    os.killpg(0, signal.SIGINT)                # Ctrl-C in the terminal: to the whole process group
    time.sleep(0.5)
    """
)


@pytest.mark.parametrize("how", ["kill", "sigint", "exit"])
def test_records_handed_to_the_worker_survive_the_application(tmp_path: Path, how: str) -> None:
    db = tmp_path / "app.db"
    script = tmp_path / "app.py"
    script.write_text(APP)
    proc = subprocess.run(
        [sys.executable, str(script), str(db), how], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True,
    )  # fmt: skip
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL
    elif how == "exit":
        assert proc.returncode == 0
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    if how != "sigint":  # (Ctrl-C's traceback is the application's own)
        # The worker, finding its application gone, answers nobody: quietly.
        assert "Traceback" not in proc.stderr and "failed" not in proc.stderr, proc.stderr
    # The worker drains, commits and checkpoints after its application is gone.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        n, cps = _records_and_checkpoint(db)
        if n == 500 and cps == 500:
            break
        time.sleep(0.2)
    assert (n, cps) == (500, 500)


def test_checkpoints_are_signed_in_the_worker_and_reach_the_listeners(tmp_path: Path) -> None:
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(str(key), str(pub))
    db = tmp_path / "s.db"
    provider, pipeline = pipeline_for(db, "process", signing_key=str(key), checkpoint_every=5)
    seen = []
    pipeline.writer.checkpoint_listeners.append(seen.append)
    try:
        for i in range(12):
            with pipeline.audit_action("order.update", resource_id=str(i)):
                pass
    finally:
        pipeline.shutdown()
    assert [c.seq for c in seen][:2] == [5, 10] and seen[-1].seq == 12
    assert all(c.signature for c in seen)
    verify = subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", str(db), "--public-key", str(pub)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "12 records" in verify.stdout


def test_bad_writer_settings_fail_configure_with_one_clear_line(tmp_path: Path) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    with pytest.raises(ConfigError, match="OTEL_AUDIT_WRITER must be one of thread, process"):
        os.environ["OTEL_AUDIT_WRITER"] = "fork"
        try:
            otel_audit.configure(ledger=str(tmp_path / "x.db"), tracer_provider=provider)
        finally:
            del os.environ["OTEL_AUDIT_WRITER"]
    from otel_audit.policy.rules import AuditPolicy

    with pytest.raises(ConfigError, match="needs the policy as a file"):
        otel_audit.configure(
            ledger=str(tmp_path / "x.db"), tracer_provider=provider, writer="process",
            policy=AuditPolicy(), handle_sigterm=False,
        )  # fmt: skip
    assert otel_audit.capture.installed.installed_on(provider) is None


def test_the_worker_loads_the_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[redact.attributes]]\nname = "order.note"\nmethod = "drop"\n')
    db = tmp_path / "p.db"
    provider, pipeline = pipeline_for(db, "process", policy=str(policy))
    try:
        span = provider.get_tracer("t").start_span(
            "order.update", attributes={"audit.event": True, "order.note": "call me at 555"}
        )
        span.end()
        pipeline.flush()
    finally:
        pipeline.shutdown()
    stored = b"".join(bodies(db))
    # The dropped value itself, not "555" (a timestamp can hold those digits).
    assert b"order.update" in stored and b"call me at 555" not in stored
    assert b"order.note" not in stored


def test_finished_records_and_spans_share_a_batch(tmp_path: Path) -> None:
    """An intent record (finished bytes, with JSON nulls) beside spans in one frame."""
    db = tmp_path / "m.db"
    provider, pipeline = pipeline_for(db, "process", durability="async")
    tracer = provider.get_tracer("t")
    try:
        from otel_audit.engine.record import encode, record_from_span

        live = tracer.start_span("order.intent", attributes={"audit.event": True})
        body = encode(record_from_span(live, "shop", {"audit.intent": True}))
        assert b"null" in body  # no parent
        writer = pipeline.writer
        tickets = []
        for round_ in range(20):
            for i in range(20):  # async: queued for the sender thread
                attrs = {"audit.event": True, "n": i, "round": round_}
                tracer.start_span("order.update", attributes=attrs).end()
            # sync: written at once by this thread, with whatever is still queued
            tickets.append(writer.enqueue(body))
        for ticket in tickets:
            ticket.wait(writer)
        assert pipeline.flush(30)
    finally:
        pipeline.shutdown()
    stored = bodies(db)
    assert len(stored) == 420 and stored.count(body) == 20


FORK_APP = textwrap.dedent(
    """
    import os, sys
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    provider = TracerProvider()
    pipeline = otel_audit.configure(ledger=sys.argv[1], service_name="app", tracer_provider=provider,
                                    writer="process", handle_sigterm=False)
    with pipeline.audit_action("before.fork"):
        pass
    pid = os.fork()   # a pre-forking server (gunicorn --preload) after configure()
    who = "child" if pid == 0 else "parent"
    for i in range(10):
        with pipeline.audit_action(f"{who}.action"):
            pass
    pipeline.shutdown()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_forked_child_starts_its_own_worker(tmp_path: Path) -> None:
    db = tmp_path / "fork.db"
    script = tmp_path / "fork_app.py"
    script.write_text(FORK_APP)
    proc = subprocess.run(
        [sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = b"\n".join(bodies(db))
    assert stored.count(b'"audit.action":"before.fork"') == 1
    assert stored.count(b'"audit.action":"child.action"') == 10
    assert stored.count(b'"audit.action":"parent.action"') == 10
    verify = subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", str(db)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


ZERO_CODE_APP = textwrap.dedent(
    """
    import os, threading, time
    from opentelemetry import trace

    pid = os.fork()  # a gunicorn worker: its writer process starts on first use, after the hook
    if pid:
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    tracer = trace.get_tracer("app")
    tracer.start_span("order.update", attributes={"audit.event": True}).end()
    time.sleep(3)  # a worker that instrumented itself would have started its own by now
    mine = {os.getpid()}
    found = []
    for _ in range(3):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid in mine and int(pid) not in mine:
                mine.add(int(pid))
                found.append(cmd)
    print(sum(b"otel_audit.engine.worker" in c for c in found), flush=True)
    trace.get_tracer_provider().shutdown()
    os._exit(0)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_under_opentelemetry_instrument_the_worker_is_not_instrumented(tmp_path: Path) -> None:
    """The auto-instrumentation's sitecustomize must not reach the worker (no worker of a worker)."""
    script = tmp_path / "app.py"
    script.write_text(ZERO_CODE_APP)
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    env = dict(os.environ, PYTHONPATH=str(REPO), OTEL_AUDIT_LEDGER=str(tmp_path / "z.db"),
               OTEL_AUDIT_WRITER="process", OTEL_SERVICE_NAME="z", OTEL_TRACES_EXPORTER="none",
               OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")  # fmt: skip
    proc = subprocess.run(
        [str(instrument), sys.executable, str(script)], capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1", proc.stdout + proc.stderr
    assert any(b'"order.update"' in b for b in bodies(tmp_path / "z.db"))


def test_one_span_that_cannot_be_sent_fails_alone_and_is_counted(tmp_path: Path) -> None:
    """A legal int too long for any encoder fails its own record, not its batch's 199 others."""
    db = tmp_path / "poison.db"
    provider, pipeline = pipeline_for(db, "process", durability="async")
    tracer = provider.get_tracer("t")
    try:
        for i in range(200):
            attrs: dict = {"audit.event": True, "n": i}
            if i == 100:
                attrs["big"] = 10**5000  # str() of it raises ValueError (int digit limit)
            tracer.start_span("order.update", attributes=attrs).end()
        pipeline.flush(30)
        stats = pipeline.stats()
    finally:
        pipeline.shutdown()
    assert len(bodies(db)) == 199
    assert stats.failed == 1 and stats.committed == 199


def test_a_span_kind_given_as_an_int_is_recorded_by_both_writers_alike(tmp_path: Path) -> None:
    """The SDK takes ``kind=2``; the worker's snapshot could not read it and failed its batch."""
    ledgers = {}
    for writer in ("thread", "process"):
        db = tmp_path / f"{writer}.db"
        provider, pipeline = pipeline_for(db, writer)
        tracer = provider.get_tracer("t")
        try:
            with pipeline.audit_action("order.ship", resource_type="order", resource_id="7"):
                for i, kind in enumerate((SpanKind.CLIENT, 2, SpanKind.CLIENT)):
                    tracer.start_span(
                        f"INSERT {i}", kind=kind, start_time=10 + i, attributes={"db.system": "x"}
                    ).end(end_time=20 + i)
        finally:
            pipeline.shutdown()
        ledgers[writer] = [b for b in bodies(db) if b"INSERT" in b]
    # All three, and the same bytes (the in-process record reads a kind that
    # is not a SpanKind as INTERNAL).
    assert len(ledgers["thread"]) == 3
    assert ledgers["process"] == ledgers["thread"]


SIGPIPE_APP = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from opentelemetry.sdk.trace import TracerProvider
    import otel_audit

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as many command-line tools do
    provider = TracerProvider()
    pipeline = otel_audit.configure(ledger=sys.argv[1], service_name="app", tracer_provider=provider,
                                    writer="process", durability="async", handle_sigterm=False)
    tracer = provider.get_tracer("app")
    pid = pipeline.writer._proc.pid
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()  # dies while frames are written
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        try:
            tracer.start_span("x", attributes={"audit.event": True, "pad": "y" * 2000}).end()
        except Exception:
            pass
    print("survived", pipeline.stats().healthy, flush=True)
    """
)


def test_a_dead_worker_does_not_kill_an_application_with_default_sigpipe(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(SIGPIPE_APP)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "p.db")], capture_output=True, text=True,
        timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "survived False"


def test_the_worker_never_imports_from_the_working_directory(tmp_path: Path) -> None:
    """The ledger's directory is often writable by others: a planted module must not run."""
    data = tmp_path / "data"
    data.mkdir()
    marker = tmp_path / "PWNED"
    for name in ("dataclasses", "orjson", "otel_audit"):
        planted = data / f"{name}.py"
        planted.write_text(
            f"open({str(marker)!r}, 'w').write('{name}')\nraise ImportError('planted')\n"
        )
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            """
            import sys
            from opentelemetry.sdk.trace import TracerProvider
            import otel_audit
            p = otel_audit.configure(ledger="ledger.db", service_name="a", writer="process",
                                     tracer_provider=TracerProvider(), handle_sigterm=False)
            with p.audit_action("order.update"):
                pass
            p.shutdown()
            print("ok")
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(app)], capture_output=True, text=True, timeout=60, cwd=data,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok" and not marker.exists()
    assert len(bodies(data / "ledger.db")) == 1


@pytest.mark.parametrize("round_", range(3))
def test_frames_that_arrive_with_the_end_of_input_are_all_committed(
    tmp_path: Path, round_: int
) -> None:
    # The application's last frames and its end (killed, or exiting) can
    # reach the worker while it is busy building or committing an earlier
    # batch: every record in them was handed over and must be committed.
    db = tmp_path / "eof.db"
    ours, theirs = socket.socketpair()
    env = dict(worker_environment(), PYTHONPATH=str(REPO))
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER], stdin=theirs.fileno(), stdout=subprocess.PIPE,
        env=env, close_fds=True,
    )  # fmt: skip
    theirs.close()
    try:
        config = {"ledger": str(db), "chain": "c", "service": "s", "policy": None,
                  "signing_key": None, "max_queue_size": 100_000,
                  "checkpoint_every": 10**9, "checkpoint_interval": 60.0}  # fmt: skip
        ours.sendall(framed(["config", config]))
        assert worker.stdout is not None
        assert read_frame(worker.stdout)[0] == "ready"
        sent = 0
        for size, pause in ((3000, 0.02), (10, 0.0)):
            items = [[sent + i, "r", f'{{"n":{sent + i}}}', "async"] for i in range(size)]
            sent += size
            ours.sendall(framed(["b", items]))
            time.sleep(pause)  # the worker is inside the first batch when the rest arrives
        ours.close()
        while read_frame(worker.stdout) is not None:
            pass
        assert worker.wait(60) == 0
    finally:
        ours.close()
        if worker.poll() is None:
            worker.kill()
    assert _records_and_checkpoint(db) == (sent, sent)


def test_records_a_killed_worker_took_with_it_are_counted_as_failed(tmp_path: Path) -> None:
    provider, pipeline = pipeline_for(tmp_path / "k.db", "process", durability="async")
    tracer = provider.get_tracer("t")
    try:
        tracer.start_span("warm", attributes={"audit.event": True}).end()
        assert pipeline.flush(10)
        proc = pipeline.writer._proc  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGSTOP)
        for i in range(20):
            tracer.start_span("order.update", attributes={"audit.event": True, "n": i}).end()
        assert not pipeline.flush(0.5)  # handed over, never answered
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pipeline.writer.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = pipeline.stats()
        assert (stats.committed, stats.failed) == (1, 20)  # logged, and counted
    finally:
        pipeline.shutdown()
