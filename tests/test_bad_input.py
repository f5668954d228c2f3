"""Hostile attributes, broken ledgers and bad settings: a clear error or a record, never a crash."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import SpanLimits, TracerProvider

import otel_audit
from otel_audit import vocabulary as v
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.errors import ConfigError, LedgerError, LedgerUnavailable, LedgerWriteError
from otel_audit.proof.verify import verify_ledger

REPO = Path(__file__).resolve().parents[1]


def only_record(pipeline):
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        verify_ledger(ledger)
        (rec,) = [r.record for r in ledger.query(Query())]
    return rec


def test_every_otel_attribute_type_round_trips(make_pipeline):
    pipeline, _, _ = make_pipeline()
    attrs = {
        "s": "text", "b": True, "i": -(2**63), "f": 1.5, "whole_float": 2.0,
        "nan": math.nan, "inf": -math.inf, "ss": ["a", "b"], "bs": [True, False],
        "is": [1, 2, 3], "fs": [0.25, 1e300], "empty": [],
    }  # fmt: skip
    with otel_audit.audit_action("types.all", attributes=attrs):
        pass
    got = only_record(pipeline).attributes
    assert got["s"] == "text" and got["b"] is True and got["i"] == -(2**63)
    assert got["f"] == 1.5 and isinstance(got["whole_float"], float)
    assert got["nan"] == {"double": "nan"} and got["inf"] == {"double": "-inf"}
    assert got["ss"] == ["a", "b"] and got["bs"] == [True, False] and got["is"] == [1, 2, 3]
    assert got["fs"] == [0.25, 1e300] and got["empty"] == []


def test_huge_values_are_cut_and_named(make_pipeline):
    pipeline, _, _ = make_pipeline()
    with otel_audit.audit_action("big", attributes={"blob": "x" * 5_000_000, "small": "ok"}):
        pass
    rec = only_record(pipeline)
    assert len(rec.attributes["blob"]) == 65536
    assert rec.truncated == ("blob",) and rec.attributes["small"] == "ok"


def test_non_utf8_text_is_kept_visibly(make_pipeline):
    pipeline, _, _ = make_pipeline()
    raw = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")
    with otel_audit.audit_action("bytes.in", attributes={"path": raw, raw: "key too"}):
        pass
    attrs = only_record(pipeline).attributes
    assert attrs["path"] == "caf\\udce9 \\udcff\\udcfe"
    assert attrs["caf\\udce9 \\udcff\\udcfe"] == "key too"


def test_ten_thousand_attributes(tmp_path):
    provider = TracerProvider(
        span_limits=SpanLimits(max_span_attributes=20_000), shutdown_on_exit=False
    )
    pipeline = otel_audit.configure(
        ledger=str(tmp_path / "a.db"),
        service_name="s",
        tracer_provider=provider,
        handle_sigterm=False,
    )
    try:
        with otel_audit.audit_action("wide", attributes={f"k{i}": i for i in range(10_000)}):
            pass
        rec = only_record(pipeline)
        assert len(rec.attributes) == 10_000 + 5
        assert rec.attributes["k9999"] == 9999
    finally:
        pipeline.shutdown()


def test_unsupported_value_smuggled_past_the_api_is_named_not_called(make_pipeline):
    class Hostile:
        def __repr__(self):  # pragma: no cover - must never run
            raise RuntimeError("repr called")

    pipeline, provider, _ = make_pipeline()
    with otel_audit.audit_action("odd") as action:
        # Bypass the SDK's type check the way a buggy instrumentation might.
        action.span._attributes._dict["weird"] = Hostile()  # type: ignore[union-attr]
    assert only_record(pipeline).attributes["weird"] == {"unsupported": "Hostile"}


def test_ledger_in_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(LedgerError, match=r"ledger directory '.*nope' does not exist"):
        otel_audit.configure(ledger=str(tmp_path / "nope" / "audit.db"), service_name="s",
                             tracer_provider=TracerProvider(shutdown_on_exit=False))  # fmt: skip


def test_corrupted_ledger_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "audit.db"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(LedgerError, match="file is not a database"):
        otel_audit.configure(ledger=str(bad), service_name="s",
                             tracer_provider=TracerProvider(shutdown_on_exit=False))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "otel_audit", "verify", "--ledger", str(bad)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "file is not a database" in result.stderr


def test_read_only_ledger_file_is_a_clear_error():
    # Root ignores file modes, so the check runs in a child that drops to nobody.
    d = tempfile.mkdtemp(prefix="otel-audit-ro-")
    os.chmod(d, 0o755)
    db = os.path.join(d, "audit.db")
    open_ledger(db).close()
    os.chmod(db, 0o444)
    code = textwrap.dedent(
        """
        import os, sys
        import otel_audit, otel_audit.engine.ledger.sqlite
        from opentelemetry.sdk.trace import TracerProvider
        # Load everything first: nobody may not be able to read the interpreter's files.
        provider = TracerProvider(shutdown_on_exit=False)
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)
        try:
            otel_audit.configure(ledger=sys.argv[1], service_name="s", tracer_provider=provider,
                                 handle_sigterm=False)
        except otel_audit.LedgerError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, db], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert "readonly database" in out.stdout, out.stderr


def test_ledger_path_that_is_a_directory(tmp_path):
    with pytest.raises(LedgerError, match="is a directory"):
        open_ledger(str(tmp_path))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"OTEL_AUDIT_DURABILITY": "maybe"}, "OTEL_AUDIT_DURABILITY must be one of sync, async"),
        (
            {"OTEL_AUDIT_CHECKPOINT_EVERY": "0"},
            "OTEL_AUDIT_CHECKPOINT_EVERY must be a positive integer",
        ),
        (
            {"OTEL_AUDIT_MAX_QUEUE_SIZE": "lots"},
            "OTEL_AUDIT_MAX_QUEUE_SIZE must be a positive integer",
        ),
        (
            {"OTEL_AUDIT_SIGNING_KEY": "/nonexistent/key"},
            "cannot read signing key '/nonexistent/key'",
        ),
        ({"OTEL_AUDIT_LEDGER": "mysql://x"}, "ledger URL scheme 'mysql' is not supported"),
        (
            {"OTEL_AUDIT_LEDGER": "sqlite:///a.db?fast=1"},
            "ledger URL option 'fast' is not supported",
        ),
        (
            {"OTEL_AUDIT_EFFECTS": "data.write,telepathy"},
            "OTEL_AUDIT_EFFECTS names unknown effects: telepathy",
        ),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch, tmp_path, env, message):
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        otel_audit.configure(
            service_name="s", tracer_provider=TracerProvider(shutdown_on_exit=False)
        )
    assert message in str(info.value)


def test_unknown_configure_option():
    with pytest.raises(ConfigError, match="configure\\(\\) got unknown option 'durabilty'"):
        otel_audit.configure(ledger="x.db", durabilty="sync")


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    from otel_audit.proof.keys import generate_keypair

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    monkeypatch.setenv("OTEL_AUDIT_LEDGER", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("OTEL_AUDIT_DURABILITY", "async")
    monkeypatch.setenv("OTEL_AUDIT_SIGNING_KEY", str(tmp_path / "k.key"))
    provider = TracerProvider(shutdown_on_exit=False)
    pipeline = otel_audit.configure(
        service_name="envsvc", tracer_provider=provider, handle_sigterm=False
    )
    assert pipeline.processor.durability == "async"
    with otel_audit.audit_action("a.b"):
        pass
    pipeline.shutdown()
    from otel_audit.proof.keys import load_public_key

    with open_ledger(str(tmp_path / "env.db"), readonly=True) as ledger:
        report = verify_ledger(ledger, load_public_key(tmp_path / "k.pub"))
    assert report.records == 1 and report.chains[0].signatures_checked == 1


def _hold_write_lock(db: str, release: threading.Event, held: threading.Event) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    held.set()
    release.wait(30)
    con.execute("ROLLBACK")
    con.close()


def test_fail_closed_when_the_ledger_cannot_be_written(make_pipeline, tmp_path):
    db = tmp_path / "locked.db"
    pipeline, _, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=100")
    pipeline.writer.probe_interval = 0.3
    with otel_audit.audit_action("before.lock"):
        pass
    release, held = threading.Event(), threading.Event()
    locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
    locker.start()
    assert held.wait(10)
    ran = []
    try:
        with pytest.raises(LedgerWriteError, match="database is locked"):
            with otel_audit.audit_action("during.lock"):
                ran.append("body")
        # The ledger just failed: the next audited action refuses to start at all.
        with pytest.raises(LedgerUnavailable, match="is unavailable"):
            with otel_audit.audit_action("refused"):
                ran.append("refused body")
        assert ran == ["body"]
        assert pipeline.stats().failed == 1 and not pipeline.stats().healthy
    finally:
        release.set()
        locker.join()
    # After the probe interval an action is let through; its commit heals the writer.
    deadline = __import__("time").monotonic() + 10
    while True:
        try:
            with otel_audit.audit_action("after.lock"):
                pass
            break
        except LedgerUnavailable:
            assert __import__("time").monotonic() < deadline
            threading.Event().wait(0.05)
    assert pipeline.stats().healthy
    pipeline.flush()
    with open_ledger(str(db), readonly=True) as ledger:
        names = [r.record.name for r in ledger.query(Query())]
        verify_ledger(ledger)
    # The failed action is not in the ledger: the application was told it failed.
    assert names == ["before.lock", "after.lock"]


def test_async_records_survive_a_ledger_outage(make_pipeline, tmp_path):
    db = tmp_path / "locked.db"
    pipeline, _, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50", durability="async")
    release, held = threading.Event(), threading.Event()
    open_ledger(str(db)).close()
    locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
    locker.start()
    assert held.wait(10)
    for i in range(20):
        with otel_audit.audit_action("queued.during.outage", resource=("n", i)):
            pass
    deadline = __import__("time").monotonic() + 10
    while pipeline.stats().retries == 0:
        assert __import__("time").monotonic() < deadline
        threading.Event().wait(0.02)
    release.set()
    locker.join()
    assert pipeline.flush(30)
    with open_ledger(str(db), readonly=True) as ledger:
        assert ledger.count() == 20
        verify_ledger(ledger)
    assert pipeline.stats().failed == 0


def test_host_span_end_never_raises_when_the_ledger_fails(make_pipeline, tmp_path):
    from opentelemetry import context as ctx_api
    from opentelemetry import trace

    from otel_audit.capture.context import with_trail

    db = tmp_path / "locked.db"
    pipeline, provider, exporter = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    release, held = threading.Event(), threading.Event()
    locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
    locker.start()
    assert held.wait(10)
    token = ctx_api.attach(with_trail("t1"))
    try:
        # An instrumented outbound call inside a trail is an audited effect; its
        # record cannot be written, yet end() returns normally into the app.
        with provider.get_tracer("app").start_as_current_span(
            "POST x", kind=trace.SpanKind.CLIENT, attributes={"http.request.method": "POST"}
        ):
            pass
    finally:
        ctx_api.detach(token)
        release.set()
        locker.join()
    assert pipeline.stats().failed == 1
    assert [s.name for s in exporter.get_finished_spans()] == ["POST x"]
    assert exporter.get_finished_spans()[0].attributes[v.TRAIL_ID] == "t1"


def test_failing_checkpoints_back_off_instead_of_spinning(make_pipeline, tmp_path, caplog):
    import time

    db = tmp_path / "locked.db"
    pipeline, _, _ = make_pipeline(
        ledger=f"sqlite:///{db}?busy_timeout=0", checkpoint_every=10**6, checkpoint_interval=0.1
    )
    with otel_audit.audit_action("before.lock"):
        pass
    release, held = threading.Event(), threading.Event()
    locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
    locker.start()
    assert held.wait(10)
    try:
        time.sleep(1.0)  # measuring a rate over a fixed window, not synchronising
        errors = pipeline.stats().checkpoint_errors
    finally:
        release.set()
        locker.join()
    # One attempt per interval (about 10 in the second), not thousands.
    assert 1 <= errors <= 30
    assert len([r for r in caplog.records if "checkpoint failed" in r.getMessage()]) == 1
    deadline = time.monotonic() + 10
    while pipeline.stats().checkpoints == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_configure_twice_on_one_provider_is_refused(make_pipeline):
    pipeline, provider, _ = make_pipeline()
    with pytest.raises(ConfigError, match="already installed on this tracer provider"):
        otel_audit.configure(ledger=pipeline.ledger_url, service_name="shop",
                             tracer_provider=provider, handle_sigterm=False)  # fmt: skip
    with otel_audit.audit_action("once"):
        pass
    pipeline.flush()
    with open_ledger(pipeline.ledger_url, readonly=True) as ledger:
        assert ledger.count() == 1


def test_a_lost_effect_record_fails_the_enclosing_action(make_pipeline, tmp_path):
    from opentelemetry import trace

    db = tmp_path / "locked.db"
    pipeline, provider, _ = make_pipeline(ledger=f"sqlite:///{db}?busy_timeout=50")
    pipeline.writer.probe_interval = 0.0
    with otel_audit.audit_action("warm.up"):
        pass
    release, held = threading.Event(), threading.Event()
    ran_after = []
    with pytest.raises(LedgerWriteError, match="database is locked"):
        with otel_audit.audit_action("order.pay"):
            locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
            locker.start()
            assert held.wait(10)
            try:
                with provider.get_tracer("app").start_as_current_span(
                    "POST bank",
                    kind=trace.SpanKind.CLIENT,
                    attributes={"http.request.method": "POST"},
                ):
                    pass
                # The effect's record is queued (sync durability waits at the
                # action's exit); hold the lock until its commit has failed.
                deadline = time.monotonic() + 10
                while pipeline.stats().failed == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            finally:
                release.set()
                locker.join()
            ran_after.append(True)  # the app continues; the action's exit reports the loss
    assert ran_after == [True]
    pipeline.flush()
    with open_ledger(str(db), readonly=True) as ledger:
        names = [r.record.name for r in ledger.query(Query())]
    # The payment effect is missing, and the action that caused it said so:
    # to its caller (the exception) and in its own record.
    assert "POST bank" not in names
    with open_ledger(str(db), readonly=True) as ledger:
        (pay,) = [r.record for r in ledger.query(Query(action="order.pay"))]
    assert (pay.attr(v.OUTCOME), pay.attr(v.REASON)) == ("failure", "LedgerWriteError")


def test_a_sync_record_fails_promptly_while_async_records_wait_for_the_ledger(tmp_path):
    import time

    from otel_audit.engine.record import Record, encode
    from otel_audit.engine.writer import LedgerWriter

    db = tmp_path / "outage.db"
    writer = LedgerWriter(f"sqlite:///{db}?busy_timeout=50", "c")
    writer.probe_interval = 0.0
    release, held = threading.Event(), threading.Event()
    locker = threading.Thread(target=_hold_write_lock, args=(str(db), release, held))
    locker.start()
    assert held.wait(10)

    def body(n: int) -> bytes:
        return encode(Record(f"{n:032x}", f"{n:016x}", None, "x", "INTERNAL", "s", n, n + 1))

    try:
        for n in range(1, 4):
            writer.submit(body(n))  # async: kept and retried through the outage
        deadline = time.monotonic() + 10
        while writer.stats().retries == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(LedgerWriteError, match="database is locked"):
            writer.write(body(99))  # sync: told at once, not after the outage
        assert time.monotonic() - started < 5
    finally:
        release.set()
        locker.join()
    assert writer.flush(30)
    writer.shutdown()
    with open_ledger(str(db), readonly=True) as ledger:
        spans = sorted(r.record.span_id for r in ledger.query(Query()))
    assert spans == [f"{n:016x}" for n in (1, 2, 3)]
